"""Pure rules: states, status decisions, backoff, send policy, validation, redaction, signing,
estimates and the consent and send-window parsers. No I/O: nothing here imports a database, a
broker or an HTTP client (an import-linter contract checks it)."""
