"""The send policy's pure decisions (worker/core/sendpolicy.py), called directly."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config import Settings
from worker.core.sendpolicy import (
    Current,
    Held,
    Isolate,
    Item,
    Rejected,
    Retry,
    Submitted,
    Unknown,
    answer_label,
    decide,
    outcomes,
    pause_for,
    request_bound,
    split,
    suspects,
)
from worker.core.states import State
from worker.provider.smsbat import BadRequest, OutcomeUnknown, Throttled, Unauthorized, Unavailable

pytestmark = pytest.mark.unit

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = Settings(
    SMSBAT_API_KEY="k",
    DATABASE_URL="sqlite:///x.db",
    SEND_CIRCUIT_FAILURES=3,
    CIRCUIT_OPEN_SECONDS=30,
    SEND_MAX_UNKNOWN_OUTCOMES=3,
)  # type: ignore[call-arg]


def batch(n: int) -> list[Item]:
    return [Item(pk=i + 1, id=f"m-{i}", to_phone=f"+38067{i:07d}") for i in range(n)]


def keys() -> Any:
    counter = itertools.count()
    return lambda: f"part-{next(counter)}"


def run(items: list[Item], answer: Any) -> list[Any]:
    return outcomes(items, answer, settings=SETTINGS, rng=random.Random(1), new_key=keys())


# --- one answer, every row -----------------------------------------------------------


def test_an_accepted_batch_is_mapped_by_tracking_id_and_a_missing_one_retried() -> None:
    items = batch(3)
    got = run(items, {"m-2": "p2", "m-0": "p0"})  # shuffled, m-1 missing
    assert got[0] == Submitted(1, "p0") and got[2] == Submitted(3, "p2")
    assert isinstance(got[1], Retry) and got[1].counts and got[1].pk == 2


def test_a_refused_single_message_is_rejected_with_the_providers_code() -> None:
    got = run(batch(1), BadRequest("INVALID_PHONE", "Invalid phone number format", "toPhone"))
    assert got == [Rejected(1, "INVALID_PHONE", "Invalid phone number format")]


def test_a_refused_batch_is_split_into_halves_with_a_key_each() -> None:
    got = run(batch(5), BadRequest("INVALID_PHONE", "Invalid phone number format", "toPhone"))
    assert all(isinstance(o, Isolate) for o in got)
    parts: dict[str, list[int]] = {}
    for o in got:
        parts.setdefault(o.key, []).append(o.pk)
    assert sorted(parts.values()) == [[1, 2, 3], [4, 5]]
    assert {o.size for o in got} == {2, 3}


@pytest.mark.parametrize(
    ("answer", "counts", "delay"),
    [
        (Throttled(7.0), False, 7.0),
        (Unauthorized("HTTP 401"), False, 0.0),
        (Held("paused", 3.0), False, 3.0),
    ],
)
def test_answers_that_are_not_about_the_messages_spend_no_attempt(
    answer: Any, counts: bool, delay: float
) -> None:
    got = run(batch(2), answer)
    assert [o.pk for o in got] == [1, 2]
    assert all(isinstance(o, Retry) and o.counts is counts and o.delay == delay for o in got)


def test_a_5xx_is_an_attempt_with_one_backoff_for_the_whole_request() -> None:
    got = run(batch(4), Unavailable("HTTP 503"))
    assert [o.pk for o in got] == [1, 2, 3, 4]
    assert all(isinstance(o, Retry) and o.counts for o in got)
    assert len({o.delay for o in got}) == 1 and got[0].delay > 0


def test_a_lost_answer_is_an_unknown_outcome() -> None:
    got = run(batch(2), OutcomeUnknown("ReadTimeout after the request was written"))
    assert [o.pk for o in got] == [1, 2]
    assert all(isinstance(o, Unknown) for o in got)


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ({}, "200"),
        (BadRequest("X", "y", None), "400"),
        (Unauthorized(""), "401"),
        (Throttled(1), "429"),
        (Unavailable(""), "5xx"),
        (OutcomeUnknown(""), "unknown"),
        (Held("paused"), "held"),
    ],
)
def test_answer_labels(answer: Any, label: str) -> None:
    assert answer_label(answer) == label


# --- the 400's hints ------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        "messages[3].toPhone +380670000003 is not a valid phone number",
        "invalid phone at index 3",
        "message m-3 refused",
        "+380670000003 is not a valid phone number",
    ],
)
def test_a_hint_names_the_suspect(message: str) -> None:
    items = batch(8)
    assert suspects(items, BadRequest("INVALID_PHONE", message, "toPhone")) == [items[3]]


@pytest.mark.parametrize(
    "message", ["Invalid phone number format", "messages[99] is bad", "bad value [8]"]
)
def test_no_usable_hint_names_nobody(message: str) -> None:
    assert suspects(batch(8), BadRequest("INVALID_PHONE", message, "toPhone")) == []


def test_a_hint_naming_every_row_is_no_hint() -> None:
    items = batch(2)
    error = BadRequest("X", "m-0 and m-1 conflict", None)
    assert suspects(items, error) == []


def test_a_suspect_goes_alone_and_the_rest_is_still_halved() -> None:
    items = batch(9)
    parts = split(items, BadRequest("INVALID_PHONE", "messages[4].toPhone bad", "toPhone"))
    assert parts == [[items[4]], items[:4], items[5:]]


@given(
    n=st.integers(2, 1000),
    hinted=st.lists(st.integers(0, 1100), max_size=3),
)
def test_split_always_partitions_into_smaller_parts(n: int, hinted: list[int]) -> None:
    items = batch(n)
    message = " ".join(f"messages[{i}]" for i in hinted) or "Invalid phone number format"
    parts = split(items, BadRequest("INVALID_PHONE", message, "toPhone"))
    flat = [item for part in parts for item in part]
    assert sorted(i.pk for i in flat) == [i.pk for i in items]  # every row once
    assert all(0 < len(part) < n for part in parts)
    # the unsuspected rest is halved: its largest part at most half of the batch, rounded up
    assert max(len(part) for part in parts) <= (n + 1) // 2


def test_the_request_bound_counts_batches_parts_and_halving_levels() -> None:
    assert request_bound(2500, 0, 0, 1000) == 3
    assert request_bound(1000, 0, 1, 1000) == 1 + 31
    assert request_bound(0, 4, 0, 1000) == 4
    assert request_bound(10, 0, 2, 16) == 1 + 2 * 13


# --- pauses --------------------------------------------------------------------------


def test_pause_for_a_429_is_its_retry_after_for_every_worker() -> None:
    pause = pause_for(Throttled(12.5), failures=0, settings=SETTINGS)
    assert pause is not None and (pause.kind, pause.seconds) == ("throttle", 12.5)


def test_pause_for_a_401_opens_the_circuit() -> None:
    pause = pause_for(Unauthorized("HTTP 401"), failures=0, settings=SETTINGS)
    assert pause is not None and (pause.kind, pause.seconds) == ("circuit", 30)
    assert "SMSBAT_API_KEY" in pause.reason


@pytest.mark.parametrize("fault", [Unavailable("HTTP 503"), OutcomeUnknown("ReadTimeout")])
def test_faults_open_the_circuit_only_when_consecutive(fault: Any) -> None:
    assert pause_for(fault, failures=2, settings=SETTINGS) is None
    pause = pause_for(fault, failures=3, settings=SETTINGS)
    assert pause is not None and pause.kind == "circuit" and "3 failures" in pause.reason


@pytest.mark.parametrize("answer", [{}, BadRequest("X", "y", None), Held("paused")])
def test_answers_and_holds_pause_nothing(answer: Any) -> None:
    assert pause_for(answer, failures=99, settings=SETTINGS) is None


# --- what a row becomes --------------------------------------------------------------

FRESH = Current(attempts=0, unknown_outcomes=0, send_deadline=NOW + timedelta(hours=6))


def test_a_retry_before_the_deadline_goes_back_to_the_queue() -> None:
    values, state, detail = decide(
        Retry(1, "HTTP 503", True, 2.0), FRESH, SETTINGS, NOW, resend_unknown=True
    )
    assert state is State.QUEUED and values["attempts"] == 1
    assert values["available_at"] == NOW + timedelta(seconds=2)
    assert "HTTP 503" in detail


def test_a_retry_past_the_deadline_fails_with_the_reason() -> None:
    late = Current(attempts=40, unknown_outcomes=0, send_deadline=NOW + timedelta(seconds=1))
    values, state, _ = decide(
        Retry(1, "HTTP 503", True, 2.0), late, SETTINGS, NOW, resend_unknown=True
    )
    assert state is State.FAILED and values["error_code"] == "SEND_DEADLINE"
    assert "HTTP 503" in values["error_message"] and values["isolation"] is None


def test_an_outage_spends_no_count_of_attempts() -> None:
    """However many attempts a message has, only its deadline fails it."""
    many = Current(attempts=500, unknown_outcomes=0, send_deadline=NOW + timedelta(hours=1))
    _, state, _ = decide(Retry(1, "HTTP 503", True, 60), many, SETTINGS, NOW, resend_unknown=True)
    assert state is State.QUEUED


def test_an_unknown_outcome_is_resent_until_lost_too_often() -> None:
    twice = Current(attempts=2, unknown_outcomes=1, send_deadline=None)
    values, state, _ = decide(Unknown(1, "ReadTimeout"), twice, SETTINGS, NOW, resend_unknown=True)
    assert state is State.QUEUED and values["unknown_outcomes"] == 2
    thrice = Current(attempts=3, unknown_outcomes=2, send_deadline=None)
    values, state, _ = decide(Unknown(1, "ReadTimeout"), thrice, SETTINGS, NOW, resend_unknown=True)
    assert state is State.FAILED and values["unknown_outcomes"] == 3
    assert values["error_code"] == "UNKNOWN_OUTCOME"


def test_an_isolated_row_keeps_its_part_and_no_attempt() -> None:
    values, state, detail = decide(
        Isolate(1, "k1", 250, "refused with its batch (INVALID_PHONE)"),
        FRESH,
        SETTINGS,
        NOW,
        resend_unknown=True,
    )
    assert state is State.QUEUED and values["isolation"] == "k1" and "attempts" not in values
    assert values["available_at"] == NOW and "part of 250" in detail
