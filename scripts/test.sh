#!/usr/bin/env bash
# The test suite: real Redis, PostgreSQL and SQLite, real Celery workers and the simulator.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/install.sh
# tests/test_metrics.py runs `promtool check rules` and `promtool test rules` (Debian's
# prometheus package); without it only the alert rules' schema test runs.
if ! command -v promtool >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
        || echo "promtool could not be installed: the alert rules get the schema test only" >&2
fi
# Types and layers first: strict mypy for worker/ and config/ (pyproject.toml [tool.mypy]),
# then the import contracts (.importlinter); either failing fails the run before the suite.
.venv/bin/mypy
.venv/bin/lint-imports
# tests/test_live_page.py renders the live campaign page in headless Chromium (Debian's
# chromium package); without it that one test is skipped.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null \
        || echo "chromium could not be installed: the live page's browser test is skipped" >&2
fi
# tests/test_bench.py drives the webhook intake column with Debian's wrk (skipped without it).
if ! command -v wrk >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get install -y -qq --no-install-recommends wrk >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk >/dev/null; }; } \
        || echo "wrk could not be installed: the bench's webhook intake column is skipped" >&2
fi
exec .venv/bin/pytest "$@"
