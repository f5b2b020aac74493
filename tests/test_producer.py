"""The intake's store path on real SQLite and PostgreSQL: new rows go in by COPY, betting
that their ids are new, and every message still gets its own answer when the bet loses."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import func, select, update

from config import Settings
from tests.conftest import make_messages
from worker.flows.producer import CHUNK, enqueue
from worker.store.db import get_engine
from worker.store.models import messages


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, database_factory: Callable[[str], str]) -> Settings:
    return Settings(DATABASE_URL=database_factory(request.param))


def _count(settings: Settings) -> int:
    with get_engine(settings.database_url).connect() as conn:
        return conn.execute(select(func.count()).select_from(messages)).scalar_one()


def test_known_ids_are_answered_with_their_state_amid_new_ones(settings: Settings) -> None:
    """Chunks that mix stored and new ids: each stored one is a duplicate with the state it
    is in (not the state it was stored in), each new one is accepted, none is stored twice."""
    engine = get_engine(settings.database_url)
    first = enqueue(make_messages(10, "mix", start=995), "mix", settings=settings, kick=False)
    assert {r.status for r in first} == {"accepted"}
    with engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.id == "mix-1000").values(state="delivered"))

    batch = make_messages(2 * CHUNK, "mix")
    batch.insert(3, batch[1])  # repeated within the call
    results = enqueue(batch, "mix", settings=settings, kick=False)

    by_status = {s: [r for r in results if r.status == s] for s in ("accepted", "duplicate")}
    assert len(results) == len(batch)
    known = [f"mix-{i}" for i in range(995, 1005)]
    assert [r.id for r in by_status["duplicate"]] == ["mix-1", *known]
    states = {r.id: r.state for r in by_status["duplicate"]}
    assert states["mix-1000"] == "delivered" and states["mix-995"] == "queued"
    assert states["mix-1"] == "queued"
    assert len(by_status["accepted"]) == 2 * CHUNK - 10
    assert {r.state for r in by_status["accepted"]} == {"queued"}
    assert _count(settings) == 2 * CHUNK


def test_a_relaunch_stores_nothing_twice(settings: Settings) -> None:
    batch = make_messages(CHUNK + 5, "again")
    assert {r.status for r in enqueue(batch, "again", settings=settings, kick=False)} == {
        "accepted"
    }
    again = enqueue(
        [*batch, *make_messages(3, "again", start=CHUNK + 5)],
        "again",
        settings=settings,
        kick=False,
    )

    assert [r.status for r in again] == ["duplicate"] * (CHUNK + 5) + ["accepted"] * 3
    assert {r.state for r in again} == {"queued"}
    assert _count(settings) == CHUNK + 8


def test_rows_of_a_chunk_share_their_times_but_not_their_expiries() -> None:
    """RowMaker works out the times a chunk shares once: each row still gets its own TTL's
    expiry, and a scheduled message its own start."""
    from datetime import UTC, datetime, timedelta

    from worker.core.validation import validate_message
    from worker.flows.producer import RowMaker

    settings = Settings()
    now = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    later = now + timedelta(days=2)
    raw = make_messages(4, "rows")
    raw[1]["ttl"], raw[2]["ttl"] = 60, 60
    raw[3] |= {"ttl": 60, "scheduledSent": later.isoformat()}
    make = RowMaker("c", now, settings)
    rows = [make(validate_message(m, now=now)) for m in raw]  # type: ignore[arg-type]

    deadline = timedelta(seconds=settings.send_retry_for_seconds)
    lead = timedelta(seconds=settings.schedule_send_lead_seconds)
    assert [r["expires_at"] for r in rows] == [
        None,
        now + timedelta(seconds=60),
        now + timedelta(seconds=60),
        later + timedelta(seconds=60),
    ]
    assert [r["send_deadline"] for r in rows] == [now + deadline] * 3 + [later + deadline]
    assert [r["available_at"] for r in rows] == [now] * 3 + [later - lead]
    assert {r["created_at"] for r in rows} == {now}


def test_a_failure_while_the_next_chunk_is_taken_stores_that_chunk_whole_or_not_at_all(
    settings: Settings,
) -> None:
    """The next chunk is taken while the server takes one in (before its commit): an error
    there leaves the chunk under way unstored (PostgreSQL) or stored (SQLite, taken after),
    never part of it, and enqueueing again stores every message once."""

    def messages_then_a_failure() -> Iterator[dict[str, object]]:
        yield from make_messages(CHUNK + 10, "cut")
        raise RuntimeError("the producer's source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        enqueue(messages_then_a_failure(), "cut", settings=settings, kick=False)
    read_ahead = settings.database_url.startswith("postgresql")
    assert _count(settings) == (0 if read_ahead else CHUNK)

    again = enqueue(make_messages(CHUNK + 10, "cut"), "cut", settings=settings, kick=False)
    assert {r.status for r in again[CHUNK:]} == {"accepted"}
    assert _count(settings) == CHUNK + 10


def test_an_id_repeated_in_a_later_chunk_of_one_call_is_a_duplicate(settings: Settings) -> None:
    """Repeats are found within a chunk by the intake, across chunks by the database."""
    raws = make_messages(CHUNK * 2 + 10, "rep")
    raws.append(dict(raws[3]))  # a repeat of the first chunk's fourth, in the third chunk
    raws.insert(5, dict(raws[5]))  # a repeat within the first chunk

    results = enqueue(raws, "rep", settings=settings, kick=False)

    assert [r.status for r in results].count("duplicate") == 2
    assert results[6].status == "duplicate" and results[6].id == raws[5]["id"]
    assert results[-1].status == "duplicate" and results[-1].state == "queued"
    assert _count(settings) == CHUNK * 2 + 10
