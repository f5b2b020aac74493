"""scripts/chaos.py, reduced: a short campaign under every fault, judged by its own figures.

Each run starts its own PostgreSQL cluster, redis-server, simulator and two workers, so it
shares nothing with other tests. The invariants are the script's; the test also checks that
the faults it claims were injected really reached the pipeline (duplicates to reconcile,
answers lost, kills), so a run that silently skipped them cannot pass.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_chaos(*options: str, timeout: float = 150) -> dict[str, Any]:
    command = [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--json", *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.stdout.strip(), f"no figures (exit {done.returncode}):\n{done.stderr[-3000:]}"
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == (0 if figures["ok"] else 1)
    return figures


def assert_invariants(figures: dict[str, Any], n: int) -> None:
    assert figures["failures"] == [], figures
    assert figures["accepted"] == n
    assert figures["lost"] == 0
    assert sum(figures["states"].values()) == n
    assert set(figures["states"]) <= {
        "delivered",
        "undeliverable",
        "permanenterror",
        "rejected",
    }
    assert figures["states"]["rejected"] == figures["refused_numbers"] > 0
    assert figures["rejected_not_refused"] == figures["refused_not_rejected"] == 0
    assert figures["send_400s"] > 0
    assert figures["duplicates_without_unknown_outcome"] == 0
    assert figures["answers_lost_not_recorded_unknown"] == 0
    assert figures["polls_after_final_unexplained"] == 0
    assert figures["polls_within_1s"] == 0
    assert figures["journal_moves_not_allowed"] == {}
    # The faults reached the pipeline: a hung send was resent, workers died, the provider
    # failed requests; the figures above held anyway.
    assert figures["duplicate_tracking_ids"] > 0
    assert figures["faults"]["kills"] >= 1
    assert figures["simulator"]["status_by_code"]["500"] > 0
    assert figures["simulator"]["connection_resets"] > 0


def test_a_short_chaos_campaign_on_postgresql_loses_nothing() -> None:
    figures = run_chaos("--n", "2000", "--duration", "10", "--kill-every", "4", "--seed", "1")

    assert_invariants(figures, 2000)
    assert {"redis restart", "redis flushall", "postgres restart", "provider outage"} <= set(
        figures["faults"]["one_off"]
    )


@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed")
def test_a_worker_host_cut_off_mid_run_is_taken_over() -> None:
    figures = run_chaos(
        "--mode", "netns", "--n", "1000", "--duration", "9", "--kill-every", "5", "--seed", "2"
    )

    assert_invariants(figures, 1000)
    assert "host cut off" in figures["faults"]["one_off"]
