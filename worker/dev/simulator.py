"""A simulated SMSBAT Cascade provider on loopback, with fault injection and counters.

Tests and benchmarks talk to it over real sockets, so the worker's HTTP client, retry and
polling policies run exactly as they would against the real provider. The ``/_sim/*``
endpoints set faults and read back what the client did (duplicates, early retries,
over-polling). Everything runs on one event loop, so the synchronous core needs no locks.

It can also push what happened to a receiver, as the providers do: SMSBAT-style status
webhooks and BulkGate-style delivery reports (with inbound replies), optionally late,
twice, out of order, before the send answer, or not at all. Planned reports wait in one
heap; a scheduler task hands the due ones to a few delivery workers sharing one client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import heapq
import hmac
import itertools
import logging
import math
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import UnionType
from typing import Any, Final, Literal, NamedTuple, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SEND_PATH: Final = "/api/CascadeMessage/send_message/async"
SEND_TG_VIBER_PATH: Final = "/api/CascadeMessage/send_message/tg-viber/async"
STATUS_PATH: Final = "/bat/message/{messageId}"

FINAL_STATES: Final = ("delivered", "undeliverable", "permanenterror")
CHANNELS: Final = ("telegram", "viber", "rcs", "sms")
REQUIRED_FIELDS: Final = ("id", "toPhone", "messageType")
# A send that arrives this soon after a 429 was answered was already in flight from
# another worker; only later ones show a client ignoring Retry-After.
IN_FLIGHT_GRACE: Final = 0.1
AUTH_HEADERS: Final = {
    "x-authorization-key": "X-Authorization-Key",
    "x-viber-auth-token": "X-Viber-Auth-Token",
    "x-tg-bot-key": "X-Tg-Bot-Key",
}
SEND_CODES: Final = (200, 400, 401, 429, 500)
STATUS_CODES: Final = (200, 401, 404, 429, 500)
RATE: Final = 0.05
CURRENCY: Final = "UAH"
PART_CHARS: Final = 160
MAX_ID_CHARS: Final = 255
POLL_GAP: Final = 1.0
REQUEST_LOG_SIZE: Final = 100_000
ANOMALY_LOG_SIZE: Final = 10_000

# Pushed reports: SMSBAT status webhooks and BulkGate delivery reports (DLRs).
WEBHOOK: Final = "webhook"
DLR: Final = "dlr"
DLR_BUFFERED: Final = "2"
DLR_INBOUND: Final = "10"
DLR_READ: Final = "13"
DLR_FINALS: Final = {"delivered": "1", "undeliverable": "3", "permanenterror": "3"}
INTERMEDIATE: Final = frozenset({"processing", DLR_BUFFERED})
PRAGUE: Final = ZoneInfo("Europe/Prague")  # BulkGate dates are Czech local time
BUFFERED_SHARE: Final = 0.2  # messages the SMSC buffers (status 2) before their final
READ_SHARE: Final = 0.5  # Viber-delivered messages that get read (status 13)
AFTER_FINAL: Final = 1.0  # reads and inbound replies follow delivery within this (s)
REORDER_LAG: Final = 1.0  # a reordered intermediate may land this long after its final
DUPLICATE_LAG: Final = 0.5  # a duplicate follows its original within this (s)
DLR_TICK: Final = 0.25  # BulkGate collects reports this long into one array
DLR_BATCH: Final = 100  # at most this many reports per array
EARLY_HOLD: Final = 0.2  # push_early: how long the send answer waits after the push
PUSH_ATTEMPTS: Final = 4
PUSH_BACKOFF: Final = 0.1  # seconds before the first retry, doubled each time
PUSH_TIMEOUT: Final = 5.0
PUSH_WORKERS: Final = 64  # as many connections as the intake bench's wrk
PUSH_PASS: Final = 1000  # reports taken per scheduler pass before the loop is yielded
INBOUND_TEXTS: Final = ("OK, thanks", "STOP", "Díky, dorazilo", "Дякую!", "Who is this?")

DlrForm = Literal["json", "query"]


@dataclass
class SimulatorConfig:
    """What the simulated provider does; changed live through ``POST /_sim/config``."""

    api_key: str = "test-key"
    username: str = "user"
    password: str = "pass"
    delay_min: float = 5.0
    delay_max: float = 30.0
    processing_at: float = 0.3
    mix: dict[str, float] = field(
        default_factory=lambda: {"delivered": 0.9, "undeliverable": 0.07, "permanenterror": 0.03}
    )
    latency_ms: float = 0.0
    error_rate: float = 0.0
    fail_next_sends: int = 0
    throttle_next: int = 0
    retry_after: str = "1"
    status_throttle_next: int = 0
    hang_next_sends: int = 0
    hang_seconds: float = 5.0
    hang_rate: float = 0.0  # share of accepted sends answered hang_seconds late (a timeout)
    throttle_every: int = 0  # every k-th send request is answered 429
    outage_seconds: float = 0.0  # sends answer 503 for this long from when it is set
    reject_phones: list[str] = field(default_factory=list)
    # A 400 names the refused message's index, as ours does; SMSBAT's says only the field.
    refusal_hints: bool = True
    shuffle: bool = True
    drop_answers: float = 0.0
    spike_rate: float = 0.0  # share of requests answered spike_seconds late
    spike_seconds: float = 2.0
    reset_rate: float = 0.0  # share of requests whose connection closes without an answer
    malformed_rate: float = 0.0  # share of 200 answers cut off mid-JSON
    fallbacks: bool = True
    webhook_url: str | None = None
    webhook_token: str | None = None
    webhook_secret: str | None = None
    dlr_url: str | None = None
    dlr_form: DlrForm = "json"
    inbound_rate: float = 0.0
    inbound_texts: list[str] = field(default_factory=lambda: list(INBOUND_TEXTS))
    push_duplicates: float = 0.0
    push_reorder: bool = False
    push_early: bool = False
    push_drop: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        """Refuse impossible settings up front rather than failing mid-request."""
        _check_config(self)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply ``changes`` all or nothing, so a bad admin call leaves the config intact."""
        hints = _config_hints()
        values: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in hints:
                raise ValueError(f"{name}: unknown config field")
            values[name] = _coerce(name, hints[name], value)
        replace(self, **values)  # runs __post_init__ on the would-be config
        for name, value in values.items():
            setattr(self, name, value)


def _config_hints() -> dict[str, Any]:
    """Field types, resolved from the postponed annotations."""
    return get_type_hints(SimulatorConfig)


def _check_config(config: SimulatorConfig) -> None:
    """Range checks; each error starts with the field name for the admin answer."""
    non_negative, unit = "must be >= 0", "must be within [0, 1]"
    checks = {
        "delay_min": (config.delay_min >= 0, non_negative),
        "delay_max": (config.delay_max >= config.delay_min, "must be >= delay_min"),
        "processing_at": (0 <= config.processing_at <= 1, unit),
        "latency_ms": (config.latency_ms >= 0, non_negative),
        "error_rate": (0 <= config.error_rate <= 1, unit),
        "drop_answers": (0 <= config.drop_answers <= 1, unit),
        "spike_rate": (0 <= config.spike_rate <= 1, unit),
        "spike_seconds": (config.spike_seconds >= 0, non_negative),
        "reset_rate": (0 <= config.reset_rate <= 1, unit),
        "malformed_rate": (0 <= config.malformed_rate <= 1, unit),
        "hang_seconds": (config.hang_seconds >= 0, non_negative),
        "hang_rate": (0 <= config.hang_rate <= 1, unit),
        "throttle_every": (config.throttle_every >= 0, non_negative),
        "outage_seconds": (config.outage_seconds >= 0, non_negative),
        "fail_next_sends": (config.fail_next_sends >= 0, non_negative),
        "throttle_next": (config.throttle_next >= 0, non_negative),
        "status_throttle_next": (config.status_throttle_next >= 0, non_negative),
        "hang_next_sends": (config.hang_next_sends >= 0, non_negative),
        "mix": (_valid_mix(config.mix), f"weights >= 0 over {FINAL_STATES}, not all 0"),
        "webhook_url": (_valid_url(config.webhook_url), "must be an http(s) URL"),
        "dlr_url": (_valid_url(config.dlr_url), "must be an http(s) URL"),
        "dlr_form": (config.dlr_form in get_args(DlrForm), "must be 'json' or 'query'"),
        "inbound_rate": (0 <= config.inbound_rate <= 1, unit),
        "inbound_texts": (bool(config.inbound_texts), "must name at least one reply text"),
        "push_duplicates": (0 <= config.push_duplicates <= 1, unit),
        "push_drop": (0 <= config.push_drop <= 1, unit),
    }
    for name, (ok, rule) in checks.items():
        if not ok:
            raise ValueError(f"{name}: {rule}")
    try:
        _retry_deadline(config.retry_after, 0.0)
    except ValueError as exc:
        raise ValueError(f"retry_after: {exc}") from exc


def _valid_mix(mix: dict[str, float]) -> bool:
    """Final-state weights that random.choices can draw from."""
    return (
        set(mix) <= set(FINAL_STATES)
        and all(weight >= 0 for weight in mix.values())
        and sum(mix.values()) > 0
    )


def _valid_url(url: str | None) -> bool:
    """No URL (pushes off), or an absolute http(s) URL httpx can send to."""
    if url is None:
        return True
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Check one admin value against its declared type; ints are fine where floats are."""
    if not _matches(hint, value):
        raise ValueError(f"{name}: expected {_type_name(hint)}, got {type(value).__name__}")
    return float(value) if hint is float else value


def _matches(hint: Any, value: Any) -> bool:
    """isinstance for the handful of annotation shapes SimulatorConfig uses."""
    origin = get_origin(hint)
    if origin is dict:
        key_type, value_type = get_args(hint)
        return isinstance(value, dict) and all(
            _matches(key_type, k) and _matches(value_type, v) for k, v in value.items()
        )
    if origin is list:
        (item_type,) = get_args(hint)
        return isinstance(value, list) and all(_matches(item_type, v) for v in value)
    if origin is UnionType:
        return any(_matches(option, value) for option in get_args(hint))
    if origin is Literal:
        return value in get_args(hint)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    """``float`` rather than ``<class 'float'>`` in error messages."""
    return hint.__name__ if hint in (str, int, float, bool) else str(hint)


def _retry_deadline(value: str, answered_at: float) -> float:
    """Unix time before which a client must not retry, per Retry-After (seconds or date)."""
    try:
        seconds = float(value)
    except ValueError:
        return _http_date(value).timestamp()
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a usable Retry-After: {value!r}")
    return answered_at + seconds


def _http_date(value: str) -> datetime:
    """Parse an HTTP date; a zone-less one is taken as UTC, as HTTP dates always are."""
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a usable Retry-After: {value!r}") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


class _Answer(NamedTuple):
    """A computed HTTP answer; ``hold`` is extra time to sit on it (hang, spike).

    ``reset``: close the connection after the status line instead of sending the body,
    which the client sees as a connection dropped mid-answer. ``cut``: the body was
    truncated on purpose (malformed JSON).
    """

    code: int
    body: bytes
    headers: dict[str, str] | None = None
    hold: float = 0.0
    reset: bool = False
    cut: bool = False
    final: bool = False  # a status answer carrying a final state

    @property
    def unread(self) -> bool:
        """The client cannot have read this answer."""
        return self.reset or self.cut


def _error(code: int, error: str, message: str, field_name: str | None = None) -> _Answer:
    """The provider's error shape: ``{"error": {"code", "message", "field"?}}``."""
    detail = {"code": error, "message": message}
    if field_name is not None:
        detail["field"] = field_name
    return _Answer(code, orjson.dumps({"error": detail}))


_UNAUTHORIZED: Final = _error(401, "UNAUTHORIZED", "Invalid API key")
_SERVER_ERROR: Final = _error(500, "SERVER_ERROR", "Internal server error")
_UNAVAILABLE: Final = _error(503, "SERVICE_UNAVAILABLE", "Service temporarily unavailable")
_INVALID_JSON: Final = object()


def _extended(channel: str, final: str) -> dict[str, Any]:
    """Cascade outcome: channels before the deciding one failed; SMS is the fallback."""
    reached = CHANNELS[: CHANNELS.index(channel) + 1]
    statuses = dict.fromkeys(reached[:-1], "undeliverable")
    statuses[channel] = final
    statuses.setdefault("sms", "not_used")
    used = "used" if channel == "sms" else "not_used"
    return {"fallbacks": [{"type": "sms", "status": used}], "extendedStatuses": statuses}


# Built once: final answers share these read-only fragments instead of rebuilding them.
_EXTENDED: Final = {(c, s): _extended(c, s) for c in CHANNELS for s in FINAL_STATES}


class _Track:
    """Everything sent under one trackinId (the client's own id)."""

    __slots__ = ("message_ids", "polls", "route", "sends", "tracking_id")

    def __init__(self, tracking_id: str, route: str) -> None:
        self.tracking_id = tracking_id
        self.message_ids: list[str] = []
        self.sends = 0
        self.polls = 0
        self.route = route


class _Message:
    """One accepted message and its planned timeline."""

    __slots__ = (
        "batch_id",
        "channel",
        "final",
        "final_seen",
        "final_seen_at",
        "last_poll",
        "message_id",
        "parts",
        "phone",
        "t_final",
        "t_processing",
        "t_sent",
        "track",
    )

    def __init__(
        self,
        message_id: str,
        batch_id: int,
        phone: str,
        t_sent: float,
        t_processing: float,
        t_final: float,
        final: str,
        channel: str,
        parts: int,
        track: _Track,
    ) -> None:
        self.message_id = message_id
        self.batch_id = batch_id
        self.phone = phone
        self.t_sent = t_sent
        self.t_processing = t_processing
        self.t_final = t_final
        self.final = final
        self.channel = channel
        self.parts = parts
        self.track = track
        self.last_poll: float | None = None
        self.final_seen = False
        self.final_seen_at: float | None = None


class _Report(NamedTuple):
    """One planned push: an SMSBAT state change, a BulkGate DLR or an inbound SMS."""

    sink: str  # WEBHOOK or DLR
    status: str  # the deliverystatus (webhook) or the BulkGate status code (DLR)
    at: float  # when it happened at the provider
    message: _Message
    text: str | None = None  # an inbound SMS's text (status 10)
    settled: bool = False  # push faults already decided (a duplicate or a delayed report)


class _Push(NamedTuple):
    """One HTTP request to a receiver; ``generation`` ties it to the records it counts in."""

    generation: int
    lane: int  # pushes in one lane go out one after another, in order
    method: str
    url: str
    body: bytes
    inbound: int  # inbound SMS it carries


def _cost(message: _Message) -> float:
    """What the message costs: failed messages cost nothing, as the reference says."""
    return round(RATE * message.parts, 2) if message.final == "delivered" else 0.0


def _iso(at: float) -> str:
    """A webhook timestamp: ISO 8601 in UTC with milliseconds."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _prague(at: float) -> str:
    """A BulkGate date half: ``yymmddHHMM`` in Prague local time (CET/CEST)."""
    return datetime.fromtimestamp(at, PRAGUE).strftime("%y%m%d%H%M")


def _webhook_body(report: _Report) -> dict[str, Any]:
    """SMSBAT status webhook; the cost is known once the message is final."""
    body: dict[str, Any] = {
        "messageId": report.message.message_id,
        "deliverystatus": report.status,
        "timestamp": _iso(report.at),
    }
    if report.status in FINAL_STATES:
        body["cost"] = _cost(report.message)
    return body


def _dlr_item(report: _Report) -> dict[str, str]:
    """One BulkGate report, with string values as in BulkGate's own example."""
    message = report.message
    if report.status == DLR_INBOUND:
        return {
            "status": DLR_INBOUND,
            "from": message.phone.lstrip("+"),
            "message": report.text or "",
            "date": f"{_prague(report.at)};{_prague(report.at)}",
        }
    return {
        "status": report.status,
        "smsID": message.message_id,
        "price": f"{_cost(message):.2f}",
        "date": f"{_prague(message.t_sent)};{_prague(report.at)}",
    }


def _inbound(items: list[dict[str, str]]) -> int:
    """How many inbound SMS (status 10) a DLR request carries."""
    return sum(item["status"] == DLR_INBOUND for item in items)


def _push_seed(seed: int | None) -> str | None:
    """Seed of the pushes' own random stream, so pushes never change ids or outcomes."""
    return None if seed is None else f"pushes/{seed}"


def _signature(secret: str, signed: bytes, now: float) -> dict[str, str]:
    """``X-Cascade-Signature: sha256=HMAC(secret, "<timestamp>.<signed>")`` and its timestamp."""
    timestamp = str(int(now))
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + signed, hashlib.sha256)
    return {"X-Cascade-Timestamp": timestamp, "X-Cascade-Signature": f"sha256={digest.hexdigest()}"}


def _safe_url(url: str) -> str:
    """A URL without userinfo, query or fragment, which may hold tokens."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="").geturl()


def _parts(text: Any) -> int:
    """SMS parts the provider bills: one per 160 characters, at least one."""
    return max(1, math.ceil(len(text) / PART_CHARS)) if isinstance(text, str) else 1


def _scheduled_at(value: Any) -> float | None:
    """``scheduledSent`` as unix time (ISO 8601, UTC when no zone), None if unreadable."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _load(body: bytes) -> Any:
    """The request body as JSON, or the ``_INVALID_JSON`` marker."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _INVALID_JSON


def _check_batch(batch: Any, rejected: frozenset[str]) -> _Answer | None:
    """The 400 the provider would give this body, or None when it is acceptable."""
    if batch is _INVALID_JSON:
        return _error(400, "INVALID_JSON", "body is not valid JSON", "body")
    if not isinstance(batch, list) or not batch:
        return _error(400, "INVALID_PARAMETER", "body must be a non-empty JSON array", "body")
    for index, message in enumerate(batch):
        problem = _check_message(index, message, rejected)
        if problem is not None:
            return problem
    return None


def _check_message(index: int, message: Any, rejected: frozenset[str]) -> _Answer | None:
    """Validate one element; the message names its index so a client can isolate it."""
    if not isinstance(message, dict):
        return _error(400, "INVALID_PARAMETER", f"messages[{index}] must be an object", "body")
    for name in REQUIRED_FIELDS:
        value = message.get(name)
        if not isinstance(value, str) or not value:
            return _error(400, "INVALID_PARAMETER", f"messages[{index}].{name} is required", name)
    if len(message["id"]) >= MAX_ID_CHARS:
        return _error(400, "INVALID_PARAMETER", f"messages[{index}].id is too long", "id")
    phone = message["toPhone"]
    if phone in rejected:
        text = f"messages[{index}].toPhone {phone} is not a valid phone number"
        return _error(400, "INVALID_PHONE", text, "toPhone")
    scheduled = message.get("scheduledSent")
    if scheduled is not None and _scheduled_at(scheduled) is None:
        text = f"messages[{index}].scheduledSent is not an ISO 8601 time"
        return _error(400, "INVALID_PARAMETER", text, "scheduledSent")
    return None


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    """``(user, password)`` from an HTTP Basic header, None if absent or malformed."""
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class _Records:
    """The simulator's configuration, what it recorded and its counters; what both the send
    and the status endpoints answer alike (a 429, transport faults)."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.wake = asyncio.Event()  # set when a report becomes the next one due
        self.push_order = itertools.count()  # heap tie-breaker: equal times keep their order
        self.lanes = itertools.count()  # DLR requests take the lanes in turn
        self.generation = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded; the random stream restarts from the seed.

        Planned reports are dropped too, and pushes already handed to the delivery
        workers belong to the old generation: they are neither sent again nor counted.
        """
        self.generation += 1
        self.pushes: list[tuple[float, int, _Report]] = []
        self.pushes_sent = 0
        self.pushes_failed = 0
        self.pushes_by_code: Counter[int] = Counter()
        self.pushes_dropped = 0
        self.pushes_duplicated = 0
        self.inbound_sent = 0
        self.push_rng = random.Random(_push_seed(self.config.seed))
        self.rng = random.Random(self.config.seed)
        self.messages: dict[str, _Message] = {}
        self.tracks: dict[str, _Track] = {}
        self.requests: deque[tuple[float, str, int, int]] = deque(maxlen=REQUEST_LOG_SIZE)
        self.batches = 0
        self.send_requests = 0
        self.first_send_at: float | None = None
        self.last_send_at: float | None = None
        self.send_status = dict.fromkeys(SEND_CODES, 0)
        self.messages_accepted = 0
        self.messages_dropped = 0
        self.duplicate_tracking_ids = 0
        self.status_requests = 0
        self.status_by_code = dict.fromkeys(STATUS_CODES, 0)
        self.polls_after_final = 0
        self.polls_within_1s = 0
        self.min_poll_gap: float | None = None
        self.early_after_429 = 0
        self.status_early_after_429 = 0
        self.max_batch = 0
        self.auth_headers_seen: set[str] = set()
        self.send_retry_at = 0.0
        self.send_throttled_at = 0.0
        self.outage_until = 0.0
        self.status_retry_at = 0.0
        self.latency_spikes = 0
        self.connection_resets = 0
        self.malformed_answers = 0
        self.answers_lost = 0
        self.lost_answer_ids: set[str] = set()
        self.poll_anomalies: deque[dict[str, Any]] = deque(maxlen=ANOMALY_LOG_SIZE)

    def configure(self, changes: Mapping[str, Any]) -> None:
        """Apply admin changes; a new seed restarts the random stream."""
        self.config.update(changes)
        if "outage_seconds" in changes:
            self.outage_until = time.time() + self.config.outage_seconds
        if "seed" in changes:
            self.rng.seed(self.config.seed)
            self.push_rng.seed(_push_seed(self.config.seed))

    def _throttled(self, now: float) -> tuple[_Answer, float]:
        """A 429 and the time before which a polite client does not come back."""
        value = self.config.retry_after
        answer = _error(429, "TOO_MANY_REQUESTS", "Too many requests")
        answered_at = now + self.config.latency_ms / 1000
        return answer._replace(headers={"Retry-After": value}), _retry_deadline(value, answered_at)

    def _transport_faults(self, answer: _Answer) -> _Answer:
        """After the provider decided: a late answer, a dropped connection, a cut-off 200.

        Drawn only when configured, so a seeded run without them keeps its random stream.
        """
        config, rng = self.config, self.rng
        if config.spike_rate and rng.random() < config.spike_rate:
            self.latency_spikes += 1
            answer = answer._replace(hold=answer.hold + config.spike_seconds)
        if config.reset_rate and rng.random() < config.reset_rate:
            self.connection_resets += 1
            return answer._replace(reset=True)
        if answer.code == 200 and config.malformed_rate and rng.random() < config.malformed_rate:
            self.malformed_answers += 1
            return answer._replace(body=answer.body[: len(answer.body) // 2], cut=True)
        return answer


class _Pushes(_Records):
    """What the simulator pushes: SMSBAT status webhooks and BulkGate DLRs, planned per
    accepted message and handed to the delivery workers (`_Pusher`) when due."""

    def _plan_pushes(self, message: _Message, now: float) -> None:
        """Queue the reports the configured receivers will get about this message."""
        if self.config.webhook_url:
            self._schedule(_Report(WEBHOOK, "processing", message.t_processing, message), now)
            self._schedule(_Report(WEBHOOK, message.final, message.t_final, message), now)
        if self.config.dlr_url:
            self._plan_dlr(message, now)

    def _plan_dlr(self, message: _Message, now: float) -> None:
        """BulkGate: sometimes buffered (2) first, then 1 or 3; a Viber delivery may be read."""
        rng = self.push_rng
        if rng.random() < BUFFERED_SHARE:
            at = rng.uniform(message.t_processing, message.t_final)
            self._schedule(_Report(DLR, DLR_BUFFERED, at, message), now)
        self._schedule(_Report(DLR, DLR_FINALS[message.final], message.t_final, message), now)
        read = message.final == "delivered" and message.channel == "viber"
        if read and rng.random() < READ_SHARE:
            at = message.t_final + rng.uniform(0, AFTER_FINAL)
            self._schedule(_Report(DLR, DLR_READ, at, message), now)

    def _schedule(self, report: _Report, now: float, due: float | None = None) -> None:
        """Queue a report for ``due`` (default: when it happens); future DLRs wait for a tick."""
        due = report.at if due is None else due
        if report.sink == DLR and due > now:
            due = math.ceil(due / DLR_TICK) * DLR_TICK
        heapq.heappush(self.pushes, (due, next(self.push_order), report))
        if self.pushes[0][2] is report:
            self.wake.set()

    def next_push_in(self, now: float) -> float | None:
        """Seconds until the next report is due; None when nothing is planned."""
        return self.pushes[0][0] - now if self.pushes else None

    def due_pushes(self, now: float) -> list[_Push]:
        """Take up to PUSH_PASS due reports, inject faults, and turn them into requests."""
        ready: list[_Report] = []
        for _ in range(PUSH_PASS):
            if not self.pushes or self.pushes[0][0] > now:
                break
            report = heapq.heappop(self.pushes)[2]
            if report.settled or self._settle(report, now):
                ready.append(report)
        if self.config.push_reorder:
            self.push_rng.shuffle(ready)
        return self._requests(ready)

    def _settle(self, report: _Report, now: float) -> bool:
        """Decide a report's fate once: reply to it, lose, copy or delay it. True: send now."""
        config, rng = self.config, self.push_rng
        # The recipient replies whether or not the delivery report itself gets through.
        replied = report.status == DLR_FINALS["delivered"] and config.inbound_rate
        if replied and rng.random() < config.inbound_rate:
            at = now + rng.uniform(0, AFTER_FINAL)
            reply = _Report(DLR, DLR_INBOUND, at, report.message, rng.choice(config.inbound_texts))
            self._schedule(reply, now)
        if config.push_drop and rng.random() < config.push_drop:
            self.pushes_dropped += 1
            return False
        settled = report._replace(settled=True)
        if config.push_duplicates and rng.random() < config.push_duplicates:
            self.pushes_duplicated += 1
            self._schedule(settled, now, now + rng.uniform(0, DUPLICATE_LAG))
        if config.push_reorder and report.status in INTERMEDIATE:
            lag = report.message.t_final - report.at + REORDER_LAG
            self._schedule(settled, now, now + rng.uniform(0, lag))
            return False
        return True

    def _requests(self, reports: list[_Report]) -> list[_Push]:
        """Webhooks one per request; DLRs in arrays or one GET each (``dlr_form``).

        URLs are read now, so a receiver switched off meanwhile gets nothing.
        """
        webhook_url, dlr_url = self.config.webhook_url, self.config.dlr_url
        webhooks = [report for report in reports if report.sink == WEBHOOK]
        items = [_dlr_item(report) for report in reports if report.sink == DLR]
        requests = [self._webhook_push(webhook_url, r) for r in webhooks] if webhook_url else []
        if items and dlr_url:
            requests += self._dlr_requests(dlr_url, items)
        return requests

    def _webhook_push(self, url: str, report: _Report) -> _Push:
        """One state change; a lane per message keeps its state changes in order."""
        body = orjson.dumps(_webhook_body(report))
        return _Push(self.generation, hash(report.message.message_id), "POST", url, body, 0)

    def _dlr_requests(self, url: str, items: list[dict[str, str]]) -> list[_Push]:
        """POSTed JSON arrays of up to DLR_BATCH reports, or the older one-GET-each form."""
        if self.config.dlr_form == "query":
            base = httpx.URL(url)
            return [
                self._dlr_push("GET", str(base.copy_merge_params(item)), b"", _inbound([item]))
                for item in items
            ]
        chunks = (items[i : i + DLR_BATCH] for i in range(0, len(items), DLR_BATCH))
        return [self._dlr_push("POST", url, orjson.dumps(c), _inbound(c)) for c in chunks]

    def _dlr_push(self, method: str, url: str, body: bytes, inbound: int) -> _Push:
        """A DLR request of the current generation, in the next lane."""
        return _Push(self.generation, next(self.lanes), method, url, body, inbound)

    def is_current(self, push: _Push) -> bool:
        """False once a reset has happened since the push was planned."""
        return push.generation == self.generation

    def push_headers(self, push: _Push, now: float) -> dict[str, str]:
        """Bearer token and signature as configured now, signed afresh for each attempt.

        A GET has no body, so its raw query string is what gets signed.
        """
        config = self.config
        post = push.method == "POST"
        headers = {"Content-Type": "application/json"} if post else {}
        if config.webhook_token:
            headers["Authorization"] = f"Bearer {config.webhook_token}"
        if config.webhook_secret:
            signed = push.body if post else httpx.URL(push.url).query
            headers.update(_signature(config.webhook_secret, signed, now))
        return headers

    def push_answered(self, push: _Push, code: int) -> None:
        """Count one receiver answer (each attempt counts)."""
        if self.is_current(push):
            self.pushes_by_code[code] += 1

    def push_done(self, push: _Push, delivered: bool) -> None:
        """Count a push that got a 2xx, or was given up."""
        if not self.is_current(push):
            return
        if delivered:
            self.pushes_sent += 1
            self.inbound_sent += push.inbound
        else:
            self.pushes_failed += 1


class _Checks(_Records):
    """What the status endpoint serves: one message's state, and the polls recorded."""

    def status(self, headers: Headers, message_id: str, now: float) -> _Answer:
        """Answer one status GET and record it."""
        self.status_requests += 1
        if now < self.status_retry_at:
            self.status_early_after_429 += 1
        message = self.messages.get(message_id)
        answer = self._transport_faults(self._status_answer(headers, message_id, now))
        if message is not None:
            # What the client was told last: a poll after a final it could read is the
            # client's fault; one after a 5xx, a reset or a cut-off answer is not.
            message.final_seen = answer.final and not answer.unread
            message.final_seen_at = now if message.final_seen else None
        self.status_by_code[answer.code] = self.status_by_code.get(answer.code, 0) + 1
        self.requests.append((now, "status", answer.code, 1))
        return answer

    def _status_answer(self, headers: Headers, message_id: str, now: float) -> _Answer:
        """Auth, poll bookkeeping, injected faults, then the message's current state."""
        if not self._status_authorized(headers):
            return _UNAUTHORIZED
        message = self.messages.get(message_id)
        if message is not None:
            self._note_poll(message, now)
        fault = self._status_fault(now)
        if fault is not None:
            return fault
        if message is None:
            return _error(404, "NOT_FOUND", f"Message {message_id} not found")
        body = self._status_body(message, now)
        return _Answer(200, orjson.dumps(body), final=body["deliverystatus"] in FINAL_STATES)

    def _status_authorized(self, headers: Headers) -> bool:
        """Any of: the API key header, Basic user:password, Basic ``@:api_key``."""
        config = self.config
        if headers.get("x-authorization-key") == config.api_key:
            return True
        credentials = _basic_credentials(headers.get("authorization"))
        return credentials in ((config.username, config.password), ("@", config.api_key))

    def _note_poll(self, message: _Message, now: float) -> None:
        """Count the polling habits the provider asks clients to avoid."""
        message.track.polls += 1
        tracking_id = message.track.tracking_id
        if message.final_seen:
            self.polls_after_final += 1
            self.poll_anomalies.append(
                {
                    "kind": "after_final",
                    "trackinId": tracking_id,
                    "at": now,
                    "final_seen_at": message.final_seen_at,
                }
            )
        if message.last_poll is not None:
            gap = now - message.last_poll
            if gap < POLL_GAP:
                self.polls_within_1s += 1
                self.poll_anomalies.append(
                    {"kind": "within_1s", "trackinId": tracking_id, "at": now, "gap": gap}
                )
            if self.min_poll_gap is None or gap < self.min_poll_gap:
                self.min_poll_gap = gap
        message.last_poll = now

    def _status_fault(self, now: float) -> _Answer | None:
        """Injected 429/500 for status GETs."""
        config = self.config
        if config.status_throttle_next > 0:
            config.status_throttle_next -= 1
            answer, self.status_retry_at = self._throttled(now)
            return answer
        if config.error_rate and self.rng.random() < config.error_rate:
            return _SERVER_ERROR
        return None

    def _status_body(self, message: _Message, now: float) -> dict[str, Any]:
        """The state the timeline has reached; early states carry only two fields."""
        if now < message.t_processing:
            return {"deliverystatus": "scheduled", "partscount": message.parts}
        if now < message.t_final:
            return {"deliverystatus": "processing", "partscount": message.parts}
        return self._final_body(message)

    def _final_body(self, message: _Message) -> dict[str, Any]:
        """Final answer with its cost, and the cascade's details when fallbacks are on."""
        cost = _cost(message)
        body: dict[str, Any] = {
            "messagelistId": message.batch_id,
            "messageId": message.message_id,
            "deliverystatus": message.final,
            "partscount": message.parts,
            "cost": cost,
        }
        if self.config.fallbacks:
            body.update(_EXTENDED[message.channel, message.final])
            body.update(
                rate=RATE,
                rateAmount=RATE,
                rateCurrency=CURRENCY,
                billAmount=cost,
                billCurrency=CURRENCY,
            )
        return body


class _Sends(_Pushes):
    """What the send endpoints serve: batches answered (or faulted) and their messages
    recorded, each accepted one's pushes planned."""

    def send(self, headers: Headers, body: bytes, route: str, now: float) -> _Answer:
        """Answer one send request and record it."""
        self.send_requests += 1
        self.first_send_at = self.first_send_at or now
        self.last_send_at = now
        if self.send_throttled_at + IN_FLIGHT_GRACE < now < self.send_retry_at:
            self.early_after_429 += 1
        batch = _load(body)
        size = len(batch) if isinstance(batch, list) else 0
        self.max_batch = max(self.max_batch, size)
        decided = self._send_answer(headers, batch, route, now)
        answer = self._transport_faults(decided)
        if answer.code == 200 and answer.unread:
            self._answer_lost(decided.body)
        self.send_status[answer.code] = self.send_status.get(answer.code, 0) + 1
        self.requests.append((now, "send", answer.code, size))
        return answer

    def _answer_lost(self, body: bytes) -> None:
        """Sends accepted here whose answer the client never read: unknown outcomes to it.

        ``body`` is the whole answer as decided, so messages dropped from it do not count.
        """
        for item in orjson.loads(body):
            self.answers_lost += 1
            self.lost_answer_ids.add(item["trackinId"])

    def _send_answer(self, headers: Headers, batch: Any, route: str, now: float) -> _Answer:
        """Checks in the provider's order: auth, injected faults, validation, acceptance."""
        self.auth_headers_seen.update(AUTH_HEADERS[k] for k in headers if k in AUTH_HEADERS)
        if headers.get("x-authorization-key") != self.config.api_key:
            return _UNAUTHORIZED
        fault = self._send_fault(now)
        if fault is not None:
            return fault
        problem = _check_batch(batch, frozenset(self.config.reject_phones))
        if problem is not None:
            if not self.config.refusal_hints and problem.code == 400:
                return _error(400, "INVALID_PHONE", "Invalid phone number format", "toPhone")
            return problem
        return self._accept(batch, route, now)

    def _send_fault(self, now: float) -> _Answer | None:
        """Injected 500/429 for sends; countdowns first, then the random error rate."""
        config = self.config
        if now < self.outage_until:
            return _UNAVAILABLE
        if config.fail_next_sends > 0:
            config.fail_next_sends -= 1
            return _SERVER_ERROR
        if config.throttle_every and self.send_requests % config.throttle_every == 0:
            answer, self.send_retry_at = self._throttled(now)
            self.send_throttled_at = now
            return answer
        if config.throttle_next > 0:
            config.throttle_next -= 1
            answer, self.send_retry_at = self._throttled(now)
            self.send_throttled_at = now
            return answer
        if config.error_rate and self.rng.random() < config.error_rate:
            return _SERVER_ERROR
        return None

    def _accept(self, batch: list[dict[str, Any]], route: str, now: float) -> _Answer:
        """Record the batch's messages and answer ``[{messageId, trackinId}]``."""
        config, rng = self.config, self.rng
        self.batches += 1
        states, weights = zip(*config.mix.items(), strict=True)
        finals = rng.choices(states, weights, k=len(batch))
        channels = rng.choices(CHANNELS, k=len(batch))
        # push_early: the provider finishes the first message (and pushes its reports)
        # before it answers, so the reports can beat the client's commit of the answer.
        early = config.push_early and bool(config.webhook_url or config.dlr_url)
        answer: list[dict[str, str]] = []
        for message, final, channel in zip(batch, finals, channels, strict=True):
            if config.drop_answers and rng.random() < config.drop_answers:
                self.messages_dropped += 1
                continue
            instant = early and not answer
            message_id = self._record(message, final, channel, route, now, instant)
            answer.append({"messageId": message_id, "trackinId": message["id"]})
        if config.shuffle:
            rng.shuffle(answer)
        hold = EARLY_HOLD if early and answer else 0.0
        if config.hang_next_sends > 0:
            config.hang_next_sends -= 1
            hold += config.hang_seconds
        elif config.hang_rate and rng.random() < config.hang_rate:
            hold += config.hang_seconds
        return _Answer(200, orjson.dumps(answer), hold=hold)

    def _record(
        self,
        message: dict[str, Any],
        final: str,
        channel: str,
        route: str,
        now: float,
        instant: bool,
    ) -> str:
        """Plan one message's timeline from now, or from its future ``scheduledSent``."""
        config, rng = self.config, self.rng
        scheduled = _scheduled_at(message.get("scheduledSent"))
        start = now if scheduled is None else max(now, scheduled)
        delay = rng.uniform(config.delay_min, config.delay_max)
        if instant:
            delay = 0.0
        message_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        track = self._track(message["id"], route)
        record = _Message(
            message_id,
            self.batches,
            message["toPhone"],
            start,
            start + config.processing_at * delay,
            start + delay,
            final,
            channel,
            _parts(message.get("text")),
            track,
        )
        track.message_ids.append(message_id)
        self.messages[message_id] = record
        self.messages_accepted += 1
        self._plan_pushes(record, now)
        return message_id

    def _track(self, tracking_id: str, route: str) -> _Track:
        """The trackinId's record, counting a second acceptance as a duplicate."""
        track = self.tracks.get(tracking_id)
        if track is None:
            track = self.tracks[tracking_id] = _Track(tracking_id, route)
        track.sends += 1
        track.route = route
        if track.sends == 2:
            self.duplicate_tracking_ids += 1
        return track


class _Simulator(_Sends, _Checks):
    """The provider as the routes see it: sends, status checks and pushes, plus the
    reports the admin endpoints read."""

    def stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks."""
        return {
            "send_requests": self.send_requests,
            "first_send_at": self.first_send_at,
            "last_send_at": self.last_send_at,
            "send_status": {str(code): n for code, n in self.send_status.items()},
            "messages_accepted": self.messages_accepted,
            "messages_dropped": self.messages_dropped,
            "unique_tracking_ids": len(self.tracks),
            "duplicate_tracking_ids": self.duplicate_tracking_ids,
            "status_requests": self.status_requests,
            "status_by_code": {str(code): n for code, n in self.status_by_code.items()},
            "polls_after_final": self.polls_after_final,
            "polls_within_1s": self.polls_within_1s,
            "min_poll_gap": self.min_poll_gap,
            "early_after_429": self.early_after_429,
            "status_early_after_429": self.status_early_after_429,
            "max_batch": self.max_batch,
            "auth_headers_seen": sorted(self.auth_headers_seen),
            "pushes_sent": self.pushes_sent,
            "pushes_failed": self.pushes_failed,
            "pushes_by_code": {str(code): n for code, n in sorted(self.pushes_by_code.items())},
            "pushes_dropped": self.pushes_dropped,
            "pushes_duplicated": self.pushes_duplicated,
            "inbound_sent": self.inbound_sent,
            "latency_spikes": self.latency_spikes,
            "connection_resets": self.connection_resets,
            "malformed_answers": self.malformed_answers,
            "answers_lost": self.answers_lost,
        }

    def duplicates(self) -> dict[str, Any]:
        """trackinIds accepted more than once, and those whose send answer was lost here."""
        return {
            "duplicated": {tid: t.sends for tid, t in self.tracks.items() if t.sends > 1},
            "answer_lost": sorted(self.lost_answer_ids),
        }

    def message_report(self, now: float) -> dict[str, Any]:
        """Per trackinId; ``final`` is the latest messageId's state once it is reached."""
        report = {}
        for tracking_id, track in self.tracks.items():
            latest = self.messages[track.message_ids[-1]]
            report[tracking_id] = {
                "messageIds": track.message_ids,
                "sends": track.sends,
                "route": track.route,
                "polls": track.polls,
                "final": latest.final if now >= latest.t_final else None,
            }
        return report

    def request_log(self) -> list[dict[str, Any]]:
        """The last REQUEST_LOG_SIZE provider requests, oldest first."""
        return [{"t": t, "kind": k, "code": c, "size": s} for t, k, c, s in self.requests]


class _Pusher:
    """Sends due reports: one scheduler task, PUSH_WORKERS lanes, one shared client."""

    def __init__(self, sim: _Simulator) -> None:
        self.sim = sim

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the pushes for the app's lifetime (its lifespan)."""
        lanes: list[asyncio.Queue[_Push]] = [asyncio.Queue() for _ in range(PUSH_WORKERS)]
        clients = [_PushClient() for _ in lanes]
        tasks = [asyncio.create_task(self._schedule(lanes))]
        tasks += [
            asyncio.create_task(self._send(client, lane))
            for client, lane in zip(clients, lanes, strict=True)
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in clients:
                client.close()

    async def _schedule(self, lanes: list[asyncio.Queue[_Push]]) -> None:
        """Sleep until the next report is due (or an earlier one is planned), hand it over."""
        sim = self.sim
        while True:
            wait = sim.next_push_in(time.time())
            if wait is not None and wait <= 0:
                for push in sim.due_pushes(time.time()):
                    lanes[push.lane % len(lanes)].put_nowait(push)
                await asyncio.sleep(0)  # a large backlog must not starve the handlers
                continue
            sim.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sim.wake.wait(), wait)

    async def _send(self, client: _PushClient, lane: asyncio.Queue[_Push]) -> None:
        """One lane's delivery worker."""
        while True:
            push = await lane.get()
            self.sim.push_done(push, await self._deliver(client, push))

    async def _deliver(self, client: _PushClient, push: _Push) -> bool:
        """Send with retries on connection errors and 5xx, as a provider would; True on 2xx."""
        sim = self.sim
        for attempt in range(PUSH_ATTEMPTS):
            if attempt:
                await asyncio.sleep(PUSH_BACKOFF * 2 ** (attempt - 1))
            if not sim.is_current(push):
                return False
            headers = sim.push_headers(push, time.time())
            try:
                code = await client.request(push.method, push.url, push.body, headers)
            except (OSError, TimeoutError, _PushFailed):
                continue
            sim.push_answered(push, code)
            if code < 500:
                return 200 <= code < 300
        return False


class _PushFailed(Exception):
    """A push got no readable answer."""


class _PushClient:
    """One lane's kept-alive connections, one per receiving origin, over asyncio's streams.

    Its pushes go one after another. On the server's event loop, not on threads: 64 threads
    each blocking on a push over the workers' transport spent ≈380 µs of the simulator's CPU
    a push (httpx's async client ≈3 ms), which the receiver it measures shares the cores
    with; a provider pushes from machines of its own.
    """

    def __init__(self) -> None:
        self._open: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self._targets: dict[str, tuple[str, str, int, bytes, bytes]] = {}

    async def request(self, method: str, url: str, body: bytes, headers: dict[str, str]) -> int:
        """The answer's status code; a kept connection found closed is replaced once."""
        origin, host, port, target, host_header = self._target(url)
        lines = [b"%s %s HTTP/1.1" % (method.encode(), target), b"Host: " + host_header]
        lines += [f"{n}: {v}".encode("latin-1") for n, v in (_PUSH_HEADERS | headers).items()]
        if body or method == "POST":
            lines.append(b"Content-Length: %d" % len(body))
        wire = b"\r\n".join(lines) + b"\r\n\r\n" + body
        for _ in range(2):
            kept = self._open.pop(origin, None)
            async with asyncio.timeout(PUSH_TIMEOUT):
                reader, writer = kept or await asyncio.open_connection(
                    host, port, ssl=origin.startswith("https:") or None
                )
                try:
                    writer.write(wire)
                    code, keep = await _read_answer(reader)
                except (OSError, asyncio.IncompleteReadError, _PushFailed) as exc:
                    writer.close()
                    stale = isinstance(exc, asyncio.IncompleteReadError) and not exc.partial
                    if kept and (stale or isinstance(exc, ConnectionResetError)):
                        continue  # closed by the receiver while idle: once more, afresh
                    raise _PushFailed(type(exc).__name__) from None
                except BaseException:  # a timeout or a cancel: the answer is half read
                    writer.close()
                    raise
            if keep:
                self._open[origin] = reader, writer
            else:
                writer.close()
            return code
        raise _PushFailed("the receiver closed a fresh connection unanswered")

    def _target(self, url: str) -> tuple[str, str, int, bytes, bytes]:
        """Origin, host, port, request target and Host header of a receiver's URL."""
        found = self._targets.get(url)
        if found is None:
            parsed = httpx.URL(url)
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            host = parsed.host
            named = f"[{host}]" if ":" in host else host
            host_header = (named if parsed.port is None else f"{named}:{port}").encode()
            origin = f"{parsed.scheme}://{named}:{port}"
            found = self._targets[url] = origin, host, port, parsed.raw_path, host_header
        return found

    def close(self) -> None:
        for _, writer in self._open.values():
            writer.close()
        self._open.clear()


_PUSH_HEADERS: Final = {"User-Agent": "smsbat-simulator"}


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """An HTTP/1.1 answer's status and whether the connection stays open, its body read."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not rest[:3].isdigit():
        raise _PushFailed("not an HTTP/1.x answer")
    fields = {}
    for line in lines:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip().lower()
    keep = version == b"HTTP/1.1" and b"close" not in fields.get(b"connection", b"")
    if fields.get(b"transfer-encoding", b"").endswith(b"chunked"):
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
    elif b"content-length" in fields:
        await reader.readexactly(int(fields[b"content-length"]))
    else:
        await reader.read()
        keep = False
    return int(rest[:3]), keep


def _json(payload: Any, code: int = 200) -> Response:
    """A JSON response serialised with orjson."""
    return Response(orjson.dumps(payload), code, media_type="application/json")


def _config_error(message: str) -> Response:
    """400 for a refused admin change."""
    return _json({"error": {"code": "INVALID_CONFIG", "message": message}}, 400)


async def _reply(sim: _Simulator, answer: _Answer) -> Response:
    """Send an answer after the configured latency (and any injected hang)."""
    delay = sim.config.latency_ms / 1000 + answer.hold
    if delay > 0:
        await asyncio.sleep(delay)
    if answer.reset:
        return _Reset()
    return Response(answer.body, answer.code, answer.headers, media_type="application/json")


class _Reset(Response):
    """Starts a 200 that promises a body, then ends: uvicorn closes the connection.

    An ASGI app cannot close a socket without answering (uvicorn sends a 500 instead), so
    this is the nearest: the client has a status line and no body, and fails reading it.
    """

    def __init__(self) -> None:
        super().__init__(status_code=200, headers={"Content-Length": "1024"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})


def _injected_reset(record: logging.LogRecord) -> bool:
    """Keep uvicorn from logging every injected reset as an application error."""
    return "without completing response" not in record.getMessage()


@contextlib.asynccontextmanager
async def _lifespan(pusher: _Pusher) -> AsyncIterator[None]:
    """Runs after uvicorn configured its logging, so the filter stays."""
    server_log = logging.getLogger("uvicorn.error")
    if _injected_reset not in server_log.filters:
        server_log.addFilter(_injected_reset)
    async with pusher.running():
        yield


def _send_endpoint(sim: _Simulator, route: str) -> Callable[[Request], Any]:
    """The handler for one of the two send routes."""

    async def send(request: Request) -> Response:
        now = time.time()
        body = await request.body()
        return await _reply(sim, sim.send(request.headers, body, route, now))

    return send


def _provider_routes(sim: _Simulator) -> list[Route]:
    """The SMSBAT endpoints."""

    async def status(request: Request) -> Response:
        message_id = request.path_params["messageId"]
        return await _reply(sim, sim.status(request.headers, message_id, time.time()))

    return [
        Route(SEND_PATH, _send_endpoint(sim, "standard"), methods=["POST"]),
        Route(SEND_TG_VIBER_PATH, _send_endpoint(sim, "tg-viber"), methods=["POST"]),
        Route(STATUS_PATH, status, methods=["GET"]),
    ]


def _admin_routes(sim: _Simulator) -> list[Route]:
    """``/_sim/*``: no auth, because the simulator only binds loopback."""

    async def health(_: Request) -> Response:
        return _json({"ok": True})

    async def set_config(request: Request) -> Response:
        changes = _load(await request.body())
        if not isinstance(changes, dict):
            return _config_error("body must be a JSON object of config changes")
        try:
            sim.configure(changes)
        except ValueError as exc:
            return _config_error(str(exc))
        return _json(asdict(sim.config))

    async def reset(_: Request) -> Response:
        sim.reset()
        return _json({"ok": True})

    async def stats(_: Request) -> Response:
        return _json(sim.stats())

    async def messages(_: Request) -> Response:
        return _json(sim.message_report(time.time()))

    async def requests(_: Request) -> Response:
        return _json(sim.request_log())

    async def duplicates(_: Request) -> Response:
        return _json(sim.duplicates())

    async def poll_anomalies(_: Request) -> Response:
        return _json(list(sim.poll_anomalies))

    return [
        Route("/_sim/health", health, methods=["GET"]),
        Route("/_sim/config", set_config, methods=["POST"]),
        Route("/_sim/reset", reset, methods=["POST"]),
        Route("/_sim/stats", stats, methods=["GET"]),
        Route("/_sim/messages", messages, methods=["GET"]),
        Route("/_sim/requests", requests, methods=["GET"]),
        Route("/_sim/duplicates", duplicates, methods=["GET"]),
        Route("/_sim/poll_anomalies", poll_anomalies, methods=["GET"]),
    ]


class _LeanStatus:
    """Status GETs answered straight on ASGI, past Starlette's router, Request and Response.

    The simulator shares the bench's two cores with the workers it stands in front of, and
    status checks are most of its requests: through Starlette one took ≈115 µs of its CPU.
    What a client sees is the same: the same answers, headers and faults."""

    def __init__(self, app: Any, sim: _Simulator) -> None:
        self._app = app
        self._sim = sim

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        message_id = path[len(_STATUS_PREFIX) :]
        if (
            scope["type"] != "http"
            or scope["method"] != "GET"
            or not path.startswith(_STATUS_PREFIX)
            or not message_id
            or "/" in message_id
        ):
            await self._app(scope, receive, send)
            return
        sim = self._sim
        answer = sim.status(Headers(scope=scope), message_id, time.time())
        if answer.reset or sim.config.latency_ms or answer.hold:
            await (await _reply(sim, answer))(scope, receive, send)
            return
        headers = [
            (b"content-length", b"%d" % len(answer.body)),
            (b"content-type", b"application/json"),
        ]
        for name, value in (answer.headers or {}).items():
            headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        await send({"type": "http.response.start", "status": answer.code, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})


_STATUS_PREFIX: Final = STATUS_PATH.removesuffix("{messageId}")


def create_app(config: SimulatorConfig | None = None) -> Starlette:
    """The simulator as an ASGI app; ``config`` stays live (admin changes mutate it)."""
    sim = _Simulator(config if config is not None else SimulatorConfig())
    pusher = _Pusher(sim)
    return Starlette(
        routes=_provider_routes(sim) + _admin_routes(sim),
        middleware=[Middleware(_LeanStatus, sim=sim)],
        lifespan=lambda _: _lifespan(pusher),
    )


def push_targets(config: SimulatorConfig) -> list[str]:
    """Where pushes go, for the console: URLs without userinfo or query, never a token."""
    lines = []
    if config.webhook_url:
        lines.append(f"status webhooks to {_safe_url(config.webhook_url)}")
    if config.dlr_url:
        lines.append(f"delivery reports ({config.dlr_form}) to {_safe_url(config.dlr_url)}")
    if lines:
        auth = "bearer token" if config.webhook_token else "no token"
        lines.append(f"pushes with {auth}, {'signed' if config.webhook_secret else 'unsigned'}")
    return lines


def serve(host: str = "127.0.0.1", port: int = 8090, config: SimulatorConfig | None = None) -> None:
    """Run the simulator until interrupted (``cascade simulator``)."""
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False)
