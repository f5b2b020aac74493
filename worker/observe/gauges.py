"""Gauges read at scrape time from the source of truth: the database, and Redis for pauses.

Celery exporters see tasks; our queue is the messages table. So every scrape runs ONE
statement of scalar subqueries, each answered from a partial index over the rows still
moving (queued, sending, due for a check, parked reports, dead callbacks): its cost
follows the backlog, not the table. The totals (every message by state and campaign) sum
the campaigns' tallies and count only the messages without a campaign; they are refreshed
at most every METRICS_TOTALS_SECONDS and served from memory in between; the states still
moving are exact on every scrape. `scripts/metrics_bench.py` measures both.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, Engine, create_engine, func, select
from sqlalchemy.pool import NullPool

from config import Settings
from worker.core.states import FINAL, State
from worker.store.db import utcnow
from worker.store.models import (
    UTCDateTime,
    callbacks,
    campaign_tallies,
    messages,
    provider_reports,
    suppressions,
)
from worker.store.pacing import PREFIX

LIVE_STATES = (
    State.QUEUED,
    State.SENDING,
    State.SUBMITTED,
    State.SCHEDULED,
    State.PROCESSING,
)
POLLED_STATES = (State.SUBMITTED, State.SCHEDULED, State.PROCESSING)
OTHER_CAMPAIGNS = "other"
NO_CAMPAIGN = "none"
# Pause keys of the send path (worker.flows.dispatcher), by the reason shown: a 429's Retry-After,
# the 401 circuit, and a 5xx circuit once the dispatcher has one.
SEND_PAUSES = {"throttle": "send:throttle", "circuit": "send:circuit"}
BEAT_TICK_KEY = "cascade:beat:last-tick"
TIMEOUT_SECONDS = 3


@lru_cache(maxsize=4)
def _engine(url: str, pid: int) -> Engine:
    """An engine of its own that gives up fast: a scrape during an outage must not hang."""
    if url.startswith("sqlite"):
        return create_engine(url, poolclass=NullPool, connect_args={"timeout": TIMEOUT_SECONDS})
    return create_engine(
        url,
        pool_size=1,
        max_overflow=1,
        pool_pre_ping=True,
        pool_timeout=TIMEOUT_SECONDS,
        hide_parameters=True,
        connect_args={
            "connect_timeout": TIMEOUT_SECONDS,
            "options": f"-c statement_timeout={TIMEOUT_SECONDS * 1000}",
        },
    )


def metrics_engine(url: str) -> Engine:
    return _engine(url, os.getpid())


@lru_cache(maxsize=4)
def _redis(url: str, pid: int) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=TIMEOUT_SECONDS, socket_connect_timeout=TIMEOUT_SECONDS
    )


def broker(url: str) -> redis.Redis:
    return _redis(url, os.getpid())


# --- the one statement per scrape ---------------------------------------------------------------


def _count(*where: Any, table: Any = messages) -> Any:
    return select(func.count()).select_from(table).where(*where).scalar_subquery()


def backlog_statement(now: datetime) -> Any:
    """One SELECT of scalar subqueries, each over a partial index (see worker/store/models.py)."""
    m = messages.c
    columns = {
        "queued": _count(m.state == State.QUEUED),
        "sending": _count(m.state == State.SENDING),
        **{
            str(state): _count(m.next_poll_at.is_not(None), m.state == state)
            for state in POLLED_STATES
        },
        "oldest_ready": select(func.min(m.available_at))
        .where(m.state == State.QUEUED, m.available_at <= now)
        .scalar_subquery(),
        "checks_due": _count(m.next_poll_at <= now),
        "earliest_check": select(func.min(m.next_poll_at))
        .where(m.next_poll_at.is_not(None))
        .scalar_subquery(),
        "parked": _count(provider_reports.c.processed_at.is_(None), table=provider_reports),
        "orphaned": _count(provider_reports.c.outcome == "orphan", table=provider_reports),
        "dead_callbacks": _count(callbacks.c.state == "dead", table=callbacks),
    }
    return select(*(column.label(name) for name, column in columns.items()))


@dataclass
class Backlog:
    """What one scrape read: the moving states, and how far behind the queues are."""

    live: dict[str, int]
    oldest_queued_seconds: float
    checks_due: int
    most_overdue_seconds: float
    parked: int
    orphaned: int
    dead_callbacks: int


def _as_datetime(value: object, template: ColumnElement[Any]) -> datetime | None:
    """min() of a timestamp comes back typed on PostgreSQL, as text on SQLite."""
    if value is None or isinstance(value, datetime):
        return value
    column_type = template.type
    assert isinstance(column_type, UTCDateTime), template
    return column_type.process_result_value(datetime.fromisoformat(str(value)), None)


def read_backlog(engine: Engine, now: datetime | None = None) -> Backlog:
    now = now or utcnow()
    with engine.connect() as conn:
        row = conn.execute(backlog_statement(now)).one()
    oldest = _as_datetime(row.oldest_ready, messages.c.available_at)
    earliest = _as_datetime(row.earliest_check, messages.c.next_poll_at)
    return Backlog(
        live={str(s): int(getattr(row, str(s))) for s in LIVE_STATES},
        oldest_queued_seconds=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
        checks_due=int(row.checks_due),
        most_overdue_seconds=max(0.0, (now - earliest).total_seconds()) if earliest else 0.0,
        parked=int(row.parked),
        orphaned=int(row.orphaned),
        dead_callbacks=int(row.dead_callbacks),
    )


# --- the totals, refreshed at most every METRICS_TOTALS_SECONDS ---------------------------------


@dataclass
class Totals:
    """Every message counted by campaign and state; `read_at` is time.time() of the read."""

    by_campaign: dict[tuple[str, str], int] = field(default_factory=dict)
    read_at: float = 0.0

    def by_state(self) -> dict[str, int]:
        states: dict[str, int] = {}
        for (_, state), n in self.by_campaign.items():
            states[state] = states.get(state, 0) + n
        return states

    def top_campaigns(self, top: int) -> dict[tuple[str, str], int]:
        """At most `top` campaigns by name, the rest summed as "other": bounded cardinality.

        Campaigns with messages still moving come first, then the biggest.
        """
        size: dict[str, int] = {}
        moving: dict[str, int] = {}
        for (campaign, state), n in self.by_campaign.items():
            size[campaign] = size.get(campaign, 0) + n
            if state not in FINAL:
                moving[campaign] = moving.get(campaign, 0) + n
        ranked = sorted(size, key=lambda c: (-moving.get(c, 0), -size[c], c))
        named = set(ranked[:top])
        shown: dict[tuple[str, str], int] = {}
        for (campaign, state), n in self.by_campaign.items():
            key = (campaign if campaign in named else OTHER_CAMPAIGNS, state)
            shown[key] = shown.get(key, 0) + n
        return shown


def read_totals(engine: Engine) -> Totals:
    """A campaign's messages by state from its tallies (worker.flows.tallies: a few rows a
    campaign, exact, kept by triggers on `messages`); the messages without a campaign, which
    the tallies leave out, counted over the (campaign, state) index. Neither reads the
    campaigns' messages, however many there are."""
    t = campaign_tallies.c
    tallied = select(t.campaign, t.state, func.sum(t.n)).group_by(t.campaign, t.state)
    m = messages.c
    bare = select(m.state, func.count()).where(m.campaign.is_(None)).group_by(m.state)
    counts: dict[tuple[str, str], int] = {}
    with engine.connect() as conn:
        rows = [*conn.execute(tallied), *((None, s, n) for s, n in conn.execute(bare))]
    for campaign, state, n in rows:
        if n:  # a group whose deltas sum to nothing holds no message
            key = (campaign or NO_CAMPAIGN, state)
            counts[key] = counts.get(key, 0) + int(n)
    return Totals(counts, time.time())


class TotalsCache:
    """The last totals, re-read when older than `max_age`; one reader at a time."""

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self._totals: Totals | None = None
        self._lock = threading.Lock()

    def get(self, engine: Engine) -> Totals:
        with self._lock:
            totals = self._totals
            if totals is None or time.time() - totals.read_at >= self.max_age:
                totals = self._totals = read_totals(engine)
            return totals


_caches: dict[tuple[str, float], TotalsCache] = {}


def totals_cache(url: str, max_age: float) -> TotalsCache:
    return _caches.setdefault((url, max_age), TotalsCache(max_age))


# --- Redis: pauses and beat -------------------------------------------------------------------


def send_pauses(client: redis.Redis) -> dict[str, float]:
    """Seconds left of each send pause, by reason (the same keys worker.store.pacing sets)."""
    with client.pipeline(transaction=False) as pipe:
        for key in SEND_PAUSES.values():
            pipe.pttl(PREFIX + key)
        answers = pipe.execute()
    return {
        reason: (ms / 1000 if ms and ms > 0 else 0.0)
        for reason, ms in zip(SEND_PAUSES, answers, strict=True)
    }


def beat_last_tick(client: redis.Redis) -> float | None:
    """Unix time of beat's last published tick (worker.observe.health records it), None if never."""
    value = client.get(BEAT_TICK_KEY)
    return float(value) if value else None


# --- the collector -------------------------------------------------------------------------------


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class DatabaseCollector(Collector):
    """Everything a scrape reads from the database and Redis, as Prometheus gauges.

    Any failure propagates: the caller answers 503 rather than serve half a picture.
    """

    def __init__(self, settings: Settings, *, database: bool = True) -> None:
        self.settings = settings
        self.database = database

    def collect(self) -> Iterator[GaugeMetricFamily]:
        settings = self.settings
        client = broker(settings.broker_url)
        yield from self._redis_gauges(client)
        if not self.database:
            return
        engine = metrics_engine(settings.database_url)
        backlog = read_backlog(engine)
        cache = totals_cache(settings.database_url, settings.metrics_totals_seconds)
        totals = cache.get(engine)
        states = totals.by_state() | backlog.live  # the moving states: exact, now
        by_state = GaugeMetricFamily(
            "cascade_messages",
            "Messages by state (final states refreshed with the totals).",
            labels=["state"],
        )
        for state in State:
            by_state.add_metric([str(state)], states.get(str(state), 0))
        yield by_state
        by_campaign = GaugeMetricFamily(
            "cascade_campaign_messages",
            f"Messages by campaign and state: the top {settings.metrics_top_campaigns} "
            "campaigns by name, the rest as 'other'.",
            labels=["campaign", "state"],
        )
        shown = totals.top_campaigns(settings.metrics_top_campaigns)
        for (campaign, state_name), n in sorted(shown.items()):
            by_campaign.add_metric([campaign, state_name], n)
        yield by_campaign
        yield _gauge(
            "cascade_message_totals_age_seconds",
            "How old the per-state totals of final states and campaigns are.",
            max(0.0, time.time() - totals.read_at),
        )
        yield from self._backlog_gauges(backlog)
        with engine.connect() as conn:  # the list's primary key: one index count
            listed = conn.execute(select(func.count()).select_from(suppressions)).scalar_one()
        yield _gauge(
            "cascade_suppressed_numbers",
            "Numbers on the suppression list (opted out of promo and surveys).",
            listed,
        )

    def _redis_gauges(self, client: redis.Redis) -> Iterable[GaugeMetricFamily]:
        paused = GaugeMetricFamily(
            "cascade_send_paused_seconds",
            "Seconds left of a pause of all sending, by reason (throttle: 429, circuit: 401).",
            labels=["reason"],
        )
        for reason, seconds in send_pauses(client).items():
            paused.add_metric([reason], seconds)
        yield paused
        tick = beat_last_tick(client)
        if tick is not None:
            yield _gauge(
                "cascade_beat_last_tick_timestamp_seconds",
                "Unix time beat last sent a periodic task.",
                tick,
            )

    def _backlog_gauges(self, backlog: Backlog) -> Iterable[GaugeMetricFamily]:
        yield _gauge(
            "cascade_oldest_queued_age_seconds",
            "How long the oldest message ready to send has waited (0: none waits).",
            backlog.oldest_queued_seconds,
        )
        yield _gauge(
            "cascade_status_checks_due", "Messages due for a status check.", backlog.checks_due
        )
        yield _gauge(
            "cascade_status_checks_overdue_seconds",
            "How late the most overdue status check is (0: none is due).",
            backlog.most_overdue_seconds,
        )
        yield _gauge(
            "cascade_reports_parked",
            "Pushed reports stored and not applied yet (waiting for their message).",
            backlog.parked,
        )
        yield _gauge(
            "cascade_reports_orphaned",
            "Pushed reports given up on: their message never appeared.",
            backlog.orphaned,
        )
        yield _gauge(
            "cascade_callbacks_dead",
            "Outcome callbacks that gave up (cascade callbacks retry sends them again).",
            backlog.dead_callbacks,
        )
