"""Read-only views of the record: one message with its history, one campaign in figures.

The dictionaries returned here are the `--json` output of the CLI; their keys are part of
the public contract.

Campaign figures must stay cheap at a million messages on SQLite and PostgreSQL, so every
figure is aggregated in SQL and Python only ever sees small grouped results or one page of
rows at a time.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Float,
    Integer,
    Row,
    Text,
    and_,
    cast,
    extract,
    func,
    literal,
    select,
)

from config.rates import RateCard
from worker.core.estimate import Estimate
from worker.core.redact import mask_phone
from worker.core.states import FINAL, State
from worker.core.validation import OutgoingMessage
from worker.flows.campaigns import campaign_control
from worker.flows.dispatcher import sending_pause
from worker.flows.tallies import Tally, campaign_tallies_of
from worker.ops.cache import Figure, FiguresCache
from worker.store.db import AnyRow, utcnow
from worker.store.models import UTCDateTime, events, messages
from worker.store.pacing import Pacing, get_pacing

# Final states the provider itself reported: the only ones with a delivery latency.
PROVIDER_FINAL: tuple[State, ...] = (State.DELIVERED, State.UNDELIVERABLE, State.PERMANENTERROR)
# Final states in lifecycle order, for stable series in timelines and charts.
FINAL_ORDER: tuple[State, ...] = tuple(state for state in State if state in FINAL)
# The cascade's channel order; channels the provider adds later sort after these.
CHANNEL_ORDER: tuple[str, ...] = ("telegram", "viber", "rcs", "sms")
NO_CHANNEL = "none"  # the provider listed its channels and none delivered
NOT_REPORTED = "not reported"  # the source tells no channel (a BulkGate DLR, a bare webhook)
UNKNOWN_CURRENCY = "unknown"
UNKNOWN_CURRENCY_NOTE = (
    "amounts whose currency the provider did not report (a BulkGate DLR price carries "
    "none: set BULKGATE_PRICE_CURRENCY); never added to the others"
)
# Final states that are failures: each is listed in top errors, with or without a code.
FAILED_STATES: tuple[State, ...] = (
    State.UNDELIVERABLE,
    State.PERMANENTERROR,
    State.REJECTED,
    State.FAILED,
    State.EXPIRED,
    State.TIMEOUT,
)
PERCENTILES: dict[str, int] = {"p50": 50, "p90": 90, "p99": 99}
TOP_ERRORS = 10
OUTCOME_PAGE = 1000

OUTCOME_COLUMNS: tuple[str, ...] = (
    "id",
    "toPhone",
    "messageType",
    "route",
    "state",
    "messageId",
    "deliverystatus",
    "channel",
    "partscount",
    "cost",
    "billAmount",
    "billCurrency",
    "errorCode",
    "errorMessage",
    "unknownOutcomes",
    "attempts",
    "polls",
    "createdAt",
    "submittedAt",
    "finalAt",
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def message_detail(engine: Engine, message_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(messages).where(messages.c.id == message_id)).first()
        if row is None:
            return None
        history = conn.execute(
            select(events).where(events.c.message_pk == row.pk).order_by(events.c.pk)
        ).all()
    return {
        "id": row.id,
        "campaign": row.campaign,
        "state": row.state,
        "final": row.state in FINAL,
        "messageId": row.provider_message_id,
        "route": row.route,
        "messageType": row.message_type,
        "deliverystatus": row.deliverystatus,
        "partscount": row.partscount,
        "cost": row.cost,
        "messagelistId": row.messagelist_id,
        "fallbacks": row.fallbacks,
        "extendedStatuses": row.extended_statuses,
        "rate": row.rate,
        "rateAmount": row.rate_amount,
        "rateCurrency": row.rate_currency,
        "billAmount": row.bill_amount,
        "billCurrency": row.bill_currency,
        "attempts": row.attempts,
        "unknownOutcomes": row.unknown_outcomes,
        "polls": row.polls,
        "error": {"code": row.error_code, "message": row.error_message} if row.error_code else None,
        "createdAt": _iso(row.created_at),
        "submittedAt": _iso(row.submitted_at),
        "finalAt": _iso(row.final_at),
        "finalSource": row.final_source,
        "events": [
            {
                "at": _iso(e.at),
                "source": e.source,
                "from": e.from_state,
                "to": e.to_state,
                "detail": e.detail,
            }
            for e in history
        ],
    }


def campaign_summary(
    engine: Engine, campaign: str, broker_url: str | None = None
) -> dict[str, Any] | None:
    """The campaign's counts from its tallies (worker/flows/tallies.py), kept by triggers:
    a few rows summed however many messages it has, cheap enough to refresh every second.
    With `broker_url`, `sending` says whether a 429 or an open circuit stops every send."""
    with engine.connect() as conn:
        groups = campaign_tallies_of(conn, campaign)
        waiting = conn.execute(
            select(func.count()).where(
                messages.c.campaign == campaign,
                messages.c.state == State.QUEUED,
                messages.c.scheduled_sent.is_not(None),
                messages.c.window_at.is_(None),  # those are counted as waiting_for_window
                messages.c.available_at > utcnow(),
            )
        ).scalar_one()
        window = conn.execute(
            select(func.count()).where(
                messages.c.campaign == campaign,
                messages.c.state == State.QUEUED,
                messages.c.window_at > utcnow(),
            )
        ).scalar_one()
    if not groups:
        return None
    states: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    for group in groups:
        states[group.state] += group.n
        if group.final_source is not None:
            sources[group.final_source] += group.n
    total = sum(states.values())
    final = sum(n for state, n in states.items() if state in FINAL)
    delivered = states.get(State.DELIVERED, 0)
    sent = sum(group.sent for group in groups)
    money = money_of(groups)
    return {
        "campaign": campaign,
        "total": total,
        "states": dict(sorted(states.items())),
        "final": final,
        "all_final": final == total,
        "sent": sent,
        "delivered": delivered,
        "delivery_rate": round(delivered / total, 4) if total else 0.0,
        "delivery_rate_of_sent": round(delivered / sent, 4) if sent else 0.0,
        # One currency (or none): its total. Several: null, and `money` has each apart.
        "cost": round(sum(group.cost for group in groups), 4) if len(money) <= 1 else None,
        "cost_currency": next(iter(money)) if len(money) == 1 else None,
        "money": money,  # per currency: what `status` shows when `cost` is null
        "unknown_outcomes": sum(group.unknown_outcomes for group in groups),
        "polls": sum(group.polls for group in groups),
        # Of `queued`: scheduled messages we keep until shortly before their time.
        "waiting_for_time": waiting,
        # Of `queued`: promo and surveys waiting for the recipient's send window (quiet hours).
        "waiting_for_window": window,
        "control": campaign_control(engine, campaign),
        "sending": _sending(broker_url),
        "finals_by_source": dict(sorted(sources.items())),
        "first_enqueued_at": _iso(
            min(filter(None, (g.first_created_at for g in groups)), default=None)
        ),
        "last_final_at": _iso(max(filter(None, (g.last_final_at for g in groups)), default=None)),
    }


def money_of(groups: Sequence[Tally]) -> dict[str, dict[str, Any]]:
    """Cost and bill per currency; only messages that carry an amount are counted."""
    totals: dict[str, tuple[float, float, int]] = {}
    for group in groups:
        if group.priced:
            currency = group.currency or UNKNOWN_CURRENCY
            cost, bill, count = totals.get(currency, (0.0, 0.0, 0))
            totals[currency] = (cost + group.cost, bill + group.bill, count + group.priced)
    return {
        currency: {
            "cost": round(cost, 4),
            "bill": round(bill, 4),
            "messages": count,
            # One shape for every currency, as the API's schema gives it.
            "note": UNKNOWN_CURRENCY_NOTE if currency == UNKNOWN_CURRENCY else None,
        }
        for currency, (cost, bill, count) in sorted(totals.items())
    }


@lru_cache(maxsize=4)
def _pacing(broker_url: str) -> Pacing:
    """One per broker: a page reloading every few seconds, or `campaign status --watch`,
    would otherwise open a Redis pool per view."""
    return get_pacing(broker_url)


def _sending(broker_url: str | None) -> dict[str, Any] | None:
    """The pause of all sending now, or None (sending goes on, or Redis cannot say)."""
    if broker_url is None:
        return None
    try:
        pause = sending_pause(_pacing(broker_url))
    except RedisError:
        return None
    return pause.as_dict() if pause else None


def campaign_report(
    engine: Engine,
    campaign: str,
    broker_url: str | None = None,
    *,
    figures: FiguresCache | None = None,
    refresh: float = 0.0,
) -> dict[str, Any] | None:
    """The summary plus channels, latency percentiles and top errors (`campaign_analytics`),
    and when those were computed (`analytics_as_of`, `analytics_age_seconds`).

    Without `figures` the analytics are computed now (the CLI: exact, age 0). With it they
    come from that cache (`analytics_figure`), recomputed once older than max(`refresh`,
    10 × what they took): the API's answer at a million messages. The counts come from the
    tallies on every call either way.
    """
    summary = campaign_summary(engine, campaign, broker_url)
    if summary is None:
        return None
    if figures is None:
        analytics = Figure(campaign_analytics(engine, campaign), 0.0)
    else:
        analytics = analytics_figure(figures, engine, campaign, summary["all_final"], refresh)
    return summary | analytics.value | analytics_age(analytics.age)


def analytics_figure(
    figures: FiguresCache, engine: Engine, campaign: str, all_final: bool, refresh: float
) -> Figure[dict[str, Any]]:
    """The campaign's analytics from `figures`, under the key the live page and the API
    share. Kept apart once all final: the first view after the last message ended computes
    them afresh."""
    return figures.get(
        (engine, campaign, all_final, "analytics"),
        lambda: campaign_analytics(engine, campaign),
        refresh,
    )


def analytics_age(age: float, now: datetime | None = None) -> dict[str, Any]:
    """When the analytics were computed, `age` seconds before `now`, and that age."""
    age = max(0.0, age)
    computed = (now or utcnow()) - timedelta(seconds=age)
    return {"analytics_as_of": _iso(computed), "analytics_age_seconds": round(age, 3)}


def campaign_analytics(engine: Engine, campaign: str) -> dict[str, Any]:
    """What the tallies cannot answer, scanned from the campaign's messages: channels,
    latency percentiles and top errors.

    `channels` and `latency_seconds` cover what the provider answered; percentiles are
    nearest-rank.
    """
    with engine.connect() as conn:
        return {
            "channels": _channels(conn, campaign),
            "latency_seconds": _latency(conn, campaign),
            "top_errors": _top_errors(conn, campaign),
        }


def _delivering_channel(extended_statuses: Any) -> str | None:
    """The channel that delivered a message, from the provider's `extendedStatuses`."""
    if not isinstance(extended_statuses, dict):
        return None
    for channel, status in extended_statuses.items():
        if isinstance(status, str) and status.lower() == State.DELIVERED:
            return str(channel)
    return None


def _decode(text: str | None) -> Any:
    return json.loads(text) if text else None


def _channels(conn: Connection, campaign: str) -> dict[str, int]:
    """Messages per delivering channel; provider-final ones that no channel delivered: none.

    Grouped by the column's text (PostgreSQL's json has no equality), so Python decodes
    one value per distinct cascade outcome, not one per message.
    """
    text = cast(messages.c.extended_statuses, Text)
    rows = conn.execute(
        select(text, messages.c.state, func.count())
        .where(messages.c.campaign == campaign)
        .group_by(text, messages.c.state)
    ).all()
    counts: Counter[str] = Counter()
    for statuses, state, count in rows:
        decoded = _decode(statuses)
        channel = _delivering_channel(decoded)
        if channel is not None:
            counts[channel] += count
        elif state in PROVIDER_FINAL:
            counts[NO_CHANNEL if isinstance(decoded, dict) and decoded else NOT_REPORTED] += count
    return dict(sorted(counts.items(), key=lambda item: _channel_rank(item[0])))


def _channel_rank(channel: str) -> tuple[int, str]:
    if channel in (NO_CHANNEL, NOT_REPORTED):
        return (len(CHANNEL_ORDER) + 1, channel)
    if channel in CHANNEL_ORDER:
        return (CHANNEL_ORDER.index(channel), channel)
    return (len(CHANNEL_ORDER), channel)


def _seconds(conn: Connection, start: Any, end: Any) -> ColumnElement[float]:
    """Seconds from `start` to `end` in SQL (SQLite's julianday is exact to the millisecond)."""
    if conn.dialect.name == "sqlite":
        return func.round((func.julianday(end) - func.julianday(start)) * 86400.0, 3)
    return cast(extract("epoch", end - start), Float)


def _latency(conn: Connection, campaign: str) -> dict[str, dict[str, float | None]]:
    reached = and_(messages.c.campaign == campaign, messages.c.state.in_(PROVIDER_FINAL))
    starts = {"submit_to_final": messages.c.submitted_at, "enqueue_to_final": messages.c.created_at}
    return {
        name: _percentiles(conn, reached, _seconds(conn, start, messages.c.final_at))
        for name, start in starts.items()
    }


def _percentiles(
    conn: Connection, where: ColumnElement[bool], seconds: ColumnElement[float]
) -> dict[str, float | None]:
    """Nearest-rank percentiles and the maximum in one sorted pass that returns four rows.

    `seconds` is computed once in an inner query; ranks are picked in SQL from the row
    count, so neither the values nor a separate count query reach Python.
    """
    values = select(seconds.label("seconds")).where(where).subquery()
    ranked = (
        select(
            values.c.seconds,
            func.row_number().over(order_by=values.c.seconds).label("rank"),
            func.count().over().label("n"),
        )
        .where(values.c.seconds.is_not(None))
        .subquery()
    )
    wanted = {name: (ranked.c.n * percent + 99) // 100 for name, percent in PERCENTILES.items()}
    rows = conn.execute(
        select(ranked.c.rank, ranked.c.seconds, ranked.c.n).where(
            ranked.c.rank.in_([*wanted.values(), ranked.c.n])
        )
    ).all()
    if not rows:
        return dict.fromkeys([*PERCENTILES, "max"])
    found = {rank: value for rank, value, _ in rows}
    count = rows[0].n
    ranks = {name: -(-count * percent // 100) for name, percent in PERCENTILES.items()}
    return {name: round(found[rank], 3) for name, rank in ranks.items()} | {
        "max": round(found[count], 3)
    }


def _top_errors(conn: Connection, campaign: str) -> list[dict[str, Any]]:
    """Error codes by count; a failed message without one (a provider that reports only a
    status) is counted under its state and the provider's status, so failures are never
    shown beside an empty list."""
    count = func.count().label("count")
    rows = conn.execute(
        select(messages.c.error_code, count)
        .where(messages.c.campaign == campaign, messages.c.error_code.is_not(None))
        .group_by(messages.c.error_code)
        .order_by(count.desc(), messages.c.error_code)
        .limit(TOP_ERRORS)
    ).all()
    found = [{"code": code, "count": n} for code, n in rows]
    uncoded = conn.execute(
        select(messages.c.state, messages.c.deliverystatus, count)
        .where(
            messages.c.campaign == campaign,
            messages.c.error_code.is_(None),
            messages.c.state.in_(FAILED_STATES),
        )
        .group_by(messages.c.state, messages.c.deliverystatus)
    ).all()
    for state, status, n in uncoded:
        reported = f"status {status}" if status and status != state else "no error code"
        found.append({"code": f"{state} ({reported} reported)", "count": n})
    found.sort(key=lambda e: (-e["count"], e["code"]))
    return found[:TOP_ERRORS]


def message_outcomes(engine: Engine, campaign: str) -> Iterator[dict[str, Any]]:
    """Every message of a campaign, one dict per message (keys: OUTCOME_COLUMNS), streamed.

    Read in pages by primary key, each in a short transaction of its own: on SQLite every
    transaction is BEGIN IMMEDIATE (worker.store.db), so one long cursor would hold the write
    lock and stall the workers for the whole export. Listing every state lets SQLite walk
    the (campaign, state) index in pk order per state and stop at the page size, instead
    of sorting the rest of the campaign for every page; a message changing state while
    it runs is still read exactly once.
    """
    page = (
        select(*_OUTCOME_SOURCE)
        .where(messages.c.campaign == campaign, messages.c.state.in_(list(State)))
        .order_by(messages.c.pk)
        .limit(OUTCOME_PAGE)
    )
    after = 0  # primary keys start at 1 on both backends
    while True:
        with engine.connect() as conn:
            rows = conn.execute(page.where(messages.c.pk > after)).all()
        yield from map(_outcome, rows)
        if len(rows) < OUTCOME_PAGE:
            return
        after = rows[-1][0]


_OUTCOME_SOURCE = [
    messages.c[name]
    for name in (
        "pk",
        "id",
        "to_phone",
        "message_type",
        "route",
        "state",
        "provider_message_id",
        "deliverystatus",
        "extended_statuses",
        "partscount",
        "cost",
        "bill_amount",
        "bill_currency",
        "error_code",
        "error_message",
        "unknown_outcomes",
        "attempts",
        "polls",
        "created_at",
        "submitted_at",
        "final_at",
    )
]


def _outcome(row: AnyRow) -> dict[str, Any]:
    # Unpacked by position: named access on a Row costs more than the rest of this function.
    (
        _pk,
        message_id,
        to_phone,
        message_type,
        route,
        state,
        provider_message_id,
        deliverystatus,
        extended_statuses,
        partscount,
        cost,
        bill_amount,
        bill_currency,
        error_code,
        error_message,
        unknown_outcomes,
        attempts,
        polls,
        created_at,
        submitted_at,
        final_at,
    ) = row
    return {
        "id": message_id,
        "toPhone": mask_phone(to_phone),
        "messageType": message_type,
        "route": route,
        "state": state,
        "messageId": provider_message_id,
        "deliverystatus": deliverystatus,
        "channel": _delivering_channel(extended_statuses) or "",
        "partscount": partscount,
        "cost": cost,
        "billAmount": bill_amount,
        "billCurrency": bill_currency,
        "errorCode": error_code,
        "errorMessage": error_message,
        "unknownOutcomes": unknown_outcomes,
        "attempts": attempts,
        "polls": polls,
        "createdAt": _iso(created_at),
        "submittedAt": _iso(submitted_at),
        "finalAt": _iso(final_at),
    }


def deliveries_over_time(engine: Engine, campaign: str, buckets: int = 60) -> dict[str, Any]:
    """Messages reaching each final state per time bucket, from first enqueue to last final.

    The width is whole seconds (at least 1) so that the campaign's span fits `buckets`;
    every bucket is listed, empty ones too, with a count for every state in `states`.
    """
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    with engine.connect() as conn:
        start, end = conn.execute(
            select(func.min(messages.c.created_at), func.max(messages.c.final_at)).where(
                messages.c.campaign == campaign
            )
        ).one()
        if start is None or end is None:
            return {
                "campaign": campaign,
                "start": _iso(start),
                "end": None,
                "bucket_seconds": 1,
                "states": [],
                "buckets": [],
            }
        span = (end - start).total_seconds()
        width = max(1, math.ceil(span / buckets))
        # At least one bucket: producer and worker clocks may disagree by a little.
        count = max(1, min(buckets, int(span // width) + 1))
        rows = _bucket_counts(conn, campaign, start, width)
    return _timeline(campaign, start, end, width, count, rows)


def _bucket_counts(
    conn: Connection, campaign: str, start: datetime, width: int
) -> Sequence[Row[Any, str, int]]:
    """(bucket index, state, count) rows; the index is grouped in a subquery, so its bound
    parameters appear once (PostgreSQL refuses a GROUP BY that repeats them)."""
    offset = _seconds(conn, literal(start, UTCDateTime()), messages.c.final_at) / width
    index = cast(offset, Integer) if conn.dialect.name == "sqlite" else func.floor(offset)
    final = (
        select(index.label("bucket"), messages.c.state)
        .where(
            messages.c.campaign == campaign,
            messages.c.state.in_(FINAL),
            messages.c.final_at.is_not(None),
        )
        .subquery()
    )
    return conn.execute(
        select(final.c.bucket, final.c.state, func.count()).group_by(final.c.bucket, final.c.state)
    ).all()


def _timeline(
    campaign: str,
    start: datetime,
    end: datetime,
    width: int,
    count: int,
    rows: Sequence[Row[Any, str, int]],
) -> dict[str, Any]:
    present = {row.state for row in rows}
    states = [state.value for state in FINAL_ORDER if state in present]
    series = [dict.fromkeys(states, 0) for _ in range(count)]
    for bucket, state, n in rows:
        series[max(0, min(int(bucket), count - 1))][state] += n
    return {
        "campaign": campaign,
        "start": _iso(start),
        "end": _iso(end),
        "bucket_seconds": width,
        "states": states,
        "buckets": [
            {"start": _iso(start + timedelta(seconds=i * width)), "counts": counts}
            for i, counts in enumerate(series)
        ],
    }


def stored_estimate(engine: Any, campaign: str, card: RateCard | None, states: Any) -> Estimate:
    """The estimate over a campaign's stored messages in `states` (a held campaign before it
    is approved), read in pages by primary key."""
    estimate = Estimate()
    after = 0
    columns = (
        messages.c.pk,
        messages.c.message_type,
        messages.c.route,
        messages.c.to_phone,
        messages.c.text,
    )
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                select(*columns)
                .where(
                    messages.c.campaign == campaign,
                    messages.c.state.in_(list(states)),
                    messages.c.pk > after,
                )
                .order_by(messages.c.pk)
                .limit(5000)
            ).all()
        for pk, message_type, route, phone, text in rows:
            after = pk
            estimate.add(
                OutgoingMessage(
                    id="", from_name="", to_phone=phone, message_type=message_type,
                    text=text, ttl=None, scheduled_sent=None, survey_options=None, route=route,
                ),
                card,
            )  # fmt: skip
        if len(rows) < 5000:
            return estimate
