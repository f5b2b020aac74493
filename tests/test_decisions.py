"""Pure decisions of the send and poll paths (worker/flows/dispatcher.py, polling.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from config import Settings
from worker.core.states import PROVIDER_STATES, State
from worker.flows.dispatcher import batch_limit, provider_payload, should_flush
from worker.flows.polling import _next, poll_task_room
from worker.provider.smsbat import NotFound, StatusReport, Throttled, Unavailable

pytestmark = pytest.mark.unit

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "SMSBAT_API_KEY": "k",
        "SMSBAT_BASE_URL": "http://sim",
        "DATABASE_URL": "sqlite:///x.db",
    }
    values.update(overrides)
    return Settings(**values)


# --- should_flush --------------------------------------------------------------------


def test_flush_when_batch_is_big_enough() -> None:
    assert should_flush(100, 0.0, batch_min=100, linger=1.0)
    assert should_flush(500, 0.0, batch_min=100, linger=1.0)


def test_no_flush_when_small_and_young() -> None:
    assert not should_flush(99, 0.5, batch_min=100, linger=1.0)


def test_flush_small_batch_once_oldest_lingered() -> None:
    assert should_flush(1, 1.0, batch_min=100, linger=1.0)
    assert should_flush(3, 30.0, batch_min=100, linger=1.0)


def test_never_flush_nothing() -> None:
    assert not should_flush(0, 1000.0, batch_min=100, linger=1.0)
    assert not should_flush(0, 0.0, batch_min=100, linger=0.0)


def test_zero_linger_flushes_any_ready_message() -> None:
    assert should_flush(1, 0.0, batch_min=100, linger=0.0)


# --- batch_limit ---------------------------------------------------------------------


def test_batch_limit_is_batch_max_without_a_rate() -> None:
    assert batch_limit(settings(SEND_BATCH_MAX=800)) == 800


def test_batch_limit_capped_by_messages_per_second() -> None:
    assert batch_limit(settings(SEND_BATCH_MAX=1000, SEND_MESSAGES_PER_SECOND=50)) == 50


def test_batch_limit_rate_above_batch_max() -> None:
    assert batch_limit(settings(SEND_BATCH_MAX=200, SEND_MESSAGES_PER_SECOND=5000)) == 200


# --- provider_payload ----------------------------------------------------------------


def claimed_row(**overrides: Any) -> SimpleNamespace:
    values: dict[str, Any] = {
        "pk": 1,
        "id": "order-1",
        "from_name": "Shop",
        "to_phone": "+380671234567",
        "message_type": "transaction",
        "text": "Your code is 1234",
        "ttl": None,
        "scheduled_sent": None,
        "survey_options": None,
        "route": "standard",
    }
    values.update(overrides)
    return SimpleNamespace(**values)


def test_provider_payload_minimal() -> None:
    assert provider_payload(claimed_row()) == {
        "id": "order-1",
        "fromName": "Shop",
        "toPhone": "+380671234567",
        "messageType": "transaction",
        "text": "Your code is 1234",
    }


def test_provider_payload_full_drops_route_and_formats_time_in_utc() -> None:
    kyiv = timezone(timedelta(hours=2))
    payload = provider_payload(
        claimed_row(
            message_type="viber_survey",
            ttl=3600,
            scheduled_sent=datetime(2025, 3, 2, 10, 30, 15, tzinfo=kyiv),
            survey_options=["Yes", "No"],
            route="tg-viber",
        )
    )
    assert payload == {
        "id": "order-1",
        "fromName": "Shop",
        "toPhone": "+380671234567",
        "messageType": "viber_survey",
        "text": "Your code is 1234",
        "ttl": 3600,
        "scheduledSent": "2025-03-02T08:30:15Z",
        "surveyOptions": ["Yes", "No"],
    }
    assert "route" not in payload


def test_provider_payload_flashcall_without_text() -> None:
    payload = provider_payload(claimed_row(message_type="flashcall", text=None))
    assert "text" not in payload
    assert payload["messageType"] == "flashcall"


def test_provider_payload_empty_survey_options_are_omitted() -> None:
    assert "surveyOptions" not in provider_payload(claimed_row(survey_options=[]))


# --- polling._next -------------------------------------------------------------------

EXACT = {"POLL_JITTER": 0, "POLL_FIRST_DELAY_SECONDS": 5, "POLL_BACKOFF_FACTOR": 2}


def poll_row(**overrides: Any) -> SimpleNamespace:
    values: dict[str, Any] = {
        "pk": 1,
        "state": "submitted",
        "provider_message_id": "uuid-1",
        "polls": 0,
        "last_polled_at": None,
        "poll_deadline": NOW + timedelta(hours=2),
        "next_poll_at": NOW,
        "route": "cascade",
        "submitted_at": NOW - timedelta(seconds=10),
        "scheduled_sent": None,
    }
    values.update(overrides)
    return SimpleNamespace(**values)


def report(status: str, **fields: Any) -> StatusReport:
    return StatusReport(
        message_id="uuid-1", state=PROVIDER_STATES[status], deliverystatus=status, **fields
    )


def test_final_report_sets_state_and_stops_polling() -> None:
    at = NOW - timedelta(seconds=1)
    change = _next(
        poll_row(state="processing", polls=3),
        (at, report("delivered", partscount=1, cost=0.05)),
        settings(),
        NOW,
    )
    assert change["state"] == State.DELIVERED
    assert change["next_poll_at"] is None
    assert change["final_at"] == NOW
    assert change["final_source"] == "poll"
    assert change["polls"] == 4
    assert change["last_polled_at"] == at
    assert change["deliverystatus"] == "delivered"
    assert change["partscount"] == 1
    assert change["cost"] == 0.05


def test_final_report_wins_even_after_the_deadline() -> None:
    row = poll_row(state="processing", poll_deadline=NOW - timedelta(seconds=10))
    change = _next(row, (NOW, report("undeliverable")), settings(), NOW)
    assert change["state"] == State.UNDELIVERABLE
    assert change["final_source"] == "poll"
    assert "error_code" not in change


def test_forward_non_final_report_moves_and_reschedules() -> None:
    change = _next(poll_row(), (NOW, report("processing", partscount=2)), settings(), NOW)
    assert change["state"] == State.PROCESSING
    assert change["partscount"] == 2
    assert change["next_poll_at"] is not None
    assert change["next_poll_at"] > NOW
    assert "final_at" not in change


def test_backwards_report_changes_no_state_nor_fields() -> None:
    row = poll_row(state="processing", polls=2, last_polled_at=NOW - timedelta(seconds=30))
    change = _next(row, (NOW, report("scheduled", partscount=9, cost=1.0)), settings(), NOW)
    assert "state" not in change
    assert "deliverystatus" not in change
    assert "partscount" not in change
    assert "cost" not in change
    assert change["polls"] == 3  # the check still happened
    assert change["next_poll_at"] is not None


def test_equal_report_updates_fields_without_a_state_change() -> None:
    row = poll_row(state="processing", polls=1)
    change = _next(row, (NOW, report("processing", partscount=3, cost=0.1)), settings(), NOW)
    assert "state" not in change
    assert change["deliverystatus"] == "processing"
    assert change["partscount"] == 3
    assert change["cost"] == 0.1
    assert change["next_poll_at"] is not None


@pytest.mark.parametrize("state", ["delivered", "undeliverable", "timeout", "cancelled"])
def test_row_already_final_only_clears_next_poll(state: str) -> None:
    change = _next(poll_row(state=state), (NOW, report("processing")), settings(), NOW)
    assert change == {"next_poll_at": None}


def test_past_deadline_an_answer_times_out() -> None:
    row = poll_row(state="processing", poll_deadline=NOW - timedelta(seconds=1))
    change = _next(row, (NOW, report("processing")), settings(), NOW)
    assert change["state"] == State.TIMEOUT
    assert change["next_poll_at"] is None
    assert change["final_at"] == NOW
    assert change["final_source"] == "system"
    assert change["error_code"] == "TIMEOUT"


def test_deadline_reached_exactly_times_out() -> None:
    change = _next(poll_row(poll_deadline=NOW), (NOW, report("processing")), settings(), NOW)
    assert change["state"] == State.TIMEOUT


@pytest.mark.parametrize("checked", [None, (NOW, Unavailable("HTTP 503")), (NOW, Throttled(5.0))])
def test_a_status_outage_past_the_deadline_delays_the_timeout(checked: Any) -> None:
    """No answer is no evidence: checks go on, at their usual pace, not in a tight loop."""
    row = poll_row(state="processing", poll_deadline=NOW - timedelta(hours=1), polls=3)
    change = _next(row, checked, settings(), NOW)
    assert "state" not in change
    assert change["next_poll_at"] >= NOW + timedelta(seconds=1)


def test_a_status_outage_longer_than_its_grace_times_out() -> None:
    row = poll_row(state="processing", poll_deadline=NOW - timedelta(hours=7))
    change = _next(row, (NOW, Unavailable("HTTP 503")), settings(), NOW)
    assert change["state"] == State.TIMEOUT


def test_past_deadline_with_a_non_final_report_still_times_out() -> None:
    row = poll_row(state="scheduled", poll_deadline=NOW - timedelta(minutes=5))
    change = _next(row, (NOW, report("processing", partscount=1)), settings(), NOW)
    assert change["state"] == State.TIMEOUT
    assert change["partscount"] == 1  # what the provider said is kept
    assert change["polls"] == 1


def test_no_deadline_never_times_out() -> None:
    change = _next(poll_row(poll_deadline=None, polls=500), None, settings(), NOW)
    assert "state" not in change
    assert change["next_poll_at"] is not None


def test_next_poll_counts_from_the_poll_and_grows_with_polls() -> None:
    s = settings(**EXACT)
    at = NOW - timedelta(seconds=2)
    delays = []
    for polls in range(5):
        change = _next(poll_row(polls=polls), (at, Unavailable("x")), s, NOW)
        delays.append((change["next_poll_at"] - at).total_seconds())
    # polls counts checks already made, so the one just made makes it polls + 1
    assert delays == [10.0, 20.0, 40.0, 80.0, 160.0]


def test_next_poll_capped_by_max_interval() -> None:
    s = settings(**EXACT, POLL_MAX_INTERVAL_SECONDS=60)
    change = _next(poll_row(polls=20), (NOW, Unavailable("x")), s, NOW)
    assert change["next_poll_at"] == NOW + timedelta(seconds=60)


@pytest.mark.parametrize("min_gap", [1, 3, 10])
def test_next_poll_respects_min_gap_after_the_last_poll(min_gap: float) -> None:
    s = settings(
        POLL_FIRST_DELAY_SECONDS=0.1,
        POLL_BACKOFF_FACTOR=1,
        POLL_JITTER=0.5,
        POLL_MIN_GAP_SECONDS=min_gap,
    )
    at = NOW - timedelta(seconds=0.2)
    for _ in range(50):
        change = _next(poll_row(), (at, report("scheduled")), s, NOW)
        assert change["next_poll_at"] - at >= timedelta(seconds=min_gap)


def test_unchecked_row_schedules_from_its_last_poll() -> None:
    last = NOW - timedelta(seconds=1)
    s = settings(**EXACT)
    change = _next(poll_row(polls=2, last_polled_at=last), None, s, NOW)
    assert change["next_poll_at"] == last + timedelta(seconds=20)
    assert "polls" not in change  # nothing was checked
    assert "last_polled_at" not in change


def test_never_polled_row_schedules_first_delay_from_now() -> None:
    change = _next(poll_row(), None, settings(**EXACT), NOW)
    assert change["next_poll_at"] == NOW + timedelta(seconds=5)


def test_overdue_schedule_is_pulled_to_now() -> None:
    last = NOW - timedelta(hours=1)
    change = _next(poll_row(polls=1, last_polled_at=last), None, settings(**EXACT), NOW)
    assert NOW < change["next_poll_at"] <= NOW + timedelta(seconds=1)


def test_next_poll_never_after_the_deadline() -> None:
    deadline = NOW + timedelta(seconds=3)
    change = _next(
        poll_row(polls=6, poll_deadline=deadline), (NOW, report("processing")), settings(), NOW
    )
    assert change["next_poll_at"] == deadline


@pytest.mark.parametrize(
    "error", [Unavailable("x"), Throttled(5.0), NotFound("HTTP 404 from /bat/message/u")]
)
def test_error_answer_counts_the_poll_and_reschedules(error: Exception) -> None:
    at = NOW - timedelta(seconds=1)
    row = poll_row(state="scheduled", polls=4, last_polled_at=NOW - timedelta(minutes=1))
    change = _next(row, (at, error), settings(**EXACT), NOW)
    assert change["polls"] == 5
    assert change["last_polled_at"] == at
    assert "state" not in change
    assert change["next_poll_at"] == at + timedelta(seconds=5 * 2**5)


def test_not_found_records_an_error_message() -> None:
    change = _next(poll_row(), (NOW, NotFound("HTTP 404")), settings(), NOW)
    assert "not found" in change["error_message"]
    change = _next(poll_row(), (NOW, Unavailable("HTTP 500")), settings(), NOW)
    assert "error_message" not in change


def test_many_polls_keep_a_schedule() -> None:
    """POLL_MAX_INTERVAL_SECONDS=60 over the default 72 h deadline allows ~4300 polls."""
    s = settings(POLL_MAX_INTERVAL_SECONDS=60)
    row = poll_row(polls=1100, poll_deadline=NOW + timedelta(hours=20))
    change = _next(row, (NOW, report("processing")), s, NOW)
    assert NOW + timedelta(seconds=47) <= change["next_poll_at"] <= NOW + timedelta(seconds=60)


# --- poll_task_room ------------------------------------------------------------------


def test_polling_fills_its_queue_when_nothing_waits_to_be_sent() -> None:
    s = settings(POLL_MAX_QUEUED_TASKS=20, POLL_TASKS_WHILE_SENDING=2)
    assert poll_task_room(0, False, s) == 20
    assert poll_task_room(15, False, s) == 5
    assert poll_task_room(25, False, s) == 0


def test_polling_keeps_a_few_tasks_while_a_full_batch_waits_to_be_sent() -> None:
    s = settings(POLL_MAX_QUEUED_TASKS=20, POLL_TASKS_WHILE_SENDING=2)
    assert poll_task_room(0, True, s) == 2
    assert poll_task_room(1, True, s) == 1
    assert poll_task_room(5, True, s) == 0
    # Never more than the queue's own cap.
    assert poll_task_room(0, True, settings(POLL_MAX_QUEUED_TASKS=1)) == 1
