"""Parsing of pushed provider reports: SMSBAT status webhooks and BulkGate delivery reports.

Pure (no I/O). A push may carry many reports, and the provider will not resend the good
ones because one was bad, so every element gets its own result: a `Report` for the one
status path (`worker.core.statuses.apply`), an `Inbound` SMS, or a `ParseError` naming the
element and the field. The parsers never raise on any JSON value.

BulkGate times (`date`, "yymmddHHMM;yymmddHHMM") are local time in Prague (CET/CEST); they
become UTC through `zoneinfo`, and DST edges are resolved by `prague_pair` (see there).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from worker.core.states import FINAL, PROVIDER_STATES, State
from worker.core.statuses import Report

T = TypeVar("T")

PRAGUE = ZoneInfo("Europe/Prague")
MAX_MESSAGE_ID = 64  # provider_reports.provider_message_id / messages.provider_message_id
MAX_SENDER = 32  # inbound_messages.sender
INBOUND = "10"
# A NUL cannot be stored by PostgreSQL (text or JSON) and a lone surrogate not as UTF-8:
# one such report refused alone, rather than failing the insert of the whole push.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
_SCALARS = frozenset({str, int, float, bool, type(None)})
MAX_DEPTH = 32  # of a field's value; json.dumps would fail on the stored raw report past ~1000

# BulkGate status code → (our state, what it means). 2 (buffered) and 6 (accepted by the
# SMSC) are not final: the message is with the network, being delivered (`processing`).
BULKGATE_STATES: dict[str, tuple[State, str]] = {
    "1": (State.DELIVERED, "delivered"),
    "2": (State.PROCESSING, "buffered at the SMSC, recipient unavailable; not final"),
    "3": (State.UNDELIVERABLE, "not delivered, unknown or unreachable recipient"),
    "6": (State.PROCESSING, "accepted by the SMSC"),
    "8": (State.UNDELIVERABLE, "expired at the SMSC"),
    "13": (State.DELIVERED, "read (Viber)"),
}
_KNOWN_CODES = ", ".join([*BULKGATE_STATES, INBOUND])


@dataclass(frozen=True, slots=True)
class Inbound:
    """An SMS a recipient sent us (BulkGate status 10)."""

    sender: str  # E.164 with "+" when it is a number, else as given (alphanumeric)
    text: str | None
    sent_at: datetime | None  # UTC
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ParseError:
    """Why element `index` of a push was refused."""

    index: int
    error: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "error": self.error}


Parsed = Report | Inbound | ParseError


# --- SMSBAT status webhook --------------------------------------------------------------


def parse_smsbat_webhook(data: Any, *, body: bytes | None = None) -> list[Report | ParseError]:
    """One result per element; a single object is a push of one. `body`: the JSON that
    orjson decoded into `data`, to judge what the database would refuse from (`_plain`)."""
    return _each(data, parse_smsbat_report, body)


def parse_smsbat_report(item: Any) -> Report:
    """`{messageId, deliverystatus, timestamp, cost}`; ValueError names the bad field."""
    data = _object(item)
    message_id = _message_id(data, "messageId")
    status = data.get("deliverystatus")
    if not isinstance(status, str) or status.strip().lower() not in PROVIDER_STATES:
        raise ValueError(
            f"deliverystatus: unknown status {_show(status)} "
            f"(expected one of {', '.join(PROVIDER_STATES)})"
        )
    status = status.strip().lower()
    fields: dict[str, Any] = {"deliverystatus": status}
    cost = _number(data, "cost")
    if cost is not None:
        fields["cost"] = cost
    detail = f"deliverystatus {status}"
    at = _timestamp(data, "timestamp")
    if at is not None:
        detail += f" at {_iso(at)} (provider time)"
    return Report(message_id, PROVIDER_STATES[status], "webhook", fields, detail)


# --- BulkGate delivery reports ----------------------------------------------------------


def parse_bulkgate(items: Any, *, body: bytes | None = None) -> list[Parsed]:
    """The POSTed JSON array (a single object counts as an array of one). `body`: the JSON
    that orjson decoded into `items`, to judge what the database would refuse from (`_plain`)."""
    return _each(items, parse_bulkgate_item, body)


def parse_bulkgate_query(params: Mapping[str, str]) -> list[Parsed]:
    """The older GET form: the same fields as query parameters, one report per request."""
    return _each(dict(params), parse_bulkgate_item)


def parse_bulkgate_item(item: Any) -> Report | Inbound:
    """One BulkGate report; ValueError names the bad field."""
    data = _object(item)
    code = _status_code(data)
    times = _dates(data)
    if code == INBOUND:
        return _inbound(data, times[0] if times else None)
    state, meaning = BULKGATE_STATES[code]
    message_id = _message_id(data, "smsID")
    fields: dict[str, Any] = {"deliverystatus": state.value}
    if state in FINAL and state != State.DELIVERED:  # the reason, for reports' top errors
        fields |= {"error_code": f"BULKGATE_{code}", "error_message": meaning}
    price = _number(data, "price")
    if price is not None:
        fields["cost"] = price
    detail = f"BulkGate status {code}: {meaning}"
    if times:  # to the minute, as BulkGate gives them: never a made-up :00 before our send
        detail += f"; sent {_minute(times[0])}"
        if times[1] is not None:
            detail += f", status at {_minute(times[1])}"
        detail += " (provider time, to the minute)"
    return Report(message_id, state, "dlr", fields, detail)


def _inbound(data: dict[str, Any], sent_at: datetime | None) -> Inbound:
    sender = data.get("from")
    if isinstance(sender, int) and not isinstance(sender, bool):
        sender = str(sender)
    if not isinstance(sender, str) or not sender.strip():
        raise ValueError("from: required for an inbound SMS (status 10), as a string")
    sender = normalise_sender(sender)
    if len(sender) > MAX_SENDER:
        raise ValueError(f"from: longer than {MAX_SENDER} characters")
    key = "message" if data.get("message") is not None else "text"
    text = data.get(key)
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{key}: must be a string, got {_kind(text)}")
    return Inbound(sender, text, sent_at, dict(data))


def normalise_sender(sender: str) -> str:
    """International digits ("420777…", "+420…", "00420…") become E.164 so they match `to_phone`."""
    value = sender.strip()
    digits = value.removeprefix("+")
    if digits.startswith("00"):
        digits = digits[2:]
    if digits.isascii() and digits.isdigit() and digits[:1] != "0":
        return "+" + digits
    return value


def _status_code(data: dict[str, Any]) -> str:
    raw = data.get("status")
    code = _text(raw)
    if code is None:
        raise ValueError(f"status: required, a number as an integer or a string, got {_show(raw)}")
    if code != INBOUND and code not in BULKGATE_STATES:
        raise ValueError(f"status: unknown BulkGate status {_show(raw)} (expected {_KNOWN_CODES})")
    return code


def _dates(data: dict[str, Any]) -> tuple[datetime, datetime | None] | None:
    """`date` "yymmddHHMM;yymmddHHMM" (send; delivery), Prague local time, as UTC."""
    raw = data.get("date")
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise ValueError(f"date: must be a string yymmddHHMM;yymmddHHMM, got {_kind(raw)}")
    return _prague_dates(raw)


@lru_cache(maxsize=4096)
def _prague_dates(raw: str) -> tuple[datetime, datetime | None]:
    """Cached: the reports of one push (and of one minute) mostly share their times, and the
    zone conversion was a tenth of the CPU of a 100-report BulkGate push (measured)."""
    parts = raw.split(";")
    if len(parts) > 2 or not parts[0]:
        raise ValueError(f"date: expected yymmddHHMM;yymmddHHMM, got {_show(raw)}")
    sent = _local(parts[0])
    done = _local(parts[1]) if len(parts) == 2 and parts[1] else None
    return prague_pair(sent, done)


def _local(part: str) -> datetime:
    if len(part) != 10 or not (part.isascii() and part.isdigit()):
        raise ValueError(f"date: {_show(part)} is not yymmddHHMM")
    values = [int(part[i : i + 2]) for i in range(0, 10, 2)]
    try:
        return datetime(2000 + values[0], values[1], values[2], values[3], values[4])
    except ValueError:
        raise ValueError(f"date: {_show(part)} is not a valid yymmddHHMM time") from None


def prague_pair(sent: datetime, done: datetime | None) -> tuple[datetime, datetime | None]:
    """Prague wall-clock times → UTC, deterministically across DST switches.

    Both are read with `fold=0`: an ambiguous time (the repeated hour in October) is its
    first occurrence, in summer time (+02:00); a non-existent time (the skipped hour in
    March) takes the offset in force before the jump, +01:00 (02:30 is read as 01:30 UTC,
    which the clock shows as 03:30). If that puts the delivery before the send and the
    delivery time is ambiguous, the delivery is its second occurrence (`fold=1`), since
    nothing is delivered before it was sent.
    """
    sent_utc = _utc(sent, 0)
    if done is None:
        return sent_utc, None
    done_utc = _utc(done, 0)
    if done_utc < sent_utc:
        done_utc = _utc(done, 1)
    return sent_utc, done_utc


def _utc(local: datetime, fold: int) -> datetime:
    return local.replace(tzinfo=PRAGUE, fold=fold).astimezone(UTC)


# --- shared field checks -------------------------------------------------------------------


def _each(data: Any, parse: Callable[[Any], T], body: bytes | None = None) -> list[T | ParseError]:
    items = data if isinstance(data, list) else [data]
    checked = body is not None and _plain(body, data)
    results: list[T | ParseError] = []
    for index, item in enumerate(items):
        try:
            if not checked:
                _refuse_unstorable(item)
            results.append(parse(item))
        except (ValueError, OverflowError) as exc:  # OverflowError: a date beyond year 1..9999
            results.append(ParseError(index, str(exc)))
    return results


def _plain(body: bytes, data: Any) -> bool:
    """Whether JSON decoded by orjson (`body` into `data`) holds nothing `_refuse_unstorable`
    refuses, judged from its bytes in C: that search over every report's strings was a
    third of a BulkGate report's parse (1.4 of 4.6 µs, measured).

    orjson refuses lone surrogates and raw control characters, so a NUL comes only from a
    `\\u0000` escape; a field nested MAX_DEPTH deep needs that many brackets beyond the
    array's own and each report's. A bracket or an escape inside a string only makes this
    answer no, and the search runs as before.
    """
    if b"\\u0000" in body:
        return False
    items = data if isinstance(data, list) else [data]
    own = isinstance(data, list) + sum(type(item) is dict for item in items)
    return body.count(b"[") + body.count(b"{") - own < MAX_DEPTH


def _refuse_unstorable(item: Any) -> None:
    """Name the field that holds what no database can keep: a NUL or lone surrogate, or
    nesting deeper than MAX_DEPTH (the raw report is stored whole, unknown fields too)."""
    if not isinstance(item, dict):
        return
    # The usual report, flat, is judged in one search over its strings (the walk below cost
    # a quarter of the CPU of a 100-report push); the walk then only names the field.
    if all(type(v) in _SCALARS for v in item.values()):
        strings = [*item, *(v for v in item.values() if type(v) is str)]
        if _UNSTORABLE.search("".join(strings)) is None:
            return
    for key, value in item.items():
        problem = _storable_problem(key) or _storable_problem(value)
        if problem:
            plain = isinstance(key, str) and key.isprintable() and key.strip() == key != ""
            name = key if plain else _show(key)
            raise ValueError(f"{name}: {problem}")


def _storable_problem(value: Any) -> str | None:
    """Iterative, so JSON nested deeper than Python's recursion limit is no crash."""
    pending = [(value, 1)]
    while pending:
        current, depth = pending.pop()
        if isinstance(current, str) and _UNSTORABLE.search(current):
            return "contains a NUL character or a lone surrogate"
        children: list[Any] = []
        if isinstance(current, dict):
            children = [*current.keys(), *current.values()]
        elif isinstance(current, list):
            children = current
        if children and depth >= MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        pending.extend((child, depth + 1) for child in children)
    return None


def _object(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError(f"report must be a JSON object, got {_kind(item)}")
    return item


def _message_id(data: dict[str, Any], key: str) -> str:
    value = _text(data.get(key))
    if not value:
        raise ValueError(f"{key}: required, a non-empty string")
    if len(value) > MAX_MESSAGE_ID:
        raise ValueError(f"{key}: longer than {MAX_MESSAGE_ID} characters")
    return value


def _text(value: Any) -> str | None:
    """A string or an integer as a stripped string (BulkGate sends numbers either way)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    return None


def _number(data: dict[str, Any], key: str) -> float | None:
    """An optional non-negative finite number, given as a number or a numeric string."""
    value = data.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{key}: must be a number, got {_kind(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"{key}: must be a number, got {_show(value)}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{key}: must be a finite number >= 0, got {_show(value)}")
    return number


def _timestamp(data: dict[str, Any], key: str) -> datetime | None:
    """An optional ISO 8601 date-time with a zone (`Z` or an offset), as UTC."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key}: must be an ISO 8601 string, got {_kind(value)}")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{key}: not an ISO 8601 date-time: {_show(value)}") from None
    if moment.utcoffset() is None:
        raise ValueError(f"{key}: needs a zone (Z or an offset): {_show(value)}")
    return moment.astimezone(UTC)


@lru_cache(maxsize=4096)
def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@lru_cache(maxsize=4096)
def _minute(moment: datetime) -> str:
    """A minute-precision time as such (`2025-07-01T10:01Z`): written with `:00` seconds it
    would claim a status at 10:01:00 for a message we sent at 10:01:40. Cached like `_iso`:
    the reports of a push share their minutes, and strftime was a fifth of `cascade api`'s
    CPU taking BulkGate arrays (py-spy)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")


def _kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, int | float) else "value")


def _show(value: Any, limit: int = 40) -> str:
    """A short repr for error messages: enough to recognise, never a whole payload."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
