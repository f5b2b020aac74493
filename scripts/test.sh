#!/usr/bin/env bash
# The test suite: real Redis, PostgreSQL and SQLite, real Celery workers and the simulator.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/install.sh
# tests/test_compose.py validates docker-compose.yml with Debian's docker-compose.
if ! command -v docker-compose >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi
exec .venv/bin/pytest "$@"
