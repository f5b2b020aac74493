"""Thin Celery tasks: each loads its per-process resources and calls one plain function."""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from celery.utils.saferepr import saferepr
from celery.worker.request import Request
from kombu.transport.redis import Channel as RedisChannel
from redis import Redis
from sqlalchemy import Engine

from config import Settings, get_settings
from worker.celery import POLL_QUEUE, SEND_QUEUE, app
from worker.core.redact import mask_url
from worker.core.sendpolicy import learn_every
from worker.core.validation import ROUTES
from worker.flows import (
    callbacks,
    campaigns,
    dispatcher,
    inbox,
    polling,
    producer,
    quota,
    sweeper,
)
from worker.observe import metrics
from worker.provider.smsbat import SendClient, StatusClient
from worker.store.db import get_engine, utcnow
from worker.store.pacing import Pacing, get_pacing

log = logging.getLogger(__name__)


@dataclass
class Resources:
    """What one worker process keeps between tasks: pools, clients, threads for checks."""

    settings: Settings
    engine: Engine
    pacing: Pacing
    sender: SendClient
    checker: StatusClient
    threads: ThreadPoolExecutor


@lru_cache(maxsize=1)
def _resources(pid: int) -> Resources:
    settings = get_settings()
    return Resources(
        settings=settings,
        engine=get_engine(settings.database_url),
        pacing=get_pacing(settings.broker_url),
        sender=metrics.TimedSendClient(settings),
        checker=metrics.TimedStatusClient(settings),
        threads=ThreadPoolExecutor(settings.poll_concurrency, thread_name_prefix="status"),
    )


def resources() -> Resources:
    return _resources(os.getpid())


POLL_BATCH = "cascade.poll_batch"


def queue_length(name: str, task: str | None = None) -> int:
    """Messages waiting in queue `name`; with `task`, only that task's (`waiting`)."""
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        assert isinstance(channel, RedisChannel), "the broker is Redis"
        if task is None:
            return int(channel.client.llen(name))
        return waiting(channel.client, name, task)


# kombu keeps a message in the queue's list as JSON whose headers name its task (the body
# is base64): counted on the server, no message crosses the wire.
_COUNT_TASK = """
local n = 0
for _, message in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if string.find(message, ARGV[1], 1, true) then n = n + 1 end
end
return n
"""


def waiting(client: Redis, queue: str, task: str) -> int:
    """How many messages of `task` wait in `queue`: `cascade-poll` also carries
    `cascade.apply_reports`, and a tick of it counted as a poll task took a poll task's
    room (with POLL_MAX_QUEUED_TASKS=1 and the two ticks in step, no sweep found any room
    for 70-110 s while 100 checks were due)."""
    return int(client.eval(_COUNT_TASK, 1, queue, f'"{task}"'))


INTAKE_ARGUMENTS = ("messages", "campaign", "callback_url", "callback_task")
SHOWN_IDS = 5


def intake_summary(args: Any, kwargs: Any) -> tuple[str, str]:
    """What logs, events and Flower show of a `cascade.enqueue` call: counts and ids.

    Producers sending by name set argsrepr/kwargsrepr to the full arguments (phones and
    texts, OTPs included), so the worker replaces them. Never raises: it runs on receipt.
    """
    args = args if isinstance(args, list | tuple) else ()
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    shown_args = tuple(
        _summarise(name, value) for name, value in zip(INTAKE_ARGUMENTS, args, strict=False)
    )
    shown_kwargs = {str(name): _summarise(str(name), value) for name, value in kwargs.items()}
    return saferepr(shown_args), saferepr(shown_kwargs)


def _summarise(name: str, value: Any) -> str | None:
    if name == "messages":
        if not isinstance(value, list | tuple):
            return f"<not a list: {type(value).__name__}>"
        ids = [m.get("id") for m in value[:SHOWN_IDS] if isinstance(m, dict)]
        shown = ", ".join(str(i)[:64] for i in ids if isinstance(i, str))
        more = ", …" if len(value) > SHOWN_IDS else ""
        return f"<{len(value)} messages: {shown}{more}>"
    if name in ("campaign", "callback_task") and (value is None or isinstance(value, str)):
        return value if value is None else value[:200]
    if name == "callback_url" and isinstance(value, str):
        return mask_url(value)[:200]
    return f"<{type(value).__name__}>"  # an argument we do not take: never echoed


class IntakeRequest(Request):
    """The request of `cascade.enqueue`, with its arguments shown only as `intake_summary`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        summary = intake_summary(self.args, self.kwargs)
        self._argsrepr, self._kwargsrepr = summary
        # The child reads task.request from this dict (and error reports show it).
        self.request_dict["argsrepr"], self.request_dict["kwargsrepr"] = summary


@app.task(name="cascade.enqueue", ignore_result=False, Request=IntakeRequest)
def enqueue(
    messages: list[dict[str, Any]],
    campaign: str | None = None,
    callback_url: str | None = None,
    callback_task: str | None = None,
) -> list[dict[str, Any]]:
    """Intake for apps that share only the broker: validate, store, answer per message."""
    if not isinstance(messages, list):  # a string or an object would be iterated
        raise ValueError(f"messages: must be an array of message objects, got {_kind(messages)}")
    results = producer.enqueue(
        messages, campaign, callback_url=callback_url, callback_task=callback_task
    )
    return [r.as_dict() for r in results]


def _kind(value: Any) -> str:
    return {dict: "an object", str: "a string", type(None): "null"}.get(type(value), "a value")


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
            res.engine, route, utcnow(), settings.send_parallelism * limit, settings.send_batch_min
        )
        flush = dispatcher.should_flush(
            ready,
            oldest_wait,
            batch_min=settings.send_batch_min,
            linger=settings.send_linger_seconds,
        )
        parts = dispatcher.parts_ready(res.engine, route, utcnow())
        if not (flush or parts):
            continue
        count = min(free, max(math.ceil(ready / limit) if flush else 0, 1 if parts else 0))
        for _ in range(count):
            send_batch.apply_async((route,))
        started[route] = count
        free -= count
    return started


@app.task(name="cascade.send_batch")
def send_batch(route: str, due: bool = False) -> dict[str, Any]:
    """Claim and send one batch; a full batch or an isolation under way means more are
    waiting, so chain the next (`due`: after a full batch, without counting first)."""
    res = resources()
    report = dispatcher.send_batch(res.engine, res.sender, res.pacing, res.settings, route, due=due)
    metrics.count_send_batch(report)
    full = report.claimed >= dispatcher.batch_limit(res.settings)
    if (full or report.isolating) and not report.paused:
        send_batch.apply_async((route,), {"due": full})
    return asdict(report)


def sending_behind(res: Resources) -> bool:
    """Whether messages wait for the workers themselves: a full batch is ready on some route.

    Not while sending is paused (a 429, an open circuit) or held to a configured rate: then
    a status check takes nothing from the sends.
    """
    settings = res.settings
    if settings.send_messages_per_second or settings.send_requests_per_second:
        return False
    if dispatcher.send_paused(res.pacing) or quota.stopped(res.engine, settings):
        return False
    limit = dispatcher.batch_limit(settings)
    now = utcnow()
    return any(
        dispatcher.ready_summary(res.engine, route, now, limit, limit)[0] >= limit
        for route in ROUTES
    )


@app.task(name="cascade.poll_sweep")
def poll_sweep() -> int:
    """Hand due status checks to poll tasks, keeping the poll queue short."""
    return hand_out_checks(resources())


def hand_out_checks(res: Resources, most: int | None = None) -> int:
    """Claim due checks into up to `most` poll tasks (all the room the queue has left, if
    None); answer how many checks were handed out."""
    settings = res.settings
    behind = sending_behind(res)
    if behind and most is not None:
        # No chain while sends wait: the sweep's tick keeps checks to a trickle then (two
        # tasks per tick); chained, they took half the workers from a campaign of 1,000,000.
        return 0
    free = polling.poll_task_room(queue_length(POLL_QUEUE, POLL_BATCH), behind, settings)
    # Every task, the chain's too, takes the due explorers first (`claim_batch`): were only
    # the sweep's to do so, the chain would keep the queue full through a backlog, the sweep
    # would find no room, and the plan would learn nothing while the backlog lasted.
    explorers = learn_every(settings)
    handed = 0
    for _ in range(free if most is None else min(free, most)):
        now = utcnow()
        pks = polling.claim_batch(
            res.engine, now, settings.poll_batch_size, settings.poll_lease_seconds, explorers
        )
        if not pks:
            break
        claimed = polling.lease_end(now, settings.poll_lease_seconds)
        poll_batch.apply_async((pks, claimed.isoformat()))
        handed += len(pks)
    return handed


@app.task(name=POLL_BATCH)
def poll_batch(pks: list[int], claimed: str | None = None) -> dict[str, Any]:
    """Check the claimed messages; `claimed` (the claim's mark) is absent in older tasks."""
    res = resources()
    report = polling.poll_batch(
        res.engine,
        res.checker,
        res.pacing,
        res.settings,
        pks,
        res.threads,
        claimed=datetime.fromisoformat(claimed) if claimed else None,
    )
    if len(pks) >= res.settings.poll_batch_size and report.checked:
        # A full batch checked (not paused): more were likely due. The sweep's tick alone let
        # the workers take at most POLL_MAX_QUEUED_TASKS batches per
        # POLL_SWEEP_INTERVAL_SECONDS (2,000 checks/s by default) however fast they went.
        hand_out_checks(res, most=1)
    return asdict(report)


_consent_passes = sweeper.ConsentPasses()


@app.task(name="cascade.sweep")
def sweep() -> dict[str, int]:
    res = resources()
    kept = quota.keep_waiting(res.engine, res.settings)  # before a capped day fails them
    since = _consent_passes.since(utcnow())
    swept = sweeper.sweep(res.engine, res.settings, since)
    return swept | ({"kept_for_cap": kept} if kept else {})


@app.task(name="cascade.enforce_holds")
def enforce_holds() -> dict[str, int]:
    """Hold what came back to the queue of a held or paused campaign (a failed send that was
    in flight when it was paused); release metered campaigns' messages within their limits."""
    res = resources()
    held = campaigns.enforce_holds(res.engine)
    released = campaigns.meter(
        res.engine,
        res.settings.dispatch_interval_seconds,
        retry_for=res.settings.send_retry_for_seconds,
    )
    return {"held": held, "released": released}


@app.task(name="cascade.apply_reports")
def apply_reports() -> dict[str, int]:
    """Apply stored webhook and DLR reports; match parked ones whose message appeared."""
    res = resources()
    finals: list[float] = []  # submit → final, as for a poll
    counts = inbox.apply_pending(res.engine, res.settings, finals)
    metrics.count_reports(counts)
    metrics.observe_finals(finals)
    return counts


@app.task(name="cascade.deliver_callbacks")
def deliver_callbacks() -> dict[str, int]:
    """Create callbacks for newly final messages and deliver the ones that are due."""
    res = resources()
    return callbacks.deliver_due(res.engine, res.settings)
