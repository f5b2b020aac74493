"""Status checks and outcome callbacks under generated interleavings of 429s, 5xx,
timeouts and answers: each keeps its progress, never gives up early, always ends.

The send path has its own state machine over a real database (tests/test_send_model.py);
these two callers decide row by row in pure functions (`polling._next`,
`callbacks.decide`), which a sequence of answers at generated times drives here.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config import Settings
from worker.core.states import FINAL, PROVIDER_STATES, State, rank
from worker.flows.callbacks import DEAD, DELIVERED, PENDING, Result, decide, judge
from worker.flows.polling import _next
from worker.provider.smsbat import NotFound, StatusReport, Throttled, Unauthorized, Unavailable

pytestmark = pytest.mark.unit

NOW = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
SETTINGS = Settings(
    SMSBAT_API_KEY="k",
    DATABASE_URL="sqlite:///x.db",
    POLL_OUTAGE_GRACE_SECONDS=3600,
    CALLBACK_RETRY_FOR_SECONDS=86400,
)  # type: ignore[call-arg]

# --- status checks -------------------------------------------------------------------

STATUS_ANSWERS = st.one_of(
    st.sampled_from(sorted(PROVIDER_STATES)).map(
        lambda s: StatusReport(message_id="m", state=PROVIDER_STATES[s], deliverystatus=s)
    ),
    st.sampled_from(
        [
            Unavailable("HTTP 503"),
            Unavailable("ConnectError on status check"),
            Unavailable("no answer within the poll task's budget"),
            Throttled(5.0),
            Unauthorized("HTTP 401"),
            NotFound("HTTP 404"),
        ]
    ),
    st.none(),  # not checked this round (paused, or not due)
)


@given(
    steps=st.lists(st.tuples(st.floats(0.05, 7200), STATUS_ANSWERS), min_size=1, max_size=40),
    life=st.floats(60, 20000),
)
def test_status_checks_keep_progress_and_never_time_out_early(
    steps: list[tuple[float, Any]], life: float
) -> None:
    deadline = NOW + timedelta(seconds=life)
    grace = timedelta(seconds=SETTINGS.poll_outage_grace_seconds)
    row = SimpleNamespace(
        pk=1,
        state=State.SUBMITTED,
        provider_message_id="m",
        polls=0,
        last_polled_at=None,
        poll_deadline=deadline,
        next_poll_at=NOW,
        route="cascade",
        submitted_at=NOW,
        scheduled_sent=None,
    )
    now = NOW
    for wait, answer in steps:
        if row.state in FINAL:
            break
        now = max(now + timedelta(seconds=wait), row.next_poll_at)
        checked = None if answer is None else (now, answer)
        before = row.state
        change = _next(row, checked, SETTINGS, now)
        for key, value in change.items():
            setattr(row, key, value)
        assert rank(row.state) >= rank(before)  # forward only
        if row.state == State.TIMEOUT:
            answered = isinstance(answer, StatusReport | NotFound)
            assert now >= deadline and (answered or now >= deadline + grace)
        if row.state in FINAL:
            assert row.next_poll_at is None
        else:  # polled again, never in a tight loop, never dropped
            assert row.next_poll_at is not None and row.next_poll_at > now
            if checked is not None:  # the provider saw a check now: the next one a gap later
                assert row.next_poll_at - now >= timedelta(seconds=SETTINGS.poll_min_gap_seconds)
    if row.state not in FINAL and now >= deadline + grace:
        # the next round ends it whatever the provider says: nothing waits forever
        change = _next(row, (now, Unavailable("HTTP 503")), SETTINGS, now)
        assert change["state"] == State.TIMEOUT


# --- outcome callbacks ---------------------------------------------------------------

CALLBACK_ANSWERS = st.sampled_from(
    [
        (200, None),
        (204, None),
        (429, "30"),
        (429, None),
        (500, None),
        (503, "Wed, 21 Oct 2015 07:28:00 GMT"),
        (408, None),
        ("timeout", None),
        ("reset", None),
    ]
)


def callback_result(answer: tuple[Any, str | None]) -> Result:
    status, retry_after = answer
    if status == "timeout":
        return Result(1, "retry", "no answer within 10 s")
    if status == "reset":
        return Result(1, "retry", "ConnectError: connection reset")
    return judge(1, status, "", retry_after)


@given(steps=st.lists(st.tuples(st.floats(0, 50000), CALLBACK_ANSWERS), min_size=1, max_size=60))
def test_callbacks_retry_passing_trouble_until_their_window_and_no_longer(
    steps: list[tuple[float, tuple[Any, str | None]]],
) -> None:
    created = NOW
    give_up_at = created + timedelta(seconds=SETTINGS.callback_retry_for_seconds)
    row = SimpleNamespace(
        pk=1, attempts=0, created_at=created, last_error=None, lease_until=None, state=PENDING
    )
    now = created
    for wait, answer in steps:
        now = now + timedelta(seconds=wait)
        result = callback_result(answer)
        change = decide(row, result, SETTINGS, now)
        assert change["attempts"] == row.attempts + 1  # every attempt counted, none lost
        for key, value in change.items():
            setattr(row, key, value)
        if result.verdict == "delivered":
            assert row.state == DELIVERED
            break
        if row.state == DEAD:  # only the window ends passing trouble
            assert now >= give_up_at and "gave up" in row.last_error
            break
        assert row.state == PENDING
        assert now <= row.next_attempt_at <= give_up_at  # never scheduled past the window
        now = max(now, row.next_attempt_at)
