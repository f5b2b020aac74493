"""Consent and quiet hours on real databases (SQLite and PostgreSQL): the suppression list
from replies, the door, the claim's guard, the sweeper's backstop, send windows."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from config import Settings
from worker.core.states import State
from worker.flows import consent, sweeper
from worker.flows.dispatcher import claim
from worker.flows.inbox import store_inbound
from worker.flows.producer import enqueue
from worker.flows.sweeper import sweep
from worker.ops.reports import campaign_summary
from worker.provider.dlr import Inbound
from worker.store.db import get_engine, utcnow
from worker.store.models import campaigns, events, messages, suppression_events, suppressions

BACKENDS = pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
PHONE = "+380671110001"
OTHER = "+380671110002"


def _settings(url: str, **extra: Any) -> Settings:
    return Settings(DATABASE_URL=url, **extra)  # type: ignore[arg-type]


def _message(i: str, phone: str, kind: str = "promo", **extra: Any) -> dict[str, Any]:
    text = {} if kind == "flashcall" else {"text": f"message {i}"}
    survey = {"surveyOptions": ["yes", "no"]} if kind == "viber_survey" else {}
    return {
        "id": i,
        "fromName": "Shop",
        "toPhone": phone,
        "messageType": kind,
        **text,
        **survey,
        **extra,
    }


def _reply(engine: Engine, settings: Settings, phone: str, text: str) -> None:
    store_inbound(engine, [Inbound(phone, text, None, {"from": phone})], None, settings)


def _states(engine: Engine, prefix: str) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(messages.c.id, messages.c.state).where(messages.c.id.like(f"{prefix}%"))
        )
        return {r.id: r.state for r in rows}


@BACKENDS
def test_a_stop_reply_suppresses_promo_and_surveys_but_not_transactions(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    settings, engine = _settings(url), get_engine(url)
    queued = enqueue(
        [
            _message("q-promo", PHONE),
            _message("q-survey", PHONE, "viber_survey"),
            _message("q-tx", PHONE, "transaction"),
            _message("q-flash", PHONE, "flashcall"),
            _message("q-other", OTHER),
        ],
        "before",
        settings=settings,
        kick=False,
    )
    assert {r.status for r in queued} == {"accepted"}

    _reply(engine, settings, PHONE, "Stop!")

    assert _states(engine, "q-") == {
        "q-promo": State.SUPPRESSED,  # queued when the opt-out arrived: never sent
        "q-survey": State.SUPPRESSED,
        "q-tx": State.QUEUED,
        "q-flash": State.QUEUED,
        "q-other": State.QUEUED,
    }
    with engine.connect() as conn:
        listed = conn.execute(select(suppressions)).one()
        journal = conn.execute(
            select(events.c.from_state, events.c.to_state, events.c.detail)
            .join(messages, messages.c.pk == events.c.message_pk)
            .where(messages.c.id == "q-promo")
        ).all()
    assert (listed.phone, listed.source, listed.evidence) == (PHONE, "reply", "Stop!")
    assert listed.inbound_pk is not None
    assert [(j.from_state, j.to_state) for j in journal] == [("queued", "suppressed")]
    summary = campaign_summary(engine, "before")
    assert summary is not None and summary["states"]["suppressed"] == 2

    after = enqueue(
        [
            _message("n-promo", PHONE),
            _message("n-survey", PHONE, "viber_survey"),
            _message("n-tx", PHONE, "transaction"),
            _message("n-other", OTHER),
        ],
        "after",
        settings=settings,
        kick=False,
    )
    answers = {r.id: r for r in after}
    assert answers["n-promo"].status == answers["n-survey"].status == "rejected"
    assert answers["n-promo"].errors[0].field == "toPhone"
    assert "suppression list" in answers["n-promo"].errors[0].problem
    assert answers["n-tx"].status == answers["n-other"].status == "accepted"

    _reply(engine, settings, PHONE, "start")
    again = enqueue([_message("s-promo", PHONE)], "again", settings=settings, kick=False)
    assert again[0].status == "accepted"
    with engine.connect() as conn:
        assert conn.execute(select(suppressions)).all() == []
        record = conn.execute(
            select(suppression_events.c.action, suppression_events.c.evidence).order_by(
                suppression_events.c.pk
            )
        ).all()
    assert [tuple(r) for r in record] == [("add", "Stop!"), ("remove", "start")]
    # Messages suppressed stay so: an opt-in does not send what was refused.
    assert _states(engine, "q-promo")["q-promo"] == State.SUPPRESSED


@BACKENDS
def test_a_reply_that_merely_mentions_stop_changes_nothing(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    settings, engine = _settings(url), get_engine(url)
    enqueue([_message("m-promo", PHONE)], "m", settings=settings, kick=False)
    _reply(engine, settings, PHONE, "stop by the shop tomorrow?")
    _reply(engine, settings, "Shop", "STOP")  # an alphanumeric sender: no number to list
    assert _states(engine, "m-") == {"m-promo": State.QUEUED}
    assert consent.count(engine) == 0


@BACKENDS
def test_suppressing_transactions_too_is_a_setting(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    settings = _settings(url, SUPPRESS_MESSAGE_TYPES="promo,viber_survey,transaction")
    engine = get_engine(url)
    enqueue([_message("t-tx", PHONE, "transaction")], "t", settings=settings, kick=False)
    _reply(engine, settings, PHONE, "СТОП")
    assert _states(engine, "t-") == {"t-tx": State.SUPPRESSED}
    refused = enqueue([_message("t-tx2", PHONE, "transaction")], "t", settings=settings)
    assert refused[0].status == "rejected"


@BACKENDS
def test_the_claim_never_takes_a_promo_to_a_listed_number_and_the_sweeper_ends_it(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """A promo that slipped past the door and the opt-out's own pass (stored while the
    opt-out committed): the claim's guard holds it, the sweeper ends it `suppressed`."""
    url = database_factory(backend)
    settings, engine = _settings(url), get_engine(url)
    enqueue(
        [_message("r-promo", PHONE), _message("r-tx", PHONE, "transaction")],
        "r",
        settings=settings,
        kick=False,
    )
    with engine.begin() as conn:  # the list gains the number without the opt-out's pass
        conn.execute(suppressions.insert().values(phone=PHONE, created_at=utcnow(), source="test"))
    now = utcnow() + timedelta(seconds=1)
    taken = claim(engine, "standard", now, 100, 60, "token")
    assert [r.id for r in taken] == ["r-tx"]
    assert sweep(engine, settings)["suppressed"] == 1
    assert _states(engine, "r-") == {"r-promo": State.SUPPRESSED, "r-tx": State.SENDING}


@BACKENDS
def test_between_whole_passes_the_backstop_looks_up_only_numbers_listed_since(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """Two promos slipped past the door: one to a number listed an hour ago, one to a number
    listed now. A pass since ten minutes ago ends only the second; a whole pass, the first."""
    url = database_factory(backend)
    settings, engine = _settings(url), get_engine(url)
    old, new = "+380671110002", "+380671110003"
    enqueue([_message("s-old", old), _message("s-new", new)], "s", settings=settings, kick=False)
    now = utcnow()
    with engine.begin() as conn:
        for phone, at in ((old, now - timedelta(hours=1)), (new, now)):
            conn.execute(suppressions.insert().values(phone=phone, created_at=at, source="test"))
    assert consent.suppress_queued(engine, since=now - timedelta(minutes=10)) == 1
    assert _states(engine, "s-") == {"s-old": State.QUEUED, "s-new": State.SUPPRESSED}
    assert consent.suppress_queued(engine) == 1
    assert _states(engine, "s-")["s-old"] == State.SUPPRESSED


def test_the_consent_backstop_reads_everything_first_then_hourly_and_listings_in_between() -> None:
    passes = sweeper.ConsentPasses(full_every=3600, margin=600)
    start = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    assert passes.since(start) is None  # a process's first sweep: a whole pass
    later = start + timedelta(minutes=30)
    assert passes.since(later) == start - timedelta(minutes=10)
    assert passes.since(start + timedelta(minutes=59)) == start - timedelta(minutes=10)
    assert passes.since(start + timedelta(hours=1)) is None
    assert passes.since(start + timedelta(hours=1, seconds=15)) == start + timedelta(minutes=50)


@BACKENDS
def test_a_held_campaigns_promo_is_suppressed_and_never_sent_after_approval(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    from worker.flows.campaigns import approve_campaign, hold_campaign

    url = database_factory(backend)
    settings, engine = _settings(url), get_engine(url)
    hold_campaign(engine, "h", create=True)
    enqueue([_message("h-promo", PHONE)], "h", settings=settings, kick=False)
    assert _states(engine, "h-") == {"h-promo": State.HELD}
    _reply(engine, settings, PHONE, "UNSUBSCRIBE")
    approve_campaign(engine, "h", settings.broker_url)
    assert _states(engine, "h-") == {"h-promo": State.SUPPRESSED}


# --- the property: no listed number ever gets a promo, whatever the interleaving -------------

_serial = itertools.count()
Step = tuple[str, int]
steps = st.lists(
    st.tuples(st.sampled_from(["promo", "tx", "stop", "start", "claim"]), st.integers(0, 2)),
    min_size=1,
    max_size=25,
)


@BACKENDS
def test_no_suppressed_number_ever_receives_a_promo_whatever_the_interleaving(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    settings, engine = _settings(url), get_engine(url)

    @hypothesis_settings(derandomize=True, max_examples=40, deadline=None)
    @given(steps)
    def run(plan: list[Step]) -> None:
        run_id = next(_serial)
        phones = [f"+38067{run_id:04d}{i:03d}" for i in range(3)]
        optedout: set[str] = set()
        queued_before_stop: dict[str, set[str]] = {p: set() for p in phones}
        for n, (action, which) in enumerate(plan):
            phone = phones[which]
            if action in ("promo", "tx"):
                kind = "promo" if action == "promo" else "transaction"
                mid = f"p{run_id}-{n}"
                (result,) = enqueue(
                    [_message(mid, phone, kind)], None, settings=settings, kick=False
                )
                if kind == "promo":
                    assert (result.status == "rejected") == (phone in optedout)
                    if result.status == "accepted":
                        queued_before_stop[phone].add(mid)
            elif action in ("stop", "start"):
                _reply(engine, settings, phone, action.upper())
                if action == "stop":
                    optedout.add(phone)
                else:
                    optedout.discard(phone)
            else:
                taken = claim(engine, "standard", utcnow() + timedelta(seconds=1), 50, 60, "t")
                for row in taken:  # rows of earlier examples too: only ours are checked
                    if row.message_type == "promo" and row.to_phone in queued_before_stop:
                        assert row.to_phone not in optedout
                        assert row.id in queued_before_stop[row.to_phone]
                        queued_before_stop[row.to_phone].discard(row.id)
            if action == "stop":
                queued_before_stop[phone].clear()  # they are suppressed, never claimable
        states = _states(engine, f"p{run_id}-")
        for phone in phones:
            for mid in queued_before_stop[phone]:
                assert states[mid] == State.QUEUED

    run()


def test_a_stop_racing_concurrent_claims_is_never_overtaken(
    database_factory: Callable[[str], str],
) -> None:
    """PostgreSQL, threads: once `store_inbound` has returned for a STOP, no claim that
    starts afterwards takes a promo to that number (happens-before, not timing luck)."""
    url = database_factory("postgresql")
    settings, engine = _settings(url), get_engine(url)
    phones = [f"+3806722{i:05d}" for i in range(40)]
    enqueue(
        [_message(f"x-{i}-{j}", p) for i, p in enumerate(phones) for j in range(25)],
        "race",
        settings=settings,
        kick=False,
    )
    stopped: dict[str, float] = {}
    claims: list[tuple[float, list[Any]]] = []
    done = threading.Event()

    def claimer(n: int) -> None:
        while not done.is_set():
            started = time.monotonic()
            rows = claim(engine, "standard", utcnow() + timedelta(seconds=1), 3, 60, f"t{n}")
            claims.append((started, rows))
            time.sleep(0.002)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for phone in phones:
        _reply(engine, settings, phone, "Stop")
        stopped[phone] = time.monotonic()
    done.set()
    for t in threads:
        t.join()
    for started, rows in claims:
        for row in rows:
            assert not (row.to_phone in stopped and started > stopped[row.to_phone]), row.id
    states = _states(engine, "x-")
    assert set(states.values()) <= {State.SENDING, State.SUPPRESSED}


# --- quiet hours ------------------------------------------------------------------------------

KYIV = ZoneInfo("Europe/Kyiv")


def _window_opening_in(minutes: int) -> tuple[str, datetime]:
    """A window opening `minutes` from now (whole minutes, Kyiv time) for an hour."""
    local = datetime.now(KYIV).replace(second=0, microsecond=0) + timedelta(minutes=minutes)
    end = local + timedelta(hours=1)
    return f"{local:%H:%M}-{end:%H:%M}", local.astimezone(UTC)


@BACKENDS
def test_outside_its_window_a_promo_waits_and_goes_when_the_window_opens(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    spec, opening = _window_opening_in(120)
    settings, engine = _settings(url, SEND_WINDOW=spec), get_engine(url)
    results = enqueue(
        [
            _message("w-promo", PHONE, ttl=86400),
            _message("w-tx", OTHER, "transaction"),
            _message("w-short", OTHER, ttl=600),  # gone before the window opens
        ],
        "w",
        settings=settings,
        kick=False,
    )
    assert [r.state for r in results] == [State.QUEUED, State.QUEUED, State.EXPIRED]
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(messages).where(messages.c.campaign == "w"))}
    assert rows["w-promo"].available_at == opening and rows["w-promo"].window_at == opening
    assert rows["w-tx"].window_at is None
    assert rows["w-short"].error_code == "QUIET_HOURS"
    summary = campaign_summary(engine, "w")
    assert summary is not None and summary["waiting_for_window"] == 1

    # The clock injected: closed a second before the opening, open at it.
    assert [
        r.id for r in claim(engine, "standard", opening - timedelta(seconds=1), 10, 60, "a")
    ] == ["w-tx"]
    assert [r.id for r in claim(engine, "standard", opening, 10, 60, "b")] == ["w-promo"]


@BACKENDS
def test_a_campaign_window_overrides_the_setting_and_off_turns_it_off(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    spec, _ = _window_opening_in(180)
    settings, engine = _settings(url, SEND_WINDOW=spec), get_engine(url)
    enqueue([_message("o-1", PHONE)], "o", settings=settings, kick=False, send_window="off")
    enqueue([_message("o-2", PHONE)], "o", settings=settings, kick=False)  # stored: still off
    mine, mine_opening = _window_opening_in(60)
    enqueue([_message("k-1", PHONE)], "k", settings=settings, kick=False, send_window=mine)
    with engine.connect() as conn:
        at = dict(conn.execute(select(messages.c.id, messages.c.window_at)).all())
    assert at == {"o-1": None, "o-2": None, "k-1": mine_opening}
    with pytest.raises(ValueError, match="send window"):
        enqueue([_message("k-2", PHONE)], "k", settings=settings, send_window="9-5")


# --- a campaign's own window from the command line and the API ----------------------------------


def _launch(url: str, broker: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", "campaign", "launch", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "DATABASE_URL": url, "BROKER_URL": broker, **env},
        timeout=120,
    )


def _windows(engine: Engine) -> tuple[dict[str, Any], dict[str, Any]]:
    """window_at by message id; send_window by campaign."""
    with engine.connect() as conn:
        at = dict(conn.execute(select(messages.c.id, messages.c.window_at)).all())
        stored = dict(conn.execute(select(campaigns.c.name, campaigns.c.send_window)).all())
    return at, stored


def test_inbound_list_shows_what_each_reply_meant(
    database_factory: Callable[[str], str], redis_db: str
) -> None:
    """README: `cascade inbound list` shows the replies, masked, "with their meaning"."""
    url = database_factory("sqlite")
    settings = _settings(url)
    engine = get_engine(url)
    _reply(engine, settings, PHONE, "Stop!")
    _reply(engine, settings, OTHER, "Who is this?")
    _reply(engine, settings, PHONE, "start")
    shown = subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", "inbound", "list"],
        capture_output=True,
        text=True,
        env={**os.environ, "DATABASE_URL": url, "BROKER_URL": redis_db, "COLUMNS": "200"},
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    lines = {line.split("│")[3].strip(): line for line in shown.stdout.splitlines() if "│" in line}
    assert "opt-out" in lines["Stop!"]
    assert "opt-in" in lines["start"]
    assert "opt-" not in lines["Who is this?"]
    assert PHONE not in shown.stdout and OTHER not in shown.stdout


@BACKENDS
def test_launch_send_window_is_stored_with_the_campaign_and_none_turns_it_off(
    backend: str, database_factory: Callable[[str], str], redis_db: str, tmp_path: Path
) -> None:
    url = database_factory(backend)
    engine = get_engine(url)
    spec, opening = _window_opening_in(60)
    rows = tmp_path / "list.csv"
    rows.write_text(
        f"id,toPhone,messageType\na-1,{PHONE},promo\na-2,{OTHER},promo\na-3,{PHONE},transaction\n"
    )
    common = ("--from-name", "Shop", "--text", "Hi")

    bad = _launch(url, redis_db, str(rows), "--name", "a", *common, "--send-window", "9-5")
    assert bad.returncode == 2 and "--send-window: '9-5' is not a window" in bad.stderr
    assert _windows(engine) == ({}, {})  # refused before anything was stored

    dry = _launch(
        url, redis_db, str(rows), "--name", "a", *common, "--send-window", spec, "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    assert "2 would be held for the recipient's send window" in dry.stdout
    assert _windows(engine) == ({}, {})

    done = _launch(url, redis_db, str(rows), "--name", "a", *common, "--send-window", spec)
    assert done.returncode == 0, done.stderr
    assert f"send window of a's promo and surveys: {spec}" in done.stdout
    assert "2 held for the recipient's send window" in done.stdout  # as the dry run said
    at, stored = _windows(engine)
    assert at == {"a-1": opening, "a-2": opening, "a-3": None} and stored == {"a": spec}

    # A later launch into the campaign keeps its window; `none` on another campaign turns
    # SEND_WINDOW off for it.
    more = tmp_path / "more.csv"
    more.write_text(f"id,toPhone,messageType\na-4,{OTHER},promo\n")
    assert _launch(url, redis_db, str(more), "--name", "a", *common).returncode == 0
    other = tmp_path / "other.csv"
    other.write_text(f"id,toPhone,messageType\nn-1,{PHONE},promo\n")
    setting = {"SEND_WINDOW": _window_opening_in(180)[0]}
    off = _launch(
        url, redis_db, str(other), "--name", "n", *common, "--send-window", "none", **setting
    )
    assert off.returncode == 0, off.stderr
    assert "send window of n's promo and surveys: none (any hour)" in off.stdout
    at, stored = _windows(engine)
    assert at["a-4"] == opening and at["n-1"] is None
    assert stored == {"a": spec, "n": "off"}


@BACKENDS
def test_the_api_takes_a_campaign_window_and_refuses_a_bad_one_naming_it(
    backend: str, database_factory: Callable[[str], str], redis_db: str
) -> None:
    from fastapi.testclient import TestClient

    from worker.http.app import create_app

    url = database_factory(backend)
    settings = Settings(DATABASE_URL=url, BROKER_URL=redis_db, API_TOKEN="t")  # type: ignore[call-arg]
    spec, opening = _window_opening_in(60)
    auth = {"Authorization": "Bearer t"}
    with TestClient(create_app(settings)) as api:

        def post(i: str, **query: str) -> Any:
            answer = api.post("/v1/messages", params=query, json=[_message(i, PHONE)], headers=auth)
            return answer.status_code, answer.json()

        assert post("p-1", campaign="p", sendWindow=spec)[1][0]["status"] == "accepted"
        assert post("p-2", campaign="p")[1][0]["status"] == "accepted"  # stored: still on
        assert post("q-1", campaign="q", sendWindow="None")[1][0]["status"] == "accepted"
        for query, problem in (
            ({"campaign": "p", "sendWindow": "25:00-26:00"}, "sendWindow: '25:00-26:00' has a"),
            ({"sendWindow": spec}, "needs ?campaign=NAME"),
        ):
            status, body = post("r-1", **query)
            assert status == 200 and body[0]["status"] == "rejected"
            assert body[0]["errors"][0]["field"] == "sendWindow"
            assert body[0]["errors"][0]["problem"].startswith(problem)
        status, body = post("r-1", campaign="p", sendWindow="after lunch")
        assert status == 422 and body["detail"][0]["loc"] == ["query", "sendWindow"]
    at, stored = _windows(get_engine(url))
    assert at == {"p-1": opening, "p-2": opening, "q-1": None}
    assert stored == {"p": spec, "q": "off"}


@BACKENDS
def test_a_promo_approved_after_its_window_closed_waits_at_the_claim_for_the_next_opening(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """Enqueued inside its window, held, approved hours later when the window has closed:
    the claim puts it back until the next opening instead of sending it at night."""
    from tests.helpers import Clock, MemoryPacing
    from tests.test_quota import ENV, Provider
    from worker.flows import dispatcher
    from worker.flows.campaigns import approve_campaign, hold_campaign
    from worker.provider.smsbat import SendClient

    url = database_factory(backend)
    spec, opened = _window_opening_in(-30)  # open since half an hour, for half an hour more
    settings, engine = _settings(url, **ENV, SEND_WINDOW=spec), get_engine(url)
    hold_campaign(engine, "night", create=True)
    enqueue(
        [_message("n-promo", PHONE, ttl=3 * 86400), _message("n-tx", OTHER, "transaction")],
        "night",
        settings=settings,
        kick=False,
    )
    assert _states(engine, "n-") == {"n-promo": State.HELD, "n-tx": State.HELD}
    approve_campaign(engine, "night")
    clock, provider = Clock(), Provider()
    clock.now += timedelta(hours=2)  # the window has closed
    client = SendClient(settings, transport=httpx.MockTransport(provider.handle))

    def send() -> None:
        dispatcher.send_batch(
            engine, client, MemoryPacing(clock), settings, "standard", clock=clock
        )

    send()
    assert provider.sent == ["n-tx"]
    tomorrow = opened + timedelta(days=1)
    with engine.connect() as conn:
        row = conn.execute(select(messages).where(messages.c.id == "n-promo")).one()
    assert (row.state, row.available_at, row.window_at) == (State.QUEUED, tomorrow, tomorrow)
    assert campaign_summary(engine, "night")["waiting_for_window"] == 1  # type: ignore[index]
    send()
    assert provider.sent == ["n-tx"]  # not due before the opening
    clock.now = tomorrow
    send()
    assert provider.sent == ["n-tx", "n-promo"]
