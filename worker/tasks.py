"""Thin Celery tasks: each loads its per-process resources and calls one plain function."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine

from config import Settings, get_settings
from worker import callbacks, dispatcher, inbox, polling, producer, sweeper
from worker.celery import POLL_QUEUE, SEND_QUEUE, app
from worker.db import get_engine, utcnow
from worker.pacing import Pacing, get_pacing
from worker.smsbat import SendClient, StatusClient
from worker.validation import ROUTES

log = logging.getLogger(__name__)


@dataclass
class Resources:
    """What one worker process keeps between tasks: pools, clients, an event loop."""

    settings: Settings
    engine: Engine
    pacing: Pacing
    sender: SendClient
    checker: StatusClient
    loop: asyncio.AbstractEventLoop


@lru_cache(maxsize=1)
def _resources(pid: int) -> Resources:
    settings = get_settings()
    loop = asyncio.new_event_loop()
    return Resources(
        settings=settings,
        engine=get_engine(settings.database_url),
        pacing=get_pacing(settings.broker_url),
        sender=SendClient(settings),
        checker=StatusClient(settings),
        loop=loop,
    )


def resources() -> Resources:
    return _resources(os.getpid())


def queue_length(name: str) -> int:
    with app.connection_for_read() as conn:
        return int(conn.default_channel.client.llen(name))


@app.task(name="cascade.enqueue", ignore_result=False)
def enqueue(
    messages: list[dict[str, Any]],
    campaign: str | None = None,
    callback_url: str | None = None,
    callback_task: str | None = None,
) -> list[dict[str, Any]]:
    """Intake for apps that share only the broker: validate, store, answer per message."""
    results = producer.enqueue(
        messages, campaign, callback_url=callback_url, callback_task=callback_task
    )
    return [r.as_dict() for r in results]


@app.task(name="cascade.dispatch")
def dispatch() -> dict[str, int]:
    """Keep up to SEND_PARALLELISM send tasks waiting while messages are ready."""
    res = resources()
    settings = res.settings
    free = settings.send_parallelism - queue_length(SEND_QUEUE)
    started: dict[str, int] = {}
    limit = dispatcher.batch_limit(settings)
    for route in ROUTES:
        if free <= 0:
            break
        ready, oldest_wait = dispatcher.ready_summary(
            res.engine, route, utcnow(), settings.send_parallelism * limit
        )
        if not dispatcher.should_flush(
            ready,
            oldest_wait,
            batch_min=settings.send_batch_min,
            linger=settings.send_linger_seconds,
        ):
            continue
        count = min(free, math.ceil(ready / limit))
        for _ in range(count):
            send_batch.apply_async((route,))
        started[route] = count
        free -= count
    return started


@app.task(name="cascade.send_batch")
def send_batch(route: str) -> dict[str, Any]:
    """Claim and send one batch; a full batch means more are waiting, so chain the next."""
    res = resources()
    report = dispatcher.send_batch(res.engine, res.sender, res.pacing, res.settings, route)
    if report.claimed >= dispatcher.batch_limit(res.settings):
        send_batch.apply_async((route,))
    return asdict(report)


@app.task(name="cascade.poll_sweep")
def poll_sweep() -> int:
    """Hand due status checks to poll tasks, keeping the poll queue short."""
    res = resources()
    settings = res.settings
    free = settings.poll_max_queued_tasks - queue_length(POLL_QUEUE)
    handed = 0
    for _ in range(max(free, 0)):
        now = utcnow()
        pks = polling.claim_due(
            res.engine, now, settings.poll_batch_size, settings.poll_lease_seconds
        )
        if not pks:
            break
        claimed = polling.lease_end(now, settings.poll_lease_seconds)
        poll_batch.apply_async((pks, claimed.isoformat()))
        handed += len(pks)
    return handed


@app.task(name="cascade.poll_batch")
def poll_batch(pks: list[int], claimed: str | None = None) -> dict[str, Any]:
    """Check the claimed messages; `claimed` (the claim's mark) is absent in older tasks."""
    res = resources()
    report = polling.poll_batch(
        res.engine,
        res.checker,
        res.pacing,
        res.settings,
        pks,
        run=res.loop.run_until_complete,
        claimed=datetime.fromisoformat(claimed) if claimed else None,
    )
    return asdict(report)


@app.task(name="cascade.sweep")
def sweep() -> dict[str, int]:
    res = resources()
    return sweeper.sweep(res.engine, res.settings)


@app.task(name="cascade.apply_reports")
def apply_reports() -> dict[str, int]:
    """Apply stored webhook and DLR reports; match parked ones whose message appeared."""
    res = resources()
    return inbox.apply_pending(res.engine, res.settings)


@app.task(name="cascade.deliver_callbacks")
def deliver_callbacks() -> dict[str, int]:
    """Create callbacks for newly final messages and deliver the ones that are due."""
    res = resources()
    return callbacks.deliver_due(res.engine, res.settings)
