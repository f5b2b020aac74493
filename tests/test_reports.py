"""Campaign reports on real databases: figures from rows whose outcome is known exactly."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from config import Settings
from tests.conftest import make_messages
from worker.core.validation import validate_message
from worker.flows.producer import row_for, store
from worker.ops import reports
from worker.ops.html_report import render_html
from worker.ops.reports import (
    OUTCOME_COLUMNS,
    UNKNOWN_CURRENCY_NOTE,
    campaign_report,
    deliveries_over_time,
    message_outcomes,
)
from worker.store.db import get_engine, utcnow
from worker.store.models import messages

T0 = datetime(2025, 1, 1, 10, 0, tzinfo=UTC)
SUBMITTED = T0 + timedelta(seconds=2.5)
NAME = "<script>x</script>"
UAH = {"cost": 0.5, "bill_amount": 0.6, "bill_currency": "UAH"}
EXISTING_KEYS = (
    *("campaign", "total", "states", "final", "all_final", "sent", "delivered"),
    *("delivery_rate", "delivery_rate_of_sent", "cost", "unknown_outcomes", "polls"),
)
ALL_FAILED = {"telegram": "undeliverable", "viber": "undeliverable", "rcs": "undeliverable"}


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _provider(state: str, latency: float, extended: Any, **money: Any) -> dict[str, Any]:
    """A message the provider answered for, `latency` seconds after its submit."""
    return {
        "state": state,
        "deliverystatus": state,
        "submitted_at": SUBMITTED,
        "final_at": SUBMITTED + timedelta(seconds=latency),
        "extended_statuses": extended,
        "polls": 2,
        **money,
    }


# Message n of the campaign; all were enqueued at T0. Submit-to-final latencies of the ten
# provider-final messages are 1..10 s in shuffled order; each also waited 2.5 s to submit.
CAMPAIGN: list[dict[str, Any]] = [
    _provider("delivered", 5, {"telegram": "delivered", "sms": "not_used"}, **UAH),
    _provider("delivered", 1, {"telegram": "delivered"}, **UAH),
    _provider(
        "delivered",
        9,
        {"telegram": "undeliverable", "viber": "delivered"},
        cost=0.5,
        bill_amount=0.6,
        rate_currency="UAH",
    ),
    _provider("delivered", 3, {"telegram": "undeliverable", "viber": "DELIVERED"}, **UAH),
    _provider(
        "delivered", 7, {"viber": "delivered", "sms": "not_used"}, **UAH, rate_currency="EUR"
    ),
    _provider(
        "delivered",
        2,
        {**ALL_FAILED, "sms": "delivered"},
        cost=1.0,
        bill_amount=1.1,
        bill_currency="USD",
    ),
    _provider("delivered", 10, {"telegram": "undeliverable", "rcs": "delivered"}, cost=0.25),
    _provider("undeliverable", 4, {**ALL_FAILED, "sms": "undeliverable"}, **UAH),
    _provider("undeliverable", 8, None, **UAH),
    _provider("permanenterror", 6, {"telegram": "permanenterror"}),
    {"state": "rejected", "final_at": _at(1), "error_code": "INVALID_PHONE"},
    {"state": "rejected", "final_at": _at(1), "error_code": "INVALID_PHONE"},
    {"state": "failed", "final_at": _at(3), "error_code": "UNKNOWN_OUTCOME", "unknown_outcomes": 1},
    {"state": "timeout", "submitted_at": SUBMITTED, "final_at": _at(60), "error_code": "TIMEOUT"},
    {"state": "expired", "final_at": _at(30), "error_code": "TTL_EXPIRED"},
    {"state": "queued", "created_at": _at(45), "error_code": "SEND_RETRY", "attempts": 1},
    {"state": "processing", "submitted_at": SUBMITTED, "extended_statuses": {"telegram": "sent"}},
]


def _fill(engine: Engine, campaign: str, prefix: str, changes: list[dict[str, Any]]) -> None:
    """Store one valid message per entry, then give it the entry's columns and T0."""
    now, settings = utcnow(), Settings()
    rows = []
    for raw in make_messages(len(changes), prefix):
        checked = validate_message(raw, now=now)
        assert not isinstance(checked, list), checked
        rows.append(row_for(checked, campaign, now, settings))
    store(engine, rows)
    with engine.begin() as conn:
        for n, change in enumerate(changes):
            sent = {"provider_message_id": f"pm-{prefix}-{n}"} if "submitted_at" in change else {}
            conn.execute(
                messages.update()
                .where(messages.c.id == f"{prefix}-{n}")
                .values({"created_at": T0, "available_at": T0, **sent, **change})
            )


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, database_factory: Callable[[str], str]) -> Engine:
    """One database per backend: the campaign under test, and another that must not count."""
    built = get_engine(database_factory(request.param))
    _fill(built, NAME, "ops", CAMPAIGN)
    other = [_provider("delivered", 99, {"telegram": "delivered"}, cost=7.0, bill_currency="EUR")]
    _fill(built, "other", "other", [*other, {"state": "rejected", "error_code": "INVALID_PHONE"}])
    return built


def test_existing_figures_are_unchanged(engine: Engine) -> None:
    report = campaign_report(engine, NAME)

    assert report is not None
    assert {key: report[key] for key in EXISTING_KEYS} == {
        "campaign": NAME,
        "total": 17,
        "states": {
            "delivered": 7,
            "expired": 1,
            "failed": 1,
            "permanenterror": 1,
            "processing": 1,
            "queued": 1,
            "rejected": 2,
            "timeout": 1,
            "undeliverable": 2,
        },
        "final": 15,
        "all_final": False,
        "sent": 12,
        "delivered": 7,
        "delivery_rate": 0.4118,
        "delivery_rate_of_sent": 0.5833,
        "cost": None,  # UAH, USD and unknown amounts: never added (issue 13)
        "unknown_outcomes": 1,
        "polls": 20,
    }


def test_money_per_currency_bill_first_then_rate(engine: Engine) -> None:
    report = campaign_report(engine, NAME)

    assert report is not None
    assert report["money"] == {
        "UAH": {"cost": 3.5, "bill": 4.2, "messages": 7, "note": None},
        "USD": {"cost": 1.0, "bill": 1.1, "messages": 1, "note": None},
        "unknown": {"cost": 0.25, "bill": 0.0, "messages": 1, "note": UNKNOWN_CURRENCY_NOTE},
    }
    assert report["cost"] is None and report["cost_currency"] is None


def test_status_shows_a_campaign_whose_amounts_are_in_several_currencies(engine: Engine) -> None:
    """`cascade campaign status` of a campaign priced by polls (UAH) and BulkGate DLRs
    (unknown) printed a KeyError: the summary had no `money` to list apart."""
    from rich.console import Console

    from worker.ops.cli import status_view

    summary = reports.campaign_summary(engine, NAME)
    assert summary is not None and summary["cost"] is None
    shown = Console(record=True, width=200)
    shown.print(status_view(summary, None))
    assert "in several currencies, never added: 3.50 UAH, 1.00 USD, 0.25 unknown" in (
        shown.export_text()
    )


def test_channels_count_the_delivering_channel_and_none(engine: Engine) -> None:
    report = campaign_report(engine, NAME)

    assert report is not None
    assert list(report["channels"].items()) == [
        ("telegram", 2),
        ("viber", 3),
        ("rcs", 1),
        ("sms", 1),
        ("none", 2),  # the provider listed channels, none delivered
        ("not reported", 1),  # no extendedStatuses at all (a BulkGate DLR)
    ]


def test_latency_percentiles_cover_provider_final_messages_only(engine: Engine) -> None:
    report = campaign_report(engine, NAME)

    assert report is not None
    assert report["latency_seconds"] == {
        "submit_to_final": {"p50": 5.0, "p90": 9.0, "p99": 10.0, "max": 10.0},
        "enqueue_to_final": {"p50": 7.5, "p90": 11.5, "p99": 12.5, "max": 12.5},
    }


def test_percentiles_are_nearest_rank(engine: Engine) -> None:
    campaign = f"ranks-{uuid.uuid4().hex[:6]}"
    latencies = [(5 * n) % 21 + 1 for n in range(21)]  # 1..21 s, shuffled
    _fill(engine, campaign, campaign, [_provider("delivered", s, None) for s in latencies])

    report = campaign_report(engine, campaign)

    assert report is not None
    assert report["latency_seconds"]["submit_to_final"] == {
        "p50": 11.0,  # rank ceil(0.5 × 21) = 11
        "p90": 19.0,  # rank ceil(0.9 × 21) = 19
        "p99": 21.0,
        "max": 21.0,
    }


def test_top_errors_and_campaign_span(engine: Engine) -> None:
    report = campaign_report(engine, NAME)

    assert report is not None
    assert report["top_errors"] == [
        {"code": "INVALID_PHONE", "count": 2},
        {"code": "undeliverable (no error code reported)", "count": 2},
        {"code": "SEND_RETRY", "count": 1},
        {"code": "TIMEOUT", "count": 1},
        {"code": "TTL_EXPIRED", "count": 1},
        {"code": "UNKNOWN_OUTCOME", "count": 1},
        {"code": "permanenterror (no error code reported)", "count": 1},
    ]
    assert report["first_enqueued_at"] == "2025-01-01T10:00:00Z"
    assert report["last_final_at"] == "2025-01-01T10:01:00Z"


def test_a_campaign_without_answers_has_empty_figures_and_ten_errors_at_most(
    engine: Engine,
) -> None:
    campaign = f"retrying-{uuid.uuid4().hex[:6]}"
    _fill(engine, campaign, campaign, [{"error_code": f"E{n:02d}"} for n in range(12)])

    report = campaign_report(engine, campaign)

    assert report is not None
    assert report["top_errors"] == [{"code": f"E{n:02d}", "count": 1} for n in range(10)]
    assert report["money"] == {}
    assert report["channels"] == {}
    nothing = {"p50": None, "p90": None, "p99": None, "max": None}
    assert report["latency_seconds"] == {"submit_to_final": nothing, "enqueue_to_final": nothing}
    assert report["first_enqueued_at"] == "2025-01-01T10:00:00Z"
    assert report["last_final_at"] is None
    assert deliveries_over_time(engine, campaign)["buckets"] == []


def test_outcomes_stream_every_message_with_masked_phones(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reports, "OUTCOME_PAGE", 5)  # 17 messages: four pages

    outcomes = list(message_outcomes(engine, NAME))

    assert [o["id"] for o in outcomes] == [f"ops-{n}" for n in range(17)]
    assert all(tuple(o) == OUTCOME_COLUMNS for o in outcomes)
    assert outcomes[5] == {
        "id": "ops-5",
        "toPhone": "+380*******05",
        "messageType": "transaction",
        "route": "standard",
        "state": "delivered",
        "messageId": "pm-ops-5",
        "deliverystatus": "delivered",
        "channel": "sms",
        "partscount": None,
        "cost": 1.0,
        "billAmount": 1.1,
        "billCurrency": "USD",
        "errorCode": None,
        "errorMessage": None,
        "unknownOutcomes": 0,
        "attempts": 0,
        "polls": 2,
        "createdAt": "2025-01-01T10:00:00Z",
        "submittedAt": "2025-01-01T10:00:02.500000Z",
        "finalAt": "2025-01-01T10:00:04.500000Z",
    }
    assert [o["channel"] for o in outcomes[:10]] == [
        *("telegram", "telegram", "viber", "viber", "viber", "sms", "rcs"),
        *("", "", ""),
    ]
    assert outcomes[16]["channel"] == ""
    assert not any("+38067" in str(value) for o in outcomes for value in o.values())


def test_timeline_buckets_hold_every_final_message_at_its_time(engine: Engine) -> None:
    timeline = deliveries_over_time(engine, NAME, buckets=12)

    assert timeline["bucket_seconds"] == 5  # 60 s from first enqueue to last final
    assert timeline["start"] == "2025-01-01T10:00:00Z"
    assert timeline["states"] == [
        *("delivered", "undeliverable", "permanenterror"),
        *("rejected", "failed", "expired", "timeout"),
    ]
    buckets = timeline["buckets"]
    assert len(buckets) == 12
    assert buckets[1]["start"] == "2025-01-01T10:00:05Z"
    counts = [{s: n for s, n in b["counts"].items() if n} for b in buckets]
    assert counts[0] == {"delivered": 2, "rejected": 2, "failed": 1}
    assert counts[1] == {"delivered": 3, "undeliverable": 1, "permanenterror": 1}
    assert counts[2] == {"delivered": 2, "undeliverable": 1}
    assert counts[6] == {"expired": 1}
    assert counts[11] == {"timeout": 1}  # the last final closes the last bucket
    assert not any(counts[n] for n in (3, 4, 5, 7, 8, 9, 10))
    assert sum(sum(b["counts"].values()) for b in buckets) == 15


def test_timeline_default_width_fits_sixty_buckets(engine: Engine) -> None:
    timeline = deliveries_over_time(engine, NAME)

    assert timeline["bucket_seconds"] == 1
    assert len(timeline["buckets"]) == 60
    assert sum(sum(b["counts"].values()) for b in timeline["buckets"]) == 15


def test_html_page_shows_the_figures_and_escapes_data(engine: Engine) -> None:
    report = campaign_report(engine, NAME)
    assert report is not None

    page = render_html(report, deliveries_over_time(engine, NAME, buckets=12))

    assert NAME not in page
    assert "Campaign &lt;script&gt;x&lt;/script&gt;" in page
    for external in ("<script", "<link", "src=", "href=", "url(", "@import", "http"):
        assert external not in page, external
    for figure in ("17", "41.2%", "58.3%", "Cost UAH", "3.50", "billed 4.20", "Cost USD"):
        assert figure in page, figure
    assert page.count("<svg") == 3  # timeline, states, channels
    assert "<title>10:00:05 delivered: 3</title>" in page
    for text in ("telegram", "permanenterror", "INVALID_PHONE", "12.5", "UNKNOWN_OUTCOME"):
        assert text in page, text
