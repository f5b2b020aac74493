"""State that outlives a process: the database engine, tables and migrations, and the pacing
keys in Redis."""
