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
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy import func, select

from config import Settings
from tests.conftest import make_messages
from tests.helpers import Clock, MemoryPacing, accepted_by, running_simulator, send_for
from worker.core.states import State
from worker.core.validation import validate_message
from worker.dev.simulator import SimulatorConfig
from worker.flows import dispatcher, quota
from worker.flows.campaigns import campaign_control
from worker.flows.producer import row_for, store
from worker.flows.quota import Candidate, admission
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
    # Past the send deadline they had (SEND_RETRY_FOR_SECONDS after the send), before the one
    # they were given: at any hour (at 23:09, two hours later was past both: a flaky test).
    later = clock() + timedelta(hours=1) + (quota.next_midnight(clock()) - clock()) / 2
    assert give_up(engine, later) == 0

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


# --- a retry counts once -------------------------------------------------------------------

NOON = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


@BACKENDS
def test_a_message_whose_ttl_ran_out_is_never_counted_against_the_cap(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """Claimed ahead of the others (older), five messages past their TTL end `expired`
    without taking the day's cap of five from the five that can still go."""
    url = database_factory(backend)
    settings = Settings(**ENV, DATABASE_URL=url, DAILY_MESSAGE_CAP="5")  # type: ignore[arg-type]
    clock, provider = Clock(), Provider()
    rows = []
    for raw in [*make_messages(5, "ttl", ttl=60), *make_messages(5, "ttl", start=5)]:
        checked = validate_message(raw, now=clock())
        assert not isinstance(checked, list), checked
        rows.append(row_for(checked, "ttl", clock(), settings))
    store(get_engine(url), rows, "ttl")
    clock.now += timedelta(minutes=2)

    _send_all(url, settings, clock, provider)

    assert sorted(provider.sent) == [f"ttl-{i}" for i in range(5, 10)]
    assert _states(url, "ttl") == {State.EXPIRED: 5, State.SUBMITTED: 5}
    assert quota.today(get_engine(url), settings, clock())["messages"] == 5


@BACKENDS
def test_a_provider_outage_does_not_spend_the_daily_cap(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """The simulator answers 500 to the first sends (the first 25 messages admitted, then
    the circuit's probes), then recovers: the same 25 are sent that day, no other. Each
    retry used to count again, and the cap was spent on messages the provider refused."""
    url = database_factory(backend)
    with running_simulator(SimulatorConfig(fail_next_sends=6)) as sim:
        env = {**ENV, "SMSBAT_API_KEY": "test-key", "SMSBAT_BASE_URL": str(sim.base_url)}
        settings = Settings(**env, DATABASE_URL=url, DAILY_MESSAGE_CAP="25")  # type: ignore[arg-type]
        clock = Clock(NOON)
        _store(url, settings, 40, "o", clock())
        send_for(url, settings, clock, minutes=20)
        accepted, statuses = accepted_by(sim), sim.get("/_sim/stats").json()["send_status"]

    assert sorted(accepted) == sorted(f"o-{i}" for i in range(25))
    assert statuses["500"] == 6  # the outage happened, and the provider recovered
    assert set(accepted.values()) == {1}
    assert _states(url, "o") == {State.SUBMITTED: 25, State.QUEUED: 15}
    figures = quota.today(get_engine(url), settings, clock())
    assert figures["day"] == "2026-03-02" and figures["messages"] == 25
    assert figures["capped"] and figures["capped"].startswith("global daily cap of 25")


@BACKENDS
def test_a_provider_outage_does_not_spend_the_daily_budget(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    with running_simulator(SimulatorConfig(fail_next_sends=6)) as sim:
        env = {**ENV, **PRICED, "SMSBAT_API_KEY": "test-key", "SMSBAT_BASE_URL": str(sim.base_url)}
        settings = Settings(**env, DATABASE_URL=url, DAILY_SPEND_BUDGET="5.2")  # type: ignore[arg-type]
        clock = Clock(NOON)
        _store(url, settings, 20, "s", clock())  # 0.50 UAH each: 10 fit
        send_for(url, settings, clock, minutes=20)
        accepted = accepted_by(sim)

    assert sorted(accepted) == sorted(f"s-{i}" for i in range(10))
    assert _states(url, "s") == {State.SUBMITTED: 10, State.QUEUED: 10}
    figures = quota.today(get_engine(url), settings, clock())
    assert figures["spend"] == 5.0 and figures["messages"] == 10


def _counted_on(url: str, campaign: str) -> set[str | None]:
    with get_engine(url).connect() as conn:
        return set(
            conn.execute(
                select(messages.c.counted_on).where(messages.c.campaign == campaign)
            ).scalars()
        )


@BACKENDS
def test_a_send_whose_answer_was_lost_counts_once(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """A lost answer (a read timeout) may mean the provider has the message: it counted
    when it was first admitted, and its resend that day does not count again."""
    url = database_factory(backend)
    with running_simulator(SimulatorConfig(hang_next_sends=1, hang_seconds=1.5)) as sim:
        env = {
            **ENV,
            "SMSBAT_API_KEY": "test-key",
            "SMSBAT_BASE_URL": str(sim.base_url),
            "HTTP_READ_TIMEOUT_SECONDS": "0.5",
        }
        settings = Settings(**env, DATABASE_URL=url, DAILY_MESSAGE_CAP="10")  # type: ignore[arg-type]
        clock = Clock(NOON)
        _store(url, settings, 10, "u", clock())
        send_for(url, settings, clock, minutes=2)
        accepted = accepted_by(sim)

    assert len(accepted) == 10 and set(accepted.values()) == {2}  # the resend: duplicates
    assert _states(url, "u") == {State.SUBMITTED: 10}
    assert quota.today(get_engine(url), settings, clock())["messages"] == 10


@BACKENDS
def test_a_retry_after_midnight_counts_on_the_new_day(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """Admitted at 23:59:50 UTC and refused (a 500), the messages are sent after 00:00:
    they count on the new day, which they are sent on; the day before keeps its count."""
    url = database_factory(backend)
    with running_simulator(SimulatorConfig(fail_next_sends=1)) as sim:
        env = {**ENV, "SMSBAT_API_KEY": "test-key", "SMSBAT_BASE_URL": str(sim.base_url)}
        settings = Settings(**env, DATABASE_URL=url, DAILY_MESSAGE_CAP="10")  # type: ignore[arg-type]
        late = datetime(2026, 3, 2, 23, 59, 50, tzinfo=UTC)
        clock = Clock(late)
        _store(url, settings, 10, "n", clock())
        send_for(url, settings, clock, minutes=1 / 12)  # one batch: a 500
        assert _counted_on(url, "n") == {"2026-03-02"}
        assert _states(url, "n") == {State.QUEUED: 10}
        clock.now = quota.next_midnight(late) + timedelta(seconds=30)
        send_for(url, settings, clock, minutes=1)
        accepted = accepted_by(sim)

    assert sorted(accepted) == sorted(f"n-{i}" for i in range(10))
    assert _states(url, "n") == {State.SUBMITTED: 10}
    assert _counted_on(url, "n") == {"2026-03-03"}
    engine = get_engine(url)
    assert quota.today(engine, settings, late)["messages"] == 10
    assert quota.today(engine, settings, clock())["messages"] == 10


# --- the counting decision, pure ------------------------------------------------------------

NEW, RETRY = Candidate(False, 0.5), Candidate(True, 0.0)


@pytest.mark.unit
def test_a_message_counts_once_a_utc_day() -> None:
    assert not quota.counted_today(None, "2026-03-02")  # never counted
    assert quota.counted_today("2026-03-02", "2026-03-02")  # a retry the same day
    assert not quota.counted_today("2026-03-01", "2026-03-02")  # counts again the next day


@pytest.mark.unit
def test_a_retry_goes_free_even_once_the_cap_is_reached() -> None:
    capped = admission([RETRY, NEW, RETRY], 25, 0.0, cap=25, budget=None, capped=quota.MESSAGES)
    assert (capped.admitted, capped.counted, capped.messages) == ((0, 2), (), 25)
    assert capped.capped == quota.MESSAGES


@pytest.mark.unit
def test_new_messages_are_counted_in_claim_order_up_to_the_cap() -> None:
    claim = [NEW, RETRY, NEW, NEW, RETRY]
    reached = admission(claim, 8, 0.0, cap=10, budget=None, capped=None)
    assert (reached.admitted, reached.counted) == ((0, 1, 2, 4), (0, 2))
    assert (reached.messages, reached.capped) == (10, quota.MESSAGES)
    under = admission(claim, 0, 0.0, cap=10, budget=None, capped=None)
    assert (under.admitted, under.counted, under.capped) == ((0, 1, 2, 3, 4), (0, 2, 3), None)


@pytest.mark.unit
def test_the_budget_stops_at_the_first_new_message_that_does_not_fit() -> None:
    dear, cheap = Candidate(False, 2.0), Candidate(False, 0.1)
    result = admission([cheap, dear, cheap, RETRY], 0.0, 4.0, cap=None, budget=5.0, capped=None)
    assert (result.admitted, result.counted) == ((0, 3), (0,))  # no overtaking the dear one
    assert result.capped == quota.BUDGET and result.spend == pytest.approx(4.1)


CLAIMS = st.lists(
    st.builds(Candidate, st.booleans(), st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5])),
    max_size=30,
)


@pytest.mark.unit
@given(
    claim=CLAIMS,
    messages=st.integers(0, 40),
    spend=st.sampled_from([0.0, 1.0, 4.75, 10.0]),
    cap=st.none() | st.integers(1, 40),
    budget=st.none() | st.sampled_from([0.5, 5.0, 12.0]),
    capped=st.none() | st.sampled_from([quota.MESSAGES, quota.BUDGET]),
)
def test_admission_counts_each_message_once_and_never_past_a_cap(
    claim: list[Candidate],
    messages: int,
    spend: float,
    cap: int | None,
    budget: float | None,
    capped: str | None,
) -> None:
    result = admission(claim, messages, spend, cap=cap, budget=budget, capped=capped)
    new = [i for i, row in enumerate(claim) if not row.counted]

    # Counted today: always sent, never counted again. New: counted exactly when sent.
    assert set(result.admitted) == {i for i, r in enumerate(claim) if r.counted} | set(
        result.counted
    )
    assert set(result.counted) <= set(new)
    assert result.messages == messages + len(result.counted)
    assert result.spend == pytest.approx(spend + sum(claim[i].cost for i in result.counted))
    # In claim order: the new messages counted are the first ones; none after one left out.
    assert list(result.counted) == new[: len(result.counted)]
    # No cap is overrun by this claim, and one that stopped a message says so.
    if result.counted:
        assert cap is None or result.messages <= cap
        assert budget is None or result.spend <= budget + 1e-9
    if len(result.counted) < len(new):
        assert result.capped is not None
    if capped is not None:
        assert result.counted == () and result.capped == capped

    # The same claim retried (the provider failed it): what went goes again, free.
    marked = [Candidate(True, 0.0) if i in result.counted else row for i, row in enumerate(claim)]
    again = admission(
        marked, result.messages, result.spend, cap=cap, budget=budget, capped=result.capped
    )
    assert set(result.admitted) <= set(again.admitted)
    assert (again.counted, again.messages) == ((), result.messages)
