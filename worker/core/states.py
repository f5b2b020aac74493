"""The message state machine: which states exist, which are final, which moves are allowed.

Provider reports (poll, webhook, DLR) may arrive late, twice or out of order; `advance`
only ever moves a message forward and never out of a final state, so a late `processing`
cannot undo a `delivered`, and the first final answer recorded is the one that stands.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    QUEUED = "queued"
    HELD = "held"  # not sent while its campaign is held for approval or paused
    SENDING = "sending"
    SUBMITTED = "submitted"
    SCHEDULED = "scheduled"
    PROCESSING = "processing"
    DELIVERED = "delivered"
    UNDELIVERABLE = "undeliverable"
    PERMANENTERROR = "permanenterror"
    REJECTED = "rejected"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    # The recipient opted out (a STOP reply, `cascade optout add`) while a promo or survey
    # to them was still unsent: never sent, final (worker/flows/consent.py).
    SUPPRESSED = "suppressed"


FINAL: frozenset[State] = frozenset(
    {
        State.DELIVERED,
        State.UNDELIVERABLE,
        State.PERMANENTERROR,
        State.REJECTED,
        State.FAILED,
        State.EXPIRED,
        State.CANCELLED,
        State.TIMEOUT,
        State.SUPPRESSED,
    }
)

# The provider's `deliverystatus` values, in lifecycle order.
PROVIDER_STATES: dict[str, State] = {
    "scheduled": State.SCHEDULED,
    "processing": State.PROCESSING,
    "delivered": State.DELIVERED,
    "undeliverable": State.UNDELIVERABLE,
    "permanenterror": State.PERMANENTERROR,
}

_RANK: dict[State, int] = {
    State.QUEUED: 0,
    State.HELD: 0,
    State.SENDING: 1,
    State.SUBMITTED: 2,
    State.SCHEDULED: 3,
    State.PROCESSING: 4,
}
_FINAL_RANK = 9

# Moves the worker itself makes (not provider reports).
_SYSTEM_MOVES: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset(
        {
            State.SENDING,
            State.REJECTED,
            State.EXPIRED,
            State.CANCELLED,
            State.FAILED,
            State.HELD,
            State.SUPPRESSED,
        }
    ),
    # A held or paused campaign's messages: back to the queue on approve or resume.
    State.HELD: frozenset({State.QUEUED, State.CANCELLED, State.SUPPRESSED}),
    State.SENDING: frozenset(
        {
            State.QUEUED,
            State.SUBMITTED,
            State.REJECTED,
            State.FAILED,
            State.EXPIRED,
            State.CANCELLED,
        }
    ),
    State.SUBMITTED: frozenset({State.TIMEOUT}),
    State.SCHEDULED: frozenset({State.TIMEOUT}),
    State.PROCESSING: frozenset({State.TIMEOUT}),
}


def is_final(state: str) -> bool:
    return state in FINAL


def rank(state: str) -> int:
    return _FINAL_RANK if state in FINAL else _RANK[State(state)]


def advance(current: str, reported: str) -> bool:
    """Whether a provider report of `reported` moves a message now in `current` forward.

    Reports only apply once the message is with the provider (submitted or later); a
    final state never changes; an equal or earlier state is a no-op.
    """
    if current in FINAL or rank(current) < rank(State.SUBMITTED):
        return False
    return rank(reported) > rank(current)


def can_move(current: str, target: str) -> bool:
    """Whether the worker may move a message from `current` to `target` on its own."""
    return State(target) in _SYSTEM_MOVES.get(State(current), frozenset())


# Journal sources of the worker's own moves; every other source is a provider report.
WORKER_SOURCES = frozenset({"send", "system"})


def journal_allows(source: str, from_state: str | None, to_state: str) -> bool:
    """Whether a message_events row records a move this machine allows: the audit of a run.

    The worker's moves follow `can_move`, provider reports `advance`; a bug that writes
    around the SQL guards (a lost claim recorded anyway, a report moving a final message)
    shows up here as a row that fails.
    """
    if from_state is None:
        return False
    if source in WORKER_SOURCES:
        return can_move(from_state, to_state)
    return advance(from_state, to_state)
