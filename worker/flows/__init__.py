"""What the worker does with messages: intake, sends, status checks, pushed reports, callbacks,
sweeps, campaigns and consent. Celery tasks (worker/tasks.py) call these plain functions."""
