"""What several test modules share, so no test module imports another: an injected clock
and the send path's pacing in memory, filling a database with messages, reading one back, a
simulator on a loopback socket, a campaign's figures recounted, and the strategies and
payloads of the property tests, a scripted HTTP server."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import uvicorn
from hypothesis import strategies as st
from sqlalchemy import Engine, select, update

from config import Settings
from tests.conftest import make_messages
from worker.core.backoff import NO_PLAN, CheckPlan
from worker.core.states import FINAL, State
from worker.core.validation import MESSAGE_TYPES, ROUTES, validate_message
from worker.dev.simulator import SimulatorConfig, create_app
from worker.flows import dispatcher
from worker.flows.campaigns import list_campaigns
from worker.flows.producer import row_for, store
from worker.ops.reports import UNKNOWN_CURRENCY, UNKNOWN_CURRENCY_NOTE, campaign_summary
from worker.provider.smsbat import SendClient
from worker.store.db import get_engine, utcnow
from worker.store.models import events, messages

# --- campaign figures counted over the messages, against the tallies ---

COUNTED = (
    "total",
    "states",
    "final",
    "sent",
    "delivered",
    "cost",
    "cost_currency",
    "money",
    "unknown_outcomes",
    "polls",
    "finals_by_source",
    "first_enqueued_at",
    "last_final_at",
)


def recount(engine: Engine, campaign: str) -> dict[str, Any] | None:
    """The summary's counted figures from the campaign's messages, one by one in Python."""
    with engine.connect() as conn:
        rows = conn.execute(select(messages).where(messages.c.campaign == campaign)).all()
    if not rows:
        return None
    states = Counter(row.state for row in rows)
    money: dict[str, list[Any]] = {}
    for row in rows:
        if row.cost is not None or row.bill_amount is not None:
            currency = row.bill_currency or row.rate_currency or UNKNOWN_CURRENCY
            totals = money.setdefault(currency, [0.0, 0.0, 0])
            totals[0] += row.cost or 0.0
            totals[1] += row.bill_amount or 0.0
            totals[2] += 1
    finals = [row.final_at for row in rows if row.final_at is not None]
    iso = lambda at: at.isoformat().replace("+00:00", "Z") if at else None  # noqa: E731
    return {
        "total": len(rows),
        "states": dict(sorted(states.items())),
        "final": sum(n for state, n in states.items() if state in FINAL),
        "sent": sum(1 for row in rows if row.provider_message_id is not None),
        "delivered": states.get("delivered", 0),
        "cost": round(sum(row.cost or 0.0 for row in rows), 4) if len(money) <= 1 else None,
        "cost_currency": next(iter(money)) if len(money) == 1 else None,
        "money": {
            currency: {
                "cost": round(cost, 4),
                "bill": round(bill, 4),
                "messages": n,
                "note": UNKNOWN_CURRENCY_NOTE if currency == UNKNOWN_CURRENCY else None,
            }
            for currency, (cost, bill, n) in sorted(money.items())
        },
        "unknown_outcomes": sum(row.unknown_outcomes or 0 for row in rows),
        "polls": sum(row.polls or 0 for row in rows),
        "finals_by_source": dict(
            sorted(Counter(r.final_source for r in rows if r.final_source).items())
        ),
        "first_enqueued_at": iso(min(row.created_at for row in rows)),
        "last_final_at": iso(max(finals, default=None)),
    }


def tallied(engine: Engine, campaign: str) -> dict[str, Any] | None:
    summary = campaign_summary(engine, campaign)
    return None if summary is None else {key: summary[key] for key in COUNTED}


def assert_tallies_match(engine: Engine, names: tuple[str, ...], *, exact: bool = True) -> None:
    """Equal figures; unless `exact`, the first and last times may cover rows gone."""
    for name in names:
        found, expected = tallied(engine, name), recount(engine, name)
        if not exact and found and expected:
            first, last = found.pop("first_enqueued_at"), found.pop("last_final_at")
            assert first <= expected.pop("first_enqueued_at"), name
            true_last = expected.pop("last_final_at")
            assert true_last is None or (last is not None and last >= true_last), name
        assert found == expected, name
    listed = {c["campaign"]: c for c in list_campaigns(engine)}
    for name, row in listed.items():
        expected = recount(engine, name)
        assert row["total"] == (expected["total"] if expected else 0), name


# --- time and pacing, in memory ---


class Clock:
    """An injected clock: `now` moves only when a test moves it."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or utcnow()

    def __call__(self) -> datetime:
        return self.now


class MemoryPacing:
    """`dispatcher.SendPacing` on an injected clock, as `worker.store.pacing.Pacing` keeps it
    in Redis: pauses with their causes, the circuit's failures, half-open state and probe;
    no rate limits, and the fixed poll schedule (no latencies learned)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.until: dict[str, datetime] = {}
        self.failures = 0
        self.half: set[str] = set()
        self.probe: dict[str, datetime] = {}
        self.why: dict[str, str] = {}

    def pause(self, name: str, seconds: float, reason: str = "paused") -> None:
        end = self.clock() + timedelta(seconds=seconds)
        if end > self.until.get(name, end - timedelta(seconds=1)):
            self.until[name], self.why[name] = end, reason

    def pause_reason(self, name: str) -> str | None:
        return self.why.get(name) if self.paused_for(name) else None

    def paused_for(self, name: str) -> float:
        end = self.until.get(name)
        return max(0.0, (end - self.clock()).total_seconds()) if end else 0.0

    def failed(self, name: str) -> int:
        self.failures += 1
        return self.failures

    def open_circuit(self, name: str, seconds: float, reason: str = "circuit open") -> None:
        self.pause(name, seconds, reason)
        self.half.add(name)
        self.probe.pop(name, None)

    def half_open(self, name: str) -> bool:
        return name in self.half

    def take_probe(self, name: str, seconds: float) -> bool:
        held = self.probe.get(name)
        if held is not None and held > self.clock():
            return False
        self.probe[name] = self.clock() + timedelta(seconds=seconds)
        return True

    def release_probe(self, name: str) -> None:
        self.probe.pop(name, None)

    def answered(self, name: str) -> None:
        self.failures = 0
        self.half.discard(name)
        self.probe.pop(name, None)

    def acquire(self, name: str, per_second: int, cost: int = 1) -> None:
        return None

    def check_plan(self, route: str, settings: Settings) -> CheckPlan:
        return NO_PLAN


# --- a database with messages --------------------------------------------------------------


def fill_messages(url: str, count: int, prefix: str, **overrides: object) -> None:
    """Store `count` valid messages `{prefix}-0…` as the intake would, under campaign `prefix`."""
    now, settings = utcnow(), Settings()
    rows = []
    for raw in make_messages(count, prefix, **overrides):
        checked = validate_message(raw, now=now)
        assert not isinstance(checked, list), checked
        rows.append(row_for(checked, prefix, now, settings))
    store(get_engine(url), rows)


def mark_submitted(engine: Engine, ids: dict[str, str]) -> None:
    """What a 200 send answer does: the message is with the provider under its messageId."""
    now = utcnow()
    with engine.begin() as conn:
        for our_id, provider_id in ids.items():
            conn.execute(
                update(messages)
                .where(messages.c.id == our_id)
                .values(
                    state=State.SUBMITTED,
                    provider_message_id=provider_id,
                    submitted_at=now,
                    next_poll_at=now + timedelta(minutes=10),
                    claim_token=None,
                )
            )


def stored_message(engine: Engine, our_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(messages).where(messages.c.id == our_id)).one()


def event_history(engine: Engine, our_id: str) -> list[tuple[str, str, str, str | None]]:
    """(source, from state, to state, detail) of each of the message's events, in order."""
    stmt = (
        select(events.c.source, events.c.from_state, events.c.to_state, events.c.detail)
        .join(messages, messages.c.pk == events.c.message_pk)
        .where(messages.c.id == our_id)
        .order_by(events.c.pk)
    )
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(stmt)]


# --- the simulator ---------------------------------------------------------------------------

SEND = "/api/CascadeMessage/send_message/async"
KEY = {"X-Authorization-Key": "test-key"}


@contextmanager
def running_simulator(config: SimulatorConfig) -> Iterator[httpx.Client]:
    """Serve the simulator from a background thread on a free port; yield a client for it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    uv_config = uvicorn.Config(
        create_app(config), log_level="warning", access_log=False, timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(uv_config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        assert time.monotonic() < deadline, "simulator did not start"
        time.sleep(0.01)
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with httpx.Client(base_url=base_url, timeout=5) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


def batch(n: int, prefix: str = "m", **extra: Any) -> list[dict[str, Any]]:
    """``n`` valid transactional messages with ids ``{prefix}0..``."""
    return [
        {
            "id": f"{prefix}{i}",
            "fromName": "Shop",
            "toPhone": f"+38067000{i:04d}",
            "messageType": "transaction",
            "text": "Your code is 1234",
            **extra,
        }
        for i in range(n)
    ]


def stats(client: httpx.Client) -> dict[str, Any]:
    return client.get("/_sim/stats").json()


def accepted_by(sim: httpx.Client) -> dict[str, int]:
    """The simulator's own record: each message id it accepted and how many times."""
    return {i: m["sends"] for i, m in sim.get("/_sim/messages").json().items()}


def send_for(
    url: str,
    settings: Settings,
    clock: Clock,
    minutes: float,
    beat: Callable[[datetime], object] | None = None,
) -> None:
    """`dispatcher.send_batch` every 5 s of the injected clock for `minutes` (after `beat`,
    e.g. a metered campaign's release, if given): through the circuit's pauses, the
    retries' backoff and its probes, as the workers would."""
    client, pacing, engine = SendClient(settings), MemoryPacing(clock), get_engine(url)
    for _ in range(round(minutes * 12)):
        if beat is not None:
            beat(clock())
        dispatcher.send_batch(engine, client, pacing, settings, "standard", clock=clock)
        clock.now += timedelta(seconds=5)


# --- pushed reports --------------------------------------------------------------------------

# The seed's example payload, without the trailing comma that makes it invalid JSON.
SEED_PAYLOAD = [
    {"status": "1", "smsID": "3t2563af3ff285", "price": "0.71", "date": "1904111007;1904111011"},
    {"status": "2", "smsID": "2t2563af3ff285", "price": "0.71", "date": "1904111007;1904111011"},
    {"status": "10", "from": "420777777777", "text": "text odpovědi"},
]

# --- property tests' inputs ------------------------------------------------------------------

NOW = datetime(2025, 1, 20, 12, 0, 0, tzinfo=UTC)
PHONE = "+380671234567"
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=20,
)
VISIBLE_TEXT = st.text(
    st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=85
).filter(lambda value: not value.isspace())
ZONES = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5.5))])


@st.composite
def valid_messages(draw: st.DrawFn) -> dict[str, Any]:
    """Messages built from valid values only, so the accept path is explored too."""
    message_type = draw(st.sampled_from(MESSAGE_TYPES))
    raw: dict[str, Any] = {
        "id": draw(st.from_regex(r"[A-Za-z0-9._-]{1,254}", fullmatch=True)),
        "fromName": draw(VISIBLE_TEXT.filter(lambda value: len(value) <= 64)),
        "toPhone": draw(st.sampled_from([PHONE, "+14155552671", "+447911123456"])),
        "messageType": message_type,
    }
    if message_type != "flashcall" or draw(st.booleans()):
        raw["text"] = draw(VISIBLE_TEXT)
    if message_type == "viber_survey":
        raw["surveyOptions"] = draw(st.lists(VISIBLE_TEXT, min_size=2, max_size=5, unique=True))
    if draw(st.booleans()):
        raw["ttl"] = draw(st.integers(1, 2_678_400))
    if draw(st.booleans()):
        ahead = timedelta(seconds=draw(st.integers(-60, 30 * 86400)))
        raw["scheduledSent"] = (NOW + ahead).astimezone(draw(ZONES)).isoformat()
    if draw(st.booleans()):
        raw["route"] = draw(st.sampled_from(ROUTES))
    return raw


# --- a scripted HTTP/1.1 server on loopback, for the clients' edge cases ---


class Closing(bytes):
    """An answer after which the server closes the connection."""


class Reset(bytes):
    """An answer after which the server resets the connection (RST, not FIN)."""


class Pieces(tuple[bytes, ...]):
    """An answer the server writes a piece at a time, a moment apart."""


# A server's script: given the connection's request number and the request head, what to
# write back (None: close without answering; "hang": answer nothing, keep the socket).
Script = Callable[[int, bytes], bytes | Pieces | str | None]

STATUS = b'{"messageId": "m-1", "deliverystatus": "delivered", "partscount": 1, "cost": 0.05}'


def ok(body: bytes = STATUS, *extra: bytes) -> bytes:
    head = [b"HTTP/1.1 200 OK", b"Content-Type: application/json", *extra]
    return b"\r\n".join([*head, b"Content-Length: %d" % len(body), b"", body])


class Server:
    """Accepts connections on 127.0.0.1 and answers each request by `script`."""

    def __init__(self, script: Script, context: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.context is not None:
            try:
                conn = self.context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                conn.close()
                return
        buffer = b""
        number = 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                self.requests.append(head)
                answer = self.script(number, head)
                number += 1
                if answer is None:
                    return
                if answer == "hang":
                    self._held.append(conn)
                    threading.Event().wait(10)
                    return
                if isinstance(answer, Pieces):
                    for piece in answer:
                        conn.sendall(piece)
                        threading.Event().wait(0.02)
                    continue
                assert isinstance(answer, bytes)
                conn.sendall(answer)
                if isinstance(answer, Reset):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if isinstance(answer, Closing):
                    return

    def close(self) -> None:
        self.listener.close()
