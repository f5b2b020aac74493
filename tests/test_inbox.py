"""Stored provider reports applied forward-only, parking, orphans, inbound SMS: real databases."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from config import Settings
from tests.helpers import event_history, fill_messages, mark_submitted, stored_message
from worker.core.states import FINAL, State
from worker.core.statuses import Report, apply
from worker.flows import inbox
from worker.flows.dispatcher import claim
from worker.flows.inbox import apply_pending, list_inbound, store_inbound, store_reports
from worker.provider.dlr import Inbound
from worker.store.db import get_engine, utcnow
from worker.store.models import events, inbound_messages, messages, provider_reports

BACKENDS = pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
PHONE = "+380670000001"  # make_messages numbers phones +38067{n:07d}


def _settings(url: str, **extra: Any) -> Settings:
    return Settings(DATABASE_URL=url, **extra)  # type: ignore[arg-type]


def _report(message_id: str, state: State, source: str = "webhook", **fields: Any) -> Report:
    return Report(message_id, state, source, {"deliverystatus": state.value, **fields}, f"{state}")


def _submitted(url: str, count: int, prefix: str) -> Engine:
    fill_messages(url, count, prefix)
    engine = get_engine(url)
    mark_submitted(engine, {f"{prefix}-{i}": f"pm-{prefix}-{i}" for i in range(count)})
    return engine


def _outcomes(engine: Engine) -> list[str | None]:
    with engine.connect() as conn:
        stmt = select(provider_reports.c.outcome).order_by(provider_reports.c.pk)
        return list(conn.execute(stmt).scalars())


# --- storing and applying ---------------------------------------------------------------------


@BACKENDS
def test_reports_are_stored_unprocessed_with_fields_and_detail(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    engine = get_engine(database_factory(backend))
    at = datetime(2025, 1, 1, tzinfo=UTC)

    assert store_reports(engine, [], at) == 0
    assert store_reports(engine, [_report("pm-1", State.DELIVERED, "dlr", cost=0.7)], at) == 1

    with engine.connect() as conn:
        row = conn.execute(select(provider_reports)).one()
    assert (row.received_at, row.source, row.provider_message_id, row.state) == (
        at,
        "dlr",
        "pm-1",
        "delivered",
    )
    assert row.payload == {
        "fields": {"deliverystatus": "delivered", "cost": 0.7},
        "detail": "delivered",
    }
    assert (row.processed_at, row.outcome) == (None, None)


@BACKENDS
def test_a_pushed_final_status_finishes_the_message(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = _submitted(url, 1, "push")
    store_reports(engine, [_report("pm-push-0", State.DELIVERED, cost=0.05)], utcnow())

    counts = apply_pending(engine, _settings(url))

    assert counts == {"applied": 1, "ignored": 0, "orphan": 0, "parked": 0}
    row = stored_message(engine, "push-0")
    assert (row.state, row.cost, row.deliverystatus, row.final_source) == (
        "delivered",
        0.05,
        "delivered",
        "webhook",
    )
    assert row.final_at is not None and row.next_poll_at is None
    assert event_history(engine, "push-0") == [("webhook", "submitted", "delivered", "delivered")]
    assert _outcomes(engine) == ["applied"]


@BACKENDS
def test_reports_for_one_message_apply_in_order_of_arrival(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = _submitted(url, 2, "order")
    store_reports(
        engine,
        [
            _report("pm-order-0", State.PROCESSING, "dlr"),
            _report("pm-order-1", State.DELIVERED, "dlr"),
            _report("pm-order-0", State.DELIVERED, "webhook"),
            _report("pm-order-1", State.PROCESSING, "dlr"),  # late: after final
        ],
        utcnow(),
    )

    counts = apply_pending(engine, _settings(url))

    assert (counts["applied"], counts["ignored"]) == (3, 1)
    assert [h[:3] for h in event_history(engine, "order-0")] == [
        ("dlr", "submitted", "processing"),
        ("webhook", "processing", "delivered"),
    ]
    assert [h[:3] for h in event_history(engine, "order-1")] == [("dlr", "submitted", "delivered")]
    assert _outcomes(engine) == ["applied", "applied", "applied", "ignored"]


@BACKENDS
def test_duplicates_and_replays_from_any_source_are_harmless(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = _submitted(url, 1, "dup")
    same = _report("pm-dup-0", State.UNDELIVERABLE, cost=0.0)
    store_reports(engine, [same, same, _report("pm-dup-0", State.UNDELIVERABLE, "dlr")], utcnow())
    apply_pending(engine, _settings(url))
    store_reports(engine, [same], utcnow())  # the provider retried later

    counts = apply_pending(engine, _settings(url))

    assert counts["ignored"] == 1
    assert _outcomes(engine) == ["applied", "ignored", "ignored", "ignored"]
    assert len(event_history(engine, "dup-0")) == 1
    assert stored_message(engine, "dup-0").state == "undeliverable"


@BACKENDS
def test_a_later_cost_is_stored_without_a_state_event(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = _submitted(url, 1, "cost")
    store_reports(
        engine,
        [
            _report("pm-cost-0", State.PROCESSING),
            _report("pm-cost-0", State.PROCESSING, cost=0.3),
            _report("pm-cost-0", State.PROCESSING, cost=0.3),
        ],
        utcnow(),
    )

    apply_pending(engine, _settings(url))

    assert _outcomes(engine) == ["applied", "applied", "ignored"]
    assert stored_message(engine, "cost-0").cost == 0.3
    assert len(event_history(engine, "cost-0")) == 1


@BACKENDS
@pytest.mark.parametrize("final", ["delivered", "timeout", "failed"])
def test_a_final_state_is_never_changed_by_a_report(
    backend: str, final: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = _submitted(url, 1, "fin")
    with engine.begin() as conn:
        conn.execute(update(messages).values(state=final, cost=None))
    store_reports(
        engine,
        [_report("pm-fin-0", State.UNDELIVERABLE, cost=1.0), _report("pm-fin-0", State.DELIVERED)],
        utcnow(),
    )

    apply_pending(engine, _settings(url))

    row = stored_message(engine, "fin-0")
    assert (row.state, row.cost) == (final, None)
    assert _outcomes(engine) == ["ignored", "ignored"]
    assert event_history(engine, "fin-0") == []


@BACKENDS
def test_a_stored_field_that_is_no_message_column_is_dropped(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = _submitted(url, 1, "odd")
    store_reports(engine, [_report("pm-odd-0", State.DELIVERED, nonsense=1, cost=0.1)], utcnow())

    assert apply_pending(engine, _settings(url))["applied"] == 1
    odd = stored_message(engine, "odd-0")
    assert (odd.state, odd.cost) == ("delivered", 0.1)


# --- parking and orphans ---------------------------------------------------------------------


@BACKENDS
def test_a_report_before_our_send_answer_is_parked_then_applied(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    fill_messages(url, 1, "early")
    engine = get_engine(url)
    settings = _settings(url)
    store_reports(engine, [_report("pm-early", State.DELIVERED, "dlr")], utcnow())

    assert apply_pending(engine, settings)["parked"] == 1  # still queued
    claim(engine, "standard", utcnow(), 10, 60, "token")
    assert apply_pending(engine, settings)["parked"] == 1  # sending: the answer is not in yet
    mark_submitted(engine, {"early-0": "pm-early"})

    assert apply_pending(engine, settings) == {
        "applied": 1,
        "ignored": 0,
        "orphan": 0,
        "parked": 0,
    }
    assert stored_message(engine, "early-0").state == "delivered"
    assert [h[:3] for h in event_history(engine, "early-0")] == [("dlr", "submitted", "delivered")]


@BACKENDS
def test_a_message_still_sending_never_loses_its_report(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """Even with its messageId already written, a `sending` message's report waits."""
    url = database_factory(backend)
    fill_messages(url, 1, "race")
    engine = get_engine(url)
    claim(engine, "standard", utcnow(), 10, 60, "token")
    with engine.begin() as conn:
        conn.execute(update(messages).values(provider_message_id="pm-race"))
    store_reports(engine, [_report("pm-race", State.DELIVERED)], utcnow())

    assert apply_pending(engine, _settings(url))["parked"] == 1
    assert _outcomes(engine) == [None]
    assert stored_message(engine, "race-0").state == "sending"


@BACKENDS
def test_parked_reports_become_orphans_after_the_limit(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = _submitted(url, 1, "old")
    now = utcnow()
    old = now - timedelta(seconds=120)
    store_reports(engine, [_report("pm-nobody", State.DELIVERED)], old)
    store_reports(engine, [_report("pm-old-0", State.DELIVERED)], old)  # known: applied
    store_reports(engine, [_report("pm-not-yet", State.DELIVERED)], now)

    counts = apply_pending(engine, _settings(url, REPORT_PARK_MAX_SECONDS=60))

    assert counts == {"applied": 1, "ignored": 0, "orphan": 1, "parked": 1}
    assert _outcomes(engine) == ["orphan", "applied", None]


@BACKENDS
def test_parked_reports_are_tried_again_later_the_longer_they_wait(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """A run joins only the parked reports that are due, so a pile of another sender's
    reports on the account does not cost every run a join over all of them."""
    url = database_factory(backend)
    fill_messages(url, 4, "late")
    engine = get_engine(url)
    now = utcnow()
    ages = {"pm-late-0": 1, "pm-late-1": 300, "pm-late-2": 7200, "pm-late-3": 10}  # parked (s)
    for message_id, age in ages.items():
        store_reports(engine, [_report(message_id, State.DELIVERED)], now - timedelta(seconds=age))

    assert apply_pending(engine, _settings(url))["parked"] == 4
    with engine.connect() as conn:
        retry = dict(
            conn.execute(
                select(provider_reports.c.provider_message_id, provider_reports.c.retry_at)
            ).all()
        )
    assert retry["pm-late-0"] <= utcnow()  # young: every run
    assert now + timedelta(seconds=1) < retry["pm-late-3"] <= utcnow() + timedelta(seconds=2)
    assert now + timedelta(seconds=29) < retry["pm-late-1"] <= utcnow() + timedelta(seconds=30)
    assert now + timedelta(seconds=599) < retry["pm-late-2"] <= utcnow() + timedelta(seconds=600)

    mark_submitted(engine, {f"late-{i}": f"pm-late-{i}" for i in range(4)})
    counts = apply_pending(engine, _settings(url))  # the older three are not tried: not due
    assert counts == {"applied": 1, "ignored": 0, "orphan": 0, "parked": 0}
    assert stored_message(engine, "late-1").state == "submitted"
    with engine.begin() as conn:  # their time comes
        conn.execute(update(provider_reports).values(retry_at=utcnow() - timedelta(seconds=1)))
    assert apply_pending(engine, _settings(url))["applied"] == 3
    assert {stored_message(engine, f"late-{i}").state for i in range(4)} == {"delivered"}


@BACKENDS
def test_batches_are_bounded_and_the_rest_waits_for_the_next_run(
    backend: str, database_factory: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = database_factory(backend)
    engine = _submitted(url, 10, "many")
    store_reports(engine, [_report(f"pm-many-{i}", State.DELIVERED) for i in range(10)], utcnow())
    monkeypatch.setattr(inbox, "BATCH_SIZE", 3)
    monkeypatch.setattr(inbox, "MAX_BATCHES", 2)

    assert apply_pending(engine, _settings(url))["applied"] == 6
    assert apply_pending(engine, _settings(url))["applied"] == 4
    assert apply_pending(engine, _settings(url))["applied"] == 0


@BACKENDS
def test_a_report_past_the_limit_whose_message_came_is_applied_not_orphaned(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """Its message was submitted while it waited out a backoff past the orphan cutoff."""
    url = database_factory(backend)
    fill_messages(url, 1, "slow")
    engine = get_engine(url)
    store_reports(engine, [_report("pm-slow-0", State.DELIVERED)], utcnow() - timedelta(hours=2))
    settings = _settings(url, REPORT_PARK_MAX_SECONDS=3600)
    assert apply_pending(engine, _settings(url))["parked"] == 1  # put off 10 minutes
    mark_submitted(engine, {"slow-0": "pm-slow-0"})

    counts = apply_pending(engine, settings)  # past the limit, not due, but its message is in
    assert counts == {"applied": 0, "ignored": 0, "orphan": 0, "parked": 0}
    with engine.begin() as conn:
        conn.execute(update(provider_reports).values(retry_at=utcnow() - timedelta(seconds=1)))
    assert apply_pending(engine, settings)["applied"] == 1
    assert stored_message(engine, "slow-0").state == "delivered"


@BACKENDS
def test_a_report_stored_without_a_retry_time_is_due(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """What a webhook process still on the code before migration 0007 stores."""
    url = database_factory(backend)
    engine = _submitted(url, 1, "old-writer")
    store_reports(engine, [_report("pm-old-writer-0", State.DELIVERED)], utcnow())
    with engine.begin() as conn:
        conn.execute(update(provider_reports).values(retry_at=None))

    assert apply_pending(engine, _settings(url))["applied"] == 1


@BACKENDS
def test_a_run_with_more_due_than_it_takes_still_turns_old_ones_into_orphans(
    backend: str, database_factory: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = database_factory(backend)
    engine = _submitted(url, 5, "busy")
    store_reports(engine, [_report("pm-nobody", State.DELIVERED)], utcnow() - timedelta(hours=1))
    store_reports(engine, [_report(f"pm-busy-{i}", State.DELIVERED) for i in range(5)], utcnow())
    monkeypatch.setattr(inbox, "BATCH_SIZE", 2)
    monkeypatch.setattr(inbox, "MAX_BATCHES", 1)

    counts = apply_pending(engine, _settings(url, REPORT_PARK_MAX_SECONDS=60))

    assert counts == {"applied": 2, "ignored": 0, "orphan": 1, "parked": 0}


# --- ordering and concurrency ------------------------------------------------------------------


def _fold(reports: list[Report]) -> str:
    state: str = State.SUBMITTED
    for report in reports:
        state = apply(state, report, utcnow()).get("state", state)
    return state


@BACKENDS
def test_shuffled_reports_end_where_applying_them_in_order_would(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = _submitted(url, 40, "mix")
    rng = random.Random(7)
    states = [State.SCHEDULED, State.PROCESSING, State.DELIVERED, State.UNDELIVERABLE]
    arrivals = [
        _report(f"pm-mix-{i}", rng.choice(states), rng.choice(["webhook", "dlr"]))
        for i in range(40)
        for _ in range(rng.randint(1, 5))
    ]
    rng.shuffle(arrivals)
    for start in range(0, len(arrivals), 17):  # several pushes, applied between some of them
        store_reports(engine, arrivals[start : start + 17], utcnow())
        if start % 2:
            apply_pending(engine, _settings(url))
    apply_pending(engine, _settings(url))

    for i in range(40):
        mine = [r for r in arrivals if r.message_id == f"pm-mix-{i}"]
        history = event_history(engine, f"mix-{i}")
        assert stored_message(engine, f"mix-{i}").state == _fold(mine)
        assert [h[2] for h in history] == sorted({h[2] for h in history}, key=states.index)
        assert sum(h[2] in FINAL for h in history) <= 1


@BACKENDS
def test_concurrent_runs_apply_each_report_once(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = _submitted(url, 300, "par")
    reports = [
        _report(f"pm-par-{i}", state)
        for state in (State.PROCESSING, State.DELIVERED)
        for i in range(300)
    ]
    store_reports(engine, reports, utcnow())
    totals: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            totals.append(apply_pending(engine, _settings(url)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors
    assert sum(t["applied"] + t["ignored"] for t in totals) == 600
    assert set(_outcomes(engine)) <= {"applied", "ignored"}
    with engine.connect() as conn:
        assert set(conn.execute(select(messages.c.state)).scalars()) == {"delivered"}
        finals = conn.execute(select(events.c.message_pk).where(events.c.to_state == "delivered"))
        assert len(finals.all()) == 300


# --- inbound SMS --------------------------------------------------------------------------------


def _set_states(engine: Engine, states: dict[str, str]) -> None:
    with engine.begin() as conn:
        for our_id, state in states.items():
            conn.execute(update(messages).where(messages.c.id == our_id).values(state=state))


@BACKENDS
def test_an_inbound_sms_links_to_the_last_message_sent_to_that_number(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = get_engine(url)
    for prefix in ("a", "b", "c", "d", "e", "f"):
        fill_messages(url, 2, prefix)  # each prefix sends to +380670000000 and +380670000001
    _set_states(
        engine,
        {
            "a-1": "delivered",
            "b-1": "submitted",  # the last one that went out
            "c-1": "queued",
            "d-1": "rejected",
            "e-1": "expired",
            "f-1": "cancelled",
        },
    )
    at = datetime(2025, 1, 15, 11, 0, tzinfo=UTC)

    stored = store_inbound(
        engine,
        [
            Inbound(PHONE, "YES", at, {"status": "10"}),
            Inbound("+420777777777", "who?", None, {}),
            Inbound("INFO", None, None, {}),
        ],
        at + timedelta(minutes=1),
    )

    assert stored == 3
    replies = {r["from"]: r["replyTo"] for r in list_inbound(engine)}
    assert replies == {PHONE: "b-1", "+420777777777": None, "INFO": None}


@BACKENDS
def test_list_inbound_is_newest_first_with_every_key(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = _submitted(url, 2, "ask")
    base = datetime(2025, 3, 30, 1, 30, tzinfo=UTC)
    for minute, text in enumerate(["first", "second", "third"]):
        store_inbound(engine, [Inbound(PHONE, text, None, {})], base + timedelta(minutes=minute))

    newest = list_inbound(engine, limit=2)

    assert newest == [
        {
            "receivedAt": "2025-03-30T01:32:00Z",
            "from": PHONE,
            "text": "third",
            "sentAt": None,
            "replyTo": "ask-1",
            "source": "bulkgate",
            "consent": None,
        },
        {
            "receivedAt": "2025-03-30T01:31:00Z",
            "from": PHONE,
            "text": "second",
            "sentAt": None,
            "replyTo": "ask-1",
            "source": "bulkgate",
            "consent": None,
        },
    ]


@BACKENDS
def test_a_repeated_inbound_sms_is_stored_once(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = get_engine(url)
    at = datetime(2025, 10, 26, 0, 30, tzinfo=UTC)
    sms = Inbound(PHONE, "STOP", at, {"status": "10"})
    untimed = Inbound(PHONE, "STOP", None, {})

    assert store_inbound(engine, [sms, sms]) == 1
    assert store_inbound(engine, [sms, Inbound(PHONE, None, at, {})]) == 1
    assert store_inbound(engine, [untimed, untimed]) == 2  # no send time: nothing to tell them by
    assert store_inbound(engine, []) == 0

    with engine.connect() as conn:
        assert len(conn.execute(select(inbound_messages)).all()) == 4


def test_the_same_inbound_sms_pushed_at_once_is_stored_once(
    database_factory: Callable[[str], str],
) -> None:
    """Found in review: two pushes of one SMS both saw it missing and both stored it."""
    engine = get_engine(database_factory("postgresql"))
    at = datetime(2025, 10, 26, 0, 30, tzinfo=UTC)
    stored: list[int] = []
    for round_ in range(10):
        sms = Inbound(PHONE, f"STOP {round_}", at, {"status": "10"})
        start = threading.Barrier(6)

        def push(sms: Inbound = sms, start: threading.Barrier = start) -> None:
            start.wait()
            stored.append(store_inbound(engine, [sms]))

        threads = [threading.Thread(target=push) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert sum(stored) == 10
    with engine.connect() as conn:
        assert len(conn.execute(select(inbound_messages)).all()) == 10


@BACKENDS
def test_the_migration_keys_stored_inbound_sms_and_keeps_earlier_repeats(
    backend: str, tmp_path: Any
) -> None:
    from tests.conftest import create_postgres_database, drop_postgres_database
    from worker.store.migrate import upgrade_database

    name = create_postgres_database() if backend == "postgresql" else None
    url = (
        f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        if name
        else f"sqlite:///{tmp_path / 'old.db'}"
    )
    try:
        upgrade_database(url, "0004")
        engine = get_engine(url)
        at = datetime(2025, 10, 26, 0, 30, tzinfo=UTC)
        old = {"received_at": at, "sender": PHONE, "source": "bulkgate", "raw": {}}
        with engine.begin() as conn:  # two pushes of one SMS that raced, one without a time
            conn.execute(
                inbound_messages.insert(),
                [old | {"text": "STOP", "sent_at": t} for t in (at, at, None)],
            )
        engine.dispose()
        upgrade_database(url)
        with engine.connect() as conn:
            keys = conn.execute(
                select(inbound_messages.c.dedup_key).order_by(inbound_messages.c.pk)
            ).scalars()
            assert list(keys) == [inbox.inbound_key(PHONE, "STOP", at), None, None]
        # And the key holds from now on: the same SMS again is not stored.
        assert store_inbound(engine, [Inbound(PHONE, "STOP", at, {})]) == 0
    finally:
        get_engine(url).dispose()
        if name:
            drop_postgres_database(name)
