"""The benchmark runs end to end (tiny N); its figures are for reading, not asserting."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_prints_the_three_columns(redis_db: str) -> None:
    args = (
        "--n 300 --naive-n 20 --db sqlite --delay-min 0.5 --delay-max 1 --naive-timeout 120"
        " --check-n 40 --skip intake --scale 600"  # the intake column has its own test below
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), *args.split(), "--broker", redis_db],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "POLL_FIRST_DELAY_SECONDS": "1"},  # deliveries take ≤ 1 s here
    )

    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout
    for row in ("enqueue rate", "send throughput", "launch to all-final", "status polls"):
        assert row in table
    assert "ours (n=300)" in table and "naive (n=20)" in table and "floor (n=300)" in table
    assert "ours + webhooks (n=300)" in table and "ours, overlapped (n=300)" in table
    assert "end to end (msg/s)" in table and "end to end ours, overlapped / floor:" in table
    assert "status checks at launch, ours: fixed schedule (0 latencies known)" in table
    costs = table.split("status check cost:")[1]
    assert "httpx HTTPTransport" in costs and "worker/provider/keepalive.py" in costs
    assert "status_all, 16 at once" in costs
    assert costs.count("µs of CPU per check") == 5
    assert "send throughput ours / naive:" in table and "send throughput ours / floor:" in table
    assert "ours, at scale (n=600)" in table and "floor, at scale (n=600)" in table
    assert "send throughput ours at 600 / at 300:" in table
    assert "send throughput floor at 600 / at 300:" in table
    each = next(line for line in table.splitlines() if line.startswith("peak RSS of each"))
    assert len(each.split(":")[1].split(",")) >= 2  # every worker process, not just the largest


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (scripts/test.sh)")
def test_bench_runs_the_webhook_intake_column(redis_db: str) -> None:
    args = "--db sqlite --skip ours --skip naive --skip floor --skip webhooks"
    args += " --intake-runs 1 --intake-seconds 1 --intake-rate 200"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), *args.split(), "--broker", redis_db],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    for row in ("pushes/s (answered 200)", "receipt to applied p99", "BulkGate reports/s"):
        assert row in done.stdout
    assert "intake, 1 API" in done.stdout and "intake run 1:" in done.stdout


def test_the_intake_bench_prints_each_way_in() -> None:
    args = ["--n", "200", "--runs", "1", "--db", "sqlite"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "enqueue_bench.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    for way in ("one call", "chunks of 10,000", "csv launch"):
        assert re.search(rf"^{way}: median [\d,]+ msg/s .*µs/msg$", done.stdout, re.M), way
