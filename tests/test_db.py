"""The bulk writers of worker/store/db.py on real SQLite and PostgreSQL: the hot paths' shortcuts
(COPY, UPDATE … FROM unnest) must keep every check an ordinary INSERT or UPDATE makes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError, StatementError

from config import Settings
from tests.conftest import make_messages
from worker.core.validation import validate_message
from worker.flows.producer import row_for
from worker.store.db import (
    among,
    array_literal,
    bulk_update,
    get_engine,
    insert_new,
    insert_new_by_copy,
    insert_rows,
)
from worker.store.models import events, messages

NOW = datetime.now(UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, database_factory: Callable[[str], str]) -> Engine:
    return get_engine(database_factory(request.param))


@pytest.fixture
def pg_engine(database_factory: Callable[[str], str]) -> Engine:
    """For what only PostgreSQL does: COPY, a staging table, enforced VARCHAR lengths."""
    return get_engine(database_factory("postgresql"))


def _rows(n: int, prefix: str) -> list[dict]:
    settings = Settings()
    return [
        row_for(validate_message(m, now=NOW), None, NOW, settings) for m in make_messages(n, prefix)
    ]


def _stored(engine: Engine, *columns: str) -> list[tuple]:
    with engine.connect() as conn:
        chosen = [messages.c[c] for c in columns]
        return [tuple(r) for r in conn.execute(select(*chosen).order_by(messages.c.pk))]


def test_insert_new_answers_the_new_ids_only(engine: Engine) -> None:
    rows = _rows(3, "new")
    rows[0]["survey_options"] = ["yes", "no"]
    with engine.begin() as conn:
        assert insert_new(conn, messages, rows[:2], key="id") == {rows[0]["id"], rows[1]["id"]}
        # A second call in the same transaction, overlapping the first.
        assert insert_new(conn, messages, rows, key="id") == {rows[2]["id"]}

    assert _stored(engine, "id", "survey_options", "created_at") == [
        (rows[0]["id"], ["yes", "no"], NOW),
        (rows[1]["id"], None, NOW),
        (rows[2]["id"], None, NOW),
    ]


def test_insert_new_by_copy_answers_the_new_ids_even_when_one_is_taken(engine: Engine) -> None:
    rows = _rows(4, "bet")
    rows[3]["survey_options"] = ["yes", "no"]
    with engine.begin() as conn:
        assert insert_new_by_copy(conn, messages, rows[:2], key="id") == {
            rows[0]["id"],
            rows[1]["id"],
        }
    with engine.begin() as conn:
        # The bet lost (rows[1] is stored): the COPY is undone to its savepoint and the rows
        # go through insert_new's ON CONFLICT, in the same transaction, which goes on.
        assert insert_new_by_copy(conn, messages, rows[1:], key="id") == {
            rows[2]["id"],
            rows[3]["id"],
        }
        assert insert_new_by_copy(conn, messages, [], key="id") == set()

    assert _stored(engine, "id", "survey_options", "created_at") == [
        (rows[0]["id"], None, NOW),
        (rows[1]["id"], None, NOW),
        (rows[2]["id"], None, NOW),
        (rows[3]["id"], ["yes", "no"], NOW),
    ]


def test_copy_keeps_each_instant_and_the_checks_of_an_insert(pg_engine: Engine) -> None:
    """COPY sends datetimes as text, each distinct one formatted once: an offset other than
    UTC is the same instant, a naive one is refused, an over-long string is refused."""
    kyiv = timezone(timedelta(hours=2))
    rows = _rows(3, "when")
    rows[0]["available_at"] = NOW.astimezone(kyiv)
    rows[1]["expires_at"] = None
    rows[2]["ttl"] = True  # a bool is no int for the driver: converted as an insert would
    with pg_engine.begin() as conn:
        insert_new_by_copy(conn, messages, rows, key="id")
    assert _stored(pg_engine, "available_at", "expires_at", "ttl") == [
        (NOW, rows[0]["expires_at"], rows[0]["ttl"]),
        (NOW, None, rows[1]["ttl"]),
        (NOW, rows[2]["expires_at"], 1),
    ]

    naive = _rows(1, "naive")[0] | {"created_at": datetime(2026, 1, 1)}
    with pytest.raises(ValueError, match="naive"), pg_engine.begin() as conn:
        insert_new_by_copy(conn, messages, [naive], key="id")
    long = _rows(1, "long")[0] | {"from_name": "F" * 65}
    with pytest.raises(DBAPIError, match="too long"), pg_engine.begin() as conn:
        insert_new_by_copy(conn, messages, [long], key="id")
    assert len(_stored(pg_engine, "id")) == 3


def test_insert_new_follows_a_schema_change_on_the_same_connection(pg_engine: Engine) -> None:
    with pg_engine.connect() as conn:
        insert_new(conn, messages, _rows(1, "before"), key="id")
        conn.commit()
        conn.execute(text("ALTER TABLE messages ALTER COLUMN to_phone TYPE VARCHAR(32)"))
        conn.commit()
        row = _rows(1, "after")[0] | {"to_phone": "+" + "1" * 25}
        assert insert_new(conn, messages, [row], key="id") == {row["id"]}
        conn.commit()


def test_bulk_update_refuses_an_over_long_value_instead_of_cutting_it(pg_engine: Engine) -> None:
    with pg_engine.begin() as conn:
        insert_new(conn, messages, _rows(1, "long"), key="id")
    (pk,) = _stored(pg_engine, "pk")[0]

    with pytest.raises(DBAPIError, match="too long"), pg_engine.begin() as conn:
        bulk_update(conn, messages, {pk: {"error_code": "E" * 70}})

    assert _stored(pg_engine, "error_code") == [(None,)]


def test_bulk_update_writes_each_shape_and_mixed_numbers(engine: Engine) -> None:
    with engine.begin() as conn:
        insert_new(conn, messages, _rows(3, "upd"), key="id")
    pks = [pk for (pk,) in _stored(engine, "pk")]
    later = NOW + timedelta(seconds=5)
    changes = {
        pks[0]: {"cost": 1, "fallbacks": [{"type": "sms", "status": "not_used"}]},
        pks[1]: {"cost": 2.5, "fallbacks": [{"type": "viber", "status": "delivered"}]},
        pks[2]: {"state": "submitted", "next_poll_at": later, "claim_token": None},
    }
    with engine.begin() as conn:
        bulk_update(conn, messages, changes)

    assert _stored(engine, "cost", "fallbacks", "state", "next_poll_at") == [
        (1.0, [{"type": "sms", "status": "not_used"}], "queued", None),
        (2.5, [{"type": "viber", "status": "delivered"}], "queued", None),
        (None, None, "submitted", later),
    ]


def test_bulk_update_sends_shared_values_once_and_keeps_each_rows_own(engine: Engine) -> None:
    with engine.begin() as conn:
        insert_new(conn, messages, _rows(3, "shared"), key="id")
    pks = [pk for (pk,) in _stored(engine, "pk")]
    later = NOW + timedelta(seconds=5)
    shared = {"state": "submitted", "next_poll_at": later, "claim_token": None}
    changes = {
        pk: shared | {"provider_message_id": f"pm-{i}", "fallbacks": [{"type": "sms"}]}
        for i, pk in enumerate(pks)
    }
    changes[pks[2]]["fallbacks"] = None
    with engine.begin() as conn:
        bulk_update(conn, messages, changes)

    assert _stored(engine, "state", "next_poll_at", "provider_message_id", "fallbacks") == [
        ("submitted", later, "pm-0", [{"type": "sms"}]),
        ("submitted", later, "pm-1", [{"type": "sms"}]),
        ("submitted", later, "pm-2", None),
    ]


def test_bulk_update_refuses_over_long_values_shared_or_not(pg_engine: Engine) -> None:
    with pg_engine.begin() as conn:
        insert_new(conn, messages, _rows(2, "long"), key="id")
    pks = [pk for (pk,) in _stored(pg_engine, "pk")]

    for codes in (["E" * 70, "E" * 70], ["E" * 70, "short"]):
        with pytest.raises(DBAPIError, match="too long"), pg_engine.begin() as conn:
            bulk_update(
                conn, messages, {pk: {"error_code": c} for pk, c in zip(pks, codes, strict=True)}
            )

    assert _stored(pg_engine, "error_code") == [(None,), (None,)]


def test_bulk_writers_refuse_naive_datetimes(engine: Engine) -> None:
    with engine.begin() as conn:
        insert_new(conn, messages, _rows(1, "naive"), key="id")
    (pk,) = _stored(engine, "pk")[0]
    naive = datetime(2026, 1, 1)

    with pytest.raises((ValueError, StatementError), match="naive"), engine.begin() as conn:
        bulk_update(conn, messages, {pk: {"next_poll_at": naive}})
    event = {"message_pk": pk, "at": naive, "source": "poll", "to_state": "queued"}
    with pytest.raises((ValueError, StatementError), match="naive"), engine.begin() as conn:
        insert_rows(conn, events, [event | {"from_state": None, "detail": None}])


def test_copy_errors_carry_no_row_values(pg_engine: Engine) -> None:
    row = _rows(1, "secret")[0] | {"to_phone": "+380671234567000000001234"}

    with pytest.raises(DBAPIError) as raised, pg_engine.begin() as conn:
        insert_new(conn, messages, [row], key="id")

    assert "too long" in str(raised.value)
    assert "380671234567" not in str(raised.value)


def test_a_provider_message_id_belongs_to_one_message(engine: Engine) -> None:
    from sqlalchemy.exc import IntegrityError

    with engine.begin() as conn:
        insert_new(conn, messages, _rows(3, "pmid"), key="id")
    pks = [pk for (pk,) in _stored(engine, "pk")]
    with engine.begin() as conn:
        bulk_update(conn, messages, {pks[0]: {"provider_message_id": "pm-1"}})

    with pytest.raises(IntegrityError), engine.begin() as conn:
        bulk_update(conn, messages, {pks[1]: {"provider_message_id": "pm-1"}})
    assert _stored(engine, "provider_message_id") == [("pm-1",), (None,), (None,)]


def test_messages_not_sent_yet_are_not_in_the_provider_message_id_index(
    pg_engine: Engine,
) -> None:
    with pg_engine.connect() as conn:
        definition = conn.execute(
            text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"),
            {"n": "ix_messages_provider_message_id"},
        ).scalar_one()
    assert "UNIQUE" in definition and "WHERE (provider_message_id IS NOT NULL)" in definition


def test_a_bulk_update_probes_its_keys_and_leaves_the_planner_as_it_was(pg_engine: Engine) -> None:
    """Before: a write of 1,000 rows by claim token into a table of 150,000 never analysed
    read the table whole and hashed it (the server's default costs), as every batch's
    submit write did at 100,000 messages (auto_explain); it locked rows in table order."""
    with pg_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO messages (id, from_name, to_phone, message_type, route, priority,"
                " state, created_at, available_at, attempts, unknown_outcomes, polls,"
                " claim_token) SELECT 'plan-' || i, 'Bench', '+380670000000', 'sms', 'sms', 0,"
                " CASE WHEN i > 140000 AND i <= 141000 THEN 'sending' ELSE 'queued' END, now(),"
                " now(), 1, 0, 0, CASE WHEN i > 140000 AND i <= 141000 THEN 'tok' END"
                " FROM generate_series(1, 150000) AS i"
            )
        )
        keys = list(
            conn.execute(text("SELECT pk FROM messages WHERE claim_token = 'tok'")).scalars()
        )
    plans: list[str] = []
    with pg_engine.begin() as conn:
        driver = conn.connection.driver_connection
        driver.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
        before = conn.exec_driver_sql("SHOW random_page_cost").scalar()
        conn.exec_driver_sql("LOAD 'auto_explain'")
        conn.exec_driver_sql("SET LOCAL auto_explain.log_min_duration = 0")
        conn.exec_driver_sql("SET LOCAL auto_explain.log_level = notice")
        sent = {"state": "submitted", "claim_token": None, "lease_until": None}
        changes = {pk: {**sent, "provider_message_id": f"p{pk}"} for pk in keys}
        written = bulk_update(conn, messages, changes, only_if={"claim_token": "tok"})
        after = conn.exec_driver_sql("SHOW random_page_cost").scalar()

    assert written == set(keys)
    plan = next(p for p in plans if "Update on messages" in p)
    assert "Nested Loop" in plan and "Index Scan using messages_pkey" in plan, plan
    assert "Seq Scan on messages" not in plan, plan
    assert after == before


ELEMENTS = {
    "BIGINT": st.integers(-(2**63), 2**63 - 1),
    # The characters an array literal gives meaning to, often; any other now and then.
    "TEXT": st.lists(st.sampled_from(list("\\\"{},' \tNUL")), max_size=8).map("".join)
    | st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")),
    "DOUBLE PRECISION": st.floats(allow_nan=False),
    "TIMESTAMP WITH TIME ZONE": st.datetimes(
        min_value=datetime(1900, 1, 1), timezones=st.just(UTC)
    ),
}


@given(data=st.data())
@hypothesis_settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_an_array_literal_reaches_postgresql_as_the_values_it_was_made_of(
    pg_engine: Engine, data: st.DataObject
) -> None:
    """Any values, NULLs among them, and any text (quotes, backslashes, braces, commas,
    blanks, the word NULL) come back from PostgreSQL as they went in."""
    kind = data.draw(st.sampled_from(sorted(ELEMENTS)))
    values = data.draw(st.lists(st.none() | ELEMENTS[kind], max_size=20))
    with pg_engine.connect() as conn:
        back = conn.exec_driver_sql(
            f"SELECT CAST(%(a)s AS {kind}[])", {"a": array_literal(values)}
        ).scalar_one()
    assert back == values


def test_among_matches_no_stored_value_by_a_prefix(pg_engine: Engine) -> None:
    """A value longer than the column is no match, not cut down to one."""
    raw = make_messages(1, "prefix")[0] | {"id": "x" * 254}
    row = row_for(validate_message(raw, now=NOW), None, NOW, Settings())
    with pg_engine.begin() as conn:
        insert_new(conn, messages, [row], "id")
        found = conn.execute(
            select(messages.c.id).where(among(conn, messages.c.id, ["x" * 300, "y"]))
        ).all()
        conn.execute(messages.delete().where(messages.c.id == "x" * 254))
    assert found == []
