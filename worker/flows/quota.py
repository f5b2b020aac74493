"""Global caps: at most DAILY_MESSAGE_CAP messages and DAILY_SPEND_BUDGET of spend per UTC
day, over every campaign (and messages without one). Per-campaign caps and rates are
worker.campaigns' (`campaign launch --daily-cap --rate`); these sit above them.

The dispatcher asks `stopped` before it claims and hands every claim to `admit`, which
takes, in claim order, the rows that still fit the day's figures (one locked row of
`send_days`) and counts them; the rest go straight back to the queue. A message counts when
it is admitted to a send request (a send retried after a provider error counts again); the
budget counts it at its RATE_CARD price as if it ended on SMS (per part; viber for
tg-viber, as `--dry-run` estimates), a number the card has no price for at 0.

Reaching a cap pauses sending, never drops: messages stay `queued` until 00:00 UTC (or a
raised limit), the sweeper keeps their send deadline at least SEND_RETRY_FOR_SECONDS past
the next midnight meanwhile (`keep_waiting`), the workers log it once, and campaign status
and reports say `capped` with the reason (`today`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, time, timedelta
from typing import Any

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


def admit(
    engine: Engine,
    settings: Settings,
    rows: Sequence[Any],
    token: str,
    now: datetime | None = None,
) -> tuple[list[Any], str | None]:
    """Of one claim's rows (claim order), those that fit today's cap and budget, counted;
    the others are put back in the queue. Answers them and the reason when a cap stopped
    the rest (or was reached by the last one admitted)."""
    if not active(settings) or not rows:
        return list(rows), None
    now = now or utcnow()
    cap, budget, card = settings.daily_message_cap, settings.daily_spend_budget, settings.rates
    today = day_of(now)
    with engine.begin() as conn:
        day = _locked_day(conn, today)
        count, spend = day.messages, day.spend
        capped = _in_force(day, settings)
        fit: list[Any] = []
        for row in [] if capped else rows:
            if cap is not None and count >= cap:
                capped = MESSAGES
                break
            cost = price(row, card)
            if budget is not None and spend + cost > budget + 1e-9:
                capped = BUDGET
                break
            fit.append(row)
            count, spend = count + 1, spend + cost
        if capped is None and cap is not None and count >= cap:
            capped = MESSAGES  # the next claim need not be made and put back
        values: dict[str, Any] = {"messages": count, "spend": spend}
        why = reason(capped, settings, spend) if capped is not None else None
        if capped is not None:
            values |= {"capped": capped, "reason": why, "spend_budget": budget}
        conn.execute(update(send_days).where(send_days.c.day == today).values(values))
    rest = [row.pk for row in rows[len(fit) :]]
    if rest:
        _unclaim(engine, token, rest)
    if why is None:
        return fit, None
    if day.capped is None:  # reached by this claim: said once
        log.warning("%s: %d messages sent today (UTC), %d put back", why, count, len(rest))
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
