"""The SMSBAT client: cascade sends and status checks, each over a keep-alive pool.

Exceptions say what the caller may do next:

    ProviderError
    ├── BadRequest      400: the batch was refused; do not resend it as it is
    ├── Unauthorized    401/403: credentials are wrong; stop and keep messages queued
    ├── Throttled       429: wait `retry_after` seconds, then try again
    ├── NotFound        404 on a status check
    ├── Unavailable     5xx, connect errors, timeouts before the request was written:
    │                   nothing reached the provider, safe to try again
    └── OutcomeUnknown  the request was written but no usable answer came back:
                        the provider may or may not have the messages
"""

from __future__ import annotations

import math
import queue
import re
import threading
import time
import uuid
from base64 import b64encode
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeGuard
from urllib.parse import quote
from urllib.request import getproxies, proxy_bypass

import httpx
import orjson

from config import Settings
from worker.core.answers import BadRequest as BadRequest
from worker.core.answers import NotFound as NotFound
from worker.core.answers import OutcomeUnknown as OutcomeUnknown
from worker.core.answers import ProviderError as ProviderError
from worker.core.answers import Throttled as Throttled
from worker.core.answers import Unauthorized as Unauthorized
from worker.core.answers import Unavailable as Unavailable
from worker.core.backoff import parse_retry_after
from worker.core.states import PROVIDER_STATES, State
from worker.provider.keepalive import KeepAliveTransport, Reply, request_bytes

# What httpx.Client sends, which the send client does: the provider sees one agent.
USER_AGENT = f"python-httpx/{httpx.__version__}"
ROUTE_PATHS = {
    "standard": "/api/CascadeMessage/send_message/async",
    "tg-viber": "/api/CascadeMessage/send_message/tg-viber/async",
}


@dataclass(frozen=True, slots=True)
class StatusReport:
    """One status answer, every field the provider sends, already type-checked."""

    message_id: str
    state: State
    deliverystatus: str
    partscount: int | None = None
    cost: float | None = None
    messagelist_id: int | None = None
    fallbacks: list[dict[str, str]] | None = None
    extended_statuses: dict[str, str] | None = None
    rate: float | None = None
    rate_amount: float | None = None
    rate_currency: str | None = None
    bill_amount: float | None = None
    bill_currency: str | None = None

    def fields(self) -> dict[str, Any]:
        """Column values to store; absent fields do not erase earlier ones."""
        values = {
            "deliverystatus": self.deliverystatus,
            "partscount": self.partscount,
            "cost": self.cost,
            "messagelist_id": self.messagelist_id,
            "fallbacks": self.fallbacks,
            "extended_statuses": self.extended_statuses,
            "rate": self.rate,
            "rate_amount": self.rate_amount,
            "rate_currency": self.rate_currency,
            "bill_amount": self.bill_amount,
            "bill_currency": self.bill_currency,
        }
        return {k: v for k, v in values.items() if v is not None}


def _number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{key} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return number


def _string(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def _within(value: float | None, top: int) -> int | None:
    """An integer the column can hold; an impossible one is dropped, not the whole batch."""
    return int(value) if value is not None and 0 <= value <= top else None


def _currency(data: Mapping[str, Any], key: str) -> str | None:
    value = _string(data, key)
    return value if value is None or len(value) <= 8 else None


def parse_status(data: Any, message_id: str) -> StatusReport:
    """Check a status answer's shape; raise ValueError naming the bad field."""
    if not isinstance(data, Mapping):
        raise ValueError("status answer must be a JSON object")
    status = data.get("deliverystatus")
    if not isinstance(status, str) or status.lower() not in PROVIDER_STATES:
        raise ValueError(f"deliverystatus is not a known status: {status!r}")
    partscount = _number(data, "partscount")
    messagelist_id = _number(data, "messagelistId")
    fallbacks = data.get("fallbacks")
    if fallbacks is not None and not (
        isinstance(fallbacks, list) and all(isinstance(f, dict) for f in fallbacks)
    ):
        raise ValueError("fallbacks must be a list of objects")
    extended = data.get("extendedStatuses")
    if extended is not None and not isinstance(extended, dict):
        raise ValueError("extendedStatuses must be an object")
    return StatusReport(
        message_id=message_id,
        state=PROVIDER_STATES[status.lower()],
        deliverystatus=status.lower(),
        partscount=_within(partscount, 2**31 - 1),
        cost=_number(data, "cost"),
        messagelist_id=_within(messagelist_id, 2**63 - 1),
        fallbacks=fallbacks,
        extended_statuses=extended,
        rate=_number(data, "rate"),
        rate_amount=_number(data, "rateAmount"),
        rate_currency=_currency(data, "rateCurrency"),
        bill_amount=_number(data, "billAmount"),
        bill_currency=_currency(data, "billCurrency"),
    )


def parse_send_answer(body: bytes) -> dict[str, str]:
    """Map trackinId → messageId from a 200 answer; order is irrelevant by design."""
    data = orjson.loads(body)
    if not isinstance(data, list):
        raise ValueError("send answer must be a JSON array")
    accepted: dict[str, str] = {}
    for item in data:
        if not isinstance(item, dict):
            raise ValueError("send answer items must be objects")
        tracking, message_id = item.get("trackinId"), item.get("messageId")
        if isinstance(tracking, str) and _usable_message_id(message_id):
            accepted[tracking] = message_id
    return accepted


_MESSAGE_ID = re.compile(r"[A-Za-z0-9._~:-]{1,64}")


def _usable_message_id(value: object) -> TypeGuard[str]:
    """Fits the column and a status URL; anything else counts as not confirmed."""
    return isinstance(value, str) and _MESSAGE_ID.fullmatch(value) is not None


def parse_error(body: bytes) -> BadRequest:
    try:
        error = orjson.loads(body).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {}
    return BadRequest(
        str(error.get("code") or "BAD_REQUEST")[:64],
        str(error.get("message") or "the provider refused the request"),
        error.get("field") if isinstance(error.get("field"), str) else None,
    )


@dataclass(frozen=True, slots=True)
class RetryAfterPolicy:
    default: float = 5.0
    cap: float = 600.0

    def seconds(self, header: str | None) -> float:
        return parse_retry_after(header, now=datetime.now(UTC), default=self.default, cap=self.cap)


def _raise_for_status(
    code: int,
    path: str,
    body: bytes,
    retry_after: Callable[[], str | None],
    *,
    sending: bool,
    policy: RetryAfterPolicy,
) -> None:
    """The answer's status as the exception the caller acts on; `retry_after` reads the
    header only for a 429."""
    if code == 200:
        return
    if code == 400 and sending:
        raise parse_error(body)
    if code in (401, 403):
        raise Unauthorized(f"HTTP {code} from {path}")
    if code == 429:
        raise Throttled(policy.seconds(retry_after()))
    if code == 404 and not sending:
        raise NotFound(f"HTTP 404 from {path}")
    raise Unavailable(f"HTTP {code} from {path}")


def send_headers(settings: Settings) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    for name, secret in (
        ("X-Authorization-Key", settings.smsbat_api_key),
        ("X-Viber-Auth-Token", settings.smsbat_viber_token),
        ("X-Tg-Bot-Key", settings.smsbat_tg_bot_key),
    ):
        if secret is not None:
            headers[name] = secret.get_secret_value()
    return headers


def status_headers(settings: Settings) -> dict[str, str]:
    """The credentials of a status check, per SMSBAT_STATUS_AUTH, as request headers."""
    key = settings.smsbat_api_key.get_secret_value() if settings.smsbat_api_key else ""
    if settings.smsbat_status_auth == "key":
        return {"X-Authorization-Key": key}
    if settings.smsbat_status_auth == "basic":
        password = settings.smsbat_password.get_secret_value() if settings.smsbat_password else ""
        user = settings.smsbat_username or ""
    else:  # basic_key
        user, password = "@", key
    pair = b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


def environment_proxy(url: httpx.URL) -> str | None:
    """The proxy the environment names for `url`, read as httpx.Client reads it: the
    scheme's own (HTTP_PROXY, HTTPS_PROXY) or ALL_PROXY, unless NO_PROXY exempts the host;
    `http://` assumed where the value names none."""
    if proxy_bypass(f"{url.host}:{url.port}" if url.port else url.host):
        return None
    proxies = getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and "://" not in proxy:
        proxy = f"http://{proxy}"
    return proxy


def _timeout(settings: Settings) -> httpx.Timeout:
    return httpx.Timeout(
        connect=settings.http_connect_timeout_seconds,
        read=settings.http_read_timeout_seconds,
        write=settings.http_write_timeout_seconds,
        pool=settings.http_connect_timeout_seconds,
    )


def _retry_after_policy(settings: Settings) -> RetryAfterPolicy:
    return RetryAfterPolicy(settings.retry_after_default_seconds, settings.retry_after_max_seconds)


class SendClient:
    """Posts batches to a cascade endpoint over one keep-alive pool per process."""

    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None) -> None:
        self._retry_after = _retry_after_policy(settings)
        self._client = httpx.Client(
            base_url=settings.smsbat_base_url,
            headers=send_headers(settings),
            timeout=_timeout(settings),
            limits=httpx.Limits(max_connections=settings.http_pool_size),
            transport=transport,
        )

    def send(self, route: str, payloads: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        """POST one batch; answer trackinId → messageId for the messages accepted."""
        try:
            response = self._client.post(ROUTE_PATHS[route], content=orjson.dumps(payloads))
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise Unavailable(f"{type(exc).__name__} before the request was sent") from None
        except (httpx.WriteError, httpx.WriteTimeout) as exc:
            # The body never arrived whole, so the provider cannot have parsed it.
            raise Unavailable(f"{type(exc).__name__} while writing the request") from None
        except httpx.HTTPError as exc:  # read errors, protocol errors, undecodable answers
            raise OutcomeUnknown(f"{type(exc).__name__} after the request was written") from None
        _raise_for_status(
            response.status_code,
            response.request.url.path,
            response.content,
            lambda: response.headers.get("Retry-After"),
            sending=True,
            policy=self._retry_after,
        )
        try:
            return parse_send_answer(response.content)
        except (orjson.JSONDecodeError, ValueError) as exc:
            raise OutcomeUnknown(f"unreadable 200 answer: {exc}") from None

    def close(self) -> None:
        self._client.close()


def _status_transport(base: httpx.URL, settings: Settings) -> httpx.BaseTransport:
    proxy = environment_proxy(base)
    if proxy is not None:
        limits = httpx.Limits(max_connections=settings.poll_concurrency)
        return httpx.HTTPTransport(limits=limits, proxy=proxy)
    return KeepAliveTransport(base, max_idle=settings.poll_concurrency)


class StatusClient:
    """Checks messages over one keep-alive pool, safe to share between threads.

    Synchronous on purpose: measured against the simulator here, httpx's asyncio client
    spent 2.0–3.4 ms of CPU per check (anyio and the async pool's bookkeeping), the
    threaded sync client 0.8–0.9 ms, and checks are CPU-bound on a worker. Requests go to
    the transport itself, not through httpx.Client, whose layers (URL merging, cookies,
    auth and redirect flows) a check does not need. That transport is the lean
    `KeepAliveTransport` unless a proxy is in the way (see worker/provider/keepalive.py).
    Over it a check is its request's bytes, made once with a hole for the message id, and
    the answer's status, one header and body: with httpx's Request and Response (and the
    URL each parses) a check took 180 µs of user CPU here, this way 70 (a bare socket,
    20). Any other transport (a proxy's, a test's) gets httpx's Request and Response.
    """

    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None) -> None:
        base = httpx.URL(settings.status_base_url)
        self._prefix = str(base).rstrip("/") + "/bat/message/"
        self._path = httpx.URL(self._prefix).path
        self._headers = httpx.Headers(
            {"Accept": "application/json", "User-Agent": USER_AGENT, **status_headers(settings)}
        )
        self._timeouts = _timeout(settings).as_dict()
        self._retry_after = _retry_after_policy(settings)
        self._transport = transport or _status_transport(base, settings)
        # Over the lean transport: the request's bytes before and after the id.
        self._lean: tuple[KeepAliveTransport, bytes, bytes] | None = None
        if isinstance(self._transport, KeepAliveTransport):
            hole = uuid.uuid4().hex
            start, _, end = request_bytes(self._request(hole)).partition(hole.encode())
            self._lean = self._transport, start, end

    def _request(self, quoted_id: str) -> httpx.Request:
        return httpx.Request(
            "GET",
            self._prefix + quoted_id,
            headers=self._headers,
            extensions={"timeout": self._timeouts},
        )

    def status(self, message_id: str) -> StatusReport:
        return self._check(message_id)

    def status_all(
        self,
        message_ids: Iterable[str],
        *,
        width: int,
        deadline: float,
        go_on: Callable[[], bool],
        threads: Executor,
    ) -> Iterator[tuple[str, StatusReport | ProviderError, float]]:
        """Check each id, `width` at a time, yielding it, its answer (a report or the error
        `status` would raise) and the seconds it took, as answers come.

        `go_on` is asked before each check starts; at `deadline` (`time.monotonic()`) none
        starts and the checks under way end as Unavailable. Over the lean transport one
        thread keeps them all under way (`KeepAliveTransport.exchange_all`); over any
        other, `width` of `threads` each make one check after another.
        """
        if self._lean is None:
            yield from self._threaded(message_ids, width, deadline, go_on, threads)
            return
        transport, start, end = self._lean
        wires = ((m, start + quote(m, safe="").encode() + end) for m in message_ids)
        answers = transport.exchange_all(
            wires, self._timeouts, width=width, deadline=deadline, go_on=go_on
        )
        for message_id, reply, seconds in answers:
            try:
                if isinstance(reply, httpx.TransportError):
                    raise Unavailable(f"{type(reply).__name__} on status check")
                report: StatusReport | ProviderError = self._read(
                    message_id, reply.status, reply.body, _retry_after_of(reply)
                )
            except ProviderError as exc:
                report = exc
            except Exception as exc:  # one odd answer must not cost the others theirs
                report = Unavailable(f"{type(exc).__name__} on status check")
            yield message_id, report, seconds

    def _threaded(
        self,
        message_ids: Iterable[str],
        width: int,
        deadline: float,
        go_on: Callable[[], bool],
        threads: Executor,
    ) -> Iterator[tuple[str, StatusReport | ProviderError, float]]:
        todo = iter(message_ids)
        taken: set[str] = set()  # started and not yet answered
        lock = threading.Lock()
        over = threading.Event()
        answers: queue.SimpleQueue[tuple[str, StatusReport | ProviderError, float] | None]
        answers = queue.SimpleQueue()

        def drain() -> None:
            try:
                while True:
                    with lock:
                        if over.is_set() or time.monotonic() >= deadline or not go_on():
                            return
                        message_id = next(todo, None)
                        if message_id is None:
                            return
                        taken.add(message_id)
                    started = time.monotonic()
                    try:
                        answer: StatusReport | ProviderError = self._check(message_id)
                    except ProviderError as exc:
                        answer = exc
                    except Exception as exc:  # one odd failure must not cost the others
                        answer = Unavailable(f"{type(exc).__name__} on status check")
                    answers.put((message_id, answer, time.monotonic() - started))
            finally:
                answers.put(None)

        for _ in range(width):
            threads.submit(drain)
        running = width
        while running:
            try:
                item = answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:  # the budget is spent: what is under way stays unanswered
                break
            if item is None:
                running -= 1
                continue
            with lock:
                taken.discard(item[0])
            yield item
        with lock:
            over.set()
            unanswered = list(taken)
        for message_id in unanswered:
            yield message_id, Unavailable("no answer within the poll task's budget"), 0.0

    def _check(self, message_id: str) -> StatusReport:
        quoted = quote(message_id, safe="")
        try:
            code, body, retry_after = self._get(quoted)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise Unavailable(f"{type(exc).__name__} on status check") from None
        return self._read(message_id, code, body, retry_after)

    def _read(
        self, message_id: str, code: int, body: bytes, retry_after: Callable[[], str | None]
    ) -> StatusReport:
        """The report in an answer, or the ProviderError it means."""
        path = self._path + message_id
        _raise_for_status(code, path, body, retry_after, sending=False, policy=self._retry_after)
        try:
            return parse_status(orjson.loads(body), message_id)
        except (orjson.JSONDecodeError, ValueError) as exc:
            raise Unavailable(f"unreadable status answer: {exc}") from None

    def _get(self, quoted_id: str) -> tuple[int, bytes, Callable[[], str | None]]:
        """The answer's status, body and a reader of its Retry-After header."""
        if self._lean is not None:
            transport, start, end = self._lean
            reply = transport.exchange(start + quoted_id.encode() + end, self._timeouts)
            return reply.status, reply.body, _retry_after_of(reply)
        response = self._transport.handle_request(self._request(quoted_id))
        try:
            response.read()
        finally:
            response.close()
        return response.status_code, response.content, lambda: response.headers.get("Retry-After")

    def close(self) -> None:
        self._transport.close()


def _retry_after_of(reply: Reply) -> Callable[[], str | None]:
    """A reader of the answer's Retry-After header, for the few answers that need it."""

    def read() -> str | None:
        value = reply.header(b"retry-after")
        return value.decode("latin-1") if value is not None else None

    return read
