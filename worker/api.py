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
from pydantic import BaseModel, ConfigDict, Field, SecretStr, WithJsonSchema
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from config import Settings, get_settings
from worker import exporter, logs, webhooks
from worker.campaigns import CampaignCancelled
from worker.db import NoSchema, get_engine, require_schema, utcnow
from worker.gauges import metrics_engine, read_backlog
from worker.health import beat_health
from worker.producer import MAX_CAMPAIGN_LENGTH, check_campaign, enqueue
from worker.reports import campaign_report, message_detail
from worker.states import State
from worker.validation import (
    MAX_CALLBACK_LATE_SECONDS,
    MAX_CALLBACK_TASK_LENGTH,
    MAX_CALLBACK_URL_LENGTH,
    MAX_FROM_NAME_LENGTH,
    MAX_ID_LENGTH,
    MAX_SURVEY_OPTION_LENGTH,
    MAX_SURVEY_OPTIONS,
    MAX_SURVEY_TEXT_LENGTH,
    MAX_TEXT_LENGTH,
    MAX_TTL_SECONDS,
    MESSAGE_TYPES,
    MIN_SURVEY_OPTIONS,
    ROUTES,
    campaign_callbacks,
)

log = logging.getLogger(__name__)

DESCRIPTION = """Hand messages to the cascade delivery worker and follow each to its final state.

`POST /v1/messages` takes the SMSBAT cascade API's own JSON array: point the payload you
already build for SMSBAT here. Every message gets a result of its own, in order; a message
that breaks a rule is `rejected` with every problem named, and never fails the others.

The `/v1` endpoints need `Authorization: Bearer <API_TOKEN>`; `/healthz` needs nothing.
"""

MAX_MESSAGES = 10_000
# Room for MAX_MESSAGES messages of about 6 KiB each (a 4096-character text in escaped
# Cyrillic); a bigger body is refused while it streams in, before anything is parsed.
MAX_BODY_BYTES = 64 * 1024 * 1024
BROKER_TIMEOUT_SECONDS = 2.0
JSON_KINDS: dict[type, str] = {
    dict: "an object",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}

ID_PATTERN = r"^[A-Za-z0-9._-]+$"
PHONE_PATTERN = r"^[+0-9][0-9 ()./-]{1,39}$"  # E.164, or national with phoneRegion
REGION_PATTERN = r"^[A-Za-z]{2}$"
NOT_BLANK_PATTERN = r"\S"  # unanchored: at least one character that is not whitespace
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
# Necessary, not sufficient: the worker also parses the URL (host, port).
CALLBACK_URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^ \x00-\x1f\x7f-\x9f]+$"
CALLBACK_TASK_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:-]*(@[A-Za-z0-9_.:-]+)?$"
# A query parameter refused is a 422 for the whole request, so its schema names a host and
# a port from 1 to 65535 exactly (a message's own callbackUrl is judged per message).
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
QUERY_CALLBACK_URL_PATTERN = (
    r"^https?://[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::" + _PORT + r")?"
    r"(?:[/?#][^ \x00-\x1f\x7f-\x9f]*)?$"
)
ISO_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?"
    r"(Z|[+-][0-9]{2}(:?[0-9]{2})?)$"
)

MessageType = Literal[MESSAGE_TYPES]  # type: ignore[valid-type]
Route = Literal[ROUTES]  # type: ignore[valid-type]
SurveyOption = Annotated[
    str, Field(min_length=1, max_length=MAX_SURVEY_OPTION_LENGTH, pattern=NOT_BLANK_PATTERN)
]
# The record's timestamps are ISO 8601 strings in UTC ending in Z, as `cascade --json` prints.
Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


# --- the request body, documented ------------------------------------------------------


def _message_type_in(*types: str) -> dict[str, Any]:
    return {"properties": {"messageType": {"enum": list(types)}}, "required": ["messageType"]}


class CascadeMessage(BaseModel):
    """One message in the cascade API's own format, plus our optional route and callbacks.

    The worker checks every rule per message: a message that breaks one gets a `rejected`
    result naming the field and the problem, and the others go on. `null` counts as
    absent. Rules no schema can state: `toPhone` must be a real number of its country's
    numbering plan, in canonical E.164; `scheduledSent` may lie at most
    SCHEDULE_PAST_SKEW_SECONDS (60) in the past and SCHEDULE_MAX_AHEAD_DAYS (30) ahead;
    `callbackLateAfter` needs a callback, on the message or on its campaign; an `id`
    already known answers `duplicate` and is not sent again.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "allOf": [
                {
                    "if": _message_type_in("viber_survey"),
                    "then": {
                        "required": ["text", "surveyOptions"],
                        "properties": {
                            "text": {"type": "string", "maxLength": MAX_SURVEY_TEXT_LENGTH},
                            "surveyOptions": {"type": "array"},
                        },
                    },
                    "else": {"properties": {"surveyOptions": {"type": "null"}}},
                },
                {
                    "if": _message_type_in("transaction", "promo"),
                    "then": {"required": ["text"], "properties": {"text": {"type": "string"}}},
                },
            ]
        },
    )

    id: str = Field(
        min_length=1,
        max_length=MAX_ID_LENGTH,
        pattern=ID_PATTERN,
        description="Your tracking id (the provider's trackinId); unique across all messages.",
    )
    fromName: str = Field(
        max_length=MAX_FROM_NAME_LENGTH,
        pattern=PRINTABLE_PATTERN,
        description="Sender name shown on the handset; no control characters.",
    )
    toPhone: str = Field(
        pattern=PHONE_PATTERN,
        description=(
            "Recipient in canonical E.164, valid for its country; with phoneRegion (or the "
            "DEFAULT_PHONE_REGION setting) also national ('067 123 4567') or without '+'."
        ),
        examples=["+380671234567"],
    )
    phoneRegion: str | None = Field(
        None,
        pattern=REGION_PATTERN,
        description=(
            "Two-letter country (ISO 3166) to read a national toPhone in; the number is "
            "sent in E.164. Default: the DEFAULT_PHONE_REGION setting."
        ),
        examples=["UA"],
    )
    messageType: MessageType = Field(description="Decides which other fields are required.")
    text: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEXT_LENGTH,
        pattern=NOT_BLANK_PATTERN,
        description=(
            "Required except for flashcall; at most "
            f"{MAX_SURVEY_TEXT_LENGTH} characters for viber_survey."
        ),
    )
    ttl: int | None = Field(
        None, ge=1, le=MAX_TTL_SECONDS, description="Seconds the provider may keep trying."
    )
    scheduledSent: str | None = Field(
        None,
        pattern=ISO_PATTERN,
        description="ISO 8601 date-time with a zone ('Z' or an offset): when to send.",
        examples=["2025-01-25T10:00:00Z"],
    )
    surveyOptions: list[SurveyOption] | None = Field(
        None,
        min_length=MIN_SURVEY_OPTIONS,
        max_length=MAX_SURVEY_OPTIONS,
        json_schema_extra={"uniqueItems": True},
        description="viber_survey only, and required there.",
    )
    route: Route | None = Field(
        "standard",
        description="Cascade endpoint: standard, or tg-viber (Telegram and Viber only).",
    )
    callbackUrl: str | None = Field(
        None,
        max_length=MAX_CALLBACK_URL_LENGTH,
        pattern=CALLBACK_URL_PATTERN,
        description="An http(s) URL with a host: the outcome is POSTed there, signed.",
    )
    callbackTask: str | None = Field(
        None,
        max_length=MAX_CALLBACK_TASK_LENGTH,
        pattern=CALLBACK_TASK_PATTERN,
        description="A Celery task sent by name with the outcome: 'name' or 'name@queue'.",
    )
    callbackLateAfter: int | None = Field(
        None,
        ge=1,
        le=MAX_CALLBACK_LATE_SECONDS,
        description="Seconds after which an undelivered message is reported late.",
    )


MESSAGES_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "array",
                "maxItems": MAX_MESSAGES,
                "items": CascadeMessage.model_json_schema(),
                "examples": [
                    [
                        {
                            "id": "order-1001",
                            "fromName": "Shop",
                            "toPhone": "+380671234567",
                            "messageType": "transaction",
                            "text": "Your order is on its way",
                            "ttl": 3600,
                        }
                    ]
                ],
                "description": (
                    f"At most {MAX_MESSAGES:,} messages and {MAX_BODY_BYTES // 2**20} MiB."
                ),
            }
        }
    },
}


# --- answers -----------------------------------------------------------------------------


class ErrorBody(BaseModel):
    """Why a whole request was refused."""

    detail: str


class ValidationProblem(BaseModel):
    model_config = ConfigDict(extra="allow")

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    """A malformed request: where (`loc`) and what (`msg`), FastAPI's own shape."""

    detail: list[ValidationProblem]


class FieldProblem(BaseModel):
    field: str = Field(description="The cascade API's field name, e.g. toPhone.")
    problem: str


class EnqueueResult(BaseModel):
    """What became of one message: `worker.producer.EnqueueResult.as_dict()`, documented."""

    id: str | None = Field(description="The message's id; null when it had no usable id.")
    status: Literal["accepted", "duplicate", "rejected", "valid"] = Field(
        description="`valid`: a dry run (dryRun=true) would accept it; nothing was stored."
    )
    smsParts: int | None = Field(None, description="Dry run: SMS parts the text takes.")
    encoding: Literal["GSM-7", "UCS-2"] | None = Field(
        None, description="Dry run: GSM-7 (160/153 a part) or UCS-2 (70/67 a part)."
    )
    state: State | None = Field(
        description="queued when accepted (held when its campaign is held, paused or "
        "metered); the known message's state."
    )
    errors: list[FieldProblem] = Field(
        default_factory=list, description="Present only when rejected: every problem found."
    )


class MessageError(BaseModel):
    code: str
    message: str | None


class MessageEvent(BaseModel):
    at: Timestamp
    source: str = Field(description="send, poll, webhook, dlr or system.")
    from_: State | None = Field(alias="from")
    to: State
    detail: str | None


class MessageDetail(BaseModel):
    """One message: its state, every provider field, and its event history."""

    id: str
    campaign: str | None
    state: State
    final: bool
    messageId: str | None = Field(description="The provider's id, once sent.")
    route: Route
    messageType: MessageType
    deliverystatus: str | None
    partscount: int | None
    cost: float | None
    messagelistId: int | None
    fallbacks: list[dict[str, Any]] | None
    extendedStatuses: dict[str, Any] | None = Field(description="Status per cascade channel.")
    rate: float | None
    rateAmount: float | None
    rateCurrency: str | None
    billAmount: float | None
    billCurrency: str | None
    attempts: int
    unknownOutcomes: int = Field(description="Sends whose answer was lost.")
    polls: int
    error: MessageError | None
    createdAt: Timestamp
    submittedAt: Timestamp | None
    finalAt: Timestamp | None
    finalSource: str | None
    events: list[MessageEvent]


class Money(BaseModel):
    cost: float
    bill: float
    messages: int
    note: str | None = Field(None, description="Why the currency is unknown (currency 'unknown').")


class Percentiles(BaseModel):
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


class Latency(BaseModel):
    submit_to_final: Percentiles
    enqueue_to_final: Percentiles


class TopError(BaseModel):
    code: str
    count: int


class CampaignLimits(BaseModel):
    daily_cap: int | None = Field(description="Messages released per UTC day at most.")
    rate: float | None = Field(description="Messages/s for this campaign at most.")
    released_today: int


class CampaignControl(BaseModel):
    """Whether a campaign is sending: held for approval, paused (and why), or running."""

    status: Literal["running", "held", "paused", "capped", "cancelled"]
    held_since: Timestamp | None
    paused_since: Timestamp | None
    pause_reason: str | None
    held_messages: int = Field(
        description="Unsent messages waiting for approve, resume or their cap and rate."
    )
    limits: CampaignLimits


class CampaignAction(CampaignControl):
    campaign: str
    held_now: int | None = Field(None, description="Messages held by this pause or hold.")
    released_now: int | None = Field(
        None, description="Messages back in the queue by this resume or approve."
    )


class CampaignReport(BaseModel):
    """A campaign in figures: what `cascade campaign report NAME --json` prints."""

    campaign: str
    total: int
    states: dict[State, int]
    final: int
    all_final: bool
    sent: int = Field(description="Messages the provider gave a messageId.")
    delivered: int
    delivery_rate: float = Field(ge=0, le=1, description="delivered / total")
    delivery_rate_of_sent: float = Field(ge=0, le=1, description="delivered / sent")
    cost: float | None = Field(
        description="Total cost when every amount is in one currency; null when there are "
        "several (they are never added: see `money`)."
    )
    cost_currency: str | None = Field(None, description="The currency of `cost`, if known.")
    unknown_outcomes: int
    polls: int
    finals_by_source: dict[str, int]
    first_enqueued_at: Timestamp
    last_final_at: Timestamp | None
    money: dict[str, Money] = Field(description="Cost and bill per currency.")
    channels: dict[str, int] = Field(description="Messages per delivering channel.")
    latency_seconds: Latency
    top_errors: list[TopError]
    waiting_for_time: int = Field(
        0, description="Of queued: scheduled messages kept here until shortly before their time."
    )
    waiting_for_window: int = Field(
        0, description="Of queued: promo and surveys waiting for the recipient's send window."
    )
    control: CampaignControl | None = None


class Health(BaseModel):
    database: Literal["ok", "unavailable"]
    broker: Literal["ok", "unavailable"]
    beat: Literal["ok", "stale", "unknown"] = Field(
        "unknown",
        description="stale: no periodic task sent for HEALTH_BEAT_MAX_AGE_SECONDS; "
        "unknown: beat never ticked (or its record expired after a day).",
    )
    beat_last_tick: Timestamp | None = None
    queue: Literal["ok", "stuck", "unknown"] = Field(
        "unknown",
        description="stuck: a message ready to send has waited HEALTH_QUEUE_MAX_AGE_SECONDS.",
    )
    oldest_queued_seconds: float | None = Field(
        None, description="How long the oldest message ready to send has waited."
    )


# --- dependencies ------------------------------------------------------------------------


def app_settings(request: Request) -> Settings:
    """The settings `create_app` was given; a dependency so tests can override them."""
    return request.app.state.settings


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
            description="Validate only: each message is answered `valid` (with its SMS parts "
            "and encoding) or `rejected`; nothing is stored or sent.",
        ),
    ] = False,
) -> Any:
    """Answer one result per message, in order: accepted, duplicate (the id is known, and
    `state` says where that message is) or rejected with every problem found. One bad
    message never fails the request."""
    body = await read_body(request)
    callbacks = (callback_url, callback_task)
    if dry_run:
        return await run_in_threadpool(dry_intake, body, settings)
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
    """What `cascade campaign report NAME --json` prints."""
    report = campaign_report(get_engine(settings.database_url), campaign)
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
    from worker import campaigns as control

    engine = get_engine(settings.database_url)
    run = {
        "pause": lambda: control.pause_campaign(engine, campaign),
        "hold": lambda: control.hold_campaign(engine, campaign),
        "resume": lambda: control.resume_campaign(engine, campaign, settings.broker_url),
        "approve": lambda: control.approve_campaign(engine, campaign, settings.broker_url),
    }[action]
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
        from worker.quiet import checked_window

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
            from worker.campaigns import hold_campaign

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


def dry_intake(body: bytes, settings: Settings) -> list[dict[str, Any]]:
    """What POST /v1/messages would answer, with each valid message's SMS parts; nothing is
    stored. Like the real intake it answers `duplicate` for a known id and refuses a promo or
    survey to a number on the suppression list (two reads)."""
    from sqlalchemy import select

    from worker.consent import REFUSED, listed
    from worker.db import among
    from worker.estimate import sms_parts
    from worker.models import messages
    from worker.producer import rules_from
    from worker.validation import FieldError, validate_message

    now, rules = utcnow(), rules_from(settings)
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
        result = {"id": checked.id, "status": "valid", "state": None}
        if checked.message_type != "flashcall":
            result |= {"smsParts": parts, "encoding": encoding}
        results.append(result)
    return results


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


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, without the `input` it echoes: a refused `callbackUrl` may carry a
    password (`loc` and `msg` still name the parameter and the problem)."""
    problems = [{k: v for k, v in e.items() if k != "input"} for e in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(problems)}, status_code=422)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A database outage is temporary: 503 tells producers to retry, a 500 would not."""
    log.error("database unavailable during %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": "the database is unavailable; retry later"}, status_code=503)


# --- the app -------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
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
    from worker.consent_api import router as consent_router  # it imports this module

    app.include_router(consent_router)
    from worker.live_page import router as pages_router  # it imports this module too

    app.include_router(pages_router)
    app.include_router(probes)
    app.include_router(webhooks.router)
    app.include_router(exporter.router)
    _documentation(app)
    return app


DOCS_ASSETS = "/docs-assets"


def _documentation(app: FastAPI) -> None:
    """Swagger UI (/docs) and ReDoc (/redoc) from files in the package (worker/static):
    no CDN, so they work offline and tell no third party who reads them."""
    app.mount(DOCS_ASSETS, StaticFiles(packages=[("worker", "static")]), name="docs-assets")
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


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the API under uvicorn. Without API_TOKEN no producer could ever be let in,
    so refuse to start rather than serve an API that answers 401 to everyone."""
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
        create_app(settings),
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        log_config=logs.uvicorn_log_config(settings.log_format) or uvicorn.config.LOGGING_CONFIG,
    )
