#!/usr/bin/env bash
# The test suite: real Redis, PostgreSQL and SQLite, real Celery workers and the simulator.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/install.sh
exec .venv/bin/pytest "$@"
