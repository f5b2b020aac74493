"""Global caps (worker/flows/quota.py): DAILY_MESSAGE_CAP and DAILY_SPEND_BUDGET over every
campaign, on both databases, through the dispatcher's real send path (the provider behind
httpx's MockTransport, the clock injected). Reaching a cap pauses: nothing is dropped or
failed, status and reports say why, the log says it once."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy import func, select

from config import Settings
from tests.conftest import make_messages
from tests.helpers import Clock, MemoryPacing
from worker.core.states import State
from worker.core.validation import validate_message
from worker.flows import dispatcher, quota
from worker.flows.campaigns import campaign_control
from worker.flows.producer import row_for, store
from worker.flows.sweeper import give_up
from worker.ops.cli import status_view
from worker.ops.reports import campaign_report
from worker.provider.smsbat import SendClient
from worker.store.db import get_engine
from worker.store.models import messages

BACKENDS = pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
ENV = {
    "SMSBAT_API_KEY": "quota-key",
    "SMSBAT_BASE_URL": "http://provider.quota",
    "SEND_BATCH_MAX": "10",
    "SEND_BATCH_MIN": "1",
    "SEND_LINGER_SECONDS": "0",
    "SEND_RETRY_FOR_SECONDS": "3600",
}
PRICED = {"RATE_CARD": "380:sms=0.5", "RATE_CARD_CURRENCY": "UAH"}


class Provider:
    """Accepts every message; remembers which it was sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        batch = json.loads(request.content)
        self.sent += [m["id"] for m in batch]
        return httpx.Response(
            200, json=[{"messageId": uuid.uuid4().hex, "trackinId": m["id"]} for m in batch]
        )


def _store(url: str, settings: Settings, count: int, campaign: str, now: datetime) -> None:
    rows = []
    for raw in make_messages(count, campaign):
        checked = validate_message(raw, now=now)
        assert not isinstance(checked, list), checked
        rows.append(row_for(checked, campaign, now, settings))
    store(get_engine(url), rows, campaign)


def _send_all(url: str, settings: Settings, clock: Clock, provider: Provider) -> list[Any]:
    """send_batch until nothing more is claimed; answers the reports."""
    client = SendClient(settings, transport=httpx.MockTransport(provider.handle))
    reports = []
    for _ in range(20):
        report = dispatcher.send_batch(
            get_engine(url), client, MemoryPacing(clock), settings, "standard", clock=clock
        )
        reports.append(report)
        clock.now += timedelta(milliseconds=10)
        if not report.claimed:
            break
    return reports


def _states(url: str, campaign: str) -> dict[str, int]:
    with get_engine(url).connect() as conn:
        return dict(
            conn.execute(
                select(messages.c.state, func.count())
                .where(messages.c.campaign == campaign)
                .group_by(messages.c.state)
            ).all()
        )


@BACKENDS
def test_the_global_daily_cap_pauses_sending_and_drops_nothing(
    backend: str, database_factory: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    url = database_factory(backend)
    settings = Settings(**ENV, DATABASE_URL=url, DAILY_MESSAGE_CAP="25")  # type: ignore[arg-type]
    clock, provider = Clock(), Provider()
    _store(url, settings, 40, "g", clock())
    with caplog.at_level(logging.WARNING, logger="worker.quota"):
        reports = _send_all(url, settings, clock, provider)

    assert len(provider.sent) == 25 == len(set(provider.sent))
    assert _states(url, "g") == {State.SUBMITTED: 25, State.QUEUED: 15}
    why = "global daily cap of 25 messages (DAILY_MESSAGE_CAP) reached"
    assert reports[-1].capped and reports[-1].capped.startswith(why) and not reports[-1].claimed
    said = [r.getMessage() for r in caplog.records if why in r.getMessage()]
    assert len(said) == 1 and "25 messages sent today (UTC)" in said[0]
    control = campaign_control(get_engine(url), "g")
    assert control["status"] == "capped" and control["pause_reason"].startswith(why)
    assert "messages stay queued, not dropped" in control["pause_reason"]
    report = campaign_report(get_engine(url), "g")
    assert report and report["control"]["status"] == "capped"
    shown = Console(record=True, width=300)
    shown.print(status_view(report, None))
    assert f"capped: {why}" in shown.export_text()  # what `cascade campaign status` prints
    assert quota.today(get_engine(url), settings, clock())["messages"] == 25

    # Hours later, past their send deadline: the sweeper must not fail them while capped.
    engine = get_engine(url)
    assert quota.keep_waiting(engine, settings, clock()) == 15
    with engine.connect() as conn:
        deadlines = conn.execute(
            select(messages.c.send_deadline).where(messages.c.state == State.QUEUED)
        ).scalars()
        assert min(deadlines) >= quota.next_midnight(clock()) + timedelta(seconds=3600)
    assert give_up(engine, clock() + timedelta(hours=2)) == 0

    # The next UTC day the rest goes.
    clock.now = quota.next_midnight(clock()) + timedelta(minutes=1)
    _send_all(url, settings, clock, provider)
    assert _states(url, "g") == {State.SUBMITTED: 40}
    assert sorted(provider.sent) == sorted(f"g-{i}" for i in range(40))


@BACKENDS
def test_the_global_spend_budget_counts_the_rate_card_and_a_raised_budget_lifts_it(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    env = {**ENV, **PRICED, "DATABASE_URL": url}
    settings = Settings(**env, DAILY_SPEND_BUDGET="5.2")  # type: ignore[arg-type]
    clock, provider = Clock(), Provider()
    _store(url, settings, 20, "b", clock())  # one SMS part each: 0.50 UAH
    reports = _send_all(url, settings, clock, provider)

    assert len(provider.sent) == 10  # 5.00 spent; the next would make 5.50 > 5.20
    assert _states(url, "b") == {State.SUBMITTED: 10, State.QUEUED: 10}
    assert reports[-1].capped and reports[-1].capped.startswith(
        "global daily spend budget of 5.20 UAH (DAILY_SPEND_BUDGET; 5.00 spent) reached"
    )
    assert campaign_control(get_engine(url), "b")["status"] == "capped"

    raised = Settings(**env, DAILY_SPEND_BUDGET="100")  # type: ignore[arg-type]
    assert quota.stopped(get_engine(url), raised, clock()) is None
    _send_all(url, raised, clock, provider)
    assert _states(url, "b") == {State.SUBMITTED: 20}
    assert campaign_control(get_engine(url), "b")["status"] == "running"
    assert quota.today(get_engine(url), raised, clock())["spend"] == 10.0


def test_the_caps_are_checked_at_start_naming_the_setting() -> None:
    with pytest.raises(ValidationError, match="DAILY_SPEND_BUDGET needs RATE_CARD"):
        Settings(DAILY_SPEND_BUDGET="10")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="DAILY_MESSAGE_CAP"):
        Settings(DAILY_MESSAGE_CAP="0")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="DAILY_SPEND_BUDGET"):
        Settings(**PRICED, DAILY_SPEND_BUDGET="-1")  # type: ignore[arg-type]


def test_a_message_is_priced_per_sms_part_and_unpriced_numbers_cost_nothing() -> None:
    card = {"380": {"sms": 0.5, "viber": 0.2}}

    def row(phone: str, text: str = "x" * 200, route: str = "standard") -> SimpleNamespace:
        return SimpleNamespace(message_type="promo", route=route, text=text, to_phone=phone)

    assert quota.price(row("+380671234567"), card) == 1.0  # two GSM-7 parts
    assert quota.price(row("+380671234567", route="tg-viber"), card) == 0.2  # per message
    assert quota.price(row("+48601234567"), card) == 0.0  # no price for Poland
    assert quota.price(row("+380671234567"), None) == 0.0


def test_next_midnight_is_utc() -> None:
    assert quota.next_midnight(datetime(2026, 1, 1, 23, 59, tzinfo=UTC)) == datetime(
        2026, 1, 2, tzinfo=UTC
    )
