"""The live campaign page, `GET /campaigns/{name}`.

Who may read it and how (bearer, `?token=` moved into a cookie, the cookie) on SQLite in
process; then the page itself in headless Chromium (Debian's `chromium`) against a real
API, worker and simulator on PostgreSQL, mid-campaign and at its end, every figure it shows
checked against the database.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from html import unescape
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, or_, select

from config import Settings
from tests.conftest import Stack, make_messages, make_stack
from worker.core.states import FINAL
from worker.dev.stack import Api, start_api, wait_for
from worker.http.app import create_app
from worker.http.live_page import COOKIE
from worker.ops import cache
from worker.ops.cache import FiguresCache
from worker.ops.cli import upgrade_database
from worker.ops.reports import FAILED_STATES, campaign_summary
from worker.producer import enqueue
from worker.store.models import messages
from worker.store.pacing import Pacing

API_TOKEN = "api-token-page"
READONLY = "read-only-page-token"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def client(tmp_path: Path, redis_db: str) -> Iterator[tuple[TestClient, str]]:
    url = f"sqlite:///{tmp_path / 'cascade.db'}"
    upgrade_database(url)
    settings = Settings(  # type: ignore[call-arg]
        DATABASE_URL=url, BROKER_URL=redis_db, API_TOKEN=API_TOKEN, READONLY_TOKEN=READONLY
    )
    name = "spring <sale>"
    enqueue(make_messages(3, "p"), name, settings=settings, kick=False)
    with TestClient(create_app(settings), base_url="http://testserver") as test:
        yield test, name


def _path(name: str) -> str:
    return "/campaigns/" + httpx.URL(name).raw_path.decode()


def test_the_page_needs_a_token_and_refuses_a_wrong_one(client) -> None:
    test, name = client
    for headers, query in (
        ({}, ""),
        ({"Authorization": "Bearer nope"}, ""),
        ({}, "?token=nope"),
        ({"Cookie": f"{COOKIE}=nope"}, ""),
    ):
        answer = test.get(_path(name) + query, headers=headers, follow_redirects=False)
        assert answer.status_code == 401, (headers, query)
        assert answer.headers["www-authenticate"] == "Bearer"
        assert "READONLY_TOKEN" in answer.text and "set-cookie" not in answer.headers
        assert "nope" not in answer.text


def test_the_read_only_token_opens_pages_only(client) -> None:
    test, name = client
    bearer = {"Authorization": f"Bearer {READONLY}"}
    page = test.get(_path(name), headers=bearer)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Campaign spring &lt;sale&gt;" in page.text and "<sale>" not in page.text
    assert page.headers["cache-control"] == "no-store"
    assert test.get("/v1/campaigns/x", headers=bearer).status_code == 401
    assert test.get(_path(name), headers={"Authorization": f"Bearer {API_TOKEN}"}).is_success


def test_a_token_in_the_query_moves_into_a_cookie_and_leaves_the_url(client) -> None:
    test, name = client
    answer = test.get(_path(name) + f"?token={READONLY}&x=1", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == _path(name) + "?x=1"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={READONLY};")
    assert "HttpOnly" in cookie and "Path=/campaigns" in cookie and "SameSite=lax" in cookie
    assert "Secure" not in cookie  # plain http here: a Secure cookie would never come back
    test.cookies.clear()
    again = test.get(_path(name), headers={"Cookie": f"{COOKIE}={READONLY}"})
    assert again.status_code == 200 and 'data-figure="total"' in again.text


def test_an_unknown_campaign_is_a_404_page_naming_it(client) -> None:
    test, _ = client
    answer = test.get(_path("no <such>"), headers={"Authorization": f"Bearer {READONLY}"})
    assert answer.status_code == 404 and answer.headers["content-type"].startswith("text/html")
    assert "No campaign named “no &lt;such&gt;”" in answer.text


def test_the_page_reloads_while_running_and_stops_when_all_final(client) -> None:
    test, name = client
    auth = {"Authorization": f"Bearer {READONLY}"}
    running = test.get(_path(name), headers=auth).text
    assert '<meta http-equiv="refresh" content="5">' in running
    assert 'data-running="true"' in running
    settings = test.app.state.settings  # type: ignore[attr-defined]
    from worker.store.db import get_engine

    with get_engine(settings.database_url).begin() as conn:
        conn.execute(
            messages.update()
            .where(messages.c.campaign == name)
            .values(state="delivered", final_at=func.now(), submitted_at=func.now())
        )
    done = test.get(_path(name), headers=auth).text
    assert "http-equiv" not in done and 'data-running="false"' in done
    assert _figures(done)["total"] == 3 and _states(done) == {"delivered": 3}


def test_the_page_and_the_report_say_when_the_provider_stops_every_send(
    client, redis_db: str
) -> None:
    """A campaign "running" while a 429 (or refused credentials) holds every worker back."""
    test, name = client
    auth = {"Authorization": f"Bearer {READONLY}"}
    assert "Sending is paused" not in test.get(_path(name), headers=auth).text
    Pacing(redis_db).pause("send:throttle", 30, "the provider throttled sends (HTTP 429)")

    page = unescape(test.get(_path(name), headers=auth).text)
    assert re.search(
        r"Sending is paused for every campaign for about \d+ s: "
        r"the provider throttled sends \(HTTP 429\)\.",
        page,
    )
    report = test.get("/v1" + _path(name), headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert report.status_code == 200, report.text
    sending = report.json()["sending"]
    assert sending["reason"] == "the provider throttled sends (HTTP 429)"
    assert 0 < sending["paused_for_seconds"] <= 30


def test_campaign_status_says_when_the_provider_stops_every_send(
    tmp_path: Path, redis_db: str
) -> None:
    url = f"sqlite:///{tmp_path / 'cascade.db'}"
    upgrade_database(url)
    settings = Settings(DATABASE_URL=url, BROKER_URL=redis_db)  # type: ignore[call-arg]
    enqueue(make_messages(3, "st"), "autumn", settings=settings, kick=False)
    Pacing(redis_db).open_circuit("send:circuit", 60, "HTTP 401: credentials refused")
    env = {**os.environ, "DATABASE_URL": url, "BROKER_URL": redis_db, "COLUMNS": "200"}

    def status(*extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "worker.ops.cli", "campaign", "status", "autumn", *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert re.search(
        r"running; sending paused for every campaign, about \d+ s more: "
        r"HTTP 401: credentials refused",
        status(),
    )
    assert '"reason": "HTTP 401: credentials refused"' in status("--json")


# --- in a browser, against the real thing ----------------------------------------------------


def _figures(page: str) -> dict[str, int]:
    """Each card's value by its data-figure name (counts only: rates end in /s)."""
    found = re.findall(
        r'data-figure="([^"]+)"><div class="label">[^<]*</div><div class="value">([^<]*)<', page
    )
    return {k: int(v.replace(",", "")) for k, v in found if re.fullmatch(r"[\d,]+", v)}


def _notes(page: str) -> dict[str, str]:
    found = re.findall(
        r'data-figure="([^"]+)"><div class="label">[^<]*</div><div class="value">[^<]*</div>'
        r'<div class="note">([^<]*)<',
        page,
    )
    return {k: unescape(v) for k, v in found}


def _states(page: str) -> dict[str, int]:
    return {s: int(n) for s, n in re.findall(r'<tr data-state="([^"]+)" data-count="(\d+)">', page)}


def _errors(page: str) -> list[int]:
    return [int(n) for n in re.findall(r'<tr data-count="(\d+)">', page)]


def _chromium(url: str, *extra: str) -> str:
    assert CHROMIUM
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        done = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def live(database_factory: Callable[[str], str]) -> Iterator[tuple[Stack, Api]]:
    env = {"API_TOKEN": API_TOKEN, "READONLY_TOKEN": READONLY}
    with make_stack(database_factory("postgresql"), "postgresql", env) as stack:
        api = start_api(stack.workers.logdir, stack.workers.env, "api-page")
        try:
            yield stack, api
        finally:
            api.process.stop()


def _database_figures(stack: Stack, campaign: str) -> dict[str, object]:
    m = messages.c
    with stack.engine.connect() as conn:
        states = dict(
            conn.execute(
                select(m.state, func.count()).where(m.campaign == campaign).group_by(m.state)
            ).all()
        )
        sent = conn.execute(
            select(func.count(m.provider_message_id)).where(m.campaign == campaign)
        ).scalar_one()
        errors = conn.execute(
            select(func.count()).where(
                m.campaign == campaign,
                or_(m.error_code.is_not(None), m.state.in_(FAILED_STATES)),
            )
        ).scalar_one()
    return {"states": states, "sent": sent, "errors": errors}


def _sent_between(stack: Stack, campaign: str, now: datetime, column: str) -> int:
    m = messages.c
    since = now - timedelta(seconds=60)
    where = [m.campaign == campaign, m[column] > since, m[column] <= now]
    if column == "final_at":
        where.append(m.state == "delivered")
    with stack.engine.connect() as conn:
        return conn.execute(select(func.count()).where(*where)).scalar_one()


def _check_against_database(page: str, stack: Stack, campaign: str) -> dict[str, object]:
    db = _database_figures(stack, campaign)
    states: dict[str, int] = db["states"]  # type: ignore[assignment]
    total = sum(states.values())
    final = sum(n for s, n in states.items() if s in FINAL)
    shown = _figures(page)
    assert _states(page) == states
    assert shown["total"] == total
    assert shown["delivered"] == states.get("delivered", 0)
    assert shown["sent"] == db["sent"]
    assert shown["final"] == final
    assert sum(_errors(page)) == db["errors"]
    now = datetime.fromisoformat(re.search(r'data-now="([^"]+)"', page).group(1))  # type: ignore[union-attr]
    notes = _notes(page)
    sent_recent = _sent_between(stack, campaign, now, "submitted_at")
    delivered_recent = _sent_between(stack, campaign, now, "final_at")
    assert notes["sent_last_minute"].startswith(f"{sent_recent:,} accepted")
    assert notes["delivered_last_minute"].startswith(f"{delivered_recent:,} delivered")
    return db


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_page_in_a_browser_mid_campaign_and_at_its_end_shows_the_database(
    live: tuple[Stack, Api], tmp_path: Path
) -> None:
    stack, api = live
    campaign = f"live-{uuid.uuid4().hex[:8]}"
    stack.simulator.configure(
        delay_min=0.5,
        delay_max=25.0,
        mix={"delivered": 0.75, "undeliverable": 0.15, "permanenterror": 0.1},
    )
    total = 300
    stack.enqueue(make_messages(total, campaign), campaign)

    def midway() -> bool:
        summary = campaign_summary(stack.engine, campaign)
        return bool(summary and summary["final"] >= 60 and summary["sent"] == total)

    wait_for(midway, 90, "some messages final, all sent")
    stack.workers.stop()  # nothing moves the campaign now: the page and the database agree
    try:
        summary = campaign_summary(stack.engine, campaign)
        assert summary and summary["final"] < total, "the campaign ended before the check"
        url = f"{api.url}/campaigns/{campaign}?token={READONLY}"
        page = _chromium(url, "--dump-dom")
        assert 'data-running="true"' in page and 'http-equiv="refresh"' in page
        db = _check_against_database(page, stack, campaign)
        assert db["errors"], "no failure to list in top errors"
        assert "Deliveries over time" in page and "<svg" in page
        # CASCADE_PAGE_SCREENSHOT=docs/campaign-page.png keeps it (README's picture).
        shot = Path(os.environ.get("CASCADE_PAGE_SCREENSHOT") or tmp_path / "page.png")
        _chromium(url, f"--screenshot={shot.resolve()}", "--window-size=1200,1240")
        assert shot.stat().st_size > 20_000
    finally:
        stack.workers.start("w0", beat=True)
    stack.wait_final(campaign, total, timeout=120)
    page = _chromium(f"{api.url}/campaigns/{campaign}?token={API_TOKEN}", "--dump-dom")
    assert 'data-running="false"' in page and "http-equiv" not in page
    _check_against_database(page, stack, campaign)
    logs = stack.logs()
    assert READONLY not in logs and API_TOKEN not in logs


def test_the_scanned_figures_are_kept_a_while_and_their_age_shown(client, monkeypatch) -> None:
    """Counts come fresh from the tallies; while the campaign runs, the row scans (errors,
    channels, latency, the chart, the rates) are recomputed once the refresh has passed,
    their age on the page. All final, they are computed afresh (the reload test)."""
    test, name = client
    now = [0.0]
    monkeypatch.setattr(cache, "FIGURES", FiguresCache(clock=lambda: now[0]))
    auth = {"Authorization": f"Bearer {READONLY}"}
    first = test.get(_path(name), headers=auth).text
    assert "E_LATER" not in first and " s ago" not in first
    settings = test.app.state.settings  # type: ignore[attr-defined]
    from worker.store.db import get_engine

    with get_engine(settings.database_url).begin() as conn:
        conn.execute(
            messages.update()
            .where(messages.c.campaign == name, messages.c.id != "p-2")  # one still queued
            .values(state="failed", error_code="E_LATER", final_at=func.now())
        )
    now[0] += 3
    kept = test.get(_path(name), headers=auth).text
    assert _states(kept) == {"failed": 2, "queued": 1}  # the counts: fresh
    assert "E_LATER" not in kept and "as of 3 s ago" in kept
    now[0] += 3  # past the 5 s refresh
    fresh = test.get(_path(name), headers=auth).text
    assert "E_LATER" in fresh and " s ago" not in fresh
