"""Outcome callbacks: validation, then collect/claim/record on real SQLite and PostgreSQL
against a real HTTP receiver, a Celery task arriving through real Redis, and one stack
end to end (workers with beat, the simulator)."""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu import Queue
from sqlalchemy import Engine, literal, select, update

from config import Settings
from tests.conftest import make_messages, make_stack
from worker.core.signing import verify_signature
from worker.core.validation import OutgoingMessage, validate_message
from worker.dev.stack import free_port, wait_for
from worker.flows.callbacks import deliver_due, list_callbacks, retry_dead
from worker.flows.producer import enqueue
from worker.store.db import get_engine, utcnow
from worker.store.models import callbacks, messages

SECRET = "test-callback-secret"
TIMEOUT = 5.0  # CALLBACK_TIMEOUT_SECONDS here: generous, for a loaded test machine
HURRIED = 0.5  # the timeout a "slow" receiver (answering after 1.5 s) runs into
BACKOFF_BASE = 600.0  # retries of one test never come due during another
NOW = datetime(2025, 1, 20, 12, 0, 0, tzinfo=UTC)
EVENT_KEYS = {
    "event",
    "id",
    "campaign",
    "state",
    "final",
    "messageId",
    "deliverystatus",
    "partscount",
    "cost",
    "error",
    "finalAt",
    "occurredAt",
}


# --- a real receiver -----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]

    def signed(self) -> bool:
        h = self.headers
        return verify_signature(
            SECRET, h["X-Cascade-Timestamp"], self.body, h["X-Cascade-Signature"], 60
        )


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # concurrent runs open up to 4 x CALLBACK_CONCURRENCY at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up on a slow answer is expected here, not a failure."""


class Receiver:
    """An HTTP endpoint on 127.0.0.1 answering each path as the test scripted it (else 200)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.scripts: dict[str, deque[Answer]] = defaultdict(deque)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                answer = receiver.take(self.path, Received(self.path, dict(self.headers), body))
                time.sleep(answer.delay)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body.encode())))
                self.end_headers()
                self.wfile.write(answer.body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self, path: str, request: Received) -> Answer:
        with self.lock:
            self.received.append(request)
            script = self.scripts[path]
            return script.popleft() if script else Answer()

    def path(self, *answers: Answer) -> str:
        """A fresh URL whose next answers are these."""
        path = f"/hooks/{uuid.uuid4().hex[:10]}"
        self.scripts[path].extend(answers)
        return path

    def url(self, path: str, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}{path}"

    def got(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    built = Receiver()
    yield built
    built.server.shutdown()


# --- databases and messages ----------------------------------------------------------------


def settings_for(database_url: str, **extra: str) -> Settings:
    values = {
        "DATABASE_URL": database_url,
        "BROKER_URL": os.environ["BROKER_URL"],
        "CALLBACK_SIGNING_SECRET": SECRET,
        "CALLBACK_TIMEOUT_SECONDS": str(TIMEOUT),
        "CALLBACK_BACKOFF_BASE_SECONDS": str(BACKOFF_BASE),
        **extra,
    }
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, database_factory: Callable[[str], str]) -> Settings:
    """One migrated database per backend for this module; tests keep to their own ids."""
    return settings_for(database_factory(request.param))


def engine_of(settings: Settings) -> Engine:
    return get_engine(settings.database_url)


def new_messages(count: int = 1, **fields: Any) -> list[dict[str, Any]]:
    return make_messages(count, f"cb-{uuid.uuid4().hex[:10]}", **fields)


def put(settings: Settings, batch: list[dict[str, Any]], campaign: str | None = None, **kw: Any):
    results = enqueue(batch, campaign, settings=settings, kick=False, **kw)
    assert [r.status for r in results] == ["accepted"] * len(batch), results
    return results


def finish(settings: Settings, *ids: str, state: str = "delivered") -> None:
    """What the poller records when the provider answers with a final status."""
    provider = state in ("delivered", "undeliverable", "permanenterror")
    with engine_of(settings).begin() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id.in_(ids))
            .values(
                state=state,
                final_at=utcnow(),
                provider_message_id=literal("pm-") + messages.c.id,
                deliverystatus=state if provider else None,
                partscount=1,
                cost=0.05 if state == "delivered" else 0.0,
                error_code=None if state == "delivered" else "E42",
                error_message=None if state == "delivered" else "not reachable",
            )
        )


def message_row(settings: Settings, message_id: str) -> Any:
    with engine_of(settings).connect() as conn:
        return conn.execute(select(messages).where(messages.c.id == message_id)).one()


def callback_rows(settings: Settings, message_id: str) -> list[Any]:
    pk = message_row(settings, message_id).pk
    with engine_of(settings).connect() as conn:
        query = select(callbacks).where(callbacks.c.message_pk == pk).order_by(callbacks.c.pk)
        return list(conn.execute(query))


def make_due(settings: Settings, message_id: str, **values: Any) -> None:
    """Bring a message's pending callbacks forward to now (and change other columns)."""
    pk = message_row(settings, message_id).pk
    with engine_of(settings).begin() as conn:
        conn.execute(
            update(callbacks)
            .where(callbacks.c.message_pk == pk)
            .values(next_attempt_at=utcnow() - timedelta(seconds=1), **values)
        )


def run(settings: Settings) -> dict[str, int]:
    return deliver_due(engine_of(settings), settings)


def one_failed_then_delivered(
    settings: Settings, receiver: Receiver, failure: Answer, timeout: float = TIMEOUT
) -> tuple[Any, Any, float]:
    """A final message whose receiver fails once (first try with `timeout`) then accepts;
    answers the callback after each attempt and when the first attempt started."""
    path = receiver.path(failure)
    [m] = new_messages(callbackUrl=receiver.url(path))
    put(settings, [m])
    finish(settings, m["id"])
    started = time.time()
    run(settings.model_copy(update={"callback_timeout_seconds": timeout}))
    [after_failure] = callback_rows(settings, m["id"])
    make_due(settings, m["id"])
    run(settings)
    run(settings)
    [after_success] = callback_rows(settings, m["id"])
    assert len(receiver.got(path)) == 2
    return after_failure, after_success, started


# --- validation ----------------------------------------------------------------------------


def base(**fields: Any) -> dict[str, Any]:
    return make_messages(1, "v", **fields)[0]


def test_callback_fields_are_validated_stored_normalised_and_never_sent() -> None:
    raw = base(
        callbackUrl="https://shop.example/hooks/sms",
        callbackTask="shop.tasks.sms_outcome",
        callbackLateAfter=30,
    )
    checked = validate_message(raw, now=NOW)
    assert isinstance(checked, OutgoingMessage)
    assert checked.callback_url == "https://shop.example/hooks/sms"
    assert checked.callback_task == "shop.tasks.sms_outcome@celery"
    assert checked.callback_late_after == 30
    assert not {"callbackUrl", "callbackTask", "callbackLateAfter"} & set(checked.to_provider())
    named = validate_message(base(callbackTask="shop.outcome@shop-callbacks"), now=NOW)
    assert isinstance(named, OutgoingMessage)
    assert named.callback_task == "shop.outcome@shop-callbacks"


@pytest.mark.parametrize(
    ("field_name", "value", "expected"),
    [
        ("callbackUrl", "ftp://shop.example/x", "must be an http:// or https:// URL"),
        ("callbackUrl", "shop.example/hook", "must be an http:// or https:// URL"),
        ("callbackUrl", "https:///path-only", "must name a host"),
        ("callbackUrl", "https://shop.example:99999/", "is not a valid URL"),
        ("callbackUrl", "https://shop.example/a b", "without spaces or control characters"),
        ("callbackUrl", "https://x.example/" + "a" * 2000, "at most 2000 characters, got 2018"),
        ("callbackUrl", 42, "must be a string, got integer"),
        ("callbackTask", "shop tasks", "must be a Celery task name"),
        ("callbackTask", "shop.outcome@", "must name a queue after '@'"),
        ("callbackTask", "x" * 195, "at most 200 characters with its @queue"),
        ("callbackTask", ["shop.outcome"], "must be a string, got array"),
        ("callbackLateAfter", 0, "must be from 1 to 2678400 seconds"),
        ("callbackLateAfter", -5, "must be from 1 to 2678400 seconds"),
        ("callbackLateAfter", 2678401, "must be from 1 to 2678400 seconds"),
        ("callbackLateAfter", True, "must be an integer number of seconds, got boolean"),
        ("callbackLateAfter", "30", "must be an integer number of seconds, got string"),
    ],
)
def test_bad_callback_fields_are_refused_clearly(
    field_name: str, value: object, expected: str
) -> None:
    result = validate_message(base(**{field_name: value}), now=NOW)
    assert isinstance(result, list)
    assert [e.field for e in result] == [field_name]
    assert expected in result[0].problem


def test_a_password_in_a_refused_url_is_not_echoed() -> None:
    result = validate_message(base(callbackUrl="ftp://shop:hunter2@shop.example/"), now=NOW)
    assert isinstance(result, list)
    assert "hunter2" not in result[0].problem
    assert "***" in result[0].problem


def test_snake_case_callback_field_gets_a_hint() -> None:
    result = validate_message(base(callback_url="https://shop.example/"), now=NOW)
    assert isinstance(result, list)
    assert "did you mean 'callbackUrl'?" in result[0].problem


def test_signature_verification_refuses_tampering_other_secrets_and_replays() -> None:
    from worker.core.signing import sign

    body, stamp = b'{"event":"message.final"}', "1700000000"
    good = sign(SECRET, stamp, body)
    assert verify_signature(SECRET, stamp, body, good, 300, now=1700000100)
    assert not verify_signature(SECRET, stamp, body + b" ", good, 300, now=1700000100)
    assert not verify_signature("other", stamp, body, good, 300, now=1700000100)
    assert not verify_signature(SECRET, stamp, body, good, 300, now=1700000301)
    assert not verify_signature(SECRET, "yesterday", body, good, 300, now=1700000100)
    assert not verify_signature(SECRET, stamp, body, "sha256=é", 300, now=1700000100)


# --- on real databases ---------------------------------------------------------------------


def test_final_callback_is_one_signed_post_of_the_documented_event(
    db: Settings, receiver: Receiver
) -> None:
    path = receiver.path()
    campaign = f"shop-{uuid.uuid4().hex[:6]}"
    done, in_flight = new_messages(2, callbackUrl=receiver.url(path))
    put(db, [done, in_flight], campaign)
    assert message_row(db, done["id"]).callback_state == "waiting"
    finish(db, done["id"])

    run(db)
    run(db)

    [got] = receiver.got(path)
    assert got.signed()
    row = message_row(db, done["id"])
    [callback] = callback_rows(db, done["id"])
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-Cascade-Event"] == "message.final"
    assert got.headers["X-Cascade-Delivery"] == str(callback.pk)
    event = got.event
    assert set(event) == EVENT_KEYS
    final_at = row.final_at.isoformat().replace("+00:00", "Z")
    assert event == {
        "event": "message.final",
        "id": done["id"],
        "campaign": campaign,
        "state": "delivered",
        "final": True,
        "messageId": row.provider_message_id,
        "deliverystatus": "delivered",
        "partscount": 1,
        "cost": 0.05,
        "error": None,
        "finalAt": final_at,
        "occurredAt": final_at,
    }
    assert (callback.state, callback.attempts, callback.kind) == ("delivered", 1, "url")
    assert row.callback_state == "created"
    assert callback_rows(db, in_flight["id"]) == []


@pytest.mark.parametrize(
    ("failure", "timeout", "error"),
    [
        (Answer(500, "database is down"), TIMEOUT, "HTTP 500: database is down"),
        (Answer(503), TIMEOUT, "HTTP 503"),
        (Answer(408), TIMEOUT, "HTTP 408"),
        (Answer(200, delay=3 * HURRIED), HURRIED, f"no answer within {HURRIED:g} s"),
    ],
    ids=["500", "503", "408", "slow"],
)
def test_passing_trouble_is_retried_with_backoff_until_a_2xx(
    db: Settings, receiver: Receiver, failure: Answer, timeout: float, error: str
) -> None:
    failed, delivered, started = one_failed_then_delivered(db, receiver, failure, timeout)
    assert (failed.state, failed.attempts, failed.last_error) == ("pending", 1, error)
    wait = failed.next_attempt_at.timestamp() - started
    assert BACKOFF_BASE / 2 - 1 <= wait <= BACKOFF_BASE + 5  # random(c/2, c), c = base
    assert (delivered.state, delivered.attempts) == ("delivered", 2)
    assert delivered.delivered_at is not None


def test_429_waits_for_retry_after(db: Settings, receiver: Receiver) -> None:
    throttled = Answer(429, "slow down", {"Retry-After": "7"})
    failed, delivered, started = one_failed_then_delivered(db, receiver, throttled)
    assert (failed.state, failed.last_error) == ("pending", "HTTP 429: slow down")
    assert 6 <= failed.next_attempt_at.timestamp() - started <= 9
    assert delivered.state == "delivered"


def test_connection_errors_are_retried(db: Settings) -> None:
    [m] = new_messages(callbackUrl=f"http://127.0.0.1:{free_port()}/nobody-listens")
    put(db, [m])
    finish(db, m["id"])
    run(db)
    [callback] = callback_rows(db, m["id"])
    assert (callback.state, callback.attempts) == ("pending", 1)
    assert callback.last_error.startswith("ConnectError")


@pytest.mark.parametrize("status", [400, 404, 410, 422, 301])
def test_a_refusal_is_dead_at_once_with_the_reason(
    db: Settings, receiver: Receiver, status: int
) -> None:
    path = receiver.path(Answer(status, "no such order 17"))
    [m] = new_messages(callbackUrl=receiver.url(path))
    put(db, [m])
    finish(db, m["id"], state="undeliverable")
    run(db)
    make_due(db, m["id"])
    run(db)
    [callback] = callback_rows(db, m["id"])
    assert (callback.state, callback.attempts) == ("dead", 1)
    assert callback.last_error.startswith(f"HTTP {status}: no such order 17")
    assert len(receiver.got(path)) == 1


def test_past_the_retry_window_is_dead(db: Settings, receiver: Receiver) -> None:
    path = receiver.path(Answer(500), Answer(500), Answer(500))
    [m] = new_messages(callbackUrl=receiver.url(path))
    put(db, [m])
    finish(db, m["id"])
    run(db)
    window = timedelta(seconds=db.callback_retry_for_seconds)
    assert window >= timedelta(hours=24)

    almost = utcnow() - window + timedelta(seconds=30)
    make_due(db, m["id"], created_at=almost)
    run(db)
    [last_try] = callback_rows(db, m["id"])
    assert last_try.state == "pending"
    assert last_try.next_attempt_at <= almost + window  # the last attempt ends the window

    make_due(db, m["id"], created_at=utcnow() - window - timedelta(seconds=1))
    run(db)
    [dead] = callback_rows(db, m["id"])
    assert (dead.state, dead.attempts) == ("dead", 3)
    assert dead.last_error == "gave up after 3 attempts in 25 h: HTTP 500"


def test_dead_callbacks_are_listed_and_retried(db: Settings, receiver: Receiver) -> None:
    path = receiver.path(Answer(410, "gone"))
    url = receiver.url(path, userinfo="shop:hunter2@")
    [m] = new_messages(callbackUrl=url)
    put(db, [m])
    finish(db, m["id"])
    run(db)
    engine = engine_of(db)

    [listed] = [c for c in list_callbacks(engine, "dead", 1000) if c["messageId"] == m["id"]]
    assert set(listed) == {
        "pk",
        "messageId",
        "kind",
        "target",
        "event",
        "state",
        "attempts",
        "nextAttemptAt",
        "lastError",
        "createdAt",
        "deliveredAt",
    }
    assert listed["target"] == receiver.url(path, userinfo="shop:***@")
    assert (listed["kind"], listed["event"], listed["state"]) == ("url", "message.final", "dead")
    assert (listed["attempts"], listed["lastError"]) == (1, "HTTP 410: gone")
    assert receiver.got(path)[0].headers["Authorization"].startswith("Basic ")

    assert retry_dead(engine, [listed["pk"]]) == 1
    [again] = callback_rows(db, m["id"])
    assert (again.state, again.attempts) == ("pending", 0)
    run(db)
    [delivered] = callback_rows(db, m["id"])
    assert delivered.state == "delivered"
    assert retry_dead(engine, [listed["pk"]]) == 0
    assert listed["pk"] not in {c["pk"] for c in list_callbacks(engine, "dead", 1000)}


def test_retry_dead_without_ids_revives_every_dead_callback(
    db: Settings, receiver: Receiver
) -> None:
    path = receiver.path(Answer(400), Answer(400))
    batch = new_messages(2, callbackUrl=receiver.url(path))
    put(db, batch)
    for m in batch:
        finish(db, m["id"])
    run(db)
    assert retry_dead(engine_of(db), None) >= 2
    assert {callback_rows(db, m["id"])[0].state for m in batch} == {"pending"}
    run(db)
    assert {callback_rows(db, m["id"])[0].state for m in batch} == {"delivered"}


def test_late_fires_once_for_an_undelivered_message_never_for_a_delivered_one(
    db: Settings, receiver: Receiver
) -> None:
    path = receiver.path()
    pending, delivered, failed = new_messages(
        3, callbackUrl=receiver.url(path), callbackLateAfter=30
    )
    put(db, [pending, delivered, failed])
    row = message_row(db, pending["id"])
    assert row.callback_late_at == row.created_at + timedelta(seconds=30)
    finish(db, delivered["id"])
    finish(db, failed["id"], state="undeliverable")
    run(db)  # finals before the deadline
    with engine_of(db).begin() as conn:
        ids = [m["id"] for m in (pending, delivered, failed)]
        conn.execute(
            update(messages)
            .where(messages.c.id.in_(ids))
            .values(callback_late_at=utcnow() - timedelta(seconds=1))
        )
    run(db)
    run(db)

    def events_of(message_id: str) -> list[str]:
        return [r.event["event"] for r in receiver.got(path) if r.event["id"] == message_id]

    assert events_of(pending["id"]) == ["message.late"]
    assert events_of(delivered["id"]) == ["message.final"]
    assert events_of(failed["id"]) == ["message.final", "message.late"]
    [late] = [r for r in receiver.got(path) if r.event["id"] == pending["id"]]
    assert late.signed()
    assert late.headers["X-Cascade-Event"] == "message.late"
    assert (late.event["state"], late.event["final"], late.event["finalAt"]) == (
        "queued",
        False,
        None,
    )
    assert message_row(db, pending["id"]).callback_late_at is None

    finish(db, pending["id"], state="undeliverable")
    run(db)
    assert events_of(pending["id"]) == ["message.late", "message.final"]
    listed = [
        c for c in list_callbacks(engine_of(db), None, 1000) if c["messageId"] == pending["id"]
    ]
    assert [c["event"] for c in listed] == ["message.final", "message.late"]  # newest first
    assert {c["kind"] for c in listed} == {"url"}


def test_messages_inherit_their_campaigns_callbacks(db: Settings, receiver: Receiver) -> None:
    path = receiver.path()
    campaign = f"orders-{uuid.uuid4().hex[:6]}"
    plain, own_task = new_messages(2)
    own_task["callbackTask"] = "shop.outcome"
    put(db, [plain, own_task], campaign, callback_url=receiver.url(path))
    [later] = new_messages(1, callbackLateAfter=60)
    put(db, [later], campaign)  # no callbacks given: the campaign's stay

    for m in (plain, later):
        row = message_row(db, m["id"])
        assert (row.callback_url, row.callback_task) == (receiver.url(path), None)
        assert row.callback_state == "waiting"
    assert message_row(db, later["id"]).callback_late_at is not None
    row = message_row(db, own_task["id"])
    assert (row.callback_url, row.callback_task) == (None, "shop.outcome@celery")

    finish(db, plain["id"])
    run(db)
    [got] = receiver.got(path)
    assert (got.event["id"], got.event["campaign"]) == (plain["id"], campaign)


def test_late_notice_without_anywhere_to_send_it_is_refused(db: Settings) -> None:
    [m] = new_messages(1, callbackLateAfter=30)
    [result] = enqueue([m], settings=db, kick=False)
    assert result.status == "rejected"
    assert [(e.field, e.problem) for e in result.errors] == [
        (
            "callbackLateAfter",
            "needs callbackUrl or callbackTask, on the message or on its campaign",
        )
    ]
    with pytest.raises(ValueError, match="callback_url must be an http"):
        enqueue([m], "c", settings=db, kick=False, callback_url="mailto:ops@shop.example")


def test_concurrent_runs_send_each_callback_exactly_once(db: Settings, receiver: Receiver) -> None:
    settings = db.model_copy(update={"callback_batch_size": 10})
    path = receiver.path()
    batch = new_messages(80, callbackUrl=receiver.url(path))
    put(settings, batch)
    finish(settings, *(m["id"] for m in batch))
    with ThreadPoolExecutor(4) as pool:
        runs = [pool.submit(run, settings) for _ in range(4)]
    assert sum(r.result()["final"] for r in runs) == len(batch)  # .result() raises their errors
    run(settings)
    ids = sorted(r.event["id"] for r in receiver.got(path))
    assert ids == sorted(m["id"] for m in batch)


# --- a Celery task in the producing app, over real Redis ------------------------------------


def test_task_callback_arrives_in_the_producing_apps_worker(
    redis_db: str, database_factory: Callable[[str], str]
) -> None:
    settings = settings_for(database_factory("sqlite"), BROKER_URL=redis_db)
    named, default_queue = new_messages(2)
    named["callbackTask"] = "shop.sms_outcome@shop-callbacks"
    default_queue["callbackTask"] = "shop.sms_outcome"
    put(settings, [named, default_queue])
    finish(settings, named["id"])
    finish(settings, default_queue["id"], state="undeliverable")
    counts = run(settings)  # published before the shop's worker even runs: it waits in Redis
    assert counts["delivered"] == 2

    shop = Celery("shop", broker=redis_db)
    shop.conf.task_queues = [Queue("shop-callbacks"), Queue("celery")]
    shop.conf.worker_hijack_root_logger = False  # keep pytest's log capture for later tests
    arrived: queue.Queue[dict[str, Any]] = queue.Queue()

    @shop.task(name="shop.sms_outcome")
    def sms_outcome(outcome: dict[str, Any]) -> None:
        arrived.put(outcome)

    with start_worker(shop, perform_ping_check=False, loglevel="WARNING"):
        outcomes = {o["id"]: o for o in (arrived.get(timeout=15) for _ in range(2))}
    assert outcomes[named["id"]]["event"] == "message.final"
    assert outcomes[named["id"]]["state"] == "delivered"
    assert outcomes[default_queue["id"]]["error"] == {"code": "E42", "message": "not reachable"}
    assert set(outcomes[named["id"]]) == EVENT_KEYS
    [callback] = callback_rows(settings, named["id"])
    assert (callback.kind, callback.target, callback.state) == (
        "task",
        "shop.sms_outcome@shop-callbacks",
        "delivered",
    )


# --- end to end ----------------------------------------------------------------------------


def test_a_stack_calls_back_once_per_message_with_a_signed_final_event(
    database_factory: Callable[[str], str], receiver: Receiver
) -> None:
    env = {"CALLBACK_SIGNING_SECRET": SECRET, "CALLBACKS_INTERVAL_SECONDS": "0.5"}
    path = receiver.path()
    campaign = f"e2e-{uuid.uuid4().hex[:6]}"
    batch = new_messages(20, callbackUrl=receiver.url(path))
    with make_stack(database_factory("postgresql"), "postgresql", env) as stack:
        stack.simulator.configure(delay_min=0.1, delay_max=1.0)
        stack.enqueue(batch, campaign)
        stack.wait_final(campaign, len(batch), timeout=90)
        wait_for(lambda: len(receiver.got(path)) >= len(batch), 30, "callbacks")
        time.sleep(1.0)  # two beat ticks: a second callback for any message would be here
        states = {m["id"]: message_row(stack.settings, m["id"]).state for m in batch}
    got = receiver.got(path)
    assert sorted(r.event["id"] for r in got) == sorted(states)
    assert all(r.signed() for r in got)
    assert {r.event["event"] for r in got} == {"message.final"}
    assert {r.event["id"]: r.event["state"] for r in got} == states
