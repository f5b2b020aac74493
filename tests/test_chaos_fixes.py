"""Regression tests for what the chaos runs (scripts/chaos.py) found, each on real parts."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import httpx
import pytest
from sqlalchemy import select, update

from config import Settings
from tests.conftest import make_messages
from tests.helpers import KEY, SEND, batch, running_simulator
from worker.core.states import State
from worker.dev.simulator import SimulatorConfig
from worker.flows import polling
from worker.flows.polling import check_all
from worker.flows.producer import enqueue
from worker.provider.smsbat import StatusClient
from worker.store.db import get_engine, utcnow
from worker.store.models import messages
from worker.store.pacing import Pacing


class SlowStart(httpx.HTTPTransport):
    """A real transport whose requests leave late, like a slow connect on a loaded host."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        time.sleep(0.3)
        return super().handle_request(request)


def test_a_poll_is_timed_no_earlier_than_the_provider_saw_it(redis_db: str) -> None:
    """Found at a 0.92 s gap: the next poll was scheduled from when the request was *started*;
    a request that sat 80 ms before it reached the provider let the next one in under 1 s."""
    config = SimulatorConfig(delay_min=0, delay_max=0, mix={"delivered": 1.0})
    with running_simulator(config) as sim:
        message_id = sim.post(SEND, json=batch(1), headers=KEY).json()[0]["messageId"]
        settings = Settings(
            SMSBAT_API_KEY="test-key",
            SMSBAT_BASE_URL=str(sim.base_url),
            BROKER_URL=redis_db,
            DATABASE_URL="sqlite://",
        )  # type: ignore[call-arg]
        client = StatusClient(settings, transport=SlowStart())
        with ThreadPoolExecutor(2) as threads:
            results = check_all(client, Pacing(redis_db), settings, [message_id], threads, 30)
        seen_at = next(r["t"] for r in sim.get("/_sim/requests").json() if r["kind"] == "status")

    polled_at, answer = results[message_id]
    assert getattr(answer, "deliverystatus", None) == "delivered"
    assert polled_at >= datetime.fromtimestamp(seen_at, polled_at.tzinfo)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_poll_task_whose_claim_was_taken_over_polls_nothing(
    backend: str, database_factory: Callable[[str], str], redis_db: str
) -> None:
    """Found as a 0.37 s gap: a poll task waited in the queue past its claim's lease, the
    rows were claimed again into a second task, and both polled them. The late task also
    rescheduled rows it never checked, ending the other task's lease early."""
    url = database_factory(backend)
    with running_simulator(SimulatorConfig(delay_min=60, delay_max=60)) as sim:
        message_id = sim.post(SEND, json=batch(1), headers=KEY).json()[0]["messageId"]
        settings = Settings(
            SMSBAT_API_KEY="test-key",
            SMSBAT_BASE_URL=str(sim.base_url),
            BROKER_URL=redis_db,
            DATABASE_URL=url,
            POLL_LEASE_SECONDS=30,
        )  # type: ignore[call-arg]
        engine = get_engine(url)
        enqueue(make_messages(1, "late"), "late", settings=settings, kick=False)
        with engine.begin() as conn:
            conn.execute(
                update(messages).values(
                    state=State.SUBMITTED,
                    provider_message_id=message_id,
                    next_poll_at=utcnow() - timedelta(seconds=120),
                )
            )
        pacing, client = Pacing(redis_db), StatusClient(settings)

        first_at = utcnow() - timedelta(seconds=60)  # a claim whose lease ran out
        stale = polling.claim_due(engine, first_at, 10, 1)
        second_at = utcnow()
        fresh = polling.claim_due(engine, second_at, 10, 30)
        assert stale == fresh  # the same row, claimed twice
        threads = ThreadPoolExecutor(2)
        late = polling.poll_batch(
            engine, client, pacing, settings, stale, threads, claimed=polling.lease_end(first_at, 1)
        )
        polls_after_late = sim.get("/_sim/stats").json()["status_requests"]
        with engine.connect() as conn:
            lease = conn.execute(select(messages.c.next_poll_at)).scalar_one()
        current = polling.poll_batch(
            engine,
            client,
            pacing,
            settings,
            fresh,
            threads,
            claimed=polling.lease_end(second_at, 30),
        )
        threads.shutdown()
        polls_after_current = sim.get("/_sim/stats").json()["status_requests"]

    assert (late.checked, late.skipped, polls_after_late) == (0, 1, 0)
    assert lease == polling.lease_end(second_at, 30)  # the second claim's lease untouched
    assert (current.checked, polls_after_current) == (1, 1)


def test_a_poll_task_is_stopped_before_its_lease_runs_out() -> None:
    """Found at 0.18 s gaps: a poll task took 11.6 s under an 8 s lease (200 checks at once
    on two loaded cores); the rows were claimed again and polled twice. The task's time
    limit now ends it before its lease does, as for send batches."""
    from worker.celery import create_app

    settings = Settings(POLL_LEASE_SECONDS=8, DATABASE_URL="sqlite://")  # type: ignore[call-arg]
    limits = create_app(settings).conf.task_annotations["cascade.poll_batch"]
    assert limits["soft_time_limit"] < limits["time_limit"] < settings.poll_lease_seconds


def test_a_slow_provider_costs_the_checks_not_started_never_the_answers_in_hand(
    redis_db: str,
) -> None:
    """Found in review: a provider slow enough to run a poll task into its time limit lost
    every answer already received. Checks now stop at a budget; what came back is kept."""
    with running_simulator(SimulatorConfig(delay_min=0, delay_max=0, latency_ms=400)) as sim:
        ids = [a["messageId"] for a in sim.post(SEND, json=batch(8), headers=KEY).json()]
        settings = Settings(
            SMSBAT_API_KEY="test-key",
            SMSBAT_BASE_URL=str(sim.base_url),
            BROKER_URL=redis_db,
            DATABASE_URL="sqlite://",
            POLL_CONCURRENCY=2,
        )  # type: ignore[call-arg]
        with ThreadPoolExecutor(2) as threads:
            started = time.monotonic()
            results = check_all(
                StatusClient(settings), Pacing(redis_db), settings, ids, threads, 1.0
            )
            took = time.monotonic() - started

    answered = [m for m, (_, a) in results.items() if getattr(a, "deliverystatus", None)]
    assert 2 <= len(answered) < len(ids)  # two at a time, 0.4 s a check, 1 s budget
    assert len(results) < len(ids)  # the checks never started are not in the results
    assert took < 2.0


def test_a_429_stops_the_checks_not_started(redis_db: str) -> None:
    """The simulator throttles from the first check: of 50 ids on 4 threads, only the checks
    already under way when the 429 came back are made, not the other 46-odd."""
    config = SimulatorConfig(delay_min=0, delay_max=0, status_throttle_next=1000)
    with running_simulator(config) as sim:
        ids = [a["messageId"] for a in sim.post(SEND, json=batch(50), headers=KEY).json()]
        settings = Settings(
            SMSBAT_API_KEY="test-key",
            SMSBAT_BASE_URL=str(sim.base_url),
            BROKER_URL=redis_db,
            DATABASE_URL="sqlite://",
            POLL_CONCURRENCY=4,
        )  # type: ignore[call-arg]
        with ThreadPoolExecutor(4) as threads:
            results = check_all(StatusClient(settings), Pacing(redis_db), settings, ids, threads, 5)
        made = sim.get("/_sim/stats").json()["status_requests"]
    assert 1 <= len(results) <= 4 and made == len(results)
    assert all(type(answer).__name__ == "Throttled" for _, answer in results.values())
