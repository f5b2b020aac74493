"""`GET /v1/campaigns/{name}` at campaign scale: the counts current on every request, the
analytics (channels, latency, top errors: scans of the campaign's rows) kept per process
in worker.ops.cache.FIGURES and their age in the answer. On SQLite and PostgreSQL, in
process, with the statements the requests run counted on the engine.

The cache's clock is a fake one that the analytics advance by 2 s, as if their scan took
that long: they are then computed again no sooner than 20 s later (10 × the cost).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from config import Settings
from tests.conftest import make_messages
from worker.http.app import create_app
from worker.ops import cache, reports
from worker.ops.cache import FiguresCache
from worker.producer import enqueue
from worker.store.db import get_engine, utcnow
from worker.store.models import messages

TOKEN = "report-cache-token"
NAME = "dash/board"  # a name with a slash, as the route allows
SCAN_SECONDS = 2.0
# Each statement of `campaign_analytics` names one of these; the summary's none.
ANALYTICS_MARKS = ("extended_statuses", "row_number", "error_code")


class Statements:
    """Every statement run on the engine while listening."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: list[str] = []

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        self.seen.append(statement)

    @property
    def scans(self) -> list[str]:
        """The analytics' statements: the row scans the cache is there to spare."""
        return [s for s in self.seen if any(mark in s for mark in ANALYTICS_MARKS)]

    @property
    def tallies(self) -> list[str]:
        return [s for s in self.seen if "campaign_tallies" in s]


@pytest.fixture(params=["sqlite", "postgresql"])
def api(
    request: pytest.FixtureRequest,
    database_factory: Callable[[str], str],
    redis_db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[TestClient, Engine, list[float]]]:
    """The app on a fresh database with a campaign of 4 messages: two delivered (telegram,
    viber), one undeliverable with an error code, one still with the provider."""
    url = database_factory(request.param)
    settings = Settings(  # type: ignore[call-arg]
        DATABASE_URL=url, BROKER_URL=redis_db, API_TOKEN=TOKEN
    )
    enqueue(make_messages(4, "rc"), NAME, settings=settings, kick=False)
    engine = get_engine(url)
    submitted = utcnow() - timedelta(minutes=5)
    for n, state, channels, code in [
        (0, "delivered", {"telegram": "delivered"}, None),
        (1, "delivered", {"telegram": "undeliverable", "viber": "delivered"}, None),
        (2, "undeliverable", {"telegram": "undeliverable"}, "E_FIRST"),
        (3, "submitted", None, None),
    ]:
        final = submitted + timedelta(seconds=10 * (n + 1)) if state != "submitted" else None
        values = {"state": state, "extended_statuses": channels, "error_code": code}
        values |= {"submitted_at": submitted, "final_at": final}
        _update(engine, f"rc-{n}", provider_message_id=f"pm-rc-{n}", **values)

    now = [1000.0]
    monkeypatch.setattr(cache, "FIGURES", FiguresCache(clock=lambda: now[0]))
    scan = reports.campaign_analytics

    def slow_scan(engine: Engine, campaign: str) -> dict[str, Any]:
        now[0] += SCAN_SECONDS
        return scan(engine, campaign)

    monkeypatch.setattr(reports, "campaign_analytics", slow_scan)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(settings), base_url="http://testserver", headers=headers) as test:
        yield test, engine, now


def _update(engine: Engine, message_id: str, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(messages.update().where(messages.c.id == message_id).values(**values))


def _path(name: str) -> str:
    return "/v1/campaigns/" + httpx.URL(name).raw_path.decode()


def _report(test: TestClient, engine: Engine) -> tuple[dict[str, Any], Statements]:
    with Statements(engine) as statements:
        answer = test.get(_path(NAME))
    assert answer.status_code == 200, answer.text
    return answer.json(), statements


def _as_of(report: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(report["analytics_as_of"].replace("Z", "+00:00"))


def test_a_second_request_within_ten_times_the_scan_reads_only_the_tallies(api) -> None:
    test, engine, now = api
    before = utcnow()
    first, statements = _report(test, engine)
    assert statements.scans and statements.tallies  # computed: nothing was kept yet
    assert first["analytics_age_seconds"] == 0.0
    assert before - timedelta(seconds=1) <= _as_of(first) <= utcnow()
    assert first["channels"] == {"telegram": 1, "viber": 1, "none": 1}
    assert [e["code"] for e in first["top_errors"]] == ["E_FIRST"]
    assert first["latency_seconds"]["submit_to_final"]["max"] == 30.0

    # Meanwhile the message with the provider moves on, with an error code, and is checked.
    _update(engine, "rc-3", state="processing", error_code="E_LATER", polls=7)
    now[0] += 19  # the 2 s scan is kept for 20 s
    kept, statements = _report(test, engine)
    assert statements.tallies and not statements.scans  # the counts read, no row scanned
    assert kept["states"] == {"delivered": 2, "processing": 1, "undeliverable": 1}
    assert kept["polls"] == first["polls"] + 7  # the counts: current
    assert kept["analytics_age_seconds"] == 19.0
    assert _as_of(kept) <= utcnow() - timedelta(seconds=19)
    assert [e["code"] for e in kept["top_errors"]] == ["E_FIRST"]  # as of 19 s ago
    assert {k: kept[k] for k in ("channels", "latency_seconds")} == {
        k: first[k] for k in ("channels", "latency_seconds")
    }

    now[0] += 1  # 20 s: due
    fresh, statements = _report(test, engine)
    assert statements.scans
    assert fresh["analytics_age_seconds"] == 0.0
    assert sorted(e["code"] for e in fresh["top_errors"]) == ["E_FIRST", "E_LATER"]


def test_the_first_answer_once_all_final_computes_the_analytics_afresh(api) -> None:
    test, engine, now = api
    first, _ = _report(test, engine)
    assert not first["all_final"]
    _update(engine, "rc-3", state="undeliverable", error_code="E_LATER", final_at=utcnow())
    now[0] += 1  # well within the 20 s

    final, statements = _report(test, engine)
    assert final["all_final"] and statements.scans
    assert final["analytics_age_seconds"] == 0.0
    assert final["channels"] == {"telegram": 1, "viber": 1, "none": 1, "not reported": 1}
    assert sorted(e["code"] for e in final["top_errors"]) == ["E_FIRST", "E_LATER"]

    now[0] += 5
    kept, statements = _report(test, engine)
    assert not statements.scans and kept["analytics_age_seconds"] == 5.0


def test_the_live_page_and_the_api_share_a_campaigns_analytics(api) -> None:
    test, engine, now = api
    _report(test, engine)
    now[0] += 5  # the page's refresh (CAMPAIGN_PAGE_REFRESH_SECONDS) is 5 s
    with Statements(engine) as statements:
        page = test.get("/campaigns/" + httpx.URL(NAME).raw_path.decode())
    assert page.status_code == 200
    assert "extended_statuses" not in " ".join(statements.seen)  # channels: the API's
    assert "row_number" not in " ".join(statements.seen)  # latency: the API's
    assert "as of 5 s ago" in page.text


def test_the_cli_report_is_computed_on_the_spot(api) -> None:
    """`cascade campaign report` (no cache): the analytics are exact, of age 0."""
    test, engine, _ = api
    _report(test, engine)
    _update(engine, "rc-3", state="undeliverable", error_code="E_LATER", final_at=utcnow())
    with Statements(engine) as statements:
        report = reports.campaign_report(engine, NAME)
    assert report is not None and statements.scans
    assert report["analytics_age_seconds"] == 0.0
    assert sorted(e["code"] for e in report["top_errors"]) == ["E_FIRST", "E_LATER"]
