"""The webhook receivers over HTTP (TestClient), storing into real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, delete, select

from config import Settings
from tests.conftest import REDIS
from tests.helpers import (
    SEED_PAYLOAD,
    event_history,
    fill_messages,
    mark_submitted,
    stored_message,
)
from worker.celery import POLL_QUEUE
from worker.flows import wake
from worker.flows.inbox import apply_pending
from worker.http import webhooks
from worker.http.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature, wake_reports
from worker.store.db import get_engine
from worker.store.models import events, inbound_messages, messages, provider_reports

TOKEN = "s3cret-token"
SECRET = "signing-secret"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 2048
DELIVERED = {"messageId": "pm-1", "deliverystatus": "delivered", "cost": 0.05}


@dataclass
class Hook:
    """The router in a small app, on a real database, with settings and wake-ups observable."""

    url: str
    app: FastAPI
    client: TestClient
    woke: list[str]

    @property
    def engine(self) -> Engine:
        return get_engine(self.url)

    def configure(self, **changes: Any) -> Settings:
        values = {
            "DATABASE_URL": self.url,
            "BROKER_URL": f"{REDIS}/15",
            "WEBHOOK_TOKEN": TOKEN,
            "WEBHOOK_MAX_BODY_BYTES": LIMIT,
            **changes,
        }
        settings = Settings(**values)
        self.app.dependency_overrides[webhooks.webhook_settings] = lambda: settings
        return settings

    def stored(self) -> tuple[list[Any], list[Any]]:
        with self.engine.connect() as conn:
            reports = conn.execute(select(provider_reports).order_by(provider_reports.c.pk))
            inbound = conn.execute(select(inbound_messages).order_by(inbound_messages.c.pk))
            return reports.all(), inbound.all()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, database_factory: Callable[[str], str]) -> str:
    return database_factory(request.param)


@pytest.fixture
def hook(database: str) -> Iterator[Hook]:
    with get_engine(database).begin() as conn:
        for table in (provider_reports, inbound_messages, events, messages):
            conn.execute(delete(table))
    app = FastAPI()
    app.include_router(webhooks.router)
    woke: list[str] = []
    app.dependency_overrides[webhooks.webhook_waker] = lambda: woke.append
    built = Hook(database, app, TestClient(app), woke)
    built.configure()
    yield built
    built.client.close()


def _signed(body: bytes, *, at: float | None = None, secret: str = SECRET) -> dict[str, str]:
    stamp = str(int(time.time() if at is None else at))
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: signature(secret, stamp, body)}


# --- accepted pushes ----------------------------------------------------------------------------


def test_an_smsbat_push_is_stored_and_wakes_the_applier(hook: Hook) -> None:
    answer = hook.client.post("/webhooks/smsbat", json=DELIVERED, headers=BEARER)

    assert answer.status_code == 200
    assert answer.json() == {"accepted": 1, "rejected": []}
    [report], inbound = hook.stored()
    assert (report.source, report.provider_message_id, report.state, report.outcome) == (
        "webhook",
        "pm-1",
        "delivered",
        None,
    )
    assert report.payload["fields"] == {"deliverystatus": "delivered", "cost": 0.05}
    assert inbound == []
    assert hook.woke == [f"{REDIS}/15"]


def test_an_array_gets_per_element_results(hook: Hook) -> None:
    body = [DELIVERED, {"messageId": "pm-2", "deliverystatus": "lost"}, "x", {**DELIVERED}]

    answer = hook.client.post("/webhooks/smsbat", json=body, headers=BEARER)

    assert answer.status_code == 200
    assert answer.json() == {
        "accepted": 2,
        "rejected": [
            {
                "index": 1,
                "error": "deliverystatus: unknown status 'lost' (expected one of scheduled, "
                "processing, delivered, undeliverable, permanenterror)",
            },
            {"index": 2, "error": "report must be a JSON object, got string"},
        ],
    }
    assert len(hook.stored()[0]) == 2


def test_the_bulkgate_array_stores_reports_and_inbound_sms(hook: Hook) -> None:
    answer = hook.client.post(f"/webhooks/bulkgate?token={TOKEN}", json=SEED_PAYLOAD)

    assert answer.json() == {"accepted": 3, "rejected": []}
    reports, [inbound] = hook.stored()
    assert [(r.source, r.provider_message_id, r.state) for r in reports] == [
        ("dlr", "3t2563af3ff285", "delivered"),
        ("dlr", "2t2563af3ff285", "processing"),
    ]
    assert (inbound.sender, inbound.text, inbound.source) == (
        "+420777777777",
        "text odpovědi",
        "bulkgate",
    )
    assert len(hook.woke) == 1


def test_the_bulkgate_query_form_never_stores_the_token(hook: Hook) -> None:
    report = hook.client.get(f"/webhooks/bulkgate?status=8&smsID=q-1&price=0.2&token={TOKEN}")
    reply = hook.client.get(
        "/webhooks/bulkgate?status=10&from=420777777777&message=ANO&date=2501151200",
        headers=BEARER,
    )

    assert report.json() == reply.json() == {"accepted": 1, "rejected": []}
    [stored], [inbound] = hook.stored()
    assert (stored.provider_message_id, stored.state) == ("q-1", "undeliverable")
    assert "expired at the SMSC" in stored.payload["detail"]
    assert inbound.raw == {
        "status": "10",
        "from": "420777777777",
        "message": "ANO",
        "date": "2501151200",
    }
    assert TOKEN not in json.dumps([dict(stored._mapping), inbound.raw], default=str)


def test_inbound_sms_alone_wakes_nothing(hook: Hook) -> None:
    hook.client.post("/webhooks/bulkgate", json=[SEED_PAYLOAD[2]], headers=BEARER)

    assert hook.woke == []


def test_pushed_reports_reach_the_message_through_apply_pending(hook: Hook) -> None:
    settings = hook.configure()
    fill_messages(hook.url, 2, "e2e")
    mark_submitted(hook.engine, {"e2e-0": "pm-e2e-0", "e2e-1": "pm-e2e-1"})
    hook.client.post(
        "/webhooks/smsbat",
        json=[
            {"messageId": "pm-e2e-0", "deliverystatus": "processing"},
            {"messageId": "pm-e2e-0", "deliverystatus": "delivered", "cost": 0.05},
        ],
        headers=BEARER,
    )
    hook.client.post(
        "/webhooks/bulkgate",
        json=[{"status": "3", "smsID": "pm-e2e-1", "date": "2507011200;2507011201"}],
        headers=BEARER,
    )

    assert apply_pending(hook.engine, settings)["applied"] == 3

    first = stored_message(hook.engine, "e2e-0")
    assert (first.state, first.cost) == ("delivered", 0.05)
    assert [h[:3] for h in event_history(hook.engine, "e2e-0")] == [
        ("webhook", "submitted", "processing"),
        ("webhook", "processing", "delivered"),
    ]
    [(source, _, to_state, detail)] = event_history(hook.engine, "e2e-1")
    assert (source, to_state) == ("dlr", "undeliverable")
    assert detail == (
        "BulkGate status 3: not delivered, unknown or unreachable recipient; "
        "sent 2025-07-01T10:00Z, status at 2025-07-01T10:01Z (provider time, to the minute)"
    )


def test_a_dlr_in_the_minute_of_the_send_never_shows_a_status_before_it(hook: Hook) -> None:
    """BulkGate's times are to the minute: a delivery in the minute we sent (10:01 for a
    send at 10:01:40) is shown as that minute, never as 10:01:00, before the send."""
    from zoneinfo import ZoneInfo

    from worker.ops.reports import message_detail

    settings = hook.configure()
    fill_messages(hook.url, 1, "minute")
    mark_submitted(hook.engine, {"minute-0": "pm-minute-0"})
    sent = stored_message(hook.engine, "minute-0").submitted_at
    local = sent.astimezone(ZoneInfo("Europe/Prague")).strftime("%y%m%d%H%M")
    hook.client.post(
        "/webhooks/bulkgate",
        json=[{"status": "1", "smsID": "pm-minute-0", "date": f"{local};{local}"}],
        headers=BEARER,
    )
    assert apply_pending(hook.engine, settings)["applied"] == 1

    detail = message_detail(hook.engine, "minute-0")
    assert detail is not None and detail["state"] == "delivered"
    [event] = [e for e in detail["events"] if e["source"] == "dlr"]
    minute = sent.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")
    assert f"sent {minute}, status at {minute} (provider time, to the minute)" in event["detail"]
    assert not re.search(r"T\d\d:\d\d:\d\d", event["detail"])  # no seconds it never had
    when = {k: datetime.fromisoformat(detail[k]) for k in ("submittedAt", "finalAt")}
    assert datetime.fromisoformat(event["at"]) >= when["submittedAt"] <= when["finalAt"]


# --- signatures that pass -----------------------------------------------------------------------


def test_a_signed_push_is_accepted_and_a_replay_is_harmless(hook: Hook) -> None:
    settings = hook.configure(WEBHOOK_SIGNING_SECRET=SECRET)
    fill_messages(hook.url, 1, "sig")
    mark_submitted(hook.engine, {"sig-0": "pm-1"})
    body = json.dumps(DELIVERED).encode()
    headers = {**BEARER, **_signed(body), "Content-Type": "application/json"}

    first = hook.client.post("/webhooks/smsbat", content=body, headers=headers)
    replay = hook.client.post("/webhooks/smsbat", content=body, headers=headers)

    assert first.status_code == replay.status_code == 200
    assert apply_pending(hook.engine, settings) == {
        "applied": 1,
        "ignored": 1,
        "orphan": 0,
        "parked": 0,
    }
    assert len(event_history(hook.engine, "sig-0")) == 1


def test_a_signed_query_covers_the_query_string(hook: Hook) -> None:
    hook.configure(WEBHOOK_SIGNING_SECRET=SECRET)
    query = f"status=1&smsID=abc&token={TOKEN}"

    answer = hook.client.get(f"/webhooks/bulkgate?{query}", headers=_signed(query.encode()))

    assert answer.json() == {"accepted": 1, "rejected": []}


# --- refusals: each writes nothing --------------------------------------------------------------

Send = Callable[[TestClient], Any]
_BODY = json.dumps([DELIVERED]).encode()
_TOO_BIG = json.dumps([DELIVERED] * 60).encode()


def _post(path: str, body: bytes, headers: dict[str, str] | None = None) -> Send:
    return lambda client: client.post(
        path, content=body, headers=BEARER if headers is None else headers
    )


def _post_signed(signed: bytes, *, secret: str = SECRET, skew: float = 0) -> Send:
    """POST `_BODY` with a signature over `signed`, made when sent (timestamps age)."""
    return lambda client: client.post(
        "/webhooks/smsbat",
        content=_BODY,
        headers={**BEARER, **_signed(signed, at=time.time() + skew, secret=secret)},
    )


REFUSALS: list[tuple[str, dict[str, Any], Send, int, str]] = [
    ("no token", {}, _post("/webhooks/smsbat", _BODY, {}), 401, "a token is required"),
    (
        "wrong bearer",
        {},
        _post("/webhooks/smsbat", _BODY, {"Authorization": "Bearer nope"}),
        401,
        "wrong token",
    ),
    (
        "wrong query token",
        {},
        lambda c: c.get("/webhooks/bulkgate?status=1&smsID=a&token=nope"),
        401,
        "wrong token",
    ),
    (
        "token in Basic auth",
        {},
        _post("/webhooks/smsbat", _BODY, {"Authorization": f"Basic {TOKEN}"}),
        401,
        "a token is required",
    ),
    (
        "a non-ASCII token",
        {},
        lambda c: c.get("/webhooks/bulkgate?status=1&smsID=a&token=%C5%BEluv"),
        401,
        "wrong token",
    ),
    (
        "token unset",
        {"WEBHOOK_TOKEN": None},
        _post("/webhooks/smsbat", _BODY),
        503,
        "webhooks are not configured (WEBHOOK_TOKEN)",
    ),
    (
        "token empty",
        {"WEBHOOK_TOKEN": ""},
        _post("/webhooks/bulkgate", _BODY, {"Authorization": "Bearer "}),
        503,
        "webhooks are not configured (WEBHOOK_TOKEN)",
    ),
    (
        "too big by Content-Length",
        {},
        _post("/webhooks/bulkgate", _TOO_BIG),
        413,
        f"body larger than {LIMIT} bytes",
    ),
    (
        "too big while streaming",
        {},
        lambda c: c.post(
            "/webhooks/smsbat", content=iter([_TOO_BIG[:1000], _TOO_BIG[1000:]]), headers=BEARER
        ),
        413,
        f"body larger than {LIMIT} bytes",
    ),
    (
        "too big and a wrong token: the token is checked first",
        {},
        _post("/webhooks/smsbat", _TOO_BIG, {"Authorization": "Bearer nope"}),
        401,
        "wrong token",
    ),
    (
        "the seed's example as written (trailing comma)",
        {},
        _post("/webhooks/bulkgate", b'[{"status":"10","from":"420777777777","text":"a",}]'),
        400,
        "malformed JSON: trailing comma is not allowed",
    ),
    ("an empty body", {}, _post("/webhooks/smsbat", b""), 400, "malformed JSON"),
    ("not UTF-8", {}, _post("/webhooks/smsbat", b'{"a":"\xff"}'), 400, "malformed JSON"),
    (
        "smsbat body of the wrong type",
        {},
        _post("/webhooks/smsbat", b'"delivered"'),
        422,
        "body must be a JSON object or an array of objects",
    ),
    (
        "bulkgate body not an array",
        {},
        _post("/webhooks/bulkgate", json.dumps(SEED_PAYLOAD[0]).encode()),
        422,
        "body must be a JSON array of reports",
    ),
    (
        "signature missing",
        {"WEBHOOK_SIGNING_SECRET": SECRET},
        _post("/webhooks/smsbat", _BODY),
        401,
        f"{TIMESTAMP_HEADER} and {SIGNATURE_HEADER} are required",
    ),
    (
        "signature with another secret",
        {"WEBHOOK_SIGNING_SECRET": SECRET},
        _post_signed(_BODY, secret="other"),
        401,
        f"{SIGNATURE_HEADER} does not match",
    ),
    (
        "signature of another body",
        {"WEBHOOK_SIGNING_SECRET": SECRET},
        _post_signed(_BODY + b" "),
        401,
        f"{SIGNATURE_HEADER} does not match",
    ),
    (
        "signature expired (a replay after the window)",
        {"WEBHOOK_SIGNING_SECRET": SECRET, "WEBHOOK_SIGNATURE_TOLERANCE_SECONDS": 60},
        _post_signed(_BODY, skew=-120),
        401,
        f"{TIMESTAMP_HEADER} is outside the tolerance window",
    ),
    (
        "signature from the future",
        {"WEBHOOK_SIGNING_SECRET": SECRET, "WEBHOOK_SIGNATURE_TOLERANCE_SECONDS": 60},
        _post_signed(_BODY, skew=120),
        401,
        f"{TIMESTAMP_HEADER} is outside the tolerance window",
    ),
    (
        "timestamp not unix seconds",
        {"WEBHOOK_SIGNING_SECRET": SECRET},
        _post(
            "/webhooks/smsbat",
            _BODY,
            {**BEARER, TIMESTAMP_HEADER: "2025-01-01T00:00:00Z", SIGNATURE_HEADER: "sha256=00"},
        ),
        401,
        f"{TIMESTAMP_HEADER} must be unix seconds",
    ),
    (
        "a signed query changed on the way",
        {"WEBHOOK_SIGNING_SECRET": SECRET},
        lambda c: c.get(
            "/webhooks/bulkgate?status=1&smsID=abc",
            headers={**BEARER, **_signed(b"status=3&smsID=abc")},
        ),
        401,
        f"{SIGNATURE_HEADER} does not match",
    ),
]


@pytest.mark.parametrize(
    ("settings", "send", "status", "detail"),
    [r[1:] for r in REFUSALS],
    ids=[r[0] for r in REFUSALS],
)
def test_a_refused_request_writes_nothing(
    hook: Hook, settings: dict[str, Any], send: Send, status: int, detail: str
) -> None:
    hook.configure(**settings)

    answer = send(hook.client)

    assert answer.status_code == status
    assert answer.json()["detail"].startswith(detail)
    assert hook.stored() == ([], [])
    assert hook.woke == []
    if status == 401:
        assert answer.headers["WWW-Authenticate"] == "Bearer"


# --- logs, wake-ups, schema ----------------------------------------------------------------------


def test_logs_never_show_tokens_or_whole_phone_numbers(
    hook: Hook, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="worker")
    hook.client.get(f"/webhooks/bulkgate?status=10&from=420777777777&message=hi&token={TOKEN}")
    hook.client.get("/webhooks/bulkgate?status=10&from=420777777777&token=wrong-token")

    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("worker"))
    assert "+420*******77" in ours and "wrong token" in ours
    assert "420777777777" not in ours
    assert TOKEN not in ours and "wrong-token" not in ours


def test_a_burst_of_wakes_queues_one_apply_task_and_one_trailing(redis_db: str) -> None:
    wake._last_run.clear()  # this DB index may have been another test's a moment ago
    for _ in range(20):  # a burst of webhooks, one report each
        wake_reports(redis_db)

    queued = [json.loads(m) for m in redis.Redis.from_url(redis_db).lrange(POLL_QUEUE, 0, -1)]
    assert [m["headers"]["task"] for m in queued] == ["cascade.apply_reports"] * 2
    assert sorted(m["headers"]["eta"] is not None for m in queued) == [False, True]


def test_wakes_are_coalesced_per_task_and_broker() -> None:
    key = ("redis://b/0", "cascade.apply_reports")
    assert wake.wake_delay(key, 100.0) == 0.0
    assert wake.wake_delay(key, 100.1) == pytest.approx(0.4)  # a run at 100.5
    assert wake.wake_delay(key, 100.2) is None  # covered by it
    assert wake.wake_delay(key, 100.45) is None
    assert wake.wake_delay(("redis://b/0", "cascade.dispatch"), 100.2) == 0.0
    assert wake.wake_delay(("redis://other/0", "cascade.apply_reports"), 100.2) == 0.0
    assert wake.wake_delay(key, 100.6) == pytest.approx(0.4)  # after 100.5: one at 101.0
    assert wake.wake_delay(key, 101.7) == 0.0  # quiet for a gap since: at once again


def test_a_broker_that_is_down_is_harmless_and_quick(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="worker.http.webhooks")
    started = time.monotonic()

    wake_reports("redis://127.0.0.1:1/0")

    assert time.monotonic() - started < 3
    assert "could not wake cascade.apply_reports" in caplog.text


def test_without_an_override_the_apps_own_settings_are_used(hook: Hook) -> None:
    app = FastAPI()
    app.state.settings = Settings(DATABASE_URL=hook.url, WEBHOOK_TOKEN="from-app-state")
    app.include_router(webhooks.router)
    app.dependency_overrides[webhooks.webhook_waker] = lambda: hook.woke.append

    with TestClient(app) as client:
        answer = client.post(
            "/webhooks/smsbat", json=DELIVERED, headers={"Authorization": "Bearer from-app-state"}
        )

    assert answer.json() == {"accepted": 1, "rejected": []}
    assert len(hook.stored()[0]) == 1


def test_the_router_documents_its_operations(hook: Hook) -> None:
    paths = hook.app.openapi()["paths"]

    assert set(paths) == {"/webhooks/smsbat", "/webhooks/bulkgate"}
    assert set(paths["/webhooks/bulkgate"]) == {"get", "post"}
    assert "requestBody" in paths["/webhooks/smsbat"]["post"]
    assert {"401", "413", "503"} <= set(paths["/webhooks/smsbat"]["post"]["responses"])
