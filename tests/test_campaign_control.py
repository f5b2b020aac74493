"""Hold and approve, pause and resume: unsent messages wait as `held`, nothing is lost."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from config import Settings
from tests.conftest import Stack, make_messages
from tests.helpers import Clock, accepted_by, running_simulator, send_for
from worker.core.states import journal_allows
from worker.core.validation import validate_message
from worker.dev.simulator import SimulatorConfig
from worker.dev.stack import Simulator
from worker.flows.campaigns import (
    CampaignCancelled,
    CampaignError,
    CampaignStateError,
    approve_campaign,
    cancel_campaign,
    enforce_holds,
    ensure_campaign,
    hold_campaign,
    later_by,
    meter,
    new_releases,
    pause_campaign,
    rate_room,
    resume_campaign,
    set_limits,
)
from worker.flows.launch import Defaults, launch
from worker.flows.producer import enqueue, row_for, store
from worker.ops.reports import campaign_summary
from worker.store.db import get_engine, utcnow
from worker.store.models import campaigns, events, messages

BACKENDS = pytest.mark.parametrize("backend", ["sqlite", "postgresql"])


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(
    request: pytest.FixtureRequest, database_factory: Callable[[str], str], redis_db: str
) -> Settings:
    return Settings(DATABASE_URL=database_factory(request.param), BROKER_URL=redis_db)  # type: ignore[call-arg]


def states(settings: Settings, campaign: str) -> dict[str, int]:
    summary = campaign_summary(get_engine(settings.database_url), campaign)
    return summary["states"] if summary else {}


def journal(settings: Settings, campaign: str) -> list[tuple[str, str, str, str]]:
    with get_engine(settings.database_url).connect() as conn:
        rows = conn.execute(
            select(events.c.source, events.c.from_state, events.c.to_state, events.c.detail)
            .join(messages, messages.c.pk == events.c.message_pk)
            .where(messages.c.campaign == campaign)
            .order_by(events.c.pk)
        ).all()
    return [tuple(r) for r in rows]


def claimable(settings: Settings) -> int:
    from worker.flows.dispatcher import ready_summary

    engine = get_engine(settings.database_url)
    return ready_summary(engine, "standard", utcnow() + timedelta(seconds=1), 10_000, 1)[0]


def test_pause_holds_unsent_messages_and_resume_sends_them_again(settings: Settings) -> None:
    engine = get_engine(settings.database_url)
    enqueue(make_messages(5, "p"), "p", settings=settings, kick=False)
    assert claimable(settings) == 5

    paused = pause_campaign(engine, "p")

    assert paused is not None and paused["held_now"] == 5
    assert paused["status"] == "paused" and paused["pause_reason"] == "paused by the operator"
    assert states(settings, "p") == {"held": 5} and claimable(settings) == 0
    # A message enqueued while paused is held as it is stored.
    [late] = enqueue(make_messages(1, "p", start=5), "p", settings=settings, kick=False)
    assert late.status == "accepted"
    assert states(settings, "p") == {"held": 6} and claimable(settings) == 0
    with pytest.raises(CampaignStateError, match="cannot be approved: it is not held"):
        approve_campaign(engine, "p")

    resumed = resume_campaign(engine, "p")

    assert resumed is not None and resumed["released_now"] == 6
    assert resumed["status"] == "running" and resumed["held_messages"] == 0
    assert states(settings, "p") == {"queued": 6} and claimable(settings) == 6
    moves = journal(settings, "p")
    assert moves.count(("system", "queued", "held", "campaign paused by the operator")) == 5
    assert moves.count(("system", "queued", "held", "campaign held, paused or metered")) == 1
    assert moves.count(("system", "held", "queued", "campaign resumed")) == 6
    assert all(journal_allows(source, a, b) for source, a, b, _ in moves)
    with pytest.raises(CampaignStateError, match="cannot be resumed: it is not paused"):
        resume_campaign(engine, "p")
    assert pause_campaign(engine, "nope") is None and resume_campaign(engine, "nope") is None


def test_a_held_launch_sends_nothing_until_approved(tmp_path: Path, settings: Settings) -> None:
    engine = get_engine(settings.database_url)
    path = tmp_path / "c.csv"
    path.write_text("toPhone,name\n+380671234567,a\n+380671234568,b\nbad,c\n")
    defaults = Defaults(from_name="Shop", message_type="promo", text="Hi {name}")

    stats = launch(path, "h", defaults, settings, hold=True)

    assert (stats.accepted, stats.rejected) == (2, 1)
    assert states(settings, "h") == {"held": 2} and claimable(settings) == 0
    summary = campaign_summary(engine, "h")
    assert summary is not None and summary["control"]["status"] == "held"
    pause_campaign(engine, "h")  # held and paused: approving alone does not send it
    assert approve_campaign(engine, "h")["released_now"] == 0  # type: ignore[index]
    assert claimable(settings) == 0

    assert resume_campaign(engine, "h")["released_now"] == 2  # type: ignore[index]

    assert states(settings, "h") == {"queued": 2} and claimable(settings) == 2
    with pytest.raises(CampaignStateError, match="not held for approval"):
        approve_campaign(engine, "h")


def test_cancel_cancels_held_messages_and_a_cancelled_campaign_cannot_be_resumed(
    settings: Settings,
) -> None:
    engine = get_engine(settings.database_url)
    enqueue(make_messages(3, "x"), "x", settings=settings, kick=False)
    hold_campaign(engine, "x")

    result = cancel_campaign(engine, "x")

    assert result is not None and result["cancelled_now"] == 3 and result["queued"] == 0
    assert states(settings, "x") == {"cancelled": 3}
    assert all(journal_allows(s, a, b) for s, a, b, _ in journal(settings, "x"))
    with pytest.raises(CampaignCancelled):
        approve_campaign(engine, "x")
    with pytest.raises(CampaignCancelled):
        pause_campaign(engine, "x")


def test_a_send_in_flight_when_paused_is_held_when_it_comes_back(settings: Settings) -> None:
    from worker.flows.dispatcher import Retry, claim, record

    engine = get_engine(settings.database_url)
    enqueue(make_messages(2, "fly"), "fly", settings=settings, kick=False)
    rows = claim(engine, "standard", utcnow(), 10, 60, "tok")
    assert pause_campaign(engine, "fly")["held_now"] == 0  # type: ignore[index]
    record(engine, "tok", [Retry(r.pk, "HTTP 500", True) for r in rows], {r.pk: r for r in rows},
           settings)  # fmt: skip
    assert states(settings, "fly") == {"queued": 2}

    assert enforce_holds(engine) == 2

    assert states(settings, "fly") == {"held": 2} and claimable(settings) == 0
    assert enforce_holds(engine) == 0


def between_beats_read_and_its_moves(
    monkeypatch: pytest.MonkeyPatch, command: Callable[[], object]
) -> list[Callable[[], object]]:
    """Run an operator's `command` once, after beat read the campaigns and before it moves
    the first message: the interleaving a busy machine makes now and then. Answers the
    command while it has not run (beat moved nothing)."""
    import worker.flows.campaigns as module

    original = module.move_messages
    pending = [command]

    def move(*args: Any, **kwargs: Any) -> int:
        while pending:
            pending.pop()()
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "move_messages", move)
    return pending


def test_beat_never_holds_a_campaign_approved_since_it_looked(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = get_engine(settings.database_url)
    enqueue(make_messages(5, "race"), "race", settings=settings, kick=False)
    assert hold_campaign(engine, "race")["held_now"] == 5  # type: ignore[index]
    between_beats_read_and_its_moves(monkeypatch, lambda: approve_campaign(engine, "race"))

    assert enforce_holds(engine) == 0

    assert states(settings, "race") == {"queued": 5} and claimable(settings) == 5


def test_beat_never_releases_a_campaign_paused_since_it_looked(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = get_engine(settings.database_url)
    enqueue(make_messages(5, "race"), "race", settings=settings, kick=False)
    set_limits(engine, "race", None, 100.0)
    between_beats_read_and_its_moves(monkeypatch, lambda: pause_campaign(engine, "race"))

    assert meter(engine) == 0

    assert states(settings, "race") == {"held": 5} and claimable(settings) == 0
    resume_campaign(engine, "race")
    assert meter(engine) == 5


def test_later_by_adds_seconds_in_sql_on_both_backends(settings: Settings) -> None:
    """What resume and approve use to push the send deadline by the time held."""
    engine = get_engine(settings.database_url)
    enqueue(make_messages(1, "t"), "t", settings=settings, kick=False)
    with engine.begin() as conn:
        conn.execute(
            messages.update().values(expires_at=later_by(conn, messages.c.created_at, 3600.25))
        )
        created, moved = conn.execute(select(messages.c.created_at, messages.c.expires_at)).one()
    assert abs((moved - created).total_seconds() - 3600.25) < 0.002


# --- with a running worker and the simulator ------------------------------------------------


def _cli(
    *args: str, stack: Stack, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {"DATABASE_URL": stack.settings.database_url, "BROKER_URL": stack.settings.broker_url}
    return subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **base, **(env or {})},
        timeout=120,
    )


def test_hold_approve_pause_resume_from_the_command_line(
    stack: Stack, sim, tmp_path: Path, campaign: str
) -> None:
    path = tmp_path / "list.csv"
    path.write_text("phone;name\n" + "".join(f"067{i:07d};n{i}\n" for i in range(400)))
    launched = _cli(
        "campaign", "launch", str(path), "--name", campaign, "--column", "phone=toPhone",
        "--default-region", "UA", "--from-name", "Shop", "--type", "promo",
        "--text", "Hi {name}", "--hold", stack=stack,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr
    assert f"{campaign} is held: nothing is sent until" in launched.stdout
    time.sleep(2)  # several dispatch ticks: a held campaign is never claimed
    assert sent_of(sim, campaign) == 0
    status = _cli("campaign", "status", campaign, stack=stack)
    assert "held for approval" in status.stdout and "held" in status.stdout

    sim.configure(api_key="rotated-key")  # approved messages stay ours (401: no send)
    approved = json.loads(_cli("campaign", "approve", campaign, "--json", stack=stack).stdout)
    assert approved["released_now"] == 400 and approved["status"] == "running"
    time.sleep(1)  # claims and 401 answers: sends in flight when the pause comes

    paused = json.loads(_cli("campaign", "pause", campaign, "--json", stack=stack).stdout)

    assert paused["status"] == "paused"
    # Sends in flight at the pause come back queued and are held by the beat's next tick.
    wait_until(lambda: states(stack.settings, campaign) == {"held": 400})
    sim.configure(api_key="test-key")
    time.sleep(3)  # past the 401 circuit pause: a queued message would be sent now
    assert sent_of(sim, campaign) == 0
    assert states(stack.settings, campaign) == {"held": 400}

    resumed = json.loads(_cli("campaign", "resume", campaign, "--json", stack=stack).stdout)

    assert resumed["released_now"] == 400
    report = stack.wait_final(campaign, 400)
    assert sum(report["states"].values()) == 400 and "held" not in report["states"]
    assert sent_of(sim, campaign) == 400
    assert all(journal_allows(s, a, b) for s, a, b, _ in journal(stack.settings, campaign))


def sent_of(sim: Simulator, campaign: str) -> int:
    """This campaign's messages the provider has: another test's late send on the shared
    stack must not count (the launch names its ids after the campaign)."""
    report = sim.admin("/_sim/messages")
    assert isinstance(report, dict)
    return sum(tracking_id.startswith(f"{campaign}-") for tracking_id in report)


def wait_until(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


# --- scheduled sends we can still stop ------------------------------------------------------


def test_available_at_keeps_far_scheduled_messages_until_shortly_before() -> None:
    from worker.flows.producer import available_at

    now = utcnow()
    hour = now + timedelta(hours=1)
    assert available_at(None, now, 600, 120) == now
    assert available_at(now + timedelta(seconds=600), now, 600, 120) == now  # near: provider's
    assert available_at(hour, now, 600, 120) == hour - timedelta(seconds=120)
    assert available_at(hour, now, 0, 120) == now  # 0 turns it off
    with pytest.raises(ValueError, match="SCHEDULE_SEND_LEAD_SECONDS must not exceed"):
        Settings(SCHEDULE_HOLD_AHEAD_SECONDS="60", SCHEDULE_SEND_LEAD_SECONDS="120")  # type: ignore[call-arg]


def test_a_message_scheduled_an_hour_ahead_stays_ours_to_pause_and_cancel(
    settings: Settings,
) -> None:
    engine = get_engine(settings.database_url)
    ahead = (utcnow() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    soon = (utcnow() + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    enqueue(make_messages(3, "s", scheduledSent=ahead), "s", settings=settings, kick=False)
    enqueue(make_messages(1, "s", start=3, scheduledSent=soon), "s", settings=settings, kick=False)

    summary = campaign_summary(engine, "s")
    assert summary is not None
    assert summary["states"] == {"queued": 4} and summary["waiting_for_time"] == 3
    assert claimable(settings) == 1  # five minutes ahead: the provider's own scheduling
    pause_campaign(engine, "s")
    assert states(settings, "s") == {"held": 4}
    resume_campaign(engine, "s")
    summary = campaign_summary(engine, "s")
    assert summary is not None and summary["waiting_for_time"] == 3  # its time is kept
    assert claimable(settings) == 1

    result = cancel_campaign(engine, "s")

    assert result is not None and result["cancelled_now"] == 4


def test_cancel_stops_scheduled_messages_on_a_running_worker(
    stack: Stack, sim, campaign: str
) -> None:
    ahead = (utcnow() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    stack.enqueue(make_messages(50, campaign, scheduledSent=ahead), campaign)
    stack.enqueue(make_messages(20, campaign, start=50), campaign)
    stack.wait_final(campaign, 20)
    time.sleep(1)  # more dispatch ticks: the scheduled ones are not claimed
    assert sent_of(sim, campaign) == 20
    status = _cli("campaign", "status", campaign, stack=stack)
    assert "waiting for its time" in status.stdout

    cancelled = json.loads(_cli("campaign", "cancel", campaign, "--json", stack=stack).stdout)

    assert cancelled["cancelled_now"] == 50 and cancelled["with_provider"] == 0
    report = stack.wait_final(campaign, 70, timeout=5)
    assert report["states"]["cancelled"] == 50 and sent_of(sim, campaign) == 20


# --- retry what did not arrive ---------------------------------------------------------------


def test_retry_states_are_checked() -> None:
    from worker.flows.campaigns import CampaignError
    from worker.flows.launch import retry_states

    assert retry_states("Undeliverable, failed,failed") == ("undeliverable", "failed")
    for given, problem in (
        ("delivered", "a delivered message is never sent again"),
        ("processing", "'processing' is not final"),
        ("lost", "unknown state 'lost'"),
        (",", "name at least one"),
    ):
        with pytest.raises(CampaignError, match=problem):
            retry_states(given)


def test_retry_sends_what_did_not_arrive_as_a_linked_campaign(settings: Settings) -> None:
    from worker.flows.campaigns import CampaignError, list_campaigns
    from worker.flows.launch import retry_campaign

    engine = get_engine(settings.database_url)
    enqueue(make_messages(6, "orig"), "orig", settings=settings, kick=False)
    finals = ["delivered", "undeliverable", "failed", "expired", "cancelled", "queued"]
    with engine.begin() as conn:
        for n, state in enumerate(finals):
            conn.execute(messages.update().where(messages.c.id == f"orig-{n}").values(state=state))

    result = retry_campaign(
        "orig", ("undeliverable", "failed", "expired"), settings, route="tg-viber"
    )  # type: ignore[arg-type]

    assert result is not None
    assert (result["campaign"], result["selected"], result["accepted"]) == ("orig-retry", 3, 3)
    with engine.connect() as conn:
        retried = conn.execute(
            select(messages.c.id, messages.c.to_phone, messages.c.route, messages.c.state)
            .where(messages.c.campaign == "orig-retry")
            .order_by(messages.c.to_phone)
        ).all()
    assert [r.to_phone for r in retried] == ["+380670000001", "+380670000002", "+380670000003"]
    assert {r.route for r in retried} == {"tg-viber"} and {r.state for r in retried} == {"queued"}
    assert all(r.id.startswith("orig-") and "-r" in r.id for r in retried)
    again = retry_campaign("orig", ("undeliverable", "failed", "expired"), settings)  # type: ignore[arg-type]
    assert again is not None and (again["accepted"], again["duplicate"]) == (0, 3)
    listing = {c["campaign"]: c for c in list_campaigns(engine)}
    assert listing["orig-retry"]["retry_of"] == "orig"
    enqueue(make_messages(1, "other"), "other", settings=settings, kick=False)
    with pytest.raises(CampaignError, match="'other' exists and is not a retry of 'orig'"):
        retry_campaign("orig", ("failed",), settings, new_name="other")  # type: ignore[arg-type]
    assert retry_campaign("nope", ("failed",), settings) is None  # type: ignore[arg-type]


# --- caps and per-campaign rate ---------------------------------------------------------------


def test_a_daily_cap_releases_that_many_a_day_and_holds_the_rest(settings: Settings) -> None:
    from worker.flows.campaigns import campaign_control, meter, set_limits

    engine = get_engine(settings.database_url)
    enqueue(make_messages(25, "cap"), "cap", settings=settings, kick=False)
    day1 = utcnow().replace(hour=9, minute=0)
    with pytest.raises(CampaignError, match="--daily-cap must be at least 1, got 0"):
        set_limits(engine, "cap", 0, None)

    control = set_limits(engine, "cap", 10, None)

    assert control is not None and states(settings, "cap") == {"held": 25}
    assert meter(engine, now=day1, retry_for=3600) == 10  # beat's next tick
    assert states(settings, "cap") == {"held": 15, "queued": 10}
    with engine.connect() as conn:  # the wait for a cap never counts against the deadline
        deadlines = list(
            conn.execute(
                select(messages.c.send_deadline).where(messages.c.state == "queued")
            ).scalars()
        )
    assert len(deadlines) == 10
    assert all(d >= day1 + timedelta(seconds=3600) for d in deadlines)
    assert meter(engine, now=day1) == 0  # the same UTC day: the cap is reached
    after = campaign_control(engine, "cap")
    assert after["status"] == "capped" and "daily cap of 10 reached" in after["pause_reason"]
    assert after["limits"] == {"daily_cap": 10, "rate": None, "released_today": 10}
    enqueue(make_messages(1, "cap", start=25), "cap", settings=settings, kick=False)
    assert states(settings, "cap") == {"held": 16, "queued": 10}  # stored held, not dropped

    assert meter(engine, now=day1 + timedelta(days=1)) == 10  # a new day
    assert meter(engine, now=day1 + timedelta(days=1)) == 0
    assert meter(engine, now=day1 + timedelta(days=2)) == 6
    assert states(settings, "cap") == {"queued": 26}
    with engine.connect() as conn:
        released = conn.execute(
            select(messages.c.id).where(messages.c.state == "queued").order_by(messages.c.pk)
        ).scalars()
        assert list(released)[:10] == [f"cap-{n}" for n in range(10)]  # oldest first


def test_a_campaign_rate_keeps_that_many_queued_per_tick(settings: Settings) -> None:
    from worker.flows.campaigns import meter, set_limits

    engine = get_engine(settings.database_url)
    enqueue(make_messages(30, "rate"), "rate", settings=settings, kick=False)
    set_limits(engine, "rate", None, 4.0)  # 4/s, beat every 0.5 s: 2 queued at a time
    assert meter(engine, interval=0.5) == 2
    assert states(settings, "rate") == {"held": 28, "queued": 2}
    assert meter(engine, interval=0.5) == 0  # nothing claimed yet: no room
    pause_campaign(engine, "rate")
    assert states(settings, "rate") == {"held": 30}
    assert meter(engine, interval=0.5) == 0  # paused: the valve stays shut
    resume_campaign(engine, "rate")  # a metered campaign goes again within its rate
    assert states(settings, "rate") == {"held": 30}
    assert meter(engine, interval=1.0) == 4
    assert states(settings, "rate") == {"held": 26, "queued": 4}
    set_limits(engine, "rate", None, None)  # lifted: everything goes
    assert states(settings, "rate") == {"queued": 30}


def test_a_message_released_today_and_held_again_goes_again_without_counting(
    settings: Settings,
) -> None:
    engine = get_engine(settings.database_url)
    enqueue(make_messages(15, "again"), "again", settings=settings, kick=False)
    set_limits(engine, "again", 10, None)
    day1 = datetime(2026, 3, 2, 9, tzinfo=UTC)
    assert meter(engine, now=day1, retry_for=3600) == 10

    pause_campaign(engine, "again")  # before they were sent
    resume_campaign(engine, "again")
    assert states(settings, "again") == {"held": 15}
    assert meter(engine, now=day1, retry_for=3600) == 10  # the same 10, not counted again
    assert meter(engine, now=day1, retry_for=3600) == 0
    with engine.connect() as conn:
        day = select(campaigns.c.cap_day, campaigns.c.cap_released)
        assert tuple(conn.execute(day).one()) == ("2026-03-02", 10)
        released = select(messages.c.id).where(messages.c.state == "queued")
        assert sorted(conn.execute(released).scalars()) == sorted(f"again-{i}" for i in range(10))

    pause_campaign(engine, "again")
    resume_campaign(engine, "again")
    assert meter(engine, now=day1 + timedelta(days=1), retry_for=3600) == 10  # a new day
    with engine.connect() as conn:
        assert tuple(conn.execute(day).one()) == ("2026-03-03", 10)  # counted on it


@pytest.mark.unit
def test_a_metered_release_counts_new_messages_within_the_cap_and_the_rate() -> None:
    assert new_releases(10, 0, None) == 10
    assert new_releases(10, 10, None) == 0
    assert new_releases(10, 4, 3) == 3  # the rate's room is smaller than the cap's
    assert new_releases(10, 4, 0) == 0  # re-releases took the room
    assert new_releases(None, 0, 5) == 5
    assert rate_room(None, 1.0, 7) is None
    assert (rate_room(4.0, 0.5, 0), rate_room(4.0, 0.5, 2)) == (2, 0)
    assert rate_room(0.1, 1.0, 0) == 1  # at least one a tick


# --- a campaign's daily cap through a provider outage -------------------------------------

NOON = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def _metered(settings: Settings, url: str, campaign: str, count: int, cap: int) -> None:
    """`count` messages stored at NOON under a campaign with a daily cap of `cap`."""
    rows = []
    for raw in make_messages(count, campaign):
        checked = validate_message(raw, now=NOON)
        assert not isinstance(checked, list), checked
        rows.append(row_for(checked, campaign, NOON, settings))
    engine = get_engine(url)
    ensure_campaign(engine, campaign)
    store(engine, rows, campaign)
    set_limits(engine, campaign, cap, None)


def _beat(url: str) -> Callable[[datetime], object]:
    return lambda now: meter(get_engine(url), now=now, retry_for=3600)


def _outage(
    backend: str, database_factory: Callable[[str], str], operator: Callable[[Engine], object]
) -> tuple[dict[str, int], dict[str, int], Any]:
    """A campaign of 25 capped at 10 a day; the provider answers its first six sends 500;
    `operator` acts once the first send failed. Answers what the simulator accepted, the
    states, and the campaign's limits, after 20 minutes of sending that day."""
    url = database_factory(backend)
    with running_simulator(SimulatorConfig(fail_next_sends=6)) as sim:
        settings = Settings(  # type: ignore[call-arg]
            SMSBAT_API_KEY="test-key",
            SMSBAT_BASE_URL=str(sim.base_url),
            DATABASE_URL=url,
            SEND_BATCH_MAX=10,
            SEND_BATCH_MIN=1,
            SEND_LINGER_SECONDS=0,
        )
        _metered(settings, url, "m", 25, 10)
        clock = Clock(NOON)
        send_for(url, settings, clock, 1 / 12, _beat(url))  # released, refused: a 500
        assert accepted_by(sim) == {}
        operator(get_engine(url))
        send_for(url, settings, clock, 20, _beat(url))
        accepted = accepted_by(sim)
    with get_engine(url).connect() as conn:
        limits = conn.execute(
            select(campaigns.c.cap_day, campaigns.c.cap_released).where(campaigns.c.name == "m")
        ).one()
        counted = dict(
            conn.execute(
                select(messages.c.state, func.count())
                .where(messages.c.campaign == "m")
                .group_by(messages.c.state)
            ).all()
        )
    return accepted, counted, limits


@BACKENDS
def test_a_provider_outage_does_not_spend_a_campaigns_daily_cap(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """The cap counts releases from `held`; a send retried after a 500 stays queued and is
    not released, nor counted, again."""
    accepted, counted, limits = _outage(backend, database_factory, lambda engine: None)
    assert sorted(accepted) == sorted(f"m-{i}" for i in range(10))
    assert counted == {"submitted": 10, "held": 15}
    assert tuple(limits) == ("2026-03-02", 10)


@BACKENDS
def test_a_campaign_paused_and_resumed_in_an_outage_releases_its_retries_free(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """Paused, the messages released today and waiting to be retried go back to `held`;
    resumed, they are released again without counting again: the day still sends 10."""

    def pause_and_resume(engine: Engine) -> None:
        pause_campaign(engine, "m")
        resume_campaign(engine, "m")

    accepted, counted, limits = _outage(backend, database_factory, pause_and_resume)
    assert sorted(accepted) == sorted(f"m-{i}" for i in range(10))
    assert counted == {"submitted": 10, "held": 15}
    assert tuple(limits) == ("2026-03-02", 10)


@BACKENDS
def test_a_cap_raised_in_an_outage_counts_each_message_once(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """A new limit holds the campaign's queued messages again (the retries among them);
    raised from 10 to 15, the day sends 15 messages, not the same 10 counted twice."""
    accepted, counted, limits = _outage(
        backend, database_factory, lambda engine: set_limits(engine, "m", 15, None)
    )
    assert sorted(accepted) == sorted(f"m-{i}" for i in range(15))
    assert counted == {"submitted": 15, "held": 10}
    assert tuple(limits) == ("2026-03-02", 15)


def test_a_rate_limited_campaign_on_a_running_worker(stack: Stack, sim, campaign: str) -> None:
    from worker.flows.campaigns import set_limits

    stack.enqueue(make_messages(1, campaign), campaign)  # the campaign
    stack.wait_final(campaign, 1)
    set_limits(stack.engine, campaign, None, 20.0)  # beat every 0.5 s: 10 at a time
    stack.enqueue(make_messages(100, campaign, start=1), campaign)

    stack.wait_final(campaign, 101, timeout=60)

    with stack.engine.connect() as conn:
        first, last = conn.execute(
            select(func.min(messages.c.submitted_at), func.max(messages.c.submitted_at)).where(
                messages.c.campaign == campaign, messages.c.id != f"{campaign}-0"
            )
        ).one()
    # 100 messages, at most 10 released a tick, ticks 0.5 s apart: at least 4.5 s.
    assert (last - first).total_seconds() >= 4.0
    assert sim.stats()["unique_tracking_ids"] == 101


def test_status_of_a_held_campaign_shows_its_estimate_and_watch_ends(
    stack: Stack, sim, tmp_path: Path, campaign: str
) -> None:
    path = tmp_path / "list.csv"
    path.write_text("toPhone,text\n+380671234567,hi\n+380671234568," + "ї" * 71 + "\n")
    env_card = {"RATE_CARD": "380:sms=1.5", "RATE_CARD_CURRENCY": "UAH"}
    launched = _cli(
        "campaign", "launch", str(path), "--name", campaign, "--from-name", "Shop",
        "--type", "promo", "--hold", stack=stack, env=env_card,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr

    status = _cli("campaign", "status", campaign, "--json", stack=stack, env=env_card)
    watched = _cli("campaign", "status", campaign, "--watch", "--interval", "0.2", stack=stack)

    estimate = json.loads(status.stdout)["estimate"]
    assert (estimate["messages"], estimate["sms_parts"], estimate["cost"]) == (2, 3, 4.5)
    assert watched.returncode == 0 and "held, nothing more moves until" in watched.stdout


# --- operators' commands interleaved with beat, generated -------------------------------

COMMANDS = ("hold", "approve", "pause", "resume", "rate", "cap", "lift", "cancel")


def command(engine: Engine, name: str, which: str) -> None:
    """An operator's command as the CLI gives it; one that does not apply now is refused."""
    act: dict[str, Callable[[], object]] = {
        "hold": lambda: hold_campaign(engine, name),
        "approve": lambda: approve_campaign(engine, name),
        "pause": lambda: pause_campaign(engine, name),
        "resume": lambda: resume_campaign(engine, name),
        "rate": lambda: set_limits(engine, name, None, 1000.0),
        "cap": lambda: set_limits(engine, name, 1000, None),
        "lift": lambda: set_limits(engine, name, None, None),
        "cancel": lambda: cancel_campaign(engine, name),
    }
    with contextlib.suppress(CampaignStateError, CampaignCancelled):
        act[which]()


@BACKENDS
def test_operators_and_beat_interleaved_never_strand_or_leak_a_message(
    backend: str,
    database_factory: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever operators do, and whenever beat looks: after beat, a held or paused campaign
    has nothing queued, a running unmetered one nothing held, a cancelled one nothing
    unsent; no message is lost."""
    from hypothesis import HealthCheck, Phase
    from hypothesis import settings as hypothesis_settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

    from worker.flows.campaigns import campaign_control
    from worker.flows.dispatcher import Retry, Submitted, claim, record

    url = database_factory(backend)
    settings = Settings(DATABASE_URL=url)  # type: ignore[call-arg]
    engine = get_engine(url)
    runs = iter(range(10**6))

    class Interleavings(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.name = f"i{next(runs)}"
            ensure_campaign(engine, self.name)
            self.enqueued = 0
            self.in_flight: list[tuple[str, list[Any]]] = []

        @rule(count=st.integers(1, 4))
        def enqueue(self, count: int) -> None:
            batch = make_messages(count, self.name, start=self.enqueued)
            with contextlib.suppress(CampaignCancelled):  # it takes no new messages
                enqueue(batch, self.name, settings=settings, kick=False)
                self.enqueued += count

        @rule(which=st.sampled_from(COMMANDS))
        def operator(self, which: str) -> None:
            command(engine, self.name, which)

        @rule(limit=st.integers(1, 4))
        def claim_some(self, limit: int) -> None:
            token = f"t{len(self.in_flight)}-{self.enqueued}"
            rows = claim(engine, "standard", utcnow() + timedelta(hours=1), limit, 60, token)
            if rows:
                self.in_flight.append((token, rows))

        @rule(accepted=st.booleans())
        def answer(self, accepted: bool) -> None:
            if not self.in_flight:
                return
            token, rows = self.in_flight.pop(0)
            outcomes = [
                Submitted(r.pk, f"p-{r.pk}") if accepted else Retry(r.pk, "HTTP 500", True)
                for r in rows
            ]
            record(engine, token, outcomes, {r.pk: r for r in rows}, settings)

        @rule(meanwhile=st.sampled_from((None, *COMMANDS)))
        def beat(self, meanwhile: str | None) -> None:
            pending: list[Callable[[], object]] = []
            if meanwhile is not None:
                act = meanwhile  # bound now: the lambda runs inside beat
                pending = between_beats_read_and_its_moves(
                    monkeypatch, lambda: command(engine, self.name, act)
                )
            enforce_holds(engine)
            meter(engine)
            monkeypatch.undo()
            if pending:  # beat moved nothing: the command came after it
                pending.pop()()
                enforce_holds(engine)
                meter(engine)
            self.settled()

        def settled(self) -> None:
            control = campaign_control(engine, self.name)
            found = states(settings, self.name)
            assert sum(found.values()) == self.enqueued
            limits = control["limits"]
            metered = limits["daily_cap"] is not None or limits["rate"] is not None
            if control["status"] == "cancelled":  # what is unsent never goes
                assert not {"queued", "held"} & set(found), (control, found)
            elif control["status"] in ("held", "paused"):
                assert "queued" not in found, (control, found)
            elif control["status"] == "running" and not metered:
                assert "held" not in found, (control, found)

    run_state_machine_as_test(
        Interleavings,
        settings=hypothesis_settings(
            max_examples=60,
            stateful_step_count=25,
            deadline=None,
            derandomize=True,
            phases=[Phase.generate, Phase.target, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        ),
    )
