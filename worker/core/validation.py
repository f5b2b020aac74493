"""Validation of one outgoing cascade message, before it is queued.

Pure functions, no I/O: a message refused here never costs a provider round trip, and a
provider 400 refuses the whole batch, so every rule of the cascade API is checked up front.
Where the provider documentation is silent, the rules are strict and say so clearly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import phonenumbers

from worker.core.phones import surely_valid
from worker.core.redact import mask_url

MESSAGE_TYPES = ("transaction", "promo", "viber_survey", "flashcall")
ROUTES = ("standard", "tg-viber")
URGENT_TYPES = frozenset({"transaction", "flashcall"})  # claimed before promo and survey

MAX_ID_LENGTH = 254  # the provider: "< 255 characters"
MAX_FROM_NAME_LENGTH = 64
MAX_TEXT_LENGTH = 4096
MAX_SURVEY_TEXT_LENGTH = 85  # the provider: "maximum survey text: 85 characters"
MIN_SURVEY_OPTIONS, MAX_SURVEY_OPTIONS = 2, 5
MAX_SURVEY_OPTION_LENGTH = 100
MAX_TTL_SECONDS = 31 * 24 * 3600  # the provider gives no maximum; 31 days covers every use
MAX_CALLBACK_URL_LENGTH = 2000  # what browsers and proxies reliably carry
MAX_CALLBACK_TASK_LENGTH = 200  # the column, with the queue: "name@queue"
MAX_CALLBACK_LATE_SECONDS = MAX_TTL_SECONDS
DEFAULT_CALLBACK_QUEUE = "celery"  # Celery's own default queue

FIELDS = (  # every field a message may carry: the cascade API's, then ours
    "id",
    "fromName",
    "toPhone",
    "messageType",
    "text",
    "ttl",
    "scheduledSent",
    "surveyOptions",
    "route",
    "callbackUrl",
    "callbackTask",
    "callbackLateAfter",
    "phoneRegion",
)
_FIELD_SET = frozenset(FIELDS)
_ALLOWED = ", ".join(FIELDS)
_FOLDED_FIELDS = {name.lower(): name for name in FIELDS}

_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Neither UTF-8 nor PostgreSQL can hold these: a lone surrogate cannot be encoded, and a NUL
# is refused by PostgreSQL text columns. Stored, either would fail the whole batch's insert.
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
_TASK_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]*")
_QUEUE_RE = re.compile(r"[A-Za-z0-9_.:-]+")
_E164_RE = re.compile(r"\+[1-9][0-9]{1,14}")
_ISO_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?"
    r"(Z|[+-][0-9]{2}(?::?[0-9]{2})?)?"
)
_SCIENTIFIC_RE = re.compile(r"[0-9](?:[.,][0-9]+)?[eE]\+?[0-9]+")
_E164_EXAMPLE = "+380671234567"
_PROVIDER_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_SHOW_MAX = 40
_JSON_KINDS: dict[type, str] = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    list: "array",
    tuple: "array",
    dict: "object",
    type(None): "null",
}


@dataclass(frozen=True, slots=True)
class FieldError:
    """One refused field, named as in the cascade API so producers can find it in their data."""

    field: str
    problem: str

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form for API answers and the rejected-message record."""
        return {"field": self.field, "problem": self.problem}


class Callbacks(NamedTuple):
    """Where a message's outcome goes: a URL to POST to, a Celery task `name@queue`, or both."""

    url: str | None = None
    task: str | None = None


NO_CALLBACKS = Callbacks()


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message that passed validation: normalised, and safe to send as it is."""

    id: str
    from_name: str
    to_phone: str
    message_type: str
    text: str | None
    ttl: int | None
    scheduled_sent: datetime | None
    survey_options: tuple[str, ...] | None
    route: str
    # Ours, never the provider's: where to report the outcome, and when to call it late.
    callback_url: str | None = None
    callback_task: str | None = None  # always "name@queue"
    callback_late_after: int | None = None

    @property
    def priority(self) -> int:
        """0 for transactional and flash-call messages, so they are claimed before bulk ones."""
        return 0 if self.message_type in URGENT_TYPES else 1

    def to_provider(self) -> dict[str, Any]:
        """The cascade API's JSON object; the route and the callbacks are ours, not sent."""
        body: dict[str, Any] = {
            "id": self.id,
            "fromName": self.from_name,
            "toPhone": self.to_phone,
            "messageType": self.message_type,
        }
        if self.text is not None:
            body["text"] = self.text
        if self.ttl is not None:
            body["ttl"] = self.ttl
        if self.scheduled_sent is not None:
            body["scheduledSent"] = self.scheduled_sent.astimezone(UTC).strftime(
                _PROVIDER_TIME_FORMAT
            )
        if self.survey_options is not None:
            body["surveyOptions"] = list(self.survey_options)
        return body


@dataclass(frozen=True, slots=True)
class ValidationRules:
    """The tunable limits, so settings can change them without touching the rules."""

    max_schedule_ahead: timedelta = timedelta(days=30)
    past_skew: timedelta = timedelta(seconds=60)
    default_route: str = "standard"
    # Reads national and '+'-less numbers as this country's (DEFAULT_PHONE_REGION).
    default_region: str | None = None

    def __post_init__(self) -> None:
        if self.default_route not in ROUTES:
            raise ValueError(f"default_route must be one of {ROUTES}, got {self.default_route!r}")
        if self.default_region is not None and (problem := region_problem(self.default_region)):
            raise ValueError(f"default_region {problem}")


_DEFAULT_RULES = ValidationRules()


def validate_message(
    raw: object, *, now: datetime, rules: ValidationRules = _DEFAULT_RULES
) -> OutgoingMessage | list[FieldError]:
    """Check one cascade API message object; return it normalised, or every problem found.

    All problems are collected, so a producer fixes its data in one round.
    """
    if not isinstance(raw, Mapping):
        return [FieldError("message", f"must be an object of message fields, got {_kind(raw)}")]
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    plain = _plain_message(raw, rules)
    return plain if plain is not None else _checked_message(raw, now, rules)


def _checked_message(
    raw: Mapping[Any, Any], now: datetime, rules: ValidationRules
) -> OutgoingMessage | list[FieldError]:
    """Every check of `validate_message`, each problem named."""
    errors: list[FieldError] = []
    if not _FIELD_SET.issuperset(raw):
        errors.extend(_unknown_field(key) for key in raw if key not in _FIELD_SET)
    get = raw.get
    message_type = get("messageType")
    region = get("phoneRegion")
    region_error = _optional(region, region_problem)
    phone = get("toPhone")
    if not region_error:
        phone = with_region(phone, region or rules.default_region)
    problems = (
        ("id", _id_problem(get("id"))),
        ("fromName", _from_name_problem(get("fromName"))),
        ("phoneRegion", region_error),
        (
            "toPhone",
            _phone_problem(phone, None if region_error else region or rules.default_region),
        ),
        ("messageType", _choice_problem(message_type, MESSAGE_TYPES, required=True)),
        ("text", _text_problem(get("text"), message_type)),
        ("ttl", _ttl_problem(get("ttl"))),
        ("callbackUrl", _optional(get("callbackUrl"), callback_url_problem)),
        ("callbackTask", _optional(get("callbackTask"), callback_task_problem)),
        ("callbackLateAfter", _late_after_problem(get("callbackLateAfter"))),
    )
    errors.extend(FieldError(field, problem) for field, problem in problems if problem)
    scheduled_sent, problem = _parse_schedule(get("scheduledSent"), now, rules)
    if problem:
        errors.append(FieldError("scheduledSent", problem))
    survey_options = get("surveyOptions")
    errors.extend(_survey_errors(survey_options, message_type))
    route = get("route")
    problem = _choice_problem(route, ROUTES, required=False)
    if problem:
        errors.append(FieldError("route", problem))
    if errors:
        return errors
    message_id, from_name = get("id"), get("fromName")
    # Checked above: the required fields are strings.
    assert isinstance(message_id, str) and isinstance(from_name, str)
    assert isinstance(phone, str) and isinstance(message_type, str)
    return OutgoingMessage(
        id=message_id,
        from_name=from_name,
        to_phone=phone,
        message_type=message_type,
        text=get("text"),
        ttl=get("ttl"),
        scheduled_sent=scheduled_sent,
        survey_options=None if survey_options is None else tuple(survey_options),
        route=rules.default_route if route is None else route,
        callback_url=get("callbackUrl"),
        callback_task=_with_queue(get("callbackTask")),
        callback_late_after=get("callbackLateAfter"),
    )


# The plain message most producers send, as few questions as prove it valid (`_plain_message`).
_PLAIN_FIELDS = frozenset({"id", "fromName", "toPhone", "messageType", "text", "ttl", "route"})
_PLAIN_TYPES = frozenset({"transaction", "promo"})  # text required, no survey options
_UNSTORABLE_RE = re.compile(r"[\x00\ud800-\udfff]")
_CONTROL_OR_UNSTORABLE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _plain_message(raw: Mapping[Any, Any], rules: ValidationRules) -> OutgoingMessage | None:
    """A quick yes for a plain message (a dict of the common fields, each of its plain
    type, an E.164 phone that `surely_valid` accepts): the OutgoingMessage the full checks
    would answer. None means "not decided here": the full checks run and name every
    problem. Half the time of the full checks (≈8 µs, measured), and it only ever says yes
    where they do (tests/test_validation.py holds it to them)."""
    if type(raw) is not dict or not _PLAIN_FIELDS.issuperset(raw):
        return None
    get = raw.get
    message_id, from_name, phone = get("id"), get("fromName"), get("toPhone")
    message_type, text, ttl, route = get("messageType"), get("text"), get("ttl"), get("route")
    if not (
        type(message_id) is str
        and len(message_id) <= MAX_ID_LENGTH
        and _ID_RE.fullmatch(message_id)
        and type(from_name) is str
        and 0 < len(from_name) <= MAX_FROM_NAME_LENGTH
        and not from_name.isspace()
        and not _CONTROL_OR_UNSTORABLE_RE.search(from_name)
        and type(phone) is str
        and _E164_RE.fullmatch(phone)
        and type(message_type) is str
        and message_type in _PLAIN_TYPES
        and type(text) is str
        and 0 < len(text) <= MAX_TEXT_LENGTH
        and not text.isspace()
        and not _UNSTORABLE_RE.search(text)
        and (ttl is None or (type(ttl) is int and 0 < ttl <= MAX_TTL_SECONDS))
        and (route is None or (type(route) is str and route in ROUTES))
        and surely_valid(phone)
    ):
        return None
    return OutgoingMessage(
        message_id,
        from_name,
        phone,
        message_type,
        text,
        ttl,
        None,
        None,
        rules.default_route if route is None else route,
    )


def campaign_callbacks(url: str | None, task: str | None) -> Callbacks:
    """Check callbacks given for a whole campaign (`enqueue`, `--callback-url`) like a
    message's own; a bad one refuses the whole call with ValueError."""
    problems = [
        f"{name} {problem}"
        for name, problem in (
            ("callback_url", _optional(url, callback_url_problem)),
            ("callback_task", _optional(task, callback_task_problem)),
        )
        if problem
    ]
    if problems:
        raise ValueError("; ".join(problems))
    return Callbacks(url, _with_queue(task))


def inherit_callbacks(
    message: OutgoingMessage, campaign: Callbacks
) -> OutgoingMessage | list[FieldError]:
    """A message without callbacks of its own takes its campaign's, as a whole.

    Asking to hear about lateness with nowhere to say it is refused rather than ignored.
    """
    if message.callback_url or message.callback_task:
        return message
    if campaign.url or campaign.task:
        return replace(message, callback_url=campaign.url, callback_task=campaign.task)
    if message.callback_late_after is not None:
        problem = "needs callbackUrl or callbackTask, on the message or on its campaign"
        return [FieldError("callbackLateAfter", problem)]
    return message


def callback_url_problem(value: object) -> str | None:
    """An absolute http(s) URL; a password in it is masked when the value is echoed."""
    if not isinstance(value, str):
        return _not_a_string(value)
    if len(value) > MAX_CALLBACK_URL_LENGTH:
        return f"must be at most {MAX_CALLBACK_URL_LENGTH} characters, got {len(value)}"
    if not value:
        return "must not be empty"
    shown = _show(mask_url(value))
    if _CONTROL_RE.search(value) or _SURROGATE_RE.search(value) or " " in value:
        return f"must be a URL without spaces or control characters, got {shown}"
    try:
        parts = urlsplit(value)
        port = parts.port  # raises for a port that is not a number up to 65535
    except ValueError:
        return f"is not a valid URL, got {shown}"
    if parts.scheme not in ("http", "https"):
        return f"must be an http:// or https:// URL, got {shown}"
    if not parts.hostname or port == 0:
        return f"must name a host (and a port from 1), got {shown}"
    return None


def callback_task_problem(value: object) -> str | None:
    """A Celery task name, optionally `@queue`; the worker sends it by name, like send_task."""
    if not isinstance(value, str):
        return _not_a_string(value)
    name, at, queue = value.partition("@")
    if not _TASK_NAME_RE.fullmatch(name):
        return (
            "must be a Celery task name like 'shop.tasks.sms_outcome', optionally "
            f"followed by '@queue', got {_show(value)}"
        )
    if at and not _QUEUE_RE.fullmatch(queue):
        return f"must name a queue after '@' (letters, digits, '_.:-'), got {_show(value)}"
    length = len(_with_queue(value) or "")
    if length > MAX_CALLBACK_TASK_LENGTH:
        limit = MAX_CALLBACK_TASK_LENGTH
        return f"must be at most {limit} characters with its @queue, got {length}"
    return None


def _with_queue(task: str | None) -> str | None:
    """Store tasks as `name@queue`, so a later change of default never reroutes them."""
    if task is None or "@" in task:
        return task
    return f"{task}@{DEFAULT_CALLBACK_QUEUE}"


def _optional(value: object, check: Callable[[object], str | None]) -> str | None:
    return None if value is None else check(value)


def _kind(value: object) -> str:
    """Name a value's type in JSON terms, which is what producers send."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _show(value: str) -> str:
    """Quote a value for a problem sentence: repr() escapes control characters, long values
    are cut so one bad field cannot flood a log line."""
    if len(value) <= _SHOW_MAX:
        return repr(value)
    return f"{value[:_SHOW_MAX]!r}... ({len(value)} characters)"


def _got(value: object) -> str:
    """Echo a string value, or only the type of anything else."""
    return _show(value) if isinstance(value, str) else _kind(value)


def _show_int(value: int) -> str:
    """Echo an integer without building a huge string (Python refuses past 4300 digits)."""
    return str(value) if value.bit_length() <= 64 else f"a {value.bit_length()}-bit integer"


def _unknown_field(key: object) -> FieldError:
    """Refuse an unknown key, with a hint when it is a spelling of a real field (to_phone)."""
    name = key if isinstance(key, str) else repr(key)
    if not name or len(name) > _SHOW_MAX or not name.isprintable() or name.strip() != name:
        name = _show(name)  # quoted: a key of spaces or with one around it stays visible
    meant = _FOLDED_FIELDS.get(name.replace("_", "").replace("-", "").lower())
    hint = f"did you mean {meant!r}? " if meant else ""
    return FieldError(name, f"unknown field; {hint}allowed: {_ALLOWED}")


def _not_a_string(value: object) -> str:
    """The problem with a required string field that holds something else."""
    return "is required" if value is None else f"must be a string, got {_kind(value)}"


def _content_problem(value: str, max_length: int) -> str | None:
    """Refuse blank or too long strings; the value itself may be secret (an OTP in a text),
    so only its length is reported."""
    if not value or value.isspace():
        return "must not be empty or only whitespace"
    if len(value) > max_length:
        return f"must be at most {max_length} characters, got {len(value)}"
    return _unstorable_problem(value)


def _unstorable_problem(value: str) -> str | None:
    """Characters no database column can keep (see `_SURROGATE_RE`), named by position."""
    if (nul := value.find("\x00")) >= 0:
        return f"must not contain NUL characters (U+0000), found at position {nul}"
    if surrogate := _SURROGATE_RE.search(value):
        return (
            "must be valid Unicode: a lone surrogate (U+D800-U+DFFF) found at position "
            f"{surrogate.start()}"
        )
    return None


def _id_problem(value: object) -> str | None:
    """The tracking id comes back as trackinId; the provider refuses special characters."""
    if not isinstance(value, str):
        return _not_a_string(value)
    problem = _content_problem(value, MAX_ID_LENGTH)
    if problem is None and not _ID_RE.fullmatch(value):
        problem = f"may contain only letters, digits, '-', '_' and '.', got {_show(value)}"
    return problem


def _from_name_problem(value: object) -> str | None:
    """The sender name is displayed on the handset; control characters never belong there."""
    if not isinstance(value, str):
        return _not_a_string(value)
    problem = _content_problem(value, MAX_FROM_NAME_LENGTH)
    if problem is None and _CONTROL_RE.search(value):
        problem = f"must not contain control characters such as newlines, got {_show(value)}"
    return problem


def region_problem(value: object) -> str | None:
    """A default region is a two-letter country code phonenumbers knows (UA, PL, GB…)."""
    if not isinstance(value, str):
        return _not_a_string(value)
    if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
        return f"must be a two-letter country code such as 'UA' or 'PL', got {_show(value)}"
    return None


def with_region(value: object, region: str | None) -> object:
    """`value` in E.164 when it reads as a real number of `region` (national '067 123 4567',
    '380671234567' without its '+', '00380…', spaces and punctuation); else unchanged, so
    validation says what is wrong with it as given. A number already in E.164 never changes.
    """
    if not isinstance(value, str) or region is None or _E164_RE.fullmatch(value):
        return value
    region = region.upper()
    text = value.strip()
    if not text or len(text) > 40:
        return value
    candidates = [text]
    digits = "".join(c for c in text if c.isdigit())
    if text[0].isdigit() and text[0] != "0":  # '380671234567': a country code without '+'
        candidates.append("+" + digits)
    for candidate in candidates:
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return value


def _phone_problem(value: object, region: str | None = None) -> str | None:
    """The provider takes strict E.164 only; a cheap shape check runs before phonenumbers.
    With a region, a number still not in E.164 is one the region could not read."""
    if not isinstance(value, str):
        return _not_a_string(value)
    if not _E164_RE.fullmatch(value):
        if region and value.strip() and not _SCIENTIFIC_RE.fullmatch(value.strip()):
            return (
                f"is not a valid {region.upper()} number (national, or with its country code) "
                f"nor E.164 like {_E164_EXAMPLE}, got {_show(value)}"
            )
        return f"{_phone_shape_problem(value)}, got {_show(value)}"
    problem = _phone_number_problem(value)
    return f"{problem}, got {_show(value)}" if problem else None


def _phone_shape_problem(value: str) -> str:
    """Say what is wrong with a number that is not '+' and digits, as the common mistakes."""
    if not value:
        return "must not be empty"
    if _SCIENTIFIC_RE.fullmatch(value.strip()):
        return (
            "is a number Excel turned into scientific notation, its digits are lost; "
            "format the column as Text and export again"
        )
    if value.startswith("00"):
        return f"uses the '00' dialling prefix instead of '+'; use E.164 like {_E164_EXAMPLE}"
    if value.startswith("0"):
        return (
            "is a national number (leading '0'); use E.164 with the country code, "
            f"like {_E164_EXAMPLE}, or give its country (phoneRegion, --default-region)"
        )
    if value[0] in "123456789":
        return (
            f"missing leading '+'; use E.164 like {_E164_EXAMPLE}, "
            "or give its country (phoneRegion, --default-region)"
        )
    digits = value[1:]
    if value[0] != "+" or not (digits.isascii() and digits.isdigit()):
        return (
            "must be '+' followed by the digits 0-9 only, without spaces or punctuation "
            f"(E.164 like {_E164_EXAMPLE})"
        )
    if digits[0] == "0":
        return "country codes never start with 0"
    if len(digits) > 15:
        return f"has {len(digits)} digits; E.164 allows at most 15"
    return "is too short to be a phone number"


def _phone_number_problem(value: str) -> str | None:
    """Ask phonenumbers whether the number exists in its country's numbering plan, and refuse
    forms it only accepts by rewriting them (a trunk '0' after the country code)."""
    if surely_valid(value):  # the same answer, a tenth of the time (worker/core/phones.py)
        return None
    try:
        number = phonenumbers.parse(value)
    except phonenumbers.NumberParseException:
        return "is not a valid phone number"
    if not phonenumbers.is_valid_number(number):
        return "is not a valid phone number for its country code"
    canonical = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if canonical != value:
        return f"is not in canonical E.164 form; did you mean {canonical!r}?"
    return None


def _choice_problem(value: object, choices: tuple[str, ...], *, required: bool) -> str | None:
    """Refuse a value outside a fixed set, listing the set."""
    if value is None:
        return "is required" if required else None
    if isinstance(value, str) and value in choices:
        return None
    return f"must be one of {', '.join(choices)}, got {_got(value)}"


def _text_problem(value: object, message_type: object) -> str | None:
    """Text is required except for flash calls; surveys have a shorter limit. When the type is
    itself invalid, only the text's own shape is checked."""
    if value is None:
        if message_type in MESSAGE_TYPES and message_type != "flashcall":
            return f"is required for messageType {message_type!r}"
        return None
    if not isinstance(value, str):
        return _not_a_string(value)
    if message_type == "viber_survey" and len(value) > MAX_SURVEY_TEXT_LENGTH:
        limit = MAX_SURVEY_TEXT_LENGTH
        return f"must be at most {limit} characters for viber_survey, got {len(value)}"
    return _content_problem(value, MAX_TEXT_LENGTH)


def _ttl_problem(value: object) -> str | None:
    """A whole number of seconds; bool and numeric strings are refused, not coerced."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer number of seconds, got {_kind(value)}"
    if value <= 0:
        return f"must be a positive number of seconds, got {_show_int(value)}"
    if value > MAX_TTL_SECONDS:
        return f"must be at most {MAX_TTL_SECONDS} seconds (31 days), got {_show_int(value)}"
    return None


def _late_after_problem(value: object) -> str | None:
    """Seconds after which an undelivered message is reported late; whole and positive."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer number of seconds, got {_kind(value)}"
    if not 0 < value <= MAX_CALLBACK_LATE_SECONDS:
        limit = MAX_CALLBACK_LATE_SECONDS
        return f"must be from 1 to {limit} seconds (31 days), got {_show_int(value)}"
    return None


def _parse_schedule(
    value: object, now: datetime, rules: ValidationRules
) -> tuple[datetime | None, str | None]:
    """Parse scheduledSent to UTC, whole seconds (what the provider gets is what we record).

    A time without a zone is refused: guessing the zone would send at the wrong hour.
    """
    if value is None:
        return None, None
    if not isinstance(value, str):
        return None, f"must be an ISO 8601 string, got {_kind(value)}"
    match = _ISO_RE.fullmatch(value)
    if match is None:
        return None, f"must be an ISO 8601 date-time like 2025-01-25T10:00:00Z, got {_show(value)}"
    if match[1] is None:
        return None, f"must include a time zone ('Z' or an offset like +02:00), got {_show(value)}"
    try:
        when = datetime.fromisoformat(value).astimezone(UTC).replace(microsecond=0)
    except (ValueError, OverflowError):
        return None, f"is not a real date and time, got {_show(value)}"
    if when < now - rules.past_skew:
        return None, f"is in the past, got {_show(value)}"
    if when > now + rules.max_schedule_ahead:
        ahead = _describe(rules.max_schedule_ahead)
        return None, f"is more than {ahead} ahead, got {_show(value)}"
    return when, None


def _describe(span: timedelta) -> str:
    """Say a configured span the way a person would: '30 days'."""
    if span % timedelta(days=1):
        return str(span)
    return f"{span.days} day" if span.days == 1 else f"{span.days} days"


def _survey_errors(value: object, message_type: object) -> list[FieldError]:
    """Survey options belong to viber_survey only; each bad option is named by its index."""
    if value is None:
        if message_type == "viber_survey":
            return [FieldError("surveyOptions", "is required for messageType 'viber_survey'")]
        return []
    if message_type != "viber_survey" and message_type in MESSAGE_TYPES:
        return [FieldError("surveyOptions", f"only allowed for viber_survey, not {message_type!r}")]
    if not isinstance(value, list | tuple):
        return [FieldError("surveyOptions", f"must be an array of strings, got {_kind(value)}")]
    if not MIN_SURVEY_OPTIONS <= len(value) <= MAX_SURVEY_OPTIONS:
        return [
            FieldError(
                "surveyOptions",
                f"must have {MIN_SURVEY_OPTIONS} to {MAX_SURVEY_OPTIONS} options, got {len(value)}",
            )
        ]
    errors: list[FieldError] = []
    first_seen: dict[str, int] = {}
    for index, option in enumerate(value):
        if not isinstance(option, str):
            problem: str | None = f"must be a string, got {_kind(option)}"
        else:
            problem = _content_problem(option, MAX_SURVEY_OPTION_LENGTH)
            first = first_seen.setdefault(option, index)
            if problem is None and first != index:
                problem = f"repeats surveyOptions[{first}]"
        if problem:
            errors.append(FieldError(f"surveyOptions[{index}]", problem))
    return errors
