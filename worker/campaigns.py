"""Campaigns: launching one from a CSV file, holding, pausing, cancelling it, listing them.

A launch streams the file in chunks, so a million rows use the memory of one chunk.
Ids are either the file's own or derived from the campaign name, the line and the phone,
so launching the same file again under the same name enqueues nothing twice and resumes
a launch that was interrupted.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import re
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, Engine, func, insert, or_, select, update

from config import Settings
from worker.db import among, insert_or_skip, utcnow
from worker.models import campaigns, events, messages
from worker.states import FINAL, State
from worker.validation import FIELDS, NO_CALLBACKS, Callbacks, campaign_callbacks

log = logging.getLogger(__name__)

API_COLUMNS = FIELDS  # CSV headers are the message fields, matched case-insensitively
_CANONICAL = {name.lower(): name for name in API_COLUMNS}
CHUNK = 1000
SNIFF_BYTES = 64 * 1024


class CampaignError(ValueError):
    """A problem with the whole launch (file, header, flags): nothing was enqueued."""


class CampaignCancelled(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"campaign {name!r} was cancelled; use a new name")


class CampaignStateError(ValueError):
    """The campaign is not in a state the command applies to (approve one not held…)."""


# --- the campaign row ----------------------------------------------------------------


def ensure_campaign(engine: Engine, name: str, callbacks: Callbacks = NO_CALLBACKS) -> Callbacks:
    """Record the campaign name once; refuse new messages for a cancelled campaign.

    Callbacks given (either one) replace the campaign's pair, so a relaunch can fix a URL;
    none given keeps them. Answers the campaign's callbacks, which its messages inherit.
    """
    with engine.begin() as conn:
        conn.execute(
            insert_or_skip(conn, campaigns)
            .values(name=name, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["name"])
        )
        row = conn.execute(
            select(
                campaigns.c.cancelled_at, campaigns.c.callback_url, campaigns.c.callback_task
            ).where(campaigns.c.name == name)
        ).one()
        if row.cancelled_at is not None:
            raise CampaignCancelled(name)
        if not (callbacks.url or callbacks.task):
            return Callbacks(row.callback_url, row.callback_task)
        conn.execute(
            update(campaigns)
            .where(campaigns.c.name == name)
            .values(callback_url=callbacks.url, callback_task=callbacks.task)
        )
    return callbacks


def cancelled_campaigns(conn: Connection, names: Iterable[str]) -> set[str]:
    wanted = list(names)
    if not wanted:
        return set()
    return set(
        conn.execute(
            select(campaigns.c.name).where(
                campaigns.c.name.in_(wanted), campaigns.c.cancelled_at.is_not(None)
            )
        ).scalars()
    )


def cancel_campaign(engine: Engine, name: str) -> dict[str, int] | None:
    """Cancel every message not yet sent; answer what happened to the campaign's messages.

    Messages already with the provider are left alone (SMSBAT has no recall); messages in
    flight become `cancelled` if their send fails, instead of being retried.
    """
    now = utcnow()
    with engine.begin() as conn:
        found = conn.execute(
            update(campaigns)
            .where(campaigns.c.name == name)
            .values(cancelled_at=func.coalesce(campaigns.c.cancelled_at, now))
            .returning(campaigns.c.name)
        ).first()
    if found is None:
        return None
    cancelled = 0
    for source in (State.QUEUED, State.HELD):
        cancelled += move_messages(
            engine,
            name,
            source,
            State.CANCELLED,
            "campaign cancelled",
            final_at=now,
            final_source="system",
            error_code="CANCELLED",
            error_message="campaign cancelled before the message was sent",
        )
    with engine.connect() as conn:
        states = dict(
            conn.execute(
                select(messages.c.state, func.count())
                .where(messages.c.campaign == name)
                .group_by(messages.c.state)
            ).all()
        )
    with_provider = sum(
        n
        for s, n in states.items()
        if s not in FINAL and s not in (State.QUEUED, State.HELD, State.SENDING)
    )
    return {
        "cancelled_now": cancelled,
        "cancelled": states.get(State.CANCELLED, 0),
        "in_flight": states.get(State.SENDING, 0),
        "with_provider": with_provider,
        "final_before": sum(n for s, n in states.items() if s in FINAL and s != State.CANCELLED),
        "queued": states.get(State.QUEUED, 0),
    }


MOVE_CHUNK = 10_000


def move_messages(
    engine: Engine,
    name: str,
    source: State,
    target: State,
    detail: str,
    limit: int | None = None,
    **values: Any,
) -> int:
    """Move every message of a campaign in `source` to `target`, journalled (source
    "system"), a chunk per transaction; answer how many moved.

    Rows another transaction holds (a claim turning them into `sending`) are skipped: the
    loop ends when a pass finds no unlocked row. For holds, `enforce_holds` (beat) takes any
    row that was locked for another reason and is still queued. `values` are set too (a
    deadline pushed, an error for a cancel).
    """
    moved = 0
    while limit is None or moved < limit:
        size = MOVE_CHUNK if limit is None else min(MOVE_CHUNK, limit - moved)
        query = select(messages.c.pk).where(messages.c.campaign == name, messages.c.state == source)
        if limit is not None:  # a metered release goes oldest first; a whole move need not
            query = query.order_by(messages.c.pk)
        with engine.begin() as conn:
            pks = list(conn.execute(query.limit(size).with_for_update(skip_locked=True)).scalars())
            if not pks:
                return moved
            now = utcnow()
            conn.execute(
                update(messages)
                .where(among(conn, messages.c.pk, pks), messages.c.state == source)
                .values(state=target, **values)
            )
            conn.execute(
                insert(events),
                [
                    {
                        "message_pk": pk,
                        "at": now,
                        "source": "system",
                        "from_state": source,
                        "to_state": target,
                        "detail": detail,
                    }
                    for pk in pks
                ],
            )
            moved += len(pks)
    return moved


# --- hold and approve, pause and resume ------------------------------------------------

# The send deadline counts no time an operator held a campaign: an hour held, an hour more.
DEADLINE_COLUMN = "send_deadline"


def later_by(conn: Connection | Engine, column: Any, seconds: float) -> Any:
    """`column` plus `seconds`, in SQL on either backend (SQLite keeps SQLAlchemy's text
    form, microseconds included, so stored times still compare as text)."""
    if conn.dialect.name == "sqlite":
        return func.strftime("%Y-%m-%d %H:%M:%f000", column, f"{seconds:+.3f} seconds")
    return column + func.make_interval(0, 0, 0, 0, 0, 0, seconds)


METERED = or_(campaigns.c.daily_cap.is_not(None), campaigns.c.rate_limit.is_not(None))


def _campaign(conn: Connection, name: str) -> Any:
    return conn.execute(
        select(
            campaigns.c.cancelled_at,
            campaigns.c.held_at,
            campaigns.c.paused_at,
            campaigns.c.pause_reason,
            METERED.label("metered"),
        )
        .where(campaigns.c.name == name)
        .with_for_update()
    ).first()


def hold_campaign(engine: Engine, name: str, *, create: bool = False) -> dict[str, Any] | None:
    """Hold a campaign for approval: nothing of it is sent until `approve_campaign`.

    `create` makes the campaign if it is new (a launch with --hold); an existing campaign
    that already sent messages can be held too, only what is unsent stops.
    """
    if create:
        ensure_campaign(engine, name)
    return _block(engine, name, "held_at", None)


def pause_campaign(
    engine: Engine, name: str, reason: str = "paused by the operator"
) -> dict[str, Any] | None:
    """Stop sending a campaign's unsent messages; those with the provider are still followed."""
    return _block(engine, name, "paused_at", reason)


def approve_campaign(
    engine: Engine, name: str, broker_url: str | None = None
) -> dict[str, Any] | None:
    """Send a campaign held for approval (unless it is also paused)."""
    return _unblock(engine, name, "held_at", "approved", "it is not held for approval", broker_url)


def resume_campaign(
    engine: Engine, name: str, broker_url: str | None = None
) -> dict[str, Any] | None:
    """Send a paused campaign's messages again (unless it is also held for approval)."""
    return _unblock(engine, name, "paused_at", "resumed", "it is not paused", broker_url)


def _block(engine: Engine, name: str, column: str, reason: str | None) -> dict[str, Any] | None:
    now = utcnow()
    with engine.begin() as conn:
        row = _campaign(conn, name)
        if row is None:
            return None
        if row.cancelled_at is not None:
            raise CampaignCancelled(name)
        values: dict[str, Any] = {column: func.coalesce(campaigns.c[column], now)}
        if reason is not None:
            values["pause_reason"] = reason
        conn.execute(update(campaigns).where(campaigns.c.name == name).values(values))
    detail = "campaign held for approval" if column == "held_at" else f"campaign {reason}"
    held = move_messages(engine, name, State.QUEUED, State.HELD, detail)
    return {"held_now": held, **campaign_control(engine, name)}


def _unblock(
    engine: Engine, name: str, column: str, verb: str, not_so: str, broker_url: str | None
) -> dict[str, Any] | None:
    now = utcnow()
    with engine.begin() as conn:
        row = _campaign(conn, name)
        if row is None:
            return None
        if row.cancelled_at is not None:
            raise CampaignCancelled(name)
        since = getattr(row, column)
        if since is None:
            raise CampaignStateError(f"campaign {name!r} cannot be {verb}: {not_so}")
        values: dict[str, Any] = {column: None}
        if column == "paused_at":
            values["pause_reason"] = None
        conn.execute(update(campaigns).where(campaigns.c.name == name).values(values))
        other = row.paused_at if column == "held_at" else row.held_at
        blocked_since = min(t for t in (row.held_at, row.paused_at) if t is not None)
    released = 0
    # Neither held nor paused any more: the messages go again (a metered campaign's are
    # released by beat's next `meter`, within its limits).
    if other is None and not row.metered:
        seconds = (now - blocked_since).total_seconds()
        extra: dict[str, Any] = {}
        if seconds > 0:
            extra[DEADLINE_COLUMN] = later_by(engine, messages.c.send_deadline, seconds)
        released = move_messages(
            engine, name, State.HELD, State.QUEUED, f"campaign {verb}", **extra
        )
        if released and broker_url:
            from worker.producer import wake_dispatcher

            wake_dispatcher(broker_url)
    return {"released_now": released, **campaign_control(engine, name)}


def campaign_control(engine: Engine, name: str) -> dict[str, Any]:
    """Whether a campaign is held or paused, since when and why; its held messages."""
    with engine.connect() as conn:
        row = conn.execute(
            select(
                campaigns.c.cancelled_at,
                campaigns.c.held_at,
                campaigns.c.paused_at,
                campaigns.c.pause_reason,
                campaigns.c.daily_cap,
                campaigns.c.rate_limit,
                campaigns.c.cap_day,
                campaigns.c.cap_released,
            ).where(campaigns.c.name == name)
        ).first()
        held = conn.execute(
            select(func.count()).where(messages.c.campaign == name, messages.c.state == State.HELD)
        ).scalar_one()
    if row is None:  # messages stored under a name without a campaign row (older data)
        stopped = _globally_capped(engine, name)
        return {
            "status": "capped" if stopped else "running",
            "held_since": None,
            "paused_since": None,
            "pause_reason": stopped,
            "held_messages": held,
            "limits": {"daily_cap": None, "rate": None, "released_today": 0},
        }
    today = utcnow().date().isoformat()
    released_today = (row.cap_released or 0) if row.cap_day == today else 0
    capped = row.daily_cap is not None and released_today >= row.daily_cap and held > 0
    status = (
        "cancelled"
        if row.cancelled_at
        else "held"
        if row.held_at
        else "paused"
        if row.paused_at
        else "capped"
        if capped
        else "running"
    )
    reason = row.pause_reason
    if status == "capped":
        reason = (
            f"daily cap of {row.daily_cap:,} reached; {held:,} messages wait for "
            "00:00 UTC (held, not dropped)"
        )
    elif status == "running" and (stopped := _globally_capped(engine, name)):
        status, reason = "capped", stopped
    return {
        "status": status,
        "held_since": _iso(row.held_at),
        "paused_since": _iso(row.paused_at),
        "pause_reason": reason,
        "held_messages": held,
        "limits": {
            "daily_cap": row.daily_cap,
            "rate": row.rate_limit,
            "released_today": released_today,
        },
    }


def _globally_capped(engine: Engine, name: str) -> str | None:
    """The global cap that stops sending today (worker/quota.py), when this campaign has
    queued messages it keeps waiting."""
    from worker.quota import stored_reason

    with engine.connect() as conn:
        why = stored_reason(conn)
        if why is None:
            return None
        waiting = conn.execute(
            select(func.count()).where(
                messages.c.campaign == name, messages.c.state == State.QUEUED
            )
        ).scalar_one()
    return why if waiting else None


# --- caps and per-campaign rate --------------------------------------------------------


def set_limits(
    engine: Engine, name: str, daily_cap: int | None, rate: float | None
) -> dict[str, Any] | None:
    """Meter a campaign: at most `daily_cap` messages released per UTC day and `rate` per
    second (beneath the global SEND_MESSAGES_PER_SECOND); None lifts a limit. Its unsent
    messages wait `held` and beat releases them; none is ever dropped."""
    if daily_cap is not None and daily_cap < 1:
        raise CampaignError(f"--daily-cap must be at least 1, got {daily_cap}")
    if rate is not None and not rate > 0:
        raise CampaignError(f"--rate must be above 0 messages/s, got {rate}")
    with engine.begin() as conn:
        row = _campaign(conn, name)
        if row is None:
            return None
        if row.cancelled_at is not None:
            raise CampaignCancelled(name)
        conn.execute(
            update(campaigns)
            .where(campaigns.c.name == name)
            .values(daily_cap=daily_cap, rate_limit=rate)
        )
        blocked = row.held_at is not None or row.paused_at is not None
    if daily_cap is not None or rate is not None:
        # Beat's next tick (`meter`) releases them within the limits.
        move_messages(engine, name, State.QUEUED, State.HELD, "campaign metered (cap or rate)")
    elif not blocked:
        move_messages(engine, name, State.HELD, State.QUEUED, "campaign limits lifted")
    return campaign_control(engine, name)


def meter(
    engine: Engine,
    interval: float = 1.0,
    now: datetime | None = None,
    retry_for: float = 21600.0,
) -> int:
    """Release the held messages of running metered campaigns within their limits: the
    day's cap, and `rate × interval` queued at a time (beat runs this every `interval`
    seconds, so the claim sends them at about the rate). Answers how many it released.

    A released message's send deadline is at least `retry_for` (SEND_RETRY_FOR_SECONDS)
    from its release: days waiting for a cap must not fail it unsent.
    """
    from sqlalchemy import case

    now = now or utcnow()
    fresh = now + timedelta(seconds=retry_for)
    deadline = messages.c.send_deadline
    renewed = {"send_deadline": case((deadline < fresh, fresh), else_=deadline)}
    day = now.date().isoformat()
    with engine.connect() as conn:
        metered = conn.execute(
            select(
                campaigns.c.name,
                campaigns.c.daily_cap,
                campaigns.c.rate_limit,
                campaigns.c.cap_day,
                campaigns.c.cap_released,
            ).where(
                METERED,
                campaigns.c.cancelled_at.is_(None),
                campaigns.c.held_at.is_(None),
                campaigns.c.paused_at.is_(None),
            )
        ).all()
    released_all = 0
    for name, cap, rate, cap_day, cap_released in metered:
        today = (cap_released or 0) if cap_day == day else 0
        allow = cap - today if cap is not None else MOVE_CHUNK
        if rate is not None:
            with engine.connect() as conn:
                queued = conn.execute(
                    select(func.count()).where(
                        messages.c.campaign == name, messages.c.state == State.QUEUED
                    )
                ).scalar_one()
            allow = min(allow, max(1, math.ceil(rate * interval)) - queued)
        released = 0
        if allow > 0:
            why = "released within the campaign's " + (
                "rate" if rate is not None and cap is None else "daily cap and rate"
            )
            released = move_messages(
                engine, name, State.HELD, State.QUEUED, why, limit=allow, **renewed
            )
        if released or cap_day != day:
            with engine.begin() as conn:
                conn.execute(
                    update(campaigns)
                    .where(campaigns.c.name == name)
                    .values(cap_day=day, cap_released=today + released)
                )
        if cap is not None and today < cap <= today + released:
            log.warning(
                "campaign %s: daily cap of %d messages reached; the rest waits (held, not "
                "dropped) until 00:00 UTC",
                name,
                cap,
            )
        released_all += released
    return released_all


def enforce_holds(engine: Engine) -> int:
    """Hold the queued messages of held and paused campaigns: a send that was in flight when
    the campaign was paused and failed comes back `queued`; this puts it with the others.
    Run by beat; answers how many it moved."""
    with engine.connect() as conn:
        blocked = list(
            conn.execute(
                select(campaigns.c.name).where(
                    campaigns.c.cancelled_at.is_(None),
                    or_(campaigns.c.held_at.is_not(None), campaigns.c.paused_at.is_not(None)),
                )
            ).scalars()
        )
    return sum(
        move_messages(engine, name, State.QUEUED, State.HELD, "campaign held or paused")
        for name in blocked
    )


def list_campaigns(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        counts: dict[str, dict[str, int]] = {}
        for name, state, n in conn.execute(
            select(messages.c.campaign, messages.c.state, func.count())
            .where(messages.c.campaign.is_not(None))
            .group_by(messages.c.campaign, messages.c.state)
        ):
            counts.setdefault(name, {})[state] = n
        rows = conn.execute(select(campaigns).order_by(campaigns.c.created_at)).all()
    listing = []
    for row in rows:
        states = counts.get(row.name, {})
        total = sum(states.values())
        listing.append(
            {
                "campaign": row.name,
                "created_at": _iso(row.created_at),
                "cancelled_at": _iso(row.cancelled_at),
                "retry_of": row.retry_of,
                "total": total,
                "final": sum(n for s, n in states.items() if s in FINAL),
                "delivered": states.get(State.DELIVERED, 0),
            }
        )
    return listing


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


# --- reading a CSV file --------------------------------------------------------------


@dataclass(frozen=True)
class Defaults:
    """Values for columns the file lacks or leaves empty (`--from-name`, `--type`, …)."""

    from_name: str | None = None
    message_type: str | None = None
    ttl: int | None = None
    route: str | None = None
    text: str | None = None  # a template: "Hi {name}, your code {code}"
    callback_url: str | None = None  # for the whole campaign (issue: outcome callbacks)
    callback_task: str | None = None
    region: str | None = None  # `--default-region UA`: national numbers read as Ukrainian
    columns: tuple[tuple[str, str], ...] = ()  # `--column phone=toPhone`: header -> field
    dedupe: bool = False  # `--dedupe`: skip a phone already in the campaign (or the file)
    # `--send-window 09:00-20:00` (or `off`/`none`): the campaign's quiet hours, stored with it
    send_window: str | None = None


def column_mapping(specs: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """`--column HEADER=FIELD` options, checked: the field must be one of the API's."""
    mapping: dict[str, str] = {}
    for spec in specs:
        header, equals, target = (part.strip() for part in spec.partition("="))
        if not (equals and header and target):
            raise CampaignError(f"--column {spec!r} must be HEADER=FIELD, like phone=toPhone")
        field_name = _CANONICAL.get(target.lower())
        if field_name is None:
            raise CampaignError(
                f"--column {spec!r} maps to an unknown field {target!r}; "
                f"the fields are: {', '.join(API_COLUMNS)}"
            )
        if header.lower() in mapping:
            raise CampaignError(f"--column maps the column {header!r} twice")
        mapping[header.lower()] = field_name
    return tuple(mapping.items())


@dataclass(frozen=True)
class Row:
    line: int
    values: dict[str, str]
    problem: str | None = None  # set when the line could not even be read


@dataclass
class CsvLayout:
    columns: list[str]  # canonical API names where they match, else as written
    ignored: list[str]
    delimiter: str  # "xlsx" for a workbook
    renamed: dict[str, str] = field(default_factory=dict)  # field -> the header it came from


def _decode_lines(raw: IO[bytes], bad: set[int]) -> Iterator[str]:
    """Decode line by line, so one badly encoded line costs one row, not the file."""
    for number, line in enumerate(raw, start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            bad.add(number)
            yield line.decode("utf-8", errors="replace")


def _binary(head: bytes) -> bool:
    """NULs in the header line (UTF-16, zip/xlsx) or everywhere (images) mean not a text
    file; a stray NUL in one data row costs that row only (validation refuses it)."""
    first_line = head.partition(b"\n")[0]
    return b"\x00" in first_line or head.count(b"\x00") * 10 > len(head)


_SEP_LINE = re.compile(r"sep=(.)\s*")  # Excel writes and reads a first line "sep=;"
XLSX_MAGIC = b"PK\x03\x04"
XLS_MAGIC = b"\xd0\xcf\x11\xe0"


def _sniff(path: Path) -> tuple[str, bool]:
    """The file's delimiter, and whether its first line is Excel's `sep=` line."""
    with path.open("rb") as raw:
        head = raw.read(SNIFF_BYTES)
    if not head.strip():
        raise CampaignError(f"{path} is empty")
    if head.startswith(XLS_MAGIC):
        raise CampaignError(
            f"{path} is an old Excel .xls workbook; save it as .xlsx or CSV UTF-8 and launch that"
        )
    if _binary(head):
        raise CampaignError(f"{path} is not a CSV text file (it contains binary data)")
    sample = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    first = sample.splitlines()[0] if sample.splitlines() else sample
    if sep := _SEP_LINE.fullmatch(first):
        return sep[1], True
    try:
        return csv.Sniffer().sniff(first, delimiters=",;\t|").delimiter, False
    except csv.Error:
        return ",", False


def template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise CampaignError(f"--text template is malformed: {exc}") from None


def read_layout(header: list[str], defaults: Defaults, delimiter: str) -> CsvLayout:
    written = [h.strip().lstrip("\ufeff").strip() for h in header]
    mapping = dict(defaults.columns)
    found = {h.lower() for h in written}
    for source, target in mapping.items():
        if source not in found:
            raise CampaignError(
                f"--column {source}={target}: the file has no column {source!r} "
                f"(found: {', '.join(h for h in written if h)})"
            )
    columns = [mapping.get(h.lower()) or _CANONICAL.get(h.lower(), h) for h in written]
    renamed = {mapping[h.lower()]: h for h in written if h.lower() in mapping}
    if not any(columns):
        raise CampaignError("the header row is empty")
    duplicates = sorted({c for c in columns if columns.count(c) > 1 and c})
    if duplicates:
        raise CampaignError(f"the header repeats columns: {', '.join(duplicates)}")
    if "toPhone" not in columns:
        raise CampaignError(
            f"the header has no toPhone column (found: {', '.join(columns)}); "
            f"the columns are the cascade API's field names: {', '.join(API_COLUMNS)}, "
            "or map yours with --column, like --column phone=toPhone"
        )
    used = set(template_fields(defaults.text)) if defaults.text else set()
    known = {c.lower() for c in [*columns, *renamed.values()]}
    missing = sorted(u for u in used if u.lower() not in known)
    if missing:
        raise CampaignError(f"--text uses columns the file does not have: {', '.join(missing)}")
    used_folded = {u.lower() for u in used}  # `{name}` fills from a column headed `Name`
    ignored = [c for c in columns if c and c not in API_COLUMNS and c.lower() not in used_folded]
    return CsvLayout(columns, ignored, delimiter, renamed)


def read_rows(path: Path, defaults: Defaults) -> tuple[CsvLayout, Iterator[Row]]:
    """The file's layout (checked now) and its rows (read lazily): CSV in any of the forms
    Excel and other tools write, or an .xlsx workbook's first sheet."""
    if not path.is_file():
        raise CampaignError(f"{path}: no such file")
    with path.open("rb") as probe:
        if probe.read(4) == XLSX_MAGIC:
            return read_xlsx(path, defaults)
    delimiter, sep_line = _sniff(path)
    raw = path.open("rb")
    bad: set[int] = set()
    reader = csv.reader(_decode_lines(raw, bad), delimiter=delimiter)
    try:
        if sep_line:
            next(reader)
        header = next(reader)
    except StopIteration:
        raw.close()
        raise CampaignError(f"{path} is empty") from None
    except csv.Error as exc:
        raw.close()
        raise CampaignError(f"{path} is not readable as CSV: {exc}") from None
    layout = read_layout(header, defaults, delimiter)
    return layout, _rows(reader, raw, layout, bad)


def _rows(reader: Any, raw: IO[bytes], layout: CsvLayout, bad: set[int]) -> Iterator[Row]:
    try:
        start = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Row(start, {}, f"not readable as CSV: {exc}")
                start = reader.line_num + 1
                continue
            end = reader.line_num
            line, start = start, end + 1
            if not any(c.strip() for c in cells):
                continue  # blank line
            if bad.intersection(range(line, end + 1)):
                yield Row(line, {}, "not valid UTF-8; save the file as UTF-8")
                continue
            if len(cells) > len(layout.columns):
                yield Row(line, {}, f"has {len(cells)} cells, the header {len(layout.columns)}")
                continue
            cells += [""] * (len(layout.columns) - len(cells))  # Excel drops trailing cells
            yield Row(line, _values(layout, cells))
    finally:
        raw.close()


def _values(layout: CsvLayout, cells: list[str]) -> dict[str, str]:
    """A row's cells by field; a mapped column is also there under its own header, so a
    --text template may use either name."""
    values = dict(zip(layout.columns, cells, strict=True))
    for target, header in layout.renamed.items():
        values.setdefault(header, values[target])
    return values


# --- reading an .xlsx workbook -------------------------------------------------------


def read_xlsx(path: Path, defaults: Defaults) -> tuple[CsvLayout, Iterator[Row]]:
    """The first sheet, streamed (openpyxl read-only: one row in memory at a time); lines
    are the sheet's row numbers, as Excel shows them."""
    import zipfile

    from openpyxl import load_workbook

    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
        raise CampaignError(f"{path} is not a readable .xlsx workbook: {exc}") from None
    sheet = book.worksheets[0] if book.worksheets else None
    if sheet is None:
        book.close()
        raise CampaignError(f"{path} has no worksheet")
    cells = sheet.iter_rows(values_only=True)
    try:
        header = next(cells)
    except StopIteration:
        book.close()
        raise CampaignError(f"{path}: the first sheet is empty") from None
    width = len(header)
    while width and header[width - 1] is None:  # trailing empty header cells
        width -= 1
    layout = read_layout([_cell_text(c) for c in header[:width]], defaults, "xlsx")
    return layout, _xlsx_rows(book, cells, layout)


def _xlsx_rows(book: Any, cells: Iterator[tuple[Any, ...]], layout: CsvLayout) -> Iterator[Row]:
    width = len(layout.columns)
    try:
        for line, values in enumerate(cells, start=2):
            text = [_cell_text(v) for v in values]
            if not any(t.strip() for t in text):
                continue
            if any(t.strip() for t in text[width:]):
                yield Row(line, {}, f"has cells beyond the header's {width} columns")
                continue
            text = (text + [""] * width)[:width]
            yield Row(line, _values(layout, text))
    finally:
        book.close()


def _cell_text(value: Any) -> str:
    """A cell as the text a CSV export would hold; a phone typed as a number keeps its digits
    (380671234567, not 380671234567.0)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# --- rows to messages (pure) ---------------------------------------------------------


class _Folded(dict[str, str]):
    """Template lookups ignore case: {name} fills from a column headed Name."""

    def __missing__(self, key: str) -> str:
        for name, value in self.items():
            if name.lower() == key.lower():
                return value
        raise KeyError(key)


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def generated_id(campaign: str, line: int, phone: str) -> str:
    """Stable for the same file and name: re-launching enqueues nothing twice."""
    slug = _ID_UNSAFE.sub("-", campaign).strip("-")[:80] or "campaign"
    digest = hashlib.sha1(f"{campaign}\x00{line}\x00{phone}".encode()).hexdigest()[:10]
    return f"{slug}-{line}-{digest}"


def to_message(row: Row, defaults: Defaults, campaign: str) -> dict[str, Any]:
    """The cascade API object for one CSV row; type problems are left to validation."""
    values = {k: v.strip() for k, v in row.values.items() if k in API_COLUMNS}
    message: dict[str, Any] = {k: v for k, v in values.items() if v != ""}
    for key, default in (
        ("fromName", defaults.from_name),
        ("messageType", defaults.message_type),
        ("ttl", defaults.ttl),
        ("route", defaults.route),
        ("phoneRegion", defaults.region),
    ):
        if key not in message and default is not None:
            message[key] = default
    if "text" not in message and defaults.text:
        message["text"] = defaults.text.format_map(_Folded(row.values))
    for number in ("ttl", "callbackLateAfter"):  # CSV cells are text; validation wants ints
        if isinstance(message.get(number), str) and message[number].isdecimal():
            message[number] = int(message[number])
    if "surveyOptions" in message:
        message["surveyOptions"] = [o.strip() for o in message["surveyOptions"].split("|")]
    if "id" not in message:
        message["id"] = generated_id(campaign, row.line, message.get("toPhone", ""))
    return message


# --- the launch ----------------------------------------------------------------------


@dataclass
class LaunchStats:
    rows: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    renumbered: int = 0  # phones read as E.164 with the default region
    deduped: int = 0  # --dedupe: rows skipped, their phone already in the campaign
    estimate: Any = None  # worker.estimate.Estimate over the accepted messages
    ignored_columns: list[str] = field(default_factory=list)
    rejected_file: str | None = None
    # Consent (worker/consent.py, worker/quiet.py): refused by the suppression list, held
    # for the recipient's send window, expired because the window opens after their TTL.
    suppressed: int = 0
    waiting_for_window: int = 0
    expired_by_window: int = 0


REJECT_COLUMNS = ("line", "field", "reason", "id", "toPhone", "changed")


def phone_change(message: dict[str, Any], region: str | None) -> str:
    """What the default region made of the row's phone, for the rejects file ('' if nothing)."""
    from worker.validation import region_problem, with_region

    phone = message.get("toPhone")
    region = message.get("phoneRegion") or region
    if not isinstance(phone, str) or not isinstance(region, str) or region_problem(region):
        return ""
    read = with_region(phone, region)
    if read == phone:
        return ""
    return f"toPhone {phone!r} read as {read} (region {region.upper()})"


def rejected_path(path: Path) -> Path:
    """`contacts.csv` → `contacts.rejected.csv`; `contacts.xlsx` → `contacts.xlsx.rejected.csv`
    (so a workbook and its CSV export never overwrite each other's rejects)."""
    if path.suffix.lower() == ".csv":
        return path.with_name(f"{path.stem}.rejected.csv")
    return path.with_name(f"{path.name}.rejected.csv")


def launch(
    path: Path,
    name: str,
    defaults: Defaults,
    settings: Settings,
    *,
    dry_run: bool = False,
    hold: bool = False,
    limits: tuple[int | None, float | None] = (None, None),
    progress: Callable[[LaunchStats], None] | None = None,
) -> LaunchStats:
    """Validate and enqueue every row; write refused rows beside the file; never stop early.

    `hold`: the campaign is held for approval before the first row is stored, so nothing
    is sent until `approve_campaign`.
    """
    from worker.db import get_engine
    from worker.producer import check_campaign, chunked, wake_dispatcher

    check_campaign(name)
    campaign_callbacks(defaults.callback_url, defaults.callback_task)  # refuse bad flags first
    window = send_window_option(defaults.send_window)
    layout, rows = read_rows(path, defaults)
    if hold and not dry_run:
        hold_campaign(get_engine(settings.database_url), name, create=True)
    if limits != (None, None) and not dry_run:  # metered from its first message on
        ensure_campaign(get_engine(settings.database_url), name)
        set_limits(get_engine(settings.database_url), name, *limits)
    if window is not None and not dry_run:  # stored before the first row: every row has it
        from worker.quiet import campaign_window

        ensure_campaign(get_engine(settings.database_url), name)
        campaign_window(get_engine(settings.database_url), name, window, "--send-window")
    from worker.estimate import Estimate

    stats = LaunchStats(ignored_columns=layout.ignored, estimate=Estimate())
    if progress:
        progress(stats)  # the caller holds the figures even if the first chunk is cut short
    woken = False
    out_path = rejected_path(path)
    with out_path.open("w", newline="", encoding="utf-8") as out:
        rejects = csv.writer(out)
        rejects.writerow(REJECT_COLUMNS)
        for chunk in chunked(rows, CHUNK):
            stats.rows += len(chunk)
            for line, field_name, reason, message in _settle(
                chunk, defaults, name, settings, stats, dry_run
            ):
                rejects.writerow(
                    (
                        line,
                        field_name,
                        reason,
                        message.get("id", ""),
                        message.get("toPhone", ""),
                        phone_change(message, settings.default_phone_region),
                    )
                )
            if progress:
                progress(stats)
            if not dry_run and stats.accepted and not woken:
                wake_dispatcher(settings.broker_url)  # beat and chained sends do the rest
                woken = True
    if stats.rejected:
        stats.rejected_file = str(out_path)
    else:
        out_path.unlink()
    return stats


def send_window_option(text: str | None) -> str | None:
    """`--send-window` checked and normalised (`none` is `off`); CampaignError names it."""
    from worker.quiet import checked_window

    if text is None:
        return None
    try:
        return checked_window(text, "--send-window")
    except ValueError as exc:
        raise CampaignError(str(exc)) from None


def _consent_preview(
    stats: LaunchStats, valid: list[Any], name: str, settings: Settings, window: str | None
) -> None:
    from sqlalchemy.exc import DBAPIError

    from worker.db import get_engine
    from worker.quiet import preview

    try:
        counts = preview(get_engine(settings.database_url), valid, name, settings, window)
    except DBAPIError:  # a dry run needs no database: without one, nothing to count
        return
    stats.suppressed += counts["suppressed"]
    stats.waiting_for_window += counts["waiting_for_window"]
    stats.expired_by_window += counts["expired_by_window"]


def _stored_ids(settings: Settings, ids: list[str]) -> set[str]:
    """Those of `ids` already stored; none when there is no database (a dry run needs none)."""
    from sqlalchemy.exc import DBAPIError

    from worker.db import get_engine

    if not ids:
        return set()
    try:
        with get_engine(settings.database_url).connect() as conn:
            return set(conn.scalars(select(messages.c.id).where(among(conn, messages.c.id, ids))))
    except DBAPIError:
        return set()


def _waiting_for_window(settings: Settings, ids: list[Any]) -> int:
    """Of the messages just stored queued, those the recipient's send window keeps back."""
    if not ids:
        return 0
    from worker.db import get_engine

    with get_engine(settings.database_url).connect() as conn:
        return conn.execute(
            select(func.count()).where(
                among(conn, messages.c.id, ids), messages.c.window_at > utcnow()
            )
        ).scalar_one()


def _dedupe(
    readable: list[Row],
    messages_: list[dict[str, Any]],
    name: str,
    settings: Settings,
    now: datetime,
    rules: Any,
    stats: LaunchStats,
) -> set[int]:
    """The lines to keep under --dedupe: a row whose phone (as it would be sent, in E.164)
    is already in the campaign, or earlier in the file, is skipped. A row whose own id is
    stored goes on (a relaunch: it counts as already known). Invalid rows go on, to be
    rejected with their reasons."""
    from worker.db import get_engine
    from worker.validation import validate_message

    phones: dict[int, tuple[str, str]] = {}
    for row, message in zip(readable, messages_, strict=True):
        valid = validate_message(message, now=now, rules=rules)
        if not isinstance(valid, list):
            phones[row.line] = (valid.to_phone, valid.id)
    wanted = sorted({phone for phone, _ in phones.values()})
    owners: dict[str, set[str]] = {}
    if wanted:
        with get_engine(settings.database_url).connect() as conn:
            for phone, message_id in conn.execute(
                select(messages.c.to_phone, messages.c.id).where(
                    among(conn, messages.c.to_phone, wanted), messages.c.campaign == name
                )
            ):
                owners.setdefault(phone, set()).add(message_id)
    keep: set[int] = set()
    for row in readable:
        if row.line not in phones:
            keep.add(row.line)
            continue
        phone, message_id = phones[row.line]
        taken = owners.setdefault(phone, set())
        if taken and message_id not in taken:
            stats.deduped += 1
            continue
        taken.add(message_id)
        keep.add(row.line)
    return keep


def _settle(
    chunk: list[Row],
    defaults: Defaults,
    name: str,
    settings: Settings,
    stats: LaunchStats,
    dry_run: bool,
) -> Iterator[tuple[int, str, str, dict[str, Any]]]:
    """Validate (and unless a dry run, enqueue) one chunk; yield its refusals in line order."""
    from worker.producer import enqueue, rules_from
    from worker.validation import validate_message

    readable = [r for r in chunk if r.problem is None]
    messages_ = [to_message(r, defaults, name) for r in readable]
    now, rules, card = utcnow(), rules_from(settings), settings.rates
    if defaults.dedupe:
        kept = _dedupe(readable, messages_, name, settings, now, rules, stats)
        chunk = [r for r in chunk if r.problem is not None or r.line in kept]
        pairs = [(r, m) for r, m in zip(readable, messages_, strict=True) if r.line in kept]
        readable, messages_ = [r for r, _ in pairs], [m for _, m in pairs]
    if dry_run:
        checked = [validate_message(m, now=now, rules=rules) for m in messages_]
        errors = [c if isinstance(c, list) else None for c in checked]
        # What the launch would answer `duplicate`: an id already stored (a relaunch), or
        # one repeated earlier in the chunk. Neither is enqueued, estimated nor counted.
        known = _stored_ids(settings, [c.id for c in checked if not isinstance(c, list)])
        valid = []
        for message in checked:
            if isinstance(message, list):
                continue
            if message.id in known:
                stats.duplicate += 1
                continue
            known.add(message.id)
            valid.append(message)
            stats.estimate.add(message, card)
        stats.accepted += len(valid)
        _consent_preview(stats, valid, name, settings, send_window_option(defaults.send_window))
    else:
        answered = enqueue(
            messages_,
            name,
            settings=settings,
            kick=False,
            callback_url=defaults.callback_url,
            callback_task=defaults.callback_task,
        )
        errors = [list(r.errors) if r.status == "rejected" else None for r in answered]
        stats.accepted += sum(r.status == "accepted" for r in answered)
        for message, result in zip(messages_, answered, strict=True):
            if result.status == "accepted":  # validated again: the estimate needs its fields
                valid = validate_message(message, now=now, rules=rules)
                if not isinstance(valid, list):
                    stats.estimate.add(valid, card)
        stats.duplicate += sum(r.status == "duplicate" for r in answered)
        stats.suppressed += sum(
            any("suppression list" in e.problem for e in r.errors) for r in answered
        )
        stats.expired_by_window += sum(
            r.status == "accepted" and r.state == State.EXPIRED for r in answered
        )
        stats.waiting_for_window += _waiting_for_window(
            settings, [r.id for r in answered if r.status == "accepted" and r.state == State.QUEUED]
        )
    stats.renumbered += sum(bool(phone_change(m, settings.default_phone_region)) for m in messages_)
    found = dict(zip((r.line for r in readable), zip(messages_, errors, strict=True), strict=True))
    for row in chunk:
        if row.problem is not None:
            stats.rejected += 1
            yield row.line, "row", row.problem, {}
            continue
        message, problems = found[row.line]
        if problems is not None:
            stats.rejected += 1
            for error in problems:
                yield row.line, error.field, error.problem, message


# --- retry what did not arrive ---------------------------------------------------------

# Final states a message may be sent again from: it never arrived. `delivered` never is.
RETRYABLE: tuple[State, ...] = (
    State.UNDELIVERABLE,
    State.PERMANENTERROR,
    State.REJECTED,
    State.FAILED,
    State.EXPIRED,
    State.TIMEOUT,
    State.CANCELLED,
)


def retry_states(text: str) -> tuple[State, ...]:
    """`--states undeliverable,failed,expired`, checked: final states that are not delivered."""
    chosen: list[State] = []
    for name in (n.strip().lower() for n in text.split(",")):
        if not name:
            continue
        if name == State.DELIVERED:
            raise CampaignError("--states: a delivered message is never sent again")
        if name not in {s.value for s in State}:
            raise CampaignError(
                f"--states: unknown state {name!r}; retryable: {', '.join(RETRYABLE)}"
            )
        if State(name) not in RETRYABLE:
            raise CampaignError(
                f"--states: {name!r} is not final; a message still under way is never resent"
            )
        chosen.append(State(name))
    if not chosen:
        raise CampaignError(f"--states: name at least one of {', '.join(RETRYABLE)}")
    return tuple(dict.fromkeys(chosen))


def retry_id(new_campaign: str, old_id: str) -> str:
    """The same old message retried under the same new name always gets the same new id,
    so a retry run twice enqueues nothing twice."""
    digest = hashlib.sha1(f"{new_campaign}\x00{old_id}".encode()).hexdigest()[:10]
    return f"{old_id[:230]}-r{digest}"


def retry_campaign(
    name: str,
    states: tuple[State, ...],
    settings: Settings,
    *,
    new_name: str | None = None,
    route: str | None = None,
    hold: bool = False,
) -> dict[str, Any] | None:
    """Send the messages of `name` that ended in `states` again, as a new campaign linked to
    it (`retry_of`), with new tracking ids; answer the counts, or None without `name`."""
    from worker.db import get_engine
    from worker.producer import check_campaign, enqueue

    engine = get_engine(settings.database_url)
    new_name = new_name or f"{name}-retry"
    check_campaign(new_name)
    if new_name == name:
        raise CampaignError("--name: the retry needs a name of its own")
    with engine.connect() as conn:
        found = conn.execute(select(campaigns.c.name).where(campaigns.c.name == name)).first()
        linked = conn.execute(
            select(campaigns.c.retry_of).where(campaigns.c.name == new_name)
        ).first()
    if found is None:
        return None
    if linked is not None and linked.retry_of != name:
        raise CampaignError(
            f"--name: campaign {new_name!r} exists and is not a retry of {name!r}; "
            "give another --name"
        )
    ensure_campaign(engine, new_name)
    with engine.begin() as conn:
        conn.execute(update(campaigns).where(campaigns.c.name == new_name).values(retry_of=name))
    if hold:
        hold_campaign(engine, new_name)
    counts = {"selected": 0, "accepted": 0, "duplicate": 0, "rejected": 0}
    columns = [
        messages.c.pk,
        messages.c.id,
        messages.c.from_name,
        messages.c.to_phone,
        messages.c.message_type,
        messages.c.text,
        messages.c.ttl,
        messages.c.survey_options,
        messages.c.route,
        messages.c.callback_url,
        messages.c.callback_task,
    ]
    after = 0
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                select(*columns)
                .where(
                    messages.c.campaign == name,
                    messages.c.state.in_(states),
                    messages.c.pk > after,
                )
                .order_by(messages.c.pk)
                .limit(CHUNK)
            ).all()
        if not rows:
            break
        after = rows[-1].pk
        batch = []
        for row in rows:
            message: dict[str, Any] = {
                "id": retry_id(new_name, row.id),
                "fromName": row.from_name,
                "toPhone": row.to_phone,
                "messageType": row.message_type,
                "route": route or row.route,
            }
            for key, value in (
                ("text", row.text),
                ("ttl", row.ttl),
                ("surveyOptions", row.survey_options),
                ("callbackUrl", row.callback_url),
                ("callbackTask", row.callback_task),
            ):
                if value is not None:
                    message[key] = value
            batch.append(message)
        counts["selected"] += len(batch)
        for result in enqueue(batch, new_name, settings=settings):
            counts[result.status] += 1
    return {"campaign": new_name, "retry_of": name, "states": list(states), **counts}
