"""The simulator's pushed reports, received by a small recording app over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import re
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
import uvicorn
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.helpers import (
    KEY,
    SEND,
    STATUS,
    Closing,
    Pieces,
    Script,
    Server,
    batch,
    ok,
    running_simulator,
    stats,
)
from worker.dev.simulator import SimulatorConfig, _PushClient, _PushFailed
from worker.ops import cli

PRAGUE = ZoneInfo("Europe/Prague")
DLR_DATE = re.compile(r"^\d{10};\d{10}$")
FINAL_CODES = {"delivered": "1", "undeliverable": "3", "permanenterror": "3"}


@dataclass
class Hit:
    """One request the receiver got, stamped when it arrived."""

    at: float
    method: str
    path: str
    query: dict[str, str]
    raw_query: bytes
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """Records every request; answers the queued ``codes`` first, then 200."""

    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)

    def app(self) -> Starlette:
        async def record(request: Request) -> Response:
            hit = Hit(
                time.monotonic(),
                request.method,
                request.url.path,
                dict(request.query_params),
                request.scope["query_string"],
                dict(request.headers),
                await request.body(),
            )
            self.hits.append(hit)
            return Response(status_code=self.codes.pop(0) if self.codes else 200)

        return Starlette(routes=[Route("/{path:path}", record, methods=["GET", "POST"])])


@contextmanager
def serving(app: Starlette) -> Iterator[str]:
    """Serve ``app`` from a background thread on a free loopback port; yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        assert time.monotonic() < deadline, "receiver did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


@pytest.fixture(scope="module")
def simulator() -> Iterator[httpx.Client]:
    with running_simulator(SimulatorConfig()) as client:
        yield client


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    with serving(receiver.app()) as url:
        receiver.url = url
        yield receiver


@dataclass
class Env:
    """One test's view: its own receiver paths, so late pushes of other tests never count."""

    client: httpx.Client
    receiver: Receiver
    prefix: str

    @property
    def webhook_url(self) -> str:
        return f"{self.receiver.url}{self.prefix}/webhooks/smsbat"

    @property
    def dlr_url(self) -> str:
        return f"{self.receiver.url}{self.prefix}/webhooks/bulkgate?token=dlr-token"

    def start(self, **overrides: Any) -> None:
        """A fresh seeded config with ``overrides``; the simulator's records cleared."""
        changes = {**asdict(SimulatorConfig(seed=7, delay_min=0, delay_max=0)), **overrides}
        assert self.client.post("/_sim/config", json=changes).status_code == 200
        assert self.client.post("/_sim/reset").status_code == 200
        self.receiver.codes.clear()

    def send(self, n: int) -> list[str]:
        """Send ``n`` messages in one batch; their messageIds in the order sent."""
        answer = self.client.post(SEND, json=batch(n), headers=KEY)
        assert answer.status_code == 200
        by_tracking_id = {item["trackinId"]: item["messageId"] for item in answer.json()}
        return [by_tracking_id[f"m{i}"] for i in range(n)]

    def hits(self, endpoint: str) -> list[Hit]:
        """What ``/webhooks/<endpoint>`` got, in arrival order."""
        path = f"{self.prefix}/webhooks/{endpoint}"
        return [hit for hit in list(self.receiver.hits) if hit.path == path]

    def webhooks(self) -> list[dict[str, Any]]:
        return [hit.json() for hit in self.hits("smsbat")]

    def dlrs(self) -> list[dict[str, str]]:
        """BulkGate reports from every array, flattened in arrival order."""
        return [item for hit in self.hits("bulkgate") for item in hit.json()]

    def poll(self, message_id: str) -> dict[str, Any]:
        return self.client.get(f"/bat/message/{message_id}", headers=KEY).json()


@pytest.fixture
def env(simulator: httpx.Client, receiver: Receiver) -> Env:
    return Env(simulator, receiver, f"/{uuid.uuid4().hex}")


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting for pushes"
        time.sleep(0.02)


def by_message(reports: list[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for report in reports:
        grouped[report[key]].append(report)
    return grouped


def utc_seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def assert_prague_date(date: str, earliest: float, latest: float) -> None:
    """Both halves are Prague local minutes within [earliest, latest] (minute-truncated)."""
    assert DLR_DATE.match(date), date
    for half in date.split(";"):
        when = datetime.strptime(half, "%y%m%d%H%M").replace(tzinfo=PRAGUE).timestamp()
        assert math.floor(earliest / 60) * 60 <= when <= latest, (date, earliest, latest)


def test_webhook_pushes_every_state_with_the_token(env: Env) -> None:
    env.start(
        webhook_url=env.webhook_url,
        webhook_token="tok-1",
        delay_min=0.1,
        delay_max=0.3,
        mix={"delivered": 0.5, "undeliverable": 0.5},
    )
    before = time.time()
    ids = env.send(6)
    wait_until(lambda: stats(env.client)["pushes_sent"] == 12)

    pushes = by_message(env.webhooks(), "messageId")
    assert set(pushes) == set(ids)
    for message_id in ids:
        processing, final = pushes[message_id]
        polled = env.poll(message_id)
        assert processing["deliverystatus"] == "processing"
        assert set(processing) == {"messageId", "deliverystatus", "timestamp"}
        assert final["deliverystatus"] == polled["deliverystatus"]
        assert final["cost"] == polled["cost"]
        assert before <= utc_seconds(processing["timestamp"]) <= utc_seconds(final["timestamp"])
        assert utc_seconds(final["timestamp"]) <= time.time()
    assert {p[1]["deliverystatus"] for p in pushes.values()} == {"delivered", "undeliverable"}
    hits = env.hits("smsbat")
    assert {hit.headers["authorization"] for hit in hits} == {"Bearer tok-1"}
    assert {(hit.method, hit.headers["content-type"]) for hit in hits} == {
        ("POST", "application/json")
    }
    assert not any("x-cascade-signature" in hit.headers for hit in hits)
    counters = stats(env.client)
    assert (counters["pushes_sent"], counters["pushes_failed"]) == (12, 0)
    assert counters["pushes_by_code"] == {"200": 12}


@pytest.mark.parametrize("dlr_form", ["json", "query"])
def test_signature_verifies_on_every_kind_of_push(env: Env, dlr_form: str) -> None:
    secret = "s3cret"
    env.start(
        webhook_url=env.webhook_url, dlr_url=env.dlr_url, dlr_form=dlr_form, webhook_secret=secret
    )
    env.send(2)
    wait_until(lambda: len(env.hits("smsbat")) == 4 and len(env.hits("bulkgate")) >= 1)

    for hit in env.hits("smsbat") + env.hits("bulkgate"):
        timestamp = hit.headers["x-cascade-timestamp"]
        assert abs(int(timestamp) - time.time()) < 10
        content = hit.body if hit.method == "POST" else hit.raw_query  # a GET signs its query
        signed = f"{timestamp}.".encode() + content
        digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        assert hit.headers["x-cascade-signature"] == f"sha256={digest}"
        assert "authorization" not in hit.headers


def test_dlr_json_arrays_with_prague_dates(env: Env) -> None:
    env.start(
        dlr_url=env.dlr_url, mix={"delivered": 0.5, "undeliverable": 0.25, "permanenterror": 0.25}
    )
    before = time.time()
    ids = env.send(40)
    finals = set(FINAL_CODES.values())
    wait_until(lambda: {r["smsID"] for r in env.dlrs() if r["status"] in finals} == set(ids))
    time.sleep(1.3)  # reads follow delivery within a second, on a quarter-second tick
    after = time.time()

    hits = env.hits("bulkgate")
    assert hits, "no delivery report request reached the receiver"
    assert all(hit.method == "POST" and hit.query == {"token": "dlr-token"} for hit in hits)
    assert all(isinstance(hit.json(), list) for hit in hits)
    assert max(len(hit.json()) for hit in hits) > 1, "reports come batched in arrays"
    reports = by_message(env.dlrs(), "smsID")
    assert set(reports) == set(ids)
    buffered = read = 0
    for message_id, items in reports.items():
        polled = env.poll(message_id)
        statuses = [item["status"] for item in items]
        final = FINAL_CODES[polled["deliverystatus"]]
        assert [s for s in statuses if s in finals] == [final]
        buffered += statuses[0] == "2"
        assert statuses in (["2", final], [final], ["2", final, "13"], [final, "13"])
        if "13" in statuses:
            read += 1
            assert polled["extendedStatuses"]["viber"] == "delivered"
        for item in items:
            assert item["price"] == f"{polled['cost']:.2f}"
            assert_prague_date(item["date"], before, after)
    assert buffered > 0
    assert read > 0


def test_dlr_query_form_is_one_get_per_report(env: Env) -> None:
    env.start(dlr_url=env.dlr_url, dlr_form="query", mix={"delivered": 1.0})
    before = time.time()
    ids = env.send(3)

    def delivered() -> set[str]:
        return {h.query["smsID"] for h in env.hits("bulkgate") if h.query["status"] == "1"}

    wait_until(lambda: delivered() == set(ids))

    for hit in env.hits("bulkgate"):
        assert (hit.method, hit.body) == ("GET", b"")
        assert hit.query["token"] == "dlr-token"
        assert set(hit.query) == {"token", "status", "smsID", "price", "date"}
        assert hit.query["price"] == "0.05"
        assert_prague_date(hit.query["date"], before, time.time())


def test_duplicates_arrive_twice(env: Env) -> None:
    env.start(webhook_url=env.webhook_url, push_duplicates=1.0)
    env.send(3)
    wait_until(lambda: len(env.hits("smsbat")) == 12)
    time.sleep(0.6)  # no third copy comes

    bodies = [hit.body for hit in env.hits("smsbat")]
    assert len(bodies) == 12
    assert all(bodies.count(body) == 2 for body in bodies)
    counters = stats(env.client)
    assert (counters["pushes_duplicated"], counters["pushes_sent"]) == (6, 12)


def test_reorder_lets_a_final_overtake_processing(env: Env) -> None:
    env.start(webhook_url=env.webhook_url, delay_min=0.2, delay_max=0.2, processing_at=0.5)
    env.send(10)
    wait_until(lambda: len(env.hits("smsbat")) == 20)
    in_order = by_message(env.webhooks(), "messageId").values()
    assert all(p[0]["deliverystatus"] == "processing" for p in in_order)

    env.start(
        webhook_url=env.webhook_url,
        delay_min=0.2,
        delay_max=0.2,
        processing_at=0.5,
        push_reorder=True,
        seed=8,
    )
    env.receiver.hits.clear()
    env.send(10)
    wait_until(lambda: len(env.hits("smsbat")) == 20, timeout=8)
    reordered = by_message(env.webhooks(), "messageId").values()
    assert any(p[0]["deliverystatus"] != "processing" for p in reordered)
    for pair in reordered:
        earliest = min(pair, key=lambda push: push["timestamp"])
        assert earliest["deliverystatus"] == "processing", "timestamps keep the true order"


def test_early_push_arrives_before_the_send_answer(env: Env) -> None:
    env.start(
        webhook_url=env.webhook_url, dlr_url=env.dlr_url, delay_min=2, delay_max=2, push_early=True
    )
    ids = env.send(3)
    answered = time.monotonic()

    early_webhooks = [h.json() for h in env.hits("smsbat") if h.at < answered]
    early_dlrs = [i for h in env.hits("bulkgate") if h.at < answered for i in h.json()]
    assert early_webhooks, "the status webhook beat the send answer"
    assert early_dlrs, "the delivery report beat the send answer"
    assert {push["messageId"] for push in early_webhooks} == {ids[0]}
    assert {item["smsID"] for item in early_dlrs} == {ids[0]}
    assert env.poll(ids[0])["deliverystatus"] in FINAL_CODES
    assert env.poll(ids[1])["deliverystatus"] == "scheduled", "only the first one is instant"


def test_dropped_pushes_never_arrive_but_polling_sees_the_final(env: Env) -> None:
    env.start(webhook_url=env.webhook_url, dlr_url=env.dlr_url, push_drop=1.0)
    ids = env.send(3)
    wait_until(lambda: stats(env.client)["pushes_dropped"] >= 6)
    time.sleep(0.4)

    assert env.hits("smsbat") == env.hits("bulkgate") == []
    assert stats(env.client)["pushes_sent"] == 0
    assert all(env.poll(i)["deliverystatus"] in FINAL_CODES for i in ids)


def test_inbound_replies_come_from_the_recipients(env: Env) -> None:
    env.start(dlr_url=env.dlr_url, mix={"delivered": 1.0}, inbound_rate=1.0)
    ids = env.send(3)
    wait_until(lambda: len([r for r in env.dlrs() if r["status"] == "10"]) == 3)
    wait_until(lambda: stats(env.client)["inbound_sent"] == 3)

    reports = env.dlrs()
    replies = [r for r in reports if r["status"] == "10"]
    assert sorted(r["from"] for r in replies) == [m["toPhone"][1:] for m in batch(3)]
    for reply in replies:
        assert set(reply) == {"status", "from", "message", "date"}
        assert reply["message"]
        assert DLR_DATE.match(reply["date"])
    delivered = [i for i, r in enumerate(reports) if r["status"] == "1"]
    assert len(delivered) == len(ids)
    assert max(delivered) < min(i for i, r in enumerate(reports) if r["status"] == "10")


def test_5xx_and_connection_errors_are_retried_and_counted(env: Env) -> None:
    env.start(webhook_url=env.webhook_url, delay_min=0.3, delay_max=0.3, processing_at=0.5)
    env.receiver.codes[:] = [503, 502]
    env.send(1)
    wait_until(lambda: stats(env.client)["pushes_sent"] == 2)
    assert len(env.webhooks()) == 4
    counters = stats(env.client)
    assert counters["pushes_by_code"] == {"200": 2, "502": 1, "503": 1}
    assert (counters["pushes_sent"], counters["pushes_failed"]) == (2, 0)

    env.receiver.codes[:] = [401]
    env.send(1)
    wait_until(lambda: stats(env.client)["pushes_sent"] == 3)
    assert stats(env.client)["pushes_failed"] == 1, "a 4xx is given up at once"

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/webhooks/smsbat"
    env.start(webhook_url=closed)
    env.send(1)
    wait_until(lambda: stats(env.client)["pushes_failed"] == 2)
    assert stats(env.client)["pushes_by_code"] == {}


def test_push_settings_are_validated() -> None:
    config = SimulatorConfig()
    for changes, name in (
        ({"dlr_form": "xml"}, "dlr_form"),
        ({"push_drop": 1.5}, "push_drop"),
        ({"inbound_rate": -0.1}, "inbound_rate"),
        ({"webhook_url": "ftp://example.com/hook"}, "webhook_url"),
        ({"dlr_url": "not a url"}, "dlr_url"),
        ({"push_reorder": 1}, "push_reorder"),
    ):
        with pytest.raises(ValueError, match=name):
            config.update(changes)
    config.update({"dlr_form": "query", "webhook_url": "http://127.0.0.1:1/x", "push_drop": 1})
    assert (config.dlr_form, config.push_drop) == ("query", 1.0)


def test_cli_options_reach_the_config_and_tokens_stay_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served: list[SimulatorConfig] = []
    monkeypatch.setattr(
        "worker.dev.simulator.serve", lambda host, port, config: served.append(config)
    )
    args = [
        "simulator",
        "--webhook-url=http://127.0.0.1:8000/webhooks/smsbat?token=url-secret",
        "--webhook-token=token-secret",
        "--webhook-secret=signing-secret",
        "--dlr-url=http://127.0.0.1:8000/webhooks/bulkgate",
        "--dlr-form=query",
        "--inbound-rate=0.2",
        "--push-duplicates=0.1",
        "--push-reorder",
        "--push-early",
        "--push-drop=0.05",
    ]
    result = CliRunner().invoke(cli.main, args)

    assert result.exit_code == 0, result.output
    (config,) = served
    assert config.webhook_url is not None and config.webhook_url.endswith("token=url-secret")
    assert (config.webhook_token, config.webhook_secret) == ("token-secret", "signing-secret")
    assert (config.dlr_form, config.inbound_rate, config.push_drop) == ("query", 0.2, 0.05)
    assert (config.push_duplicates, config.push_reorder, config.push_early) == (0.1, True, True)
    assert "/webhooks/smsbat" in result.output
    assert "secret" not in result.output


def test_the_push_client_keeps_connections_and_replaces_one_closed_while_idle() -> None:
    """Against a scripted server: a kept connection the receiver closed is tried once more
    on a fresh one (not counted as a failed attempt); chunked answers, `Connection: close`
    and an HTTP/1.0 answer read to its end are each read whole."""
    chunked = b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    scripts: dict[str, Script] = {
        "one per connection": lambda n, head: ok() if n == 0 else None,
        "chunked": lambda n, head: Pieces((chunked[:40], chunked[40:])),
        "close": lambda n, head: ok(STATUS, b"Connection: close"),
        "until close": lambda n, head: Closing(b"HTTP/1.0 200 OK\r\n\r\n" + STATUS),
        "kept": lambda n, head: ok(),
    }
    expected_connections = {
        "one per connection": 4,
        "chunked": 1,
        "close": 4,
        "until close": 4,
        "kept": 1,
    }
    for name, script in scripts.items():
        server = Server(script)
        try:
            codes = asyncio.run(_pushes(f"http://127.0.0.1:{server.port}/hook?x=1", 4))
        finally:
            server.close()
        assert codes == [202 if name == "chunked" else 200] * 4, name
        assert server.connections == expected_connections[name], name
        head = server.requests[0].decode()
        assert head.startswith("POST /hook?x=1 HTTP/1.1\r\n"), name
        assert f"Host: 127.0.0.1:{server.port}" in head and "Content-Length: 7" in head, name


async def _pushes(url: str, n: int, method: str = "POST", body: bytes = b'{"a":1}') -> list[int]:
    """`n` pushes one after another over one lane's client."""
    client = _PushClient()
    try:
        return [await client.request(method, url, body, {"Authorization": "t"}) for _ in range(n)]
    finally:
        client.close()


def test_a_push_a_fresh_connection_leaves_unanswered_fails() -> None:
    server = Server(lambda n, head: None)
    try:
        with pytest.raises(_PushFailed):
            asyncio.run(_pushes(f"http://127.0.0.1:{server.port}/dlr?a=1", 1, "GET", b""))
    finally:
        server.close()
    assert server.requests[0].startswith(b"GET /dlr?a=1 HTTP/1.1\r\n")
    assert b"Content-Length" not in server.requests[0]
