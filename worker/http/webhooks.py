"""Webhook receivers: SMSBAT status pushes and BulkGate delivery reports / inbound SMS.

They answer fast: check the caller, parse, store, wake `cascade.apply_reports`, answer
200 with per-element results. A 200 means stored: reports are committed before the answer,
in one transaction shared by the requests that arrived together (`worker.intake`).
Applying happens in the worker (`inbox.apply_pending`), so
a slow database lock or a report that arrives before our send answer never holds the
provider's request. A refused request (401, 413, 400, 422, 503) writes nothing.

Security: the shared WEBHOOK_TOKEN (`Authorization: Bearer …`, or `?token=…` for providers
that can only call a URL), compared in constant time; with WEBHOOK_SIGNING_SECRET also an
HMAC-SHA256 over "<X-Cascade-Timestamp>.<raw body>" (for GET, the raw query string),
refused outside WEBHOOK_SIGNATURE_TOLERANCE_SECONDS to bound replays. Replays inside the
window are harmless anyway: reports only move messages forward, inbound repeats are skipped.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from config import Settings, get_settings
from worker.core.redact import mask_phone
from worker.core.signing import sign as signature
from worker.core.statuses import Report
from worker.flows.inbox import store_inbound
from worker.flows.wake import APPLY_REPORTS, wake
from worker.http.intake import Job, committer
from worker.observe.metrics import WEBHOOK_PUSHES
from worker.provider.dlr import (
    Inbound,
    Parsed,
    ParseError,
    parse_bulkgate,
    parse_bulkgate_query,
    parse_smsbat_webhook,
)
from worker.store.db import get_engine, utcnow

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Cascade-Timestamp"
SIGNATURE_HEADER = "X-Cascade-Signature"


class Rejected(BaseModel):
    index: int
    error: str


class Answer(BaseModel):
    accepted: int
    rejected: list[Rejected]


class Problem(BaseModel):
    detail: str


_PROBLEMS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "malformed JSON or Content-Length"},
    401: {"model": Problem, "description": "missing or wrong token or signature"},
    413: {"model": Problem, "description": "body larger than WEBHOOK_MAX_BODY_BYTES"},
    422: {"model": Problem, "description": "JSON of the wrong shape"},
    503: {"model": Problem, "description": "WEBHOOK_TOKEN is not set"},
}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI for a body read raw (the signature covers the exact bytes)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_OBJECT = {"type": "object", "additionalProperties": True}
_SMSBAT_BODY = _json_body({"anyOf": [_OBJECT, {"type": "array", "items": _OBJECT}]})
_BULKGATE_BODY = _json_body({"type": "array", "items": _OBJECT})
_BULKGATE_QUERY = {
    "parameters": [
        {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
        for name in ("status", "smsID", "price", "date", "from", "message", "token")
    ]
}

router = APIRouter(prefix="/webhooks", tags=["webhooks"], responses=_PROBLEMS)


# --- dependencies (tests override them) --------------------------------------------------------


async def webhook_settings(request: Request) -> Settings:
    """The app's own settings (`app.state.settings`, as worker/http/app.py sets), else the
    process's."""
    return getattr(request.app.state, "settings", None) or get_settings()


async def webhook_waker() -> Callable[[str], None]:
    """How to wake the applier; tests swap it for a recorder."""
    return wake_reports


SettingsDep = Annotated[Settings, Depends(webhook_settings)]
WakerDep = Annotated[Callable[[str], None], Depends(webhook_waker)]


def wake_reports(broker_url: str) -> None:
    """Ask for `cascade.apply_reports` now; harmless if it fails, beat runs it anyway."""
    wake(APPLY_REPORTS, broker_url)


# --- the checks, in order: configured, token, size, signature ----------------------------------


def _refuse(request: Request, status: int, reason: str) -> HTTPException:
    client = request.client.host if request.client else "?"
    _count(request, str(status))
    log.warning("webhook %s from %s refused (%d): %s", request.url.path, client, status, reason)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return HTTPException(status, reason, headers=headers)


def _check_token(request: Request, settings: Settings) -> None:
    expected = settings.webhook_token.get_secret_value() if settings.webhook_token else ""
    if not expected:
        raise _refuse(request, 503, "webhooks are not configured (WEBHOOK_TOKEN)")
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    presented = value.strip() if scheme.lower() == "bearer" else ""
    presented = presented or request.query_params.get("token", "")
    if not presented:
        raise _refuse(request, 401, "a token is required (Authorization: Bearer, or ?token=)")
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise _refuse(request, 401, "wrong token")


async def _read_limited(request: Request, limit: int) -> bytes:
    """The raw body, refused (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise _refuse(request, 400, "Content-Length is not a number")
        if int(declared) > limit:
            raise _refuse(request, 413, f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _refuse(request, 413, f"body larger than {limit} bytes")
    return bytes(body)


def _check_signature(request: Request, signed: bytes, settings: Settings, now: float) -> None:
    if settings.webhook_signing_secret is None:
        return
    stamp = request.headers.get(TIMESTAMP_HEADER, "").strip()
    presented = request.headers.get(SIGNATURE_HEADER, "").strip().lower()
    if not stamp or not presented:
        raise _refuse(request, 401, f"{TIMESTAMP_HEADER} and {SIGNATURE_HEADER} are required")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        raise _refuse(request, 401, f"{TIMESTAMP_HEADER} must be unix seconds")
    if abs(now - int(stamp)) > settings.webhook_signature_tolerance_seconds:
        raise _refuse(request, 401, f"{TIMESTAMP_HEADER} is outside the tolerance window")
    secret = settings.webhook_signing_secret.get_secret_value()
    if not hmac.compare_digest(presented.encode(), signature(secret, stamp, signed).encode()):
        raise _refuse(request, 401, f"{SIGNATURE_HEADER} does not match")


async def verified_body(request: Request, settings: SettingsDep) -> bytes:
    """The raw body of a caller that passed every check (nothing is parsed before that)."""
    _check_token(request, settings)
    body = await _read_limited(request, settings.webhook_max_body_bytes)
    signed = body if request.method == "POST" else request.scope.get("query_string", b"")
    _check_signature(request, signed, settings, time.time())
    return body


BodyDep = Annotated[bytes, Depends(verified_body)]


# --- endpoints ---------------------------------------------------------------------------------


@router.post("/smsbat", response_model=Answer, openapi_extra=_SMSBAT_BODY)
async def smsbat_webhook(
    request: Request, body: BodyDep, settings: SettingsDep, wake: WakerDep
) -> Response:
    """SMSBAT status push: `{messageId, deliverystatus, timestamp, cost}` or an array of them."""
    return await _smsbat(request, body, settings, wake)


@router.post("/bulkgate", response_model=Answer, openapi_extra=_BULKGATE_BODY)
async def bulkgate_webhook(
    request: Request, body: BodyDep, settings: SettingsDep, wake: WakerDep
) -> Response:
    """BulkGate delivery reports and inbound SMS: a JSON array of reports."""
    return await _bulkgate(request, body, settings, wake)


@router.get("/bulkgate", response_model=Answer, openapi_extra=_BULKGATE_QUERY)
async def bulkgate_query(
    request: Request, _body: BodyDep, settings: SettingsDep, wake: WakerDep
) -> Response:
    """The older BulkGate form: one report as query parameters (the token is not a field)."""
    return await _bulkgate_query(request, _body, settings, wake)


Handler = Callable[[Request, bytes, Settings, Callable[[str], None]], Awaitable[Response]]


async def _smsbat(
    request: Request, body: bytes, settings: Settings, wake: Callable[[str], None]
) -> Response:
    data = _json(request, body)
    if not isinstance(data, dict | list):
        raise _refuse(request, 422, "body must be a JSON object or an array of objects")
    return await _accept(request, parse_smsbat_webhook(data, body=body), settings, wake)


async def _bulkgate(
    request: Request, body: bytes, settings: Settings, wake: Callable[[str], None]
) -> Response:
    data = _json(request, body)
    if not isinstance(data, list):
        raise _refuse(request, 422, "body must be a JSON array of reports")
    return await _accept(request, parse_bulkgate(data, body=body), settings, wake)


async def _bulkgate_query(
    request: Request, _body: bytes, settings: Settings, wake: Callable[[str], None]
) -> Response:
    params = {k: v for k, v in request.query_params.items() if k != "token"}
    return await _accept(request, parse_bulkgate_query(params), settings, wake)


# --- the lean path: the same checks and handlers, without routing and dependency solving ----

LEAN_ROUTES: dict[tuple[str, str], Handler] = {
    ("POST", "/webhooks/smsbat"): _smsbat,
    ("POST", "/webhooks/bulkgate"): _bulkgate,
    ("GET", "/webhooks/bulkgate"): _bulkgate_query,
}


async def serve_lean(
    handler: Handler, settings: Settings, scope: Scope, receive: Receive, send: Send
) -> None:
    """Answer one webhook request as its route would, straight from the ASGI scope.

    FastAPI's routing, middleware and dependency solving cost more CPU than storing a push
    (measured: over half the API's samples at 2,300 pushes/s); `worker.http.app` sends the three
    webhook routes here. A refusal answers as the route's HTTPException would, a database
    outage 503 (the provider retries).
    """
    request = Request(scope, receive)
    try:
        body = await verified_body(request, settings)
        response = await handler(request, body, settings, wake_reports)
    except HTTPException as exc:
        response = JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
    except OperationalError as exc:
        log.error("database unavailable during webhook %s: %s", scope["path"], exc)
        detail = {"detail": "the database is unavailable; retry later"}
        response = JSONResponse(detail, status_code=503)
    await response(scope, receive, send)


def _count(request: Request, outcome: str) -> None:
    """cascade_webhook_pushes_total by source (the path's last part) and outcome."""
    source = request.scope["path"].rstrip("/").rpartition("/")[2]
    WEBHOOK_PUSHES.labels(source if source in ("smsbat", "bulkgate") else "other", outcome).inc()


def _json(request: Request, body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _refuse(request, 400, f"malformed JSON: {exc}") from None


async def _accept(
    request: Request,
    results: Sequence[Parsed],
    settings: Settings,
    wake: Callable[[str], None],
) -> Response:
    """Store what parsed, then answer with a result per element.

    Reports go through the group committer (`worker.intake`): this request is answered
    once the transaction holding them has committed, shared with the requests that came
    in meanwhile. Inbound SMS (rare, each looked up against what we sent) are stored in a
    transaction of their own, in a thread.
    """
    received_at = utcnow()
    reports = [_priced(r, settings) for r in results if isinstance(r, Report)]
    inbound = [r for r in results if isinstance(r, Inbound)]
    rejected = [r.as_dict() for r in results if isinstance(r, ParseError)]
    engine = get_engine(settings.database_url)
    if reports:
        job = Job(reports, received_at, wake, settings.broker_url)
        await committer(engine).store(job)
    if inbound:
        await run_in_threadpool(store_inbound, engine, inbound, received_at, settings)
    _log(reports, inbound, rejected)
    _count(request, "accepted")
    answer = {"accepted": len(reports) + len(inbound), "rejected": rejected}
    return Response(orjson.dumps(answer), media_type="application/json")


def _priced(report: Report, settings: Settings) -> Report:
    """A BulkGate price in the unit BULKGATE_PRICE_CURRENCY names (the DLR names none)."""
    currency = settings.bulkgate_price_currency
    if report.source != "dlr" or currency is None or "cost" not in report.fields:
        return report
    return replace(report, fields={**report.fields, "rate_currency": currency.upper()})


def _log(reports: Sequence[Report], inbound: Sequence[Inbound], rejected: Sequence[Any]) -> None:
    """A line per request only when something was rejected (else DEBUG): at thousands of
    pushes a second, a line each cost more than storing them."""
    log.log(
        logging.INFO if rejected else logging.DEBUG,
        "webhook: %d reports, %d inbound SMS stored, %d rejected",
        len(reports),
        len(inbound),
        len(rejected),
    )
    for item in inbound:
        log.info("inbound SMS from %s stored", mask_phone(item.sender))
