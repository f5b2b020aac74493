"""A campaign through every provider fault at once, with the workers SIGKILLed mid-isolation.

The adversary's two findings, composed: refused numbers (a whole-batch 400 that names
no index, as SMSBAT's does) amid a 429 every fourth request, 5xx at first and at random,
a provider outage, timeouts after the request was written, and every worker killed while
an isolation part is in flight. Each fault alone is tested elsewhere.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable

import pytest
from sqlalchemy import select

from tests.conftest import make_messages, make_stack
from worker.dev.stack import Simulator
from worker.store.models import messages

MESSAGES = 1200
REFUSED = 3
LEVELS = math.ceil(math.log2(1000))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_every_fault_at_once_loses_nothing_and_isolates_within_the_bound(
    backend: str, database_factory: Callable[[str], str], campaign: str
) -> None:
    env = {"SEND_LEASE_SECONDS": "6", "SEND_MAX_UNKNOWN_OUTCOMES": "5"}
    batch = make_messages(MESSAGES, campaign)
    refused = [batch[i]["toPhone"] for i in (17, 640, 1111)]
    with make_stack(database_factory(backend), backend, env, processes=2) as stack:
        sim = stack.simulator
        sim.configure(
            seed=11,
            reject_phones=refused,
            refusal_hints=False,
            throttle_every=4,
            retry_after="1",
            fail_next_sends=3,
            error_rate=0.05,
            hang_rate=0.02,
            hang_seconds=3.0,  # past HTTP_READ_TIMEOUT_SECONDS=2: an unknown outcome
        )
        stack.enqueue(batch, campaign)

        # Kill every worker while an isolation part is claimed, then start one afresh.
        deadline = time.monotonic() + 60
        while not _part_in_flight(stack.engine, campaign):
            assert time.monotonic() < deadline, "no isolation part was ever in flight"
            time.sleep(0.02)
        for process in stack.workers.processes:
            process.stop(signal.SIGKILL)
        stack.workers.processes.clear()
        stack.workers.start("w-after-kill", beat=True)
        # Then the provider goes down while the new worker isolates: wait until it has met
        # the outage, whatever the machine's load made of its start-up.
        sent = _sends(sim)
        _wait(lambda: _sends(sim) > sent, "the new worker never sent")
        sim.configure(outage_seconds=15)
        _wait(lambda: int(sim.stats()["send_status"].get("503", 0)) > 0, "no send met the outage")

        report = stack.wait_final(campaign, MESSAGES, timeout=240)
        codes = sim.stats()["send_status"]
        with stack.engine.connect() as conn:
            rows = list(conn.execute(select(messages).where(messages.c.campaign == campaign)))

    assert report["final"] == MESSAGES
    rejected = {r.to_phone for r in rows if r.state == "rejected"}
    assert rejected == set(refused)
    assert {r.error_code for r in rows if r.state == "rejected"} == {"INVALID_PHONE"}
    for row in rows:
        if row.to_phone in refused:
            continue
        assert row.state in ("delivered", "undeliverable", "permanenterror") or (
            row.state == "failed"
            and row.error_code == "UNKNOWN_OUTCOME"
            and row.unknown_outcomes >= 5
        ), (row.id, row.state, row.error_code, row.error_message)
    # Halving with no hint: one refused request per level per refused number, plus a part
    # whose 400 was answered but not recorded when the workers died.
    assert 0 < int(codes["400"]) <= REFUSED * (LEVELS + 1) + 1, codes
    assert int(codes.get("429", 0)) > 0 and int(codes.get("503", 0)) > 0, codes


def _sends(sim: Simulator) -> int:
    return int(sim.stats()["send_requests"])


def _wait(done: Callable[[], bool], why: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def _part_in_flight(engine: object, campaign: str) -> bool:
    with engine.connect() as conn:  # type: ignore[attr-defined]
        found = conn.execute(
            select(messages.c.pk)
            .where(
                messages.c.campaign == campaign,
                messages.c.state == "sending",
                messages.c.isolation.is_not(None),
            )
            .limit(1)
        ).first()
    return found is not None
