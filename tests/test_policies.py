"""Policies that need their own worker settings, each on a stack of its own (SQLite)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import select

from tests.conftest import Stack, make_messages, make_stack
from worker.store.models import messages


def _rows(stack: Stack, campaign: str) -> list:
    with stack.engine.connect() as conn:
        return list(conn.execute(select(messages).where(messages.c.campaign == campaign)))


@pytest.fixture(scope="module")
def failing_stack(database_factory: Callable[[str], str]) -> Iterator[Stack]:
    env = {"SEND_UNKNOWN_OUTCOME": "fail", "SEND_RETRY_FOR_SECONDS": "6"}
    with make_stack(database_factory("sqlite"), "sqlite", env) as built:
        yield built


def test_fail_policy_never_resends_an_unknown_outcome(failing_stack: Stack, campaign) -> None:
    sim = failing_stack.simulator
    sim.configure(hang_next_sends=1, hang_seconds=3.5)

    failing_stack.enqueue(make_messages(40, campaign), campaign)
    report = failing_stack.wait_final(campaign, 40)

    assert report["states"] == {"failed": 40}
    assert report["unknown_outcomes"] == 40
    rows = _rows(failing_stack, campaign)
    assert {(r.error_code, r.unknown_outcomes) for r in rows} == {("UNKNOWN_OUTCOME", 1)}
    at_provider = sim.admin("/_sim/messages")
    assert all(at_provider[r.id]["sends"] == 1 for r in rows)


def test_a_provider_down_past_the_send_deadline_fails_with_few_requests(
    failing_stack: Stack, campaign
) -> None:
    """An outage opens the circuit: a few probes, not a request per message per attempt;
    the messages fail only when their deadline passes, saying why."""
    sim = failing_stack.simulator
    sim.configure(hang_next_sends=0, fail_next_sends=1000)
    before = sim.stats()["send_requests"]
    try:
        failing_stack.enqueue(make_messages(10, campaign), campaign)
        report = failing_stack.wait_final(campaign, 10, timeout=60)
    finally:
        sim.configure(fail_next_sends=0)

    assert report["states"] == {"failed": 10}
    rows = _rows(failing_stack, campaign)
    assert {r.error_code for r in rows} == {"SEND_DEADLINE"}
    # 3 failures open the circuit (CIRCUIT_OPEN_SECONDS=2), then one probe a period.
    assert sim.stats()["send_requests"] - before <= 3 + 6


def test_global_send_rate_holds_across_worker_processes(
    database_factory: Callable[[str], str], campaign: str
) -> None:
    env = {
        "SEND_REQUESTS_PER_SECOND": "2",
        "SEND_BATCH_MAX": "5",
        "SEND_BATCH_MIN": "1",
        "SMSBAT_STATUS_AUTH": "basic_key",  # status checks as HTTP Basic "@:<api key>"
    }
    with make_stack(database_factory("sqlite"), "sqlite", env, processes=2) as stack:
        stack.enqueue(make_messages(40, campaign), campaign)
        stack.wait_final(campaign, 40)
        sends = [r["t"] for r in stack.simulator.admin("/_sim/requests") if r["kind"] == "send"]
        status_codes = stack.simulator.stats()["status_by_code"]

    assert len(sends) >= 8
    busiest = max(sum(1 for t in sends if start <= t < start + 1) for start in sends)
    assert busiest <= 2 * 2  # the sliding window counter admits at most a 2x edge burst
    assert (len(sends) - 2) / (sends[-1] - sends[0]) <= 2 * 1.1
    assert status_codes["401"] == 0 and status_codes["200"] >= 40


def test_a_worker_killed_mid_send_is_taken_over(
    database_factory: Callable[[str], str], campaign: str
) -> None:
    env = {
        "SEND_LEASE_SECONDS": "4",
        "HTTP_READ_TIMEOUT_SECONDS": "30",
        "SMSBAT_STATUS_AUTH": "basic",  # status checks as HTTP Basic user:password
        "SMSBAT_USERNAME": "user",
        "SMSBAT_PASSWORD": "pass",
    }
    with make_stack(database_factory("sqlite"), "sqlite", env) as stack:
        stack.simulator.configure(hang_next_sends=1, hang_seconds=8)
        stack.enqueue(make_messages(30, campaign), campaign)
        deadline = time.monotonic() + 20
        while stack.simulator.stats()["messages_accepted"] < 30:
            assert time.monotonic() < deadline, "the first send never arrived"
            time.sleep(0.05)
        stack.workers.processes[0].stop(signal.SIGKILL)  # mid-HTTP: the answer is lost
        stack.workers.start("w-replacement")

        report = stack.wait_final(campaign, 30, timeout=90)
        at_provider = stack.simulator.admin("/_sim/messages")

    assert report["total"] == 30 and report["unknown_outcomes"] == 30
    assert report["states"].keys() <= {"delivered", "undeliverable", "permanenterror"}
    rows = _rows(stack, campaign)
    assert all(at_provider[r.id]["sends"] == 2 for r in rows)
    assert all(r.provider_message_id == at_provider[r.id]["messageIds"][-1] for r in rows)
