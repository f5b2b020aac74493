"""The HTTP API: producers hand over messages and read back what became of them.

`POST /v1/messages` takes the cascade API's own JSON array, so a producer can point the
payload it already builds for SMSBAT at us. Each message is checked by `validate_message`,
not by the request schema, so one bad message earns a `rejected` result naming its field
and never fails the others; the OpenAPI document still describes every field and rule.
Producer endpoints need `Authorization: Bearer <API_TOKEN>`; `/healthz` is open to probes.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Annotated, Any, Literal

import redis
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, SecretStr
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from config import Settings, get_settings
from worker.core.estimate import Estimate
from worker.core.quiet import checked_window
from worker.core.states import State
from worker.core.validation import (
    MAX_CALLBACK_TASK_LENGTH,
    MAX_CALLBACK_URL_LENGTH,
    MAX_ID_LENGTH,
    campaign_callbacks,
)
from worker.flows.campaigns import CampaignCancelled
from worker.flows.producer import MAX_CAMPAIGN_LENGTH, check_campaign, enqueue
from worker.http import webhooks
from worker.http.schemas import (
    CALLBACK_TASK_PATTERN,
    ID_PATTERN,
    MAX_BODY_BYTES,
    MAX_MESSAGES,
    MESSAGES_BODY,
    PRINTABLE_PATTERN,
    QUERY_CALLBACK_URL_PATTERN,
    CampaignAction,
    CampaignReport,
    EnqueueResult,
    ErrorBody,
    Health,
    MessageDetail,
    ValidationErrorBody,
)
from worker.observe import exporter, logs
from worker.observe.gauges import metrics_engine, read_backlog
from worker.observe.health import beat_health
from worker.ops import cache
from worker.ops.reports import campaign_report, message_detail
from worker.store.db import NoSchema, get_engine, require_schema, utcnow

log = logging.getLogger(__name__)

DESCRIPTION = """Hand messages to the cascade delivery worker and follow each to its final state.

`POST /v1/messages` takes the SMSBAT cascade API's own JSON array: point the payload you
already build for SMSBAT here. Every message gets a result of its own, in order; a message
that breaks a rule is `rejected` with every problem named, and never fails the others.

The `/v1` endpoints need `Authorization: Bearer <API_TOKEN>`; `/healthz` needs nothing.
"""

BROKER_TIMEOUT_SECONDS = 2.0
JSON_KINDS: dict[type, str] = {
    dict: "an object",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}

# --- dependencies ------------------------------------------------------------------------


def app_settings(request: Request) -> Settings:
    """The settings `create_app` was given; a dependency so tests can override them."""
    settings = request.app.state.settings
    assert isinstance(settings, Settings)
    return settings


SettingsDep = Annotated[Settings, Depends(app_settings)]

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiToken",
    description="The API_TOKEN setting, sent as `Authorization: Bearer <API_TOKEN>`.",
)


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value else ""


def require_token(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    settings: SettingsDep,
) -> None:
    """Constant-time comparison, so timing tells nothing about the token."""
    expected = _secret(settings.api_token).encode()
    given = credentials.credentials.encode() if credentials else b""
    if not (expected and hmac.compare_digest(given, expected)):
        raise HTTPException(
            401,
            "missing or wrong token: send Authorization: Bearer <API_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )


# --- responses documented per route ----------------------------------------------------------


def _error(description: str, model: type[BaseModel] = ErrorBody) -> dict[str, Any]:
    return {"model": model, "description": description}


UNAUTHORIZED = _error("No bearer token, or not API_TOKEN.") | {
    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}
}
UNAVAILABLE = _error("The database is unreachable; retry later.")


# --- routes ------------------------------------------------------------------------------

producers = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])


@producers.post(
    "/messages",
    tags=["messages"],
    summary="Queue messages",
    response_model=list[EnqueueResult],
    response_model_exclude_unset=True,
    openapi_extra={"requestBody": MESSAGES_BODY},
    responses={
        400: _error("The body is not JSON."),
        401: UNAUTHORIZED,
        409: _error("The campaign was cancelled: it takes no new messages."),
        413: _error(
            f"More than {MAX_MESSAGES:,} messages, or a body over "
            f"{MAX_BODY_BYTES // 2**20} MiB: split the batch."
        ),
        415: _error("The Content-Type is not application/json."),
        422: _error(
            "The body is not a JSON array, or the campaign name is invalid.", ValidationErrorBody
        ),
        503: UNAVAILABLE,
    },
)
async def post_messages(
    request: Request,
    response: Response,
    settings: SettingsDep,
    campaign: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_CAMPAIGN_LENGTH,
            pattern=PRINTABLE_PATTERN,
            description="Enqueue under this campaign (reports, cancel); no control characters.",
            examples=["orders"],
        ),
    ] = None,
    callback_url: Annotated[
        str | None,
        Query(
            alias="callbackUrl",
            max_length=MAX_CALLBACK_URL_LENGTH,
            pattern=QUERY_CALLBACK_URL_PATTERN,
            description="Outcome callback URL for messages without their own "
            "(stored on the campaign when one is given). See docs/callbacks.md.",
        ),
    ] = None,
    callback_task: Annotated[
        str | None,
        Query(
            alias="callbackTask",
            max_length=MAX_CALLBACK_TASK_LENGTH - len("@celery"),
            pattern=CALLBACK_TASK_PATTERN,
            description="Celery task (`name` or `name@queue`) sent every outcome, for "
            "messages without their own.",
        ),
    ] = None,
    hold: Annotated[
        bool,
        Query(
            description="Hold the campaign for approval before storing: nothing of it is "
            "sent until POST /v1/campaign-actions/approve/{campaign}. Needs `campaign`."
        ),
    ] = False,
    send_window: Annotated[
        str | None,
        Query(
            alias="sendWindow",
            max_length=32,
            pattern=r"^\s*([Oo][Ff][Ff]|[Nn][Oo][Nn][Ee]|\d{1,2}:\d{2}\s*-\s*\d{1,2}:\d{2})\s*$",
            description="The campaign's quiet hours for promo and surveys, `HH:MM-HH:MM` in "
            "the recipient's local time (over SEND_WINDOW and SEND_WINDOW_BY_TYPE), or "
            "`none`/`off` for none; stored with the campaign. Needs `campaign`.",
            examples=["09:00-20:00"],
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        Query(
            alias="dryRun",
            description="Validate only: each message is answered `valid` (with its SMS parts, "
            "encoding and, with a RATE_CARD, its cost) or `rejected`; nothing is stored or "
            "sent. The totals come as headers: X-Estimate-Messages, X-Estimate-SMS-Parts, "
            "X-Estimate-Cost and X-Estimate-Currency (with a RATE_CARD), "
            "X-Estimate-Unpriced (valid messages the card has no rate for).",
        ),
    ] = False,
) -> Any:
    """Answer one result per message, in order: accepted, duplicate (the id is known, and
    `state` says where that message is) or rejected with every problem found. One bad
    message never fails the request."""
    body = await read_body(request)
    callbacks = (callback_url, callback_task)
    if dry_run:
        results, estimate = await run_in_threadpool(dry_intake, body, settings)
        response.headers.update(estimate_headers(estimate, settings))
        return results
    return await run_in_threadpool(intake, body, campaign, callbacks, settings, hold, send_window)


@producers.get(
    "/messages/{id}",
    tags=["messages"],
    summary="One message and its history",
    response_model=MessageDetail,
    responses={
        401: UNAUTHORIZED,
        404: _error("No message has this id."),
        422: _error("The id cannot be a message id.", ValidationErrorBody),
        503: UNAVAILABLE,
    },
)
def get_message(
    id: Annotated[
        str,
        Path(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN, examples=["order-1001"]),
    ],
    settings: SettingsDep,
) -> Any:
    """What `cascade message show ID --json` prints."""
    detail = message_detail(get_engine(settings.database_url), id)
    if detail is None:
        raise HTTPException(404, f"no message with id {id!r}")
    return detail


@producers.get(
    "/campaigns/{campaign:path}",
    tags=["campaigns"],
    summary="A campaign's report",
    response_model=CampaignReport,
    responses={
        401: UNAUTHORIZED,
        404: _error("No stored message has this campaign."),
        422: _error("The name cannot be a campaign name.", ValidationErrorBody),
        503: UNAVAILABLE,
    },
)
def get_campaign(
    campaign: Annotated[
        str,
        Path(
            min_length=1,
            max_length=MAX_CAMPAIGN_LENGTH,
            pattern=PRINTABLE_PATTERN,  # a NUL would reach PostgreSQL and fail there (500)
            examples=["orders"],
        ),
    ],
    settings: SettingsDep,
) -> Any:
    """What `cascade campaign report NAME --json` prints, the counts current and the
    channels, latency and errors kept a while per process (`analytics_age_seconds`)."""
    engine = get_engine(settings.database_url)
    # The row scans: recomputed once older than 10 × what they took (seconds at a million
    # messages), shared with the live page; the counts come from the tallies every time.
    report = campaign_report(engine, campaign, settings.broker_url, figures=cache.FIGURES)
    if report is None:
        raise HTTPException(404, f"no campaign named {campaign!r}")
    return report


@producers.post(
    # Not under /campaigns/{campaign:path}: that GET route's greedy name would also match
    # "NAME/pause", and OPTIONS there would answer Allow: GET.
    "/campaign-actions/{action}/{campaign:path}",
    tags=["campaigns"],
    summary="Pause, resume, hold or approve a campaign",
    response_model=CampaignAction,
    response_model_exclude_none=False,
    responses={
        401: UNAUTHORIZED,
        404: _error("No campaign has this name."),
        409: _error("The campaign was cancelled, or is not paused (resume) or held (approve)."),
        422: _error("The name cannot be a campaign name.", ValidationErrorBody),
        503: UNAVAILABLE,
    },
)
def control_campaign(
    campaign: Annotated[
        str,
        Path(
            min_length=1,
            max_length=MAX_CAMPAIGN_LENGTH,
            pattern=PRINTABLE_PATTERN,
            examples=["orders"],
        ),
    ],
    action: Annotated[
        Literal["pause", "resume", "hold", "approve"],
        Path(description="pause/resume; hold/approve (hold for approval, then send)."),
    ],
    settings: SettingsDep,
) -> Any:
    """`pause` and `hold` stop the unsent messages (those with the provider are still
    followed); `resume` and `approve` send them again. What `cascade campaign ACTION NAME
    --json` prints."""
    from worker.flows import campaigns as control

    engine = get_engine(settings.database_url)
    controls: dict[str, Callable[[], dict[str, Any] | None]] = {
        "pause": lambda: control.pause_campaign(engine, campaign),
        "hold": lambda: control.hold_campaign(engine, campaign),
        "resume": lambda: control.resume_campaign(engine, campaign, settings.broker_url),
        "approve": lambda: control.approve_campaign(engine, campaign, settings.broker_url),
    }
    run = controls[action]
    try:
        result = run()
    except ValueError as exc:  # cancelled, or not paused / not held
        raise HTTPException(409, str(exc)) from None
    if result is None:
        raise HTTPException(404, f"no campaign named {campaign!r}")
    return {"campaign": campaign, **result}


probes = APIRouter(tags=["health"])


@probes.get(
    "/healthz",
    summary="Database and broker reachable, beat ticking, the queue moving",
    response_model=Health,
    responses={503: {"model": Health, "description": "Something is unavailable, stale or stuck."}},
)
def healthz(settings: SettingsDep, response: Response) -> Health:
    """A `SELECT 1` and a Redis PING, beat's last tick and the oldest ready message's age;
    no token, so load balancers and orchestrators can probe it."""
    health = Health(
        database=_probe("database", _ping_database, settings.database_url),
        broker=_probe("broker", _ping_broker, settings.broker_url),
    )
    if health.broker == "ok":
        _beat_health(health, settings)
    if health.database == "ok":
        _queue_health(health, settings)
    down = "unavailable" in (health.database, health.broker)
    if down or health.beat == "stale" or health.queue == "stuck":
        response.status_code = 503
    return health


# --- the work behind the routes ------------------------------------------------------------


async def read_body(request: Request) -> bytes:
    """Read at most MAX_BODY_BYTES: an oversized body is refused before it fills memory."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if not _is_json(media_type):
        raise HTTPException(415, "send the messages as Content-Type: application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    return bytes(body)


def _is_json(media_type: str) -> bool:
    """application/json or a +json type, as FastAPI requires of JSON bodies."""
    kind, _, subtype = media_type.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def intake(
    body: bytes,
    campaign: str | None,
    callbacks: tuple[str | None, str | None],
    settings: Settings,
    hold: bool = False,
    send_window: str | None = None,
) -> list[dict[str, Any]]:
    """Parse and enqueue, off the event loop: both are CPU or database work."""
    messages = parse_messages(body)
    try:
        check_campaign(campaign)
    except ValueError as exc:
        raise _invalid(["query", "campaign"], str(exc), "value_error") from None
    problem: dict[str, str] | None = None
    if hold and campaign is None:  # each message refused (a 422 would fail schema-valid input)
        problem = {"field": "hold", "problem": "needs ?campaign=NAME: a campaign to approve"}
    elif send_window is not None:  # the same
        try:
            send_window = checked_window(send_window, "sendWindow")
        except ValueError as exc:
            problem = {"field": "sendWindow", "problem": str(exc)}
        if problem is None and campaign is None:
            problem = {"field": "sendWindow", "problem": "needs ?campaign=NAME: it is stored there"}
    if problem is not None:
        return [
            _answerable(
                {
                    "id": m.get("id") if isinstance(m, dict) and isinstance(m.get("id"), str)
                    else None,
                    "status": "rejected",
                    "state": None,
                    "errors": [problem],
                }
            )
            for m in messages
        ]  # fmt: skip
    url, task = callbacks
    for name, value in (("callbackUrl", (url, None)), ("callbackTask", (None, task))):
        try:
            campaign_callbacks(*value)
        except ValueError as exc:
            raise _invalid(["query", name], str(exc), "value_error") from None
    try:
        if hold and campaign is not None:
            from worker.flows.campaigns import hold_campaign

            hold_campaign(get_engine(settings.database_url), campaign, create=True)
        results = enqueue(
            messages,
            campaign,
            settings=settings,
            callback_url=url,
            callback_task=task,
            send_window=send_window,
        )
    except CampaignCancelled as exc:
        raise HTTPException(409, str(exc)) from None
    return [_answerable(result.as_dict()) for result in results]


def estimate_headers(estimate: Estimate, settings: Settings) -> dict[str, str]:
    """A dry run's totals, beside its per-message answers (the body stays a list)."""
    headers = {
        "X-Estimate-Messages": str(estimate.messages),
        "X-Estimate-SMS-Parts": str(estimate.parts),
    }
    if settings.rates is not None:
        headers["X-Estimate-Unpriced"] = str(estimate.messages - estimate.priced)
        headers["X-Estimate-Cost"] = f"{estimate.cost:.4f}"
        headers["X-Estimate-Currency"] = settings.rate_card_currency or "unknown"
    return headers


def dry_intake(body: bytes, settings: Settings) -> tuple[list[dict[str, Any]], Estimate]:
    """What POST /v1/messages would answer, with each valid message's SMS parts (and cost
    by the rate card), and their totals; nothing is stored. Like the real intake it answers
    `duplicate` for a known id and refuses a promo or survey to a number on the suppression
    list (two reads)."""
    from sqlalchemy import select

    from worker.core.estimate import message_cost, sms_parts
    from worker.core.validation import FieldError, validate_message
    from worker.flows.consent import REFUSED, listed
    from worker.flows.producer import rules_from
    from worker.store.db import among
    from worker.store.models import messages

    now, rules = utcnow(), rules_from(settings)
    card, estimate = settings.rates, Estimate()
    raws = parse_messages(body)
    all_checked = [validate_message(raw, now=now, rules=rules) for raw in raws]
    valid = [c for c in all_checked if not isinstance(c, list)]
    types = settings.suppressed_types
    with get_engine(settings.database_url).connect() as conn:
        known = dict(
            conn.execute(
                select(messages.c.id, messages.c.state).where(
                    among(conn, messages.c.id, [c.id for c in valid])
                )
            ).all()
            if valid
            else []
        )
        subject = [c.to_phone for c in valid if c.message_type in types]
        suppressed = listed(conn, subject) if subject else set()
    results = []
    seen: set[str] = set()
    for raw, checked in zip(raws, all_checked, strict=True):
        # In the real intake's order: a repeat within the body, the list, a stored id.
        if not isinstance(checked, list):
            if checked.id in seen:
                results.append({"id": checked.id, "status": "duplicate", "state": State.QUEUED})
                continue
            seen.add(checked.id)
            if checked.message_type in types and checked.to_phone in suppressed:
                checked = [FieldError("toPhone", REFUSED.format(kind=checked.message_type))]
            elif checked.id in known:
                results.append(
                    {"id": checked.id, "status": "duplicate", "state": known[checked.id]}
                )
                continue
        if isinstance(checked, list):
            raw_id = raw.get("id") if isinstance(raw, dict) else None
            shown = raw_id if isinstance(raw_id, str) else None
            errors = [e.as_dict() for e in checked]
            results.append(
                _answerable({"id": shown, "status": "rejected", "state": None, "errors": errors})
            )
            continue
        encoding, _, parts = sms_parts(checked.text)
        result: dict[str, Any] = {"id": checked.id, "status": "valid", "state": None}
        if checked.message_type != "flashcall":
            result |= {"smsParts": parts, "encoding": encoding}
        if card is not None:
            cost = message_cost(checked, card)
            result["cost"] = None if cost is None else round(cost, 4)
        estimate.add(checked, card)
        results.append(result)
    return results, estimate


def _answerable(result: dict[str, Any]) -> dict[str, Any]:
    """A rejected id echoed back must be encodable as UTF-8, or the whole answer fails (500);
    one with a lone surrogate is answered as no usable id, its `id` error says why."""
    try:
        (result["id"] or "").encode("utf-8")
    except UnicodeEncodeError:
        result["id"] = None
    return result


def parse_messages(body: bytes) -> list[Any]:
    """The JSON array, items untouched: each item is judged by `validate_message`.

    The standard library keeps big integers exact (orjson turns them into floats), so a
    producer's mistake is reported as what it sent.
    """
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise HTTPException(400, "the body is nested too deeply") from None
    if not isinstance(data, list):
        got = JSON_KINDS.get(type(data), "a value")
        raise _invalid(["body"], f"must be a JSON array of message objects, got {got}")
    if len(data) > MAX_MESSAGES:
        raise _too_large()
    return data


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _too_large() -> HTTPException:
    return HTTPException(
        413,
        f"at most {MAX_MESSAGES:,} messages and {MAX_BODY_BYTES // 2**20} MiB per request; "
        "split the batch",
    )


def _invalid(loc: list[str | int], msg: str, kind: str = "list_type") -> RequestValidationError:
    """A refusal in FastAPI's own 422 shape, so every 422 reads alike."""
    return RequestValidationError([{"type": kind, "loc": loc, "msg": msg}])


def _probe(name: str, check: Callable[[str], None], url: str) -> Literal["ok", "unavailable"]:
    try:
        check(url)
    except Exception as exc:  # any failure means unavailable; the log says which
        log.warning("healthz: the %s is unavailable: %s", name, exc)
        return "unavailable"
    return "ok"


def _beat_health(health: Health, settings: Settings) -> None:
    try:
        beat = beat_health(settings.broker_url, settings.health_beat_max_age_seconds)
    except Exception as exc:
        log.warning("healthz: beat's tick unreadable: %s", type(exc).__name__)
        return
    health.beat = beat.status  # type: ignore[assignment]
    if beat.last_tick is not None:
        stamp = datetime.fromtimestamp(beat.last_tick, UTC)
        health.beat_last_tick = stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


def _queue_health(health: Health, settings: Settings) -> None:
    try:
        backlog = read_backlog(metrics_engine(settings.database_url))
    except Exception as exc:
        log.warning("healthz: backlog unreadable: %s", type(exc).__name__)
        return
    health.oldest_queued_seconds = round(backlog.oldest_queued_seconds, 3)
    stuck = backlog.oldest_queued_seconds >= settings.health_queue_max_age_seconds
    health.queue = "stuck" if stuck else "ok"


def _ping_database(url: str) -> None:
    with get_engine(url).connect() as conn:
        conn.execute(text("SELECT 1"))


def _ping_broker(url: str) -> None:
    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=BROKER_TIMEOUT_SECONDS,
        socket_timeout=BROKER_TIMEOUT_SECONDS,
    )
    try:
        client.ping()
    finally:
        client.close()


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, without the `input` it echoes: a refused `callbackUrl` may carry a
    password (`loc` and `msg` still name the parameter and the problem)."""
    assert isinstance(exc, RequestValidationError)  # registered for it alone
    problems = [{k: v for k, v in e.items() if k != "input"} for e in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(problems)}, status_code=422)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A database outage is temporary: 503 tells producers to retry, a 500 would not."""
    log.error("database unavailable during %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": "the database is unavailable; retry later"}, status_code=503)


# --- the app -------------------------------------------------------------------------------


class CascadeAPI(FastAPI):
    """FastAPI, with the webhook routes answered on the lean path (`webhooks.serve_lean`):
    at thousands of pushes a second, routing and dependency solving cost more than the push.
    With dependency overrides set (tests), every request takes the full path."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.dependency_overrides:
            handler = webhooks.LEAN_ROUTES.get((scope["method"], scope["path"]))
            if handler is not None:
                await webhooks.serve_lean(handler, self.state.settings, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    app = CascadeAPI(
        title="Cascade delivery worker",
        version=version("cascade-worker"),
        description=DESCRIPTION,
        docs_url=None,  # served by _documentation, from the package
        redoc_url=None,
    )
    app.state.settings = settings or get_settings()
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.include_router(producers)
    from worker.http.consent_api import router as consent_router  # it imports this module

    app.include_router(consent_router)
    from worker.http.live_page import router as pages_router  # it imports this module too

    app.include_router(pages_router)
    app.include_router(probes)
    app.include_router(webhooks.router)
    app.include_router(exporter.router)
    _documentation(app)
    return app


DOCS_ASSETS = "/docs-assets"


def _documentation(app: FastAPI) -> None:
    """Swagger UI (/docs) and ReDoc (/redoc) from files in the package (worker/http/static):
    no CDN, so they work offline and tell no third party who reads them."""
    app.mount(DOCS_ASSETS, StaticFiles(packages=[("worker.http", "static")]), name="docs-assets")
    favicon = f"{DOCS_ASSETS}/swagger-ui/favicon-32x32.png"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title}: API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=favicon,
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title}: API",
            redoc_js_url=f"{DOCS_ASSETS}/redoc/redoc.standalone.js",
            redoc_favicon_url=favicon,
            with_google_fonts=False,
        )


def serving_app() -> FastAPI:
    """The app of one of `cascade api --workers N`'s processes (uvicorn imports it there);
    the settings come from the environment, as the parent's did."""
    settings = get_settings()
    logs.configure(settings.log_format)
    return create_app(settings)


def serve(settings: Settings, host: str, port: int, workers: int = 1) -> None:
    """Run the API under uvicorn, in `workers` processes sharing the port. Without
    API_TOKEN no producer could ever be let in, so refuse to start rather than serve an
    API that answers 401 to everyone."""
    logs.configure(settings.log_format)
    if not _secret(settings.api_token):
        raise SystemExit(
            "refusing to start the API: API_TOKEN is not set "
            "(producers send it as Authorization: Bearer <API_TOKEN>)"
        )
    try:
        require_schema(settings.database_url)
    except NoSchema as exc:
        raise SystemExit(f"refusing to start the API: {exc}") from None
    except OperationalError as exc:  # down for now: /healthz and the routes answer 503
        log.warning("the database is unreachable at start: %s", str(exc.orig).splitlines()[0])
    if not _secret(settings.webhook_token):
        log.warning("WEBHOOK_TOKEN is not set: provider webhooks cannot be authenticated")
    # No access log: BulkGate can only send its token in the URL (?token=…).
    uvicorn.run(
        create_app(settings) if workers == 1 else "worker.http.app:serving_app",
        factory=workers > 1,
        workers=workers if workers > 1 else None,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        log_config=logs.uvicorn_log_config(settings.log_format) or uvicorn.config.LOGGING_CONFIG,
    )
