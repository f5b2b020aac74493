"""Campaigns: the campaign row, holding, pausing, cancelling, metering and listing them.

Launching one from a CSV file is worker/flows/launch.py, which enqueues through the producer;
this store never imports the producer (the producer uses it), and wakes the dispatcher by
the task's name (worker/flows/wake.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, and_, func, insert, or_, select, update

from config import Settings
from worker.core.quiet import WINDOWED_TYPES, checked_window, next_window_open
from worker.core.states import FINAL, State
from worker.core.validation import NO_CALLBACKS, Callbacks
from worker.flows.quota import stored_reason
from worker.flows.tallies import counts_by_campaign
from worker.flows.wake import wake_dispatcher
from worker.store.db import AnyRow, among, insert_or_skip, utcnow
from worker.store.models import campaigns, events, messages

log = logging.getLogger(__name__)


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


def campaign_window(
    engine: Engine, campaign: str | None, given: str | None, option: str = "send window"
) -> str | None:
    """The campaign's own window: `given` is checked (a ValueError names `option`) and
    stored on the campaign (its row exists: `ensure_campaign` ran), else what was stored
    before, if anything."""
    if campaign is None:
        return given if given is None else checked_window(given, option)
    with engine.begin() as conn:
        if given is not None:
            value = checked_window(given, option)
            conn.execute(
                update(campaigns).where(campaigns.c.name == campaign).values(send_window=value)
            )
            return value
        found: str | None = conn.execute(
            select(campaigns.c.send_window).where(campaigns.c.name == campaign)
        ).scalar()
        return found


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
        states: dict[str, int] = dict(
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
    where: Sequence[Any] = (),
    while_campaign: ColumnElement[bool] | None = None,
    **values: Any,
) -> int:
    """Move every message of a campaign in `source` to `target` (and meeting `where`),
    journalled (source "system"), a chunk per transaction; answer how many moved.

    `while_campaign` is a condition on the campaign's row, checked with the row locked in
    each chunk's transaction: the move stops once it no longer holds. A decision made on an
    earlier read (beat holding a campaign that was paused when it looked) must not undo an
    operator's command that came in between (an approve, its messages then held for ever).

    Rows another transaction holds (a claim turning them into `sending`) are skipped: the
    loop ends when a pass finds no unlocked row. For holds, `enforce_holds` (beat) takes any
    row that was locked for another reason and is still queued. `values` are set too (a
    deadline pushed, an error for a cancel).
    """
    moved = 0
    while limit is None or moved < limit:
        size = MOVE_CHUNK if limit is None else min(MOVE_CHUNK, limit - moved)
        query = select(messages.c.pk).where(
            messages.c.campaign == name, messages.c.state == source, *where
        )
        if limit is not None:  # a metered release goes oldest first; a whole move need not
            query = query.order_by(messages.c.pk)
        with engine.begin() as conn:
            if while_campaign is not None and not _campaign_is(conn, name, while_campaign):
                return moved
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


def _campaign_is(conn: Connection, name: str, condition: ColumnElement[bool]) -> bool:
    """Whether the campaign meets `condition`, its row locked until the transaction ends
    (an operator's command on it waits; PostgreSQL re-checks the row once it may read it)."""
    found = conn.execute(
        select(campaigns.c.name).where(campaigns.c.name == name, condition).with_for_update()
    ).first()
    return found is not None


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
LIVE = campaigns.c.cancelled_at.is_(None)
BLOCKED = and_(LIVE, or_(campaigns.c.held_at.is_not(None), campaigns.c.paused_at.is_not(None)))
RUNNING = and_(LIVE, campaigns.c.held_at.is_(None), campaigns.c.paused_at.is_(None))
UNMETERED = and_(campaigns.c.daily_cap.is_(None), campaigns.c.rate_limit.is_(None))
# What a release from `held` needs to still hold: beat's metered one, an operator's plain one.
RUNNING_METERED = and_(RUNNING, METERED)
RUNNING_FREE = and_(RUNNING, UNMETERED)


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
    held = move_messages(engine, name, State.QUEUED, State.HELD, detail, while_campaign=BLOCKED)
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
            engine,
            name,
            State.HELD,
            State.QUEUED,
            f"campaign {verb}",
            while_campaign=RUNNING_FREE,
            **extra,
        )
        if released and broker_url:
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
    """The global cap that stops sending today (worker/flows/quota.py), when this campaign
    has queued messages it keeps waiting."""
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
        detail = "campaign metered (cap or rate)"
        move_messages(engine, name, State.QUEUED, State.HELD, detail, while_campaign=METERED)
    elif not blocked:
        detail = "campaign limits lifted"
        move_messages(engine, name, State.HELD, State.QUEUED, detail, while_campaign=RUNNING_FREE)
    return campaign_control(engine, name)


def rate_room(rate: float | None, interval: float, queued: int) -> int | None:
    """How many more of a campaign's messages its rate lets into the queue this tick
    (`rate × interval` at a time, at least one); None without a rate."""
    if rate is None:
        return None
    return max(1, math.ceil(rate * interval)) - queued


def new_releases(cap: int | None, released_today: int, room: int | None) -> int:
    """How many messages not yet released today a metered campaign may release now: what
    its daily cap leaves, within its rate's `room`. A message released today and held
    again since (a pause, a new limit) is not among them: it goes again without counting."""
    allow = cap - released_today if cap is not None else MOVE_CHUNK
    return allow if room is None else min(allow, room)


def meter(
    engine: Engine,
    interval: float = 1.0,
    now: datetime | None = None,
    retry_for: float = 21600.0,
) -> int:
    """Release the held messages of running metered campaigns within their limits: the
    day's cap, and `rate × interval` queued at a time (beat runs this every `interval`
    seconds, so the claim sends them at about the rate). Answers how many it released.

    A message counts once a UTC day against the cap: the day it was released is kept on
    it (`released_on`, migration 0018). One released today and held again since (a pause
    or a new limit while it waited to be sent, or to be retried after a provider error)
    is released again first, within the rate, without counting again; one released on an
    earlier day counts again today, as a new release.

    A released message's send deadline is at least `retry_for` (SEND_RETRY_FOR_SECONDS)
    from its release: days waiting for a cap must not fail it unsent.
    """
    from sqlalchemy import case

    now = now or utcnow()
    fresh = now + timedelta(seconds=retry_for)
    deadline = messages.c.send_deadline
    renewed: dict[str, Any] = {"send_deadline": case((deadline < fresh, fresh), else_=deadline)}
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
        queued = 0
        if rate is not None:
            with engine.connect() as conn:
                queued = conn.execute(
                    select(func.count()).where(
                        messages.c.campaign == name, messages.c.state == State.QUEUED
                    )
                ).scalar_one()
        room = rate_room(rate, interval, queued)
        again = 0
        if room is None or room > 0:
            again = move_messages(
                engine,
                name,
                State.HELD,
                State.QUEUED,
                "released again (counted today already)",
                limit=room,
                where=[messages.c.released_on == day],
                while_campaign=RUNNING_METERED,
                **renewed,
            )
        allow = new_releases(cap, today, None if room is None else room - again)
        released = 0
        if allow > 0:
            why = "released within the campaign's " + (
                "rate" if rate is not None and cap is None else "daily cap and rate"
            )
            released = move_messages(
                engine,
                name,
                State.HELD,
                State.QUEUED,
                why,
                limit=allow,
                while_campaign=RUNNING_METERED,
                released_on=day,
                **renewed,
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
        released_all += again + released
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
        move_messages(
            engine,
            name,
            State.QUEUED,
            State.HELD,
            "campaign held or paused",
            while_campaign=BLOCKED,
        )
        for name in blocked
    )


def list_campaigns(engine: Engine) -> list[dict[str, Any]]:
    """Every campaign with its counts, from the tallies: no campaign's messages are read."""
    with engine.connect() as conn:
        counts = counts_by_campaign(conn)
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


# --- the claim's side of send windows ----------------------------------------------------


def hold_outside_window(
    engine: Engine, settings: Settings, rows: Sequence[AnyRow], token: str, now: datetime
) -> list[AnyRow]:
    """Of one claim's rows, those inside their send window now; the others go back to the
    queue until their window's next opening (`available_at`, `window_at`).

    The producer placed each message in its window when it was enqueued; this catches the
    ones that come due outside it later: a campaign approved or resumed at night, a metered
    release, a send retried after a provider error. A message whose TTL runs out before the
    opening then ends `expired` when it is claimed again, as any expired message does.
    """
    windows = settings.windows
    by_type = windows.by_type or {}
    subject = [r for r in rows if r.message_type in WINDOWED_TYPES or by_type.get(r.message_type)]
    if not subject:
        return list(rows)
    names = {r.campaign for r in subject if r.campaign is not None}
    own: dict[str, str | None] = {}
    if names:
        with engine.connect() as conn:
            own = {
                name: window
                for name, window in conn.execute(
                    select(campaigns.c.name, campaigns.c.send_window).where(
                        among(conn, campaigns.c.name, sorted(names))
                    )
                ).all()
            }
    later: dict[int, datetime] = {}
    for row in subject:
        window = windows.for_message(row.message_type, own.get(row.campaign))
        opening = next_window_open(
            row.to_phone, now, window, settings.send_window_fallback_timezone
        )
        if opening > now:
            later[row.pk] = opening
    if not later:
        return list(rows)
    with engine.begin() as conn:
        for pk, opening in later.items():
            conn.execute(
                update(messages)
                .where(messages.c.pk == pk, messages.c.claim_token == token)
                .values(
                    state=State.QUEUED,
                    claim_token=None,
                    lease_until=None,
                    available_at=opening,
                    window_at=opening,
                )
            )
    return [r for r in rows if r.pk not in later]
