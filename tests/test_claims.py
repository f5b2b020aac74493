"""Claims on real databases: concurrent claimers never take the same message twice."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from config import Settings
from tests.helpers import fill_messages
from worker.flows import polling
from worker.flows.dispatcher import claim
from worker.store.db import get_engine, utcnow
from worker.store.models import messages


def _run_claimers(work: Callable[[], list[int]], threads: int) -> list[int]:
    taken: list[int] = []
    lock = threading.Lock()

    def loop() -> None:
        while batch := work():
            with lock:
                taken.extend(batch)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return taken


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_send_claims_take_each_message_once(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    fill_messages(url, 3000, "claims")
    engine = get_engine(url)

    def work() -> list[int]:
        rows = claim(engine, "standard", utcnow(), 250, 60, uuid.uuid4().hex)
        return [r.pk for r in rows]

    taken = _run_claimers(work, threads=4)

    assert len(taken) == 3000
    assert len(set(taken)) == 3000
    with engine.connect() as conn:
        states = dict(
            conn.execute(select(messages.c.state, func.count()).group_by(messages.c.state)).all()
        )
    assert states == {"sending": 3000}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_urgent_types_are_claimed_first(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    fill_messages(url, 20, "promo", messageType="promo")
    fill_messages(url, 5, "otp")
    engine = get_engine(url)

    rows = claim(engine, "standard", utcnow(), 5, 60, "t")

    assert sorted(r.id for r in rows) == [f"otp-{i}" for i in range(5)]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_poll_claims_take_each_message_once(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    fill_messages(url, 2000, "polls")
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.execute(
            messages.update().values(
                state="submitted", next_poll_at=utcnow() - timedelta(seconds=1)
            )
        )

    taken = _run_claimers(lambda: polling.claim_due(engine, utcnow(), 100, 60), threads=4)

    assert len(taken) == len(set(taken)) == 2000
    assert polling.claim_due(engine, utcnow(), 100, 60) == []  # leased, not due again yet


def test_a_poll_task_rereads_its_rows_only_when_its_claim_could_run_out() -> None:
    now = utcnow()
    assert not polling.needs_fresh_lease(polling.lease_end(now, 120), now, 120)
    assert not polling.needs_fresh_lease(now + timedelta(seconds=108), now, 120)
    assert polling.needs_fresh_lease(now + timedelta(seconds=107), now, 120)
    assert polling.needs_fresh_lease(now - timedelta(seconds=5), now, 120)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_fresh_poll_task_reads_its_rows_and_a_late_one_leases_them_again(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    fill_messages(url, 20, "take")
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.execute(
            messages.update().values(state="submitted", next_poll_at=utcnow() - timedelta(hours=1))
        )

    def marks() -> set[object]:
        with engine.connect() as conn:
            return set(conn.execute(select(messages.c.next_poll_at)).scalars())

    fresh_at = utcnow()
    fresh = polling.claim_due(engine, fresh_at, 10, 60)
    assert len(fresh) == 10  # else the comparisons below hold for nothing taken
    taken = polling.take(engine, fresh, polling.lease_end(fresh_at, 60), 60)
    assert sorted(r.pk for r in taken) == sorted(fresh)
    assert polling.lease_end(fresh_at, 60) in marks()  # read, not written

    late_at = utcnow() - timedelta(seconds=30)  # sat in the queue for half its lease
    late = polling.claim_due(engine, late_at, 10, 60)
    assert len(late) == 10 and not set(late) & set(fresh)  # the other ten, still due
    before = utcnow()
    retaken = polling.take(engine, late, polling.lease_end(late_at, 60), 60)
    assert sorted(r.pk for r in retaken) == sorted(late)
    with engine.connect() as conn:
        leased = list(
            conn.execute(select(messages.c.next_poll_at).where(messages.c.pk.in_(late))).scalars()
        )
    assert len(leased) == 10
    assert all(mark >= polling.lease_end(before, 60) for mark in leased)  # afresh from now


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sending_is_behind_while_a_full_batch_is_ready_and_sending_is_free(
    backend: str, database_factory: Callable[[str], str], redis_db: str
) -> None:
    from types import SimpleNamespace

    from worker.flows.dispatcher import THROTTLE
    from worker.store.pacing import PREFIX, Pacing
    from worker.tasks import sending_behind

    url = database_factory(backend)
    engine = get_engine(url)
    pacing = Pacing(redis_db)

    def behind(**overrides: Any) -> bool:
        settings = Settings(DATABASE_URL=url, SEND_BATCH_MAX=100, **overrides)  # type: ignore[call-arg]
        return sending_behind(SimpleNamespace(engine=engine, settings=settings, pacing=pacing))  # type: ignore[arg-type]

    fill_messages(url, 99, "almost")
    assert not behind()
    fill_messages(url, 1, "full")
    assert behind()
    # Held to a rate, or paused by the provider: a backlog is expected, checks cost nothing.
    assert not behind(SEND_MESSAGES_PER_SECOND=500)
    pacing.pause(THROTTLE, 30)
    assert not behind()
    redis.Redis.from_url(redis_db).delete(PREFIX + THROTTLE)
    assert behind()
    claim(engine, "standard", utcnow(), 50, 60, uuid.uuid4().hex)
    assert not behind()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_full_poll_batch_starts_no_next_one_while_a_full_send_batch_waits(
    backend: str, database_factory: Callable[[str], str], redis_db: str
) -> None:
    """The chain after a full poll batch stands aside while sends wait (in the bench it took
    half the workers beside the sends of 1,000,000); the sweep's trickle goes on alone."""
    from types import SimpleNamespace

    from tests.helpers import mark_submitted
    from worker.store.pacing import Pacing
    from worker.tasks import hand_out_checks

    url = database_factory(backend)
    engine = get_engine(url)
    settings = Settings(DATABASE_URL=url, SEND_BATCH_MAX=100)  # type: ignore[call-arg]
    fill_messages(url, 100, "waiting")  # a full send batch, ready
    fill_messages(url, 20, "checked")
    mark_submitted(engine, {f"checked-{i}": f"pm-{i}" for i in range(20)})
    due = utcnow() - timedelta(seconds=1)
    with engine.begin() as conn:
        conn.execute(
            messages.update().where(messages.c.campaign == "checked"), {"next_poll_at": due}
        )
    res = SimpleNamespace(engine=engine, settings=settings, pacing=Pacing(redis_db))

    assert hand_out_checks(res, most=1) == 0  # type: ignore[arg-type]
    with engine.connect() as conn:  # nothing claimed: every check still due as it was
        marks = conn.execute(
            select(messages.c.next_poll_at).where(messages.c.campaign == "checked")
        ).scalars()
        assert {mark.replace(microsecond=0) for mark in marks} == {due.replace(microsecond=0)}


def test_the_poll_room_counts_poll_tasks_not_the_report_ticks_beside_them(redis_db: str) -> None:
    """`cascade-poll` also carries `cascade.apply_reports`: counted as a poll task, its tick
    took the room of one (with POLL_MAX_QUEUED_TASKS=1 and the two ticks in step, no sweep
    found room for 70-110 s while 100 checks were due)."""
    import redis

    from worker.celery import POLL_QUEUE, app
    from worker.tasks import POLL_BATCH, waiting

    client = redis.Redis.from_url(redis_db)
    with app.connection_for_write(redis_db) as conn:  # real messages, as Celery writes them
        app.send_task("cascade.apply_reports", queue=POLL_QUEUE, connection=conn)
        assert waiting(client, POLL_QUEUE, POLL_BATCH) == 0
        for _ in range(2):
            app.send_task(POLL_BATCH, ([1, 2, 3], "2026-12-07T22:00:00"), connection=conn)
        app.send_task("cascade.apply_reports", queue=POLL_QUEUE, connection=conn)

    assert client.llen(POLL_QUEUE) == 4
    assert waiting(client, POLL_QUEUE, POLL_BATCH) == 2
    assert waiting(client, POLL_QUEUE, "cascade.apply_reports") == 2
    assert waiting(client, "cascade-nothing", POLL_BATCH) == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_outcomes_are_written_only_to_rows_that_still_carry_the_claim(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    from worker.flows.dispatcher import Retry, Submitted, record
    from worker.store.models import events

    url = database_factory(backend)
    engine = get_engine(url)
    settings = Settings(DATABASE_URL=url)  # type: ignore[call-arg]
    fill_messages(url, 6, "held")
    token = uuid.uuid4().hex
    rows = claim(engine, "standard", utcnow(), 10, 60, token)
    pks = sorted(r.pk for r in rows)
    with engine.begin() as conn:  # the sweeper took two over after a lease ran out
        conn.execute(
            messages.update()
            .where(messages.c.pk.in_([pks[0], pks[3]]))
            .values(claim_token=uuid.uuid4().hex)
        )
    outcomes = [Submitted(pk, f"pm-{pk}") for pk in pks[:3]]
    outcomes += [Retry(pk, "HTTP 500", True) for pk in pks[3:]]

    counts = record(engine, token, outcomes, {r.pk: r for r in rows}, settings)

    assert counts == {"submitted": 2, "queued": 2, "lost_claim": 2}
    with engine.connect() as conn:
        stored = {
            r.pk: (r.state, r.provider_message_id, r.attempts)
            for r in conn.execute(select(messages).order_by(messages.c.pk))
        }
        journal = sorted(conn.execute(select(events.c.message_pk, events.c.to_state)))
    assert stored == {
        pks[0]: ("sending", None, 0),
        pks[1]: ("submitted", f"pm-{pks[1]}", 0),
        pks[2]: ("submitted", f"pm-{pks[2]}", 0),
        pks[3]: ("sending", None, 0),
        pks[4]: ("queued", None, 1),
        pks[5]: ("queued", None, 1),
    }
    assert journal == [
        (pks[1], "submitted"),
        (pks[2], "submitted"),
        (pks[4], "queued"),
        (pks[5], "queued"),
    ]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_claim_of_explorers_takes_them_ahead_of_older_due_checks(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    fill_messages(url, 300, "explore")
    engine = get_engine(url)
    now = utcnow()
    with engine.begin() as conn:  # all due, the lowest keys longest
        for pk in range(1, 301):
            conn.execute(
                messages.update()
                .where(messages.c.pk == pk)
                .values(state="submitted", next_poll_at=now - timedelta(seconds=400 - pk))
            )

    explorers = polling.claim_due(engine, now, 50, 60, explorers_of=100)
    oldest = polling.claim_due(engine, now, 5, 60)
    # A poll task's batch: the due explorers, filled up with the oldest due.
    batch = polling.claim_batch(engine, now, 6, 60, explorers_of=70)
    none_explore = polling.claim_batch(engine, now, 3, 60, explorers_of=0)

    assert sorted(explorers) == [100, 200, 300]
    assert oldest == [1, 2, 3, 4, 5]
    assert batch == [70, 140, 210, 280, 6, 7]
    assert none_explore == [8, 9, 10]
