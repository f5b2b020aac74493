#!/usr/bin/env bash
# Create .venv and install the worker with its development tools (idempotent), at the
# versions pinned in requirements-dev.lock (README: Dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -qq --disable-pip-version-check -r requirements-dev.lock
.venv/bin/python -m pip install -qq --disable-pip-version-check --no-deps -e .
