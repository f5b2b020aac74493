"""The message state machine (worker/core/states.py): pure, no I/O."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.core.states import (
    FINAL,
    PROVIDER_STATES,
    State,
    advance,
    can_move,
    is_final,
    journal_allows,
    rank,
)

pytestmark = pytest.mark.unit

PRE_SUBMIT = (State.QUEUED, State.SENDING)
LIVE = (State.SUBMITTED, State.SCHEDULED, State.PROCESSING)
PROVIDER = tuple(PROVIDER_STATES.values())


# --- FINAL ---------------------------------------------------------------------------


def test_final_set_is_exactly_the_terminal_states() -> None:
    expected = {
        State.DELIVERED,
        State.UNDELIVERABLE,
        State.PERMANENTERROR,
        State.REJECTED,
        State.FAILED,
        State.EXPIRED,
        State.CANCELLED,
        State.TIMEOUT,
        State.SUPPRESSED,  # the recipient opted out before it was sent (worker/flows/consent.py)
    }
    assert expected == FINAL


@pytest.mark.parametrize("state", [*PRE_SUBMIT, *LIVE])
def test_working_states_are_not_final(state: State) -> None:
    assert state not in FINAL
    assert not is_final(state)
    assert not is_final(state.value)


@pytest.mark.parametrize("state", sorted(FINAL))
def test_is_final_accepts_plain_strings(state: State) -> None:
    assert is_final(state.value)


def test_provider_states_map_the_provider_vocabulary() -> None:
    assert PROVIDER_STATES == {
        "scheduled": State.SCHEDULED,
        "processing": State.PROCESSING,
        "delivered": State.DELIVERED,
        "undeliverable": State.UNDELIVERABLE,
        "permanenterror": State.PERMANENTERROR,
    }


def test_rank_follows_the_lifecycle() -> None:
    order = [State.QUEUED, State.SENDING, State.SUBMITTED, State.SCHEDULED, State.PROCESSING]
    ranks = [rank(s) for s in order]
    assert ranks == sorted(ranks)
    assert len(set(ranks)) == len(ranks)
    assert all(rank(f) > rank(State.PROCESSING) for f in FINAL)
    assert len({rank(f) for f in FINAL}) == 1


# --- advance -------------------------------------------------------------------------


@pytest.mark.parametrize("current", sorted(FINAL))
@pytest.mark.parametrize("reported", PROVIDER)
def test_advance_never_leaves_a_final_state(current: State, reported: State) -> None:
    assert advance(current, reported) is False
    assert advance(current.value, reported.value) is False


@pytest.mark.parametrize("current", PRE_SUBMIT)
@pytest.mark.parametrize("reported", PROVIDER)
def test_advance_ignores_reports_before_submit(current: State, reported: State) -> None:
    assert advance(current, reported) is False


@pytest.mark.parametrize(
    ("current", "reported"),
    [
        (State.SCHEDULED, State.SUBMITTED),
        (State.PROCESSING, State.SCHEDULED),
        (State.PROCESSING, State.SUBMITTED),
        (State.SUBMITTED, State.QUEUED),
        (State.PROCESSING, State.SENDING),
    ],
)
def test_advance_never_moves_backwards(current: State, reported: State) -> None:
    assert advance(current, reported) is False


@pytest.mark.parametrize("state", LIVE)
def test_advance_equal_state_is_a_no_op(state: State) -> None:
    assert advance(state, state) is False
    assert advance(state.value, state.value) is False


@pytest.mark.parametrize(
    ("current", "reported"),
    [
        (State.SUBMITTED, State.SCHEDULED),
        (State.SUBMITTED, State.PROCESSING),
        (State.SUBMITTED, State.DELIVERED),
        (State.SCHEDULED, State.PROCESSING),
        (State.SCHEDULED, State.UNDELIVERABLE),
        (State.PROCESSING, State.DELIVERED),
        (State.PROCESSING, State.PERMANENTERROR),
    ],
)
def test_advance_moves_forward(current: State, reported: State) -> None:
    assert advance(current, reported) is True
    assert advance(current.value, reported.value) is True


# --- can_move ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (State.QUEUED, State.SENDING),
        (State.QUEUED, State.REJECTED),
        (State.QUEUED, State.EXPIRED),
        (State.QUEUED, State.CANCELLED),
        (State.QUEUED, State.FAILED),
        (State.SENDING, State.QUEUED),
        (State.SENDING, State.SUBMITTED),
        (State.SENDING, State.REJECTED),
        (State.SENDING, State.FAILED),
        (State.SENDING, State.EXPIRED),
        (State.SENDING, State.CANCELLED),  # a failed send of a cancelled campaign
        (State.SUBMITTED, State.TIMEOUT),
        (State.SCHEDULED, State.TIMEOUT),
        (State.PROCESSING, State.TIMEOUT),
    ],
)
def test_can_move_allows_the_worker_moves(current: State, target: State) -> None:
    assert can_move(current, target)
    assert can_move(current.value, target.value)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (State.QUEUED, State.SUBMITTED),  # must go through sending
        (State.QUEUED, State.DELIVERED),
        (State.SUBMITTED, State.QUEUED),
        (State.SUBMITTED, State.CANCELLED),
        (State.SUBMITTED, State.DELIVERED),  # only a provider report delivers
        (State.PROCESSING, State.SCHEDULED),
        (State.QUEUED, State.TIMEOUT),
    ],
)
def test_can_move_refuses_other_moves(current: State, target: State) -> None:
    assert not can_move(current, target)


@pytest.mark.parametrize("current", sorted(FINAL))
@pytest.mark.parametrize("target", list(State))
def test_can_move_never_leaves_a_final_state(current: State, target: State) -> None:
    assert not can_move(current, target)


def test_can_move_rejects_unknown_states() -> None:
    with pytest.raises(ValueError):
        can_move("queued", "bogus")


# --- journal_allows --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "from_state", "to_state", "allowed"),
    [
        ("send", "sending", "submitted", True),
        ("system", "sending", "queued", True),  # a lease expired: sent again
        ("system", "processing", "timeout", True),
        ("send", "sending", "delivered", False),  # only a report says delivered
        ("system", "delivered", "queued", False),  # a final message never comes back
        ("poll", "submitted", "processing", True),
        ("webhook", "processing", "delivered", True),
        ("dlr", "delivered", "undeliverable", False),  # the first final answer stands
        ("poll", "processing", "scheduled", False),  # never backwards
        ("webhook", "sending", "delivered", False),  # not with the provider yet
        ("poll", None, "delivered", False),
    ],
)
def test_journal_allows_worker_moves_and_forward_reports_only(
    source: str, from_state: str | None, to_state: str, allowed: bool
) -> None:
    assert journal_allows(source, from_state, to_state) is allowed


# --- properties ----------------------------------------------------------------------


def _apply(start: State, reports: list[State]) -> list[State]:
    """Every state a message goes through while `reports` arrive in order."""
    trail = [start]
    for reported in reports:
        trail.append(reported if advance(trail[-1], reported) else trail[-1])
    return trail


reports_strategy = st.lists(st.sampled_from(PROVIDER), max_size=12)


@given(reports_strategy)
def test_rank_never_decreases_and_final_never_changes(reports: list[State]) -> None:
    trail = _apply(State.SUBMITTED, reports)
    ranks = [rank(s) for s in trail]
    assert ranks == sorted(ranks)
    for i, state in enumerate(trail):
        if state in FINAL:
            assert all(later == state for later in trail[i:])


@given(reports_strategy)
def test_end_state_is_the_first_report_of_maximal_rank(reports: list[State]) -> None:
    """The outcome equals applying the first highest-ranked report alone.

    Among several *different* final reports the first one wins (all finals share a
    rank), so order matters only then: see the next test.
    """
    end = _apply(State.SUBMITTED, reports)[-1]
    if not reports:
        assert end == State.SUBMITTED
        return
    top = max(rank(r) for r in reports)
    first_top = next(r for r in reports if rank(r) == top)
    assert end == first_top
    assert _apply(State.SUBMITTED, [first_top, *reports])[-1] == end


@given(reports_strategy, st.randoms(use_true_random=False))
def test_order_does_not_matter_when_reports_agree_on_the_final(
    reports: list[State], rnd: random.Random
) -> None:
    finals = {r for r in reports if r in FINAL}
    if len(finals) > 1:
        reports = [r for r in reports if r not in FINAL or r == min(finals)]
    shuffled = list(reports)
    rnd.shuffle(shuffled)
    assert _apply(State.SUBMITTED, reports)[-1] == _apply(State.SUBMITTED, shuffled)[-1]


def test_conflicting_finals_keep_the_first_one() -> None:
    assert _apply(State.SUBMITTED, [State.DELIVERED, State.UNDELIVERABLE])[-1] == State.DELIVERED
    assert _apply(State.SUBMITTED, [State.UNDELIVERABLE, State.DELIVERED])[-1] == (
        State.UNDELIVERABLE
    )


@given(st.sampled_from(list(State)), reports_strategy)
def test_reports_never_touch_a_message_not_yet_submitted_or_final(
    start: State, reports: list[State]
) -> None:
    if start in LIVE:
        return
    assert set(_apply(start, reports)) == {start}
