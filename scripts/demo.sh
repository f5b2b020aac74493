#!/usr/bin/env bash
# A demo campaign end to end against the bundled simulator (SQLite by default).
set -euo pipefail
cd "$(dirname "$0")/.."
CASCADE_NEEDS_REDIS=1 CASCADE_NEEDS_POSTGRES=0 CASCADE_NEEDS_COMPOSE=0 bash scripts/services.sh
bash scripts/install.sh
exec .venv/bin/cascade demo "$@"
