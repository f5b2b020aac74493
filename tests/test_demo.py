"""The README's first Quick start command: a demo campaign end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_campaign_runs_to_all_final(tmp_path: Path, redis_db: str) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}",
        "BROKER_URL": redis_db,
    }
    done = subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", "demo", "--messages", "150", "--campaign", "qs"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "150 of 150 messages accepted" in done.stdout
    assert "delivery rate" in done.stdout
    report = subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", "campaign", "report", "qs", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert '"all_final": true' in report.stdout
