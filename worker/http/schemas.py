"""The API's documented bodies: the cascade message as a producer sends it, and every answer.

FastAPI builds the OpenAPI schema (/docs, /redoc, /openapi.json) from these models; the
routes (worker/http/app.py) validate messages with worker/core/validation.py, so the
patterns and limits here document the same rules.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from worker.core.states import State
from worker.core.validation import (
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
)

MAX_MESSAGES = 10_000
# Room for MAX_MESSAGES messages of about 6 KiB each (a 4096-character text in escaped
# Cyrillic); a bigger body is refused while it streams in, before anything is parsed.
MAX_BODY_BYTES = 64 * 1024 * 1024

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
    """What became of one message: `worker.flows.producer.EnqueueResult.as_dict()`, documented."""

    id: str | None = Field(description="The message's id; null when it had no usable id.")
    status: Literal["accepted", "duplicate", "rejected", "valid"] = Field(
        description="`valid`: a dry run (dryRun=true) would accept it; nothing was stored."
    )
    smsParts: int | None = Field(None, description="Dry run: SMS parts the text takes.")
    cost: float | None = Field(
        None,
        description="Dry run with a RATE_CARD: the message's price in RATE_CARD_CURRENCY "
        "(per SMS part on SMS); null where the card has no rate for it.",
    )
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


class SendingPause(BaseModel):
    """All sending stopped by the provider's answers: every campaign waits, "running" or not."""

    paused_for_seconds: float = Field(description="About how long the pause has left.")
    reason: str = Field(
        description="What caused it: a 429, refused credentials, or the provider failing."
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
    analytics_as_of: Timestamp = Field(
        description="When `channels`, `latency_seconds` and `top_errors` were computed: they "
        "read the campaign's messages, so the API keeps them per process and computes them "
        "again once older than 10 × what they took (seconds at a million messages). The "
        "counts are always current. The CLI computes them on the spot."
    )
    analytics_age_seconds: float = Field(ge=0, description="Seconds since `analytics_as_of`.")
    waiting_for_time: int = Field(
        0, description="Of queued: scheduled messages kept here until shortly before their time."
    )
    waiting_for_window: int = Field(
        0, description="Of queued: promo and surveys waiting for the recipient's send window."
    )
    control: CampaignControl | None = None
    sending: SendingPause | None = Field(
        None, description="Set while a 429 or an open circuit stops every send; else null."
    )


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
