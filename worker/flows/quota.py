"""Global caps: at most DAILY_MESSAGE_CAP messages and DAILY_SPEND_BUDGET of spend per UTC
day, over every campaign (and messages without one). Per-campaign caps and rates are
worker.campaigns' (`campaign launch --daily-cap --rate`); these sit above them.

The dispatcher asks `stopped` before it claims and hands every claim to `admit`, which
takes, in claim order, the rows that still fit the day's figures (one locked row of
`send_days`) and counts them; the rest go straight back to the queue. A message counts
once a UTC day, the first time it is admitted to a send request that day: the day is
marked on it (`messages.counted_on`, migration 0018) in the transaction that counts it.
A send retried the same day after a provider error (5xx, connection refused, a 429, a
pause) or a lost answer is not counted again, and goes even once a cap is reached: the
dispatcher then claims only messages counted today. A lost answer (the provider may have
the message) was counted when it was first admitted, as every send is. A message retried on
a later UTC day counts again, on that day: each day's figures are what was admitted to
send requests that day, and the cap holds for what is sent on it. The budget counts a
message at its RATE_CARD price as if it ended on SMS (per part; viber for tg-viber, as
`--dry-run` estimates), a number the card has no price for at 0.

Reaching a cap pauses sending, never drops: messages stay `queued` until 00:00 UTC (or a
raised limit), the sweeper keeps their send deadline at least SEND_RETRY_FOR_SECONDS past
the next midnight meanwhile (`keep_waiting`), the workers log it once, and campaign status
and reports say `capped` with the reason (`today`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, select, update

from config import Settings
from worker.core.estimate import channel_for, rate_for, sms_parts
from worker.core.states import State
from worker.store.db import among, insert_or_skip, utcnow
from worker.store.models import messages, send_days

log = logging.getLogger(__name__)

MESSAGES = "messages"  # send_days.capped: DAILY_MESSAGE_CAP reached
BUDGET = "budget"  # DAILY_SPEND_BUDGET reached


def active(settings: Settings) -> bool:
    return settings.daily_message_cap is not None or settings.daily_spend_budget is not None


def day_of(now: datetime) -> str:
    return now.date().isoformat()


def next_midnight(now: datetime) -> datetime:
    return datetime.combine(now.date() + timedelta(days=1), time(0), tzinfo=now.tzinfo)


def price(row: Any, card: dict[str, dict[str, float]] | None) -> float:
    """A claimed row's spend as the budget counts it (0 without a price)."""
    if not card:
        return 0.0
    channel = channel_for(row.message_type, row.route)
    rate = rate_for(card, row.to_phone, channel)
    if rate is None:
        return 0.0
    parts = sms_parts(row.text)[2] if channel == "sms" else 1
    return rate * parts


def _in_force(day: Any, settings: Settings) -> str | None:
    """The cap that stopped `day` (a send_days row), if it still holds under `settings`."""
    if day is None or day.capped is None:
        return None
    cap, budget = settings.daily_message_cap, settings.daily_spend_budget
    if day.capped == MESSAGES and cap is not None and day.messages >= cap:
        return MESSAGES
    if day.capped == BUDGET and budget is not None and budget <= (day.spend_budget or 0.0):
        return BUDGET
    return None


def reason(capped: str, settings: Settings, spend: float) -> str:
    """What an operator reads in status, reports and logs (stored with the day)."""
    if capped == MESSAGES:
        what = f"global daily cap of {settings.daily_message_cap:,} messages (DAILY_MESSAGE_CAP)"
    else:
        currency = f" {settings.rate_card_currency}" if settings.rate_card_currency else ""
        what = (
            f"global daily spend budget of {settings.daily_spend_budget:,.2f}{currency} "
            f"(DAILY_SPEND_BUDGET; {spend:,.2f} spent)"
        )
    return f"{what} reached; sending waits for 00:00 UTC (messages stay queued, not dropped)"


def stopped(engine: Engine, settings: Settings, now: datetime | None = None) -> str | None:
    """Why sending is stopped for today, or None. A cap lifted since (a raised or removed
    limit) is cleared here, so sending goes on."""
    if not active(settings):
        return None
    now = now or utcnow()
    with engine.connect() as conn:
        day = conn.execute(select(send_days).where(send_days.c.day == day_of(now))).first()
    if day is None or day.capped is None:
        return None
    capped = _in_force(day, settings)
    if capped is None:
        with engine.begin() as conn:
            conn.execute(
                update(send_days).where(send_days.c.day == day.day).values(capped=None, reason=None)
            )
        log.warning("global cap lifted: sending goes on (%s)", _limits(settings))
        return None
    return reason(capped, settings, day.spend)


class Candidate(NamedTuple):
    """One claimed row as the day's figures see it."""

    counted: bool  # already counted today (`counted_today`): admitted free, even when capped
    cost: float  # what counting it adds to the day's spend (`price`)


@dataclass(frozen=True, slots=True)
class Admission:
    """What one claim comes to against the day: the rows admitted to the send request and,
    among them, the rows counted now (indexes into the claim, in claim order); the day's
    figures after it, and the cap that stops new messages (reached now or before)."""

    admitted: tuple[int, ...]
    counted: tuple[int, ...]
    messages: int
    spend: float
    capped: str | None


def counted_today(counted_on: str | None, today: str) -> bool:
    """Whether a message marked `counted_on` (the last UTC day it was counted) already counts
    against `today`: only the same day. Counted on an earlier day, it counts again today."""
    return counted_on == today


def admission(
    claim: Sequence[Candidate],
    messages: int,
    spend: float,
    *,
    cap: int | None,
    budget: float | None,
    capped: str | None,
) -> Admission:
    """Of one claim (claim order), what goes and what is counted, from the day's figures
    (`messages`, `spend`, the cap in force, if any).

    A row counted today goes and costs nothing more. The others are counted while they fit;
    the first that does not stops the rest of them (claim order is priority order), so the
    cap is exact and a cheaper message never overtakes an urgent one."""
    admitted: list[int] = []
    counted: list[int] = []
    for index, row in enumerate(claim):
        if row.counted:
            admitted.append(index)
            continue
        if capped is not None:
            continue
        if cap is not None and messages >= cap:
            capped = MESSAGES
            continue
        if budget is not None and spend + row.cost > budget + 1e-9:
            capped = BUDGET
            continue
        admitted.append(index)
        counted.append(index)
        messages, spend = messages + 1, spend + row.cost
    if capped is None and cap is not None and messages >= cap:
        capped = MESSAGES  # the next claim need not be made and put back
    return Admission(tuple(admitted), tuple(counted), messages, spend, capped)


def admit(
    engine: Engine,
    settings: Settings,
    rows: Sequence[Any],
    token: str,
    now: datetime | None = None,
) -> tuple[list[Any], str | None]:
    """Of one claim's rows (claim order), those counted today already and those that fit
    today's cap and budget, counted and marked; the others are put back in the queue.
    Answers them and the reason when a cap stops new messages (reached by this claim or
    before)."""
    if not active(settings) or not rows:
        return list(rows), None
    now = now or utcnow()
    today = day_of(now)
    claim = [
        Candidate(True, 0.0)
        if counted_today(row.counted_on, today)
        else Candidate(False, price(row, settings.rates))
        for row in rows
    ]
    with engine.begin() as conn:
        day = _locked_day(conn, today)
        result = admission(
            claim,
            day.messages,
            day.spend,
            cap=settings.daily_message_cap,
            budget=settings.daily_spend_budget,
            capped=_in_force(day, settings),
        )
        values: dict[str, Any] = {"messages": result.messages, "spend": result.spend}
        why = reason(result.capped, settings, result.spend) if result.capped else None
        if why is not None:
            values |= {
                "capped": result.capped,
                "reason": why,
                "spend_budget": settings.daily_spend_budget,
            }
        conn.execute(update(send_days).where(send_days.c.day == today).values(values))
        if result.counted:  # in the same transaction: counted once, and marked so
            counted = [rows[i].pk for i in result.counted]
            conn.execute(
                update(messages).where(among(conn, messages.c.pk, counted)).values(counted_on=today)
            )
    going = set(result.admitted)
    fit = [row for i, row in enumerate(rows) if i in going]
    rest = [row.pk for i, row in enumerate(rows) if i not in going]
    if rest:
        _unclaim(engine, token, rest)
    if why is None:
        return fit, None
    if day.capped is None:  # reached by this claim: said once
        log.warning(
            "%s: %d messages sent today (UTC), %d put back", why, result.messages, len(rest)
        )
    return fit, why


def _locked_day(conn: Connection, today: str) -> Any:
    conn.execute(
        insert_or_skip(conn, send_days)
        .values(day=today, messages=0, spend=0.0)
        .on_conflict_do_nothing(index_elements=["day"])
    )
    return conn.execute(select(send_days).where(send_days.c.day == today).with_for_update()).one()


def _unclaim(engine: Engine, token: str, pks: list[int]) -> None:
    """Claimed rows a cap left out go back to the queue as they were (no attempt made)."""
    with engine.begin() as conn:
        conn.execute(
            update(messages)
            .where(among(conn, messages.c.pk, pks), messages.c.claim_token == token)
            .values(state=State.QUEUED, claim_token=None, lease_until=None)
        )


def keep_waiting(engine: Engine, settings: Settings, now: datetime | None = None) -> int:
    """While a global cap stops sending, no queued message may reach its send deadline
    (the sweeper would fail it unsent): each is kept at least SEND_RETRY_FOR_SECONDS past
    the next midnight (UTC), when sending goes on. Answers how many were moved."""
    now = now or utcnow()
    if stopped(engine, settings, now) is None:
        return 0
    keep = next_midnight(now) + timedelta(seconds=settings.send_retry_for_seconds)
    deadline = messages.c.send_deadline
    with engine.begin() as conn:
        return conn.execute(
            update(messages)
            .where(messages.c.state == State.QUEUED, deadline < keep)
            .values(send_deadline=keep)
        ).rowcount


def today(engine: Engine, settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """Today's figures against the global caps, for status and reports."""
    now = now or utcnow()
    with engine.connect() as conn:
        day = conn.execute(select(send_days).where(send_days.c.day == day_of(now))).first()
    capped = _in_force(day, settings) if active(settings) else None
    return {
        "day": day_of(now),
        "messages": day.messages if day else 0,
        "spend": round(day.spend, 4) if day else 0.0,
        "currency": settings.rate_card_currency,
        "daily_message_cap": settings.daily_message_cap,
        "daily_spend_budget": settings.daily_spend_budget,
        "capped": reason(capped, settings, day.spend) if capped and day else None,
    }


def _limits(settings: Settings) -> str:
    return (
        f"DAILY_MESSAGE_CAP={settings.daily_message_cap}, "
        f"DAILY_SPEND_BUDGET={settings.daily_spend_budget}"
    )


def stored_reason(conn: Connection, now: datetime | None = None) -> str | None:
    """Why the workers stopped sending today, as they last saw it (no settings needed):
    for campaign status and reports."""
    return conn.execute(
        select(send_days.c.reason).where(
            send_days.c.day == day_of(now or utcnow()), send_days.c.capped.is_not(None)
        )
    ).scalar()
