"""Quiet hours: promo and surveys go only inside a send window of the recipient's local time.

The recipient's time zones come from the number (`phonenumbers`' time-zone data); a number
that spans several zones (a Russian or Australian mobile) goes only when it is inside the
window in every one of them: the strictest reading. A message enqueued outside its window
is stored `queued` with `available_at` at the window's next opening (`window_at` says so,
for reports); one whose TTL would run out before then is `expired` at once, with that
reason, instead of going at night.

Windows: `SEND_WINDOW=09:00-20:00` for promo and viber_survey; `SEND_WINDOW_BY_TYPE=
"viber_survey=10:00-18:00;transaction=off"` per message type; a campaign's own window
(`campaign launch --send-window`, `?sendWindow=`) over both, stored with the campaign for
its later messages too. `off` (or `none`) means no window. A window
may wrap midnight (`22:00-06:00`); `24:00` is allowed as an end.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as phone_timezone

from config import Settings

OFF = "off"
NONE = "none"  # the same as `off` (`--send-window none`)
WINDOWED_TYPES: tuple[str, ...] = ("promo", "viber_survey")  # SEND_WINDOW applies to these
_SPEC = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_DAY = 24 * 60
_LOOK_AHEAD_DAYS = 8
UNKNOWN_ZONE = "Etc/Unknown"


@dataclass(frozen=True, order=True)
class Window:
    """Minutes after local midnight: [start, end), wrapping midnight when start > end."""

    start: int
    end: int

    def __str__(self) -> str:
        return (
            f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"
        )

    def contains(self, local: datetime) -> bool:
        minute = local.hour * 60 + local.minute + (local.second + local.microsecond / 1e6) / 60
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


_WINDOW_CHARACTERS = re.compile(r"[0-9:\- ]{1,20}")


def _shown(text: str) -> str:
    """The value as given when it could only be a mistyped window; else not echoed: a value
    pasted into the wrong setting may be a secret."""
    return repr(text) if _WINDOW_CHARACTERS.fullmatch(text) else "the value"


def parse_window(text: str, setting: str = "SEND_WINDOW") -> Window | None:
    """`09:00-20:00` → Window; `off` → None; anything else names the setting (and the value,
    when it is only digits, colons and dashes)."""
    if text.strip().lower() in (OFF, NONE):
        return None
    match = _SPEC.match(text)
    if not match:
        raise ValueError(f"{setting}: {_shown(text)} is not a window like 09:00-20:00 (or 'off')")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if m1 > 59 or m2 > 59 or start >= _DAY or end > _DAY:
        raise ValueError(f"{setting}: {_shown(text)} has a time that is not HH:MM of a day")
    if start == end or (start == 0 and end == _DAY):
        raise ValueError(
            f"{setting}: {_shown(text)} is empty or the whole day; say 'off' for no window"
        )
    return Window(start, end)


def parse_by_type(
    text: str | None, setting: str = "SEND_WINDOW_BY_TYPE"
) -> dict[str, Window | None]:
    """`promo=09:00-20:00;viber_survey=off` → {type: window or None}."""
    from worker.core.validation import MESSAGE_TYPES

    chosen: dict[str, Window | None] = {}
    if not text:
        return chosen
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        kind, eq, spec = entry.partition("=")
        kind = kind.strip()
        if not eq or kind not in MESSAGE_TYPES:
            # The type is named only when it could be a mistyped one: else it may be a secret.
            named = repr(kind) if re.fullmatch(r"[a-z_]{1,40}", kind) else "an entry"
            raise ValueError(
                f"{setting}: {named} is not TYPE=HH:MM-HH:MM or TYPE=off, TYPE one of "
                f"{', '.join(MESSAGE_TYPES)}"
            )
        chosen[kind] = parse_window(spec, f"{setting} ({kind})")
    return chosen


@dataclass(frozen=True)
class Windows:
    """The settings' windows: SEND_WINDOW for WINDOWED_TYPES, then per type."""

    default: Window | None = None
    by_type: Mapping[str, Window | None] | None = None

    def for_message(self, message_type: str, campaign: str | None = None) -> Window | None:
        """The campaign's window (`off`: none) over the type's over SEND_WINDOW. A campaign
        window applies to the types a window applies to: promo, surveys, and any type given
        one in SEND_WINDOW_BY_TYPE."""
        by_type = self.by_type or {}
        subject = message_type in WINDOWED_TYPES or by_type.get(message_type) is not None
        if campaign is not None and subject:
            return parse_window(campaign, "campaign send window")
        if message_type in by_type:
            return by_type[message_type]
        return self.default if message_type in WINDOWED_TYPES else None


def windows_from(default: str | None, by_type: str | None) -> Windows:
    return Windows(
        parse_window(default) if default else None, parse_by_type(by_type) if by_type else {}
    )


# --- time zones -----------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def zones_for(phone: str, fallback: str = "UTC") -> tuple[ZoneInfo, ...]:
    """The recipient's time zones from the number's prefix; `fallback` when it names none."""
    try:
        names = phone_timezone.time_zones_for_number(phonenumbers.parse(phone, None))
    except phonenumbers.NumberParseException:
        names = ()
    zones: list[ZoneInfo] = []
    for name in names:
        if name == UNKNOWN_ZONE:
            continue
        try:
            zones.append(ZoneInfo(name))
        except ZoneInfoNotFoundError:  # a name tzdata does not (yet) have
            continue
    return tuple(zones) or (ZoneInfo(fallback),)


def _opens(zone: ZoneInfo, window: Window, now: datetime) -> list[datetime]:
    """The window's openings in `zone` around `now` (UTC), and an hour after each (a
    daylight-saving gap can swallow the opening itself)."""
    today = now.astimezone(zone).date()
    found = []
    for day in range(-1, _LOOK_AHEAD_DAYS):
        date = today + timedelta(days=day)
        local = datetime.combine(date, time(window.start // 60, window.start % 60), tzinfo=zone)
        opening = local.astimezone(UTC)
        found += [opening, opening + timedelta(hours=1)]
    return found


def inside(zones: tuple[ZoneInfo, ...], window: Window, at: datetime) -> bool:
    return all(window.contains(at.astimezone(zone)) for zone in zones)


def next_window_open(
    phone: str, now: datetime, window: Window | None, fallback: str = "UTC"
) -> datetime:
    """The first instant at or after `now` (aware) inside `window` in every time zone of
    `phone`: `now` itself when it is inside. Without a window: `now`.

    When no instant is inside every zone's window (a window shorter than the zones' span),
    the first zone's window decides.
    """
    if window is None:
        return now
    zones = zones_for(phone, fallback)
    for strict in (zones, zones[:1]):
        if inside(strict, window, now):
            return now
        candidates = sorted(at for zone in strict for at in _opens(zone, window, now) if at > now)
        for at in candidates:
            if inside(strict, window, at):
                return at
    raise AssertionError("a window of a single zone opens within a day")  # pragma: no cover


# --- the producer's side --------------------------------------------------------------------

WAITING_DETAIL = "TTL runs out before the recipient's send window opens"


def checked_window(text: str, option: str = "send window") -> str:
    """A campaign's window as stored: `09:00-20:00` stripped, or `off` (also for `none`);
    anything else is a ValueError naming `option` (`--send-window`, `sendWindow`)."""
    return OFF if parse_window(text, option) is None else text.strip()


def place(
    row: dict[str, Any],
    window: Window | None,
    now: datetime,
    settings: Settings,
) -> bool:
    """Fit a new messages row to its send window: when it is outside, `available_at` (and a
    `scheduledSent` outside it) move to the window's next opening and `window_at` says so.
    Answers True when its TTL would run out first: the caller ends it `expired`."""
    if window is None:
        return False
    scheduled = row["scheduled_sent"]
    start = max(now, scheduled) if scheduled else now
    opening = next_window_open(
        row["to_phone"], start, window, settings.send_window_fallback_timezone
    )
    if opening == start:
        return False
    if row["expires_at"] is not None and row["expires_at"] <= opening:
        return True
    if scheduled is not None:
        row["scheduled_sent"] = opening
    keep = (settings.schedule_hold_ahead_seconds, settings.schedule_send_lead_seconds)
    row["available_at"] = available_at(opening, now, *keep) if scheduled else opening
    row["window_at"] = opening
    return False


def available_at(
    scheduled: datetime | None, now: datetime, hold_ahead: float, lead: float
) -> datetime:
    """When a message may be claimed: now, or for one scheduled further ahead than
    `hold_ahead` seconds, `lead` seconds before its time, so that until then it is still
    ours to cancel or pause (the provider cannot recall a message it has)."""
    if scheduled is None or hold_ahead <= 0:
        return now
    if (scheduled - now).total_seconds() <= hold_ahead:
        return now
    return scheduled - timedelta(seconds=lead)
