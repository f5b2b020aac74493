"""The sweeper repairs from database state alone: dead claims, expired TTLs, deadlines."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import select

from config import Settings
from tests.helpers import fill_messages
from worker.flows import sweeper
from worker.flows.dispatcher import claim
from worker.store.db import get_engine, utcnow
from worker.store.models import events, messages


def _settings(url: str, **extra: str) -> Settings:
    return Settings(DATABASE_URL=url, **extra)  # type: ignore[arg-type]


def _states(url: str) -> dict[str, str]:
    with get_engine(url).connect() as conn:
        return dict(conn.execute(select(messages.c.id, messages.c.state)).all())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_claim_whose_worker_died_is_resent_and_counted(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    fill_messages(url, 10, "dead")
    engine = get_engine(url)
    claim(engine, "standard", utcnow(), 10, -1, "gone")  # lease already over

    assert sweeper.recover_stale_claims(engine, _settings(url)) == 10

    with engine.connect() as conn:
        rows = conn.execute(select(messages)).all()
        history = conn.execute(select(events)).all()
    assert {r.state for r in rows} == {"queued"}
    assert {(r.attempts, r.unknown_outcomes, r.claim_token) for r in rows} == {(1, 1, None)}
    assert len(history) == 10 and {e.to_state for e in history} == {"queued"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_fail_policy_fails_a_dead_claim_instead(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    fill_messages(url, 3, "dead")
    engine = get_engine(url)
    claim(engine, "standard", utcnow(), 10, -1, "gone")

    sweeper.recover_stale_claims(engine, _settings(url, SEND_UNKNOWN_OUTCOME="fail"))

    assert set(_states(url).values()) == {"failed"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_live_claims_and_fresh_messages_are_left_alone(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    fill_messages(url, 4, "live")
    engine = get_engine(url)
    claim(engine, "standard", utcnow(), 2, 60, "alive")

    assert sweeper.sweep(engine, _settings(url)) == {
        "stale_claims": 0,
        "expired": 0,
        "gave_up": 0,
        "timeout": 0,
        "suppressed": 0,
        "tallies_folded": 0,
    }
    assert sorted(_states(url).values()) == ["queued", "queued", "sending", "sending"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_expiry_and_timeout(backend: str, database_factory: Callable[[str], str]) -> None:
    url = database_factory(backend)
    fill_messages(url, 2, "ttl", ttl=60)
    fill_messages(url, 2, "late")
    engine = get_engine(url)
    past = utcnow() - timedelta(hours=1)
    with engine.begin() as conn:
        conn.execute(messages.update().where(messages.c.id.like("ttl-%")).values(expires_at=past))
        conn.execute(
            messages.update()
            .where(messages.c.id.like("late-%"))
            .values(state="processing", poll_deadline=past, next_poll_at=past)
        )

    assert sweeper.sweep(engine, _settings(url, POLL_OUTAGE_GRACE_SECONDS="0")) == {
        "stale_claims": 0,
        "expired": 2,
        "gave_up": 0,
        "timeout": 2,
        "suppressed": 0,
        "tallies_folded": 0,
    }

    assert _states(url) == {
        "ttl-0": "expired",
        "ttl-1": "expired",
        "late-0": "timeout",
        "late-1": "timeout",
    }
    with engine.connect() as conn:
        froms = {e.from_state for e in conn.execute(select(events)).all()}
    assert froms == {"queued", "processing"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_ttl_run_out_while_quiet_hours_hold_it_is_said_as_at_the_door(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """Before: a promo held at the claim for its window (approved at night) whose TTL ran out
    meanwhile ended TTL_EXPIRED, as if we had been too slow; at the door the same case is
    QUIET_HOURS. One whose window had already opened is ours: TTL_EXPIRED."""
    url = database_factory(backend)
    fill_messages(url, 3, "w", ttl=60)
    engine = get_engine(url)
    now = utcnow()
    opens = {"w-0": now + timedelta(hours=3), "w-1": now - timedelta(minutes=5), "w-2": None}
    with engine.begin() as conn:
        for message_id, window_at in opens.items():
            conn.execute(
                messages.update()
                .where(messages.c.id == message_id)
                .values(expires_at=now - timedelta(seconds=1), window_at=window_at)
            )

    assert sweeper.expire_queued(engine) == 3

    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(messages))}
        details = {e.message_pk: e.detail for e in conn.execute(select(events))}
    assert {k: (r.state, r.error_code) for k, r in rows.items()} == {
        "w-0": ("expired", "QUIET_HOURS"),
        "w-1": ("expired", "TTL_EXPIRED"),
        "w-2": ("expired", "TTL_EXPIRED"),
    }
    assert "send window" in rows["w-0"].error_message
    assert details[rows["w-0"].pk] == rows["w-0"].error_message


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_message_kept_from_the_provider_past_its_deadline_fails_saying_so(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """However it was kept queued (an open circuit never claims it), it does not wait forever."""
    url = database_factory(backend)
    fill_messages(url, 2, "kept")
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.execute(
            messages.update()
            .where(messages.c.id == "kept-0")
            .values(send_deadline=utcnow() - timedelta(seconds=1), isolation="part-1")
        )

    assert sweeper.give_up(engine) == 1

    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(messages))}
    assert rows["kept-0"].state == "failed" and rows["kept-0"].error_code == "SEND_DEADLINE"
    assert rows["kept-0"].isolation is None
    assert rows["kept-1"].state == "queued"  # its deadline is hours away
    assert rows["kept-1"].send_deadline > utcnow() + timedelta(hours=5)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_dead_claim_of_an_isolation_part_stays_that_part(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """The halving's progress survives the worker: the part is resent alone."""
    url = database_factory(backend)
    fill_messages(url, 3, "part")
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.execute(messages.update().values(isolation="p-7"))
    with engine.begin() as conn:  # claimed as a part, then the worker vanished
        conn.execute(
            messages.update().values(
                state="sending", claim_token="gone", lease_until=utcnow() - timedelta(seconds=1)
            )
        )

    assert sweeper.recover_stale_claims(engine, _settings(url)) == 3

    with engine.connect() as conn:
        rows = conn.execute(select(messages)).all()
    assert {(r.state, r.isolation, r.unknown_outcomes) for r in rows} == {("queued", "p-7", 1)}
