"""Outcome callbacks to producing apps: a signed POST or a Celery task by name, at least once.

Every callback is a row, so it survives a flushed Redis or a dead worker, is retried with
backoff for a day, and an operator can list and retry the ones that gave up. `deliver_due`
(beat: `cascade.deliver_callbacks`) works in rounds until nothing is left or its time
budget is spent:

- collect: final messages still `waiting` get a `final` callback per target; messages past
  `callback_late_at` and not delivered get one `late` callback per target;
- claim: due `pending` callbacks, leased by pushing `next_attempt_at` (SKIP LOCKED);
- send: URLs concurrently with httpx, tasks through the worker's Celery app;
- record: 2xx or published: delivered; 5xx, 408, 429, timeouts, connection errors: again
  after a backoff until the retry window ends, then dead; any other answer: dead at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import httpx
import orjson
from sqlalchemy import Connection, Engine, Row, bindparam, insert, select, update

from config import Settings
from worker.core.backoff import parse_retry_after, send_retry_delay
from worker.core.redact import mask_url
from worker.core.signing import sign
from worker.core.states import FINAL as FINAL_STATES
from worker.core.states import State
from worker.store.db import among, claim_rows, utcnow
from worker.store.models import callbacks, messages

log = logging.getLogger(__name__)

FINAL, LATE = "final", "late"
EVENT_NAMES = {FINAL: "message.final", LATE: "message.late"}
URL, TASK = "url", "task"
PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
WAITING, CREATED = "waiting", "created"  # messages.callback_state
RUN_BUDGET_SECONDS = 60.0  # then the next beat tick goes on, well inside the task time limit
ERROR_CHARS = 200  # of a receiver's answer, kept in last_error
USER_AGENT = "cascade-worker-callbacks"

Verdict = Literal["delivered", "retry", "refused"]


# --- the event ---------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def build_event(message: Row[Any], event: str, created_at: datetime) -> dict[str, Any]:
    """The JSON a producer gets (docs/callbacks.md): the message as it is when sent."""
    occurred = message.final_at if event == FINAL else created_at
    error = (
        {"code": message.error_code, "message": message.error_message}
        if message.error_code
        else None
    )
    return {
        "event": EVENT_NAMES[event],
        "id": message.id,
        "campaign": message.campaign,
        "state": message.state,
        "final": message.state in FINAL_STATES,
        "messageId": message.provider_message_id,
        "deliverystatus": message.deliverystatus,
        "partscount": message.partscount,
        "cost": message.cost,
        "error": error,
        "finalAt": _iso(message.final_at),
        "occurredAt": _iso(occurred),
    }


# --- collect: outcomes become callback rows ----------------------------------------------


def collect_final(engine: Engine, now: datetime, limit: int) -> int:
    """Messages that became final while `waiting` get one `final` callback per target."""
    chosen = (
        select(messages.c.pk)
        .where(messages.c.callback_state == WAITING, messages.c.final_at.is_not(None))
        .order_by(messages.c.final_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    stmt = (
        update(messages)
        .where(messages.c.pk.in_(chosen), messages.c.callback_state == WAITING)
        .values(callback_state=CREATED)
        .returning(messages.c.pk, messages.c.callback_url, messages.c.callback_task)
    )
    with engine.begin() as conn:
        return _create(conn, conn.execute(stmt).all(), FINAL, now)


def collect_late(engine: Engine, now: datetime, limit: int) -> int:
    """Messages past their `callback_late_at` and not delivered get one `late` callback per
    target; the deadline is cleared either way, so it fires at most once."""
    chosen = (
        select(messages.c.pk)
        .where(messages.c.callback_late_at <= now)
        .order_by(messages.c.callback_late_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    stmt = (
        update(messages)
        .where(messages.c.pk.in_(chosen))
        .values(callback_late_at=None)
        .returning(
            messages.c.pk, messages.c.state, messages.c.callback_url, messages.c.callback_task
        )
    )
    with engine.begin() as conn:
        late = [row for row in conn.execute(stmt) if row.state != State.DELIVERED]
        return _create(conn, late, LATE, now)


def _create(conn: Connection, rows: Iterable[Row[Any]], event: str, now: datetime) -> int:
    new = [
        {
            "message_pk": row.pk,
            "kind": kind,
            "event": event,
            "target": target,
            "state": PENDING,
            "attempts": 0,
            "created_at": now,
            "next_attempt_at": now,
        }
        for row in rows
        for kind, target in ((URL, row.callback_url), (TASK, row.callback_task))
        if target
    ]
    if new:
        conn.execute(insert(callbacks), new)
    return len(new)


# --- claim, send, record -----------------------------------------------------------------


def lease_seconds(settings: Settings) -> float:
    """Twice the longest a claimed batch can take to send: only a dead worker loses a claim."""
    rounds = math.ceil(settings.callback_batch_size / settings.callback_concurrency)
    return 2 * rounds * settings.callback_timeout_seconds + 30


def claim_due(engine: Engine, now: datetime, limit: int, lease: float) -> list[Row[Any]]:
    """Take due callbacks; the lease (also the record's token) makes a lost run come due again."""
    until = now + timedelta(seconds=lease)
    return claim_rows(
        engine,
        callbacks,
        where=[callbacks.c.state == PENDING, callbacks.c.next_attempt_at <= now],
        order_by=[callbacks.c.next_attempt_at],
        limit=limit,
        values={"next_attempt_at": until, "lease_until": until},
        returning=list(callbacks.c),
    )


@dataclass(frozen=True, slots=True)
class Job:
    """One claimed callback and the event it carries."""

    pk: int
    kind: str
    target: str
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Result:
    pk: int
    verdict: Verdict
    error: str | None = None
    retry_after: str | None = None  # a 429's Retry-After header, as sent


def jobs_for(engine: Engine, claimed: Sequence[Row[Any]]) -> list[Job]:
    with engine.connect() as conn:
        found = conn.execute(
            select(messages).where(among(conn, messages.c.pk, {c.message_pk for c in claimed}))
        )
        by_pk = {row.pk: row for row in found}
    jobs = []
    for row in claimed:
        event = build_event(by_pk[row.message_pk], row.event, row.created_at)
        jobs.append(Job(row.pk, row.kind, row.target, event))
    return jobs


def send(engine: Engine, settings: Settings, claimed: Sequence[Row[Any]]) -> dict[str, int]:
    """Send claimed callbacks (URLs concurrently, tasks over one broker connection) and
    record every result."""
    if not claimed:
        return {}
    jobs = jobs_for(engine, claimed)
    urls = [job for job in jobs if job.kind == URL]
    results = publish_all([job for job in jobs if job.kind == TASK], settings.broker_url)
    if urls:
        results += asyncio.run(post_all(urls, settings))
    return record(engine, settings, claimed, results)


def headers_for(job: Job, body: bytes, secret: str | None) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Cascade-Event": job.event["event"],
        "X-Cascade-Delivery": str(job.pk),
    }
    if secret:
        timestamp = str(int(time.time()))
        headers["X-Cascade-Timestamp"] = timestamp
        headers["X-Cascade-Signature"] = sign(secret, timestamp, body)
    return headers


async def post_all(jobs: Sequence[Job], settings: Settings) -> list[Result]:
    """POST every URL callback, at most CALLBACK_CONCURRENCY at once."""
    timeout = settings.callback_timeout_seconds
    secret = settings.callback_signing_secret
    key = secret.get_secret_value() if secret else None
    gate = asyncio.Semaphore(settings.callback_concurrency)
    limits = httpx.Limits(max_connections=settings.callback_concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one(job: Job) -> Result:
            async with gate:
                return await post(client, job, key, timeout)

        return list(await asyncio.gather(*(one(job) for job in jobs)))


async def post(client: httpx.AsyncClient, job: Job, secret: str | None, timeout: float) -> Result:
    """One POST, bounded as a whole by `timeout` (a receiver dripping its answer included)."""
    body = orjson.dumps(job.event)
    try:
        async with asyncio.timeout(timeout):
            response = await client.post(
                job.target, content=body, headers=headers_for(job, body, secret)
            )
    except (TimeoutError, httpx.TimeoutException):
        return Result(job.pk, "retry", f"no answer within {timeout:g} s")
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:  # no request can ever go out
        return Result(job.pk, "refused", f"the URL cannot be used: {exc}")
    except httpx.HTTPError as exc:  # connection refused, reset, DNS, TLS: try again later
        return Result(job.pk, "retry", f"{type(exc).__name__}: {exc}"[:ERROR_CHARS])
    return judge(job.pk, response.status_code, response.text, response.headers.get("Retry-After"))


def judge(pk: int, status: int, text: str, retry_after: str | None) -> Result:
    """What an HTTP answer means: 2xx delivered; 408, 429 and 5xx passing trouble; anything
    else the receiver refusing this callback, which no retry will change."""
    if 200 <= status < 300:
        return Result(pk, "delivered")
    snippet = " ".join(text.split())[:ERROR_CHARS]
    error = f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}"
    if status == 429:
        return Result(pk, "retry", error, retry_after)
    if status == 408 or status >= 500:
        return Result(pk, "retry", error)
    if 300 <= status < 400:
        error += " (redirects are not followed: give the final URL)"
    return Result(pk, "refused", error)


def publish_all(jobs: Sequence[Job], broker_url: str) -> list[Result]:
    """Send each task callback by name on its queue; once the broker has it, it is delivered."""
    # Here, not at the top: receivers import verify_signature without the worker's settings.
    from worker.celery import app as celery_app

    if not jobs:
        return []
    results = []
    with celery_app.connection_for_write(broker_url) as conn:
        for job in jobs:
            name, _, queue = job.target.rpartition("@")
            try:
                celery_app.send_task(
                    name,
                    kwargs={"outcome": job.event},
                    queue=queue,
                    connection=conn,
                    retry=False,
                    ignore_result=True,
                    add_to_parent=False,
                )
            except Exception as exc:  # whatever stopped the publish, it was not delivered
                results.append(
                    Result(job.pk, "retry", f"not published: {type(exc).__name__}: {exc}")
                )
            else:
                results.append(Result(job.pk, "delivered"))
    return results


def decide(claimed: Row[Any], result: Result, settings: Settings, now: datetime) -> dict[str, Any]:
    """Column changes after one attempt: delivered, again after a backoff, or dead."""
    attempts = claimed.attempts + 1
    change: dict[str, Any] = {
        "state": DEAD,
        "attempts": attempts,
        "next_attempt_at": None,
        "lease_until": None,
        "delivered_at": None,
        "last_error": result.error,
    }
    if result.verdict == "delivered":
        return change | {"state": DELIVERED, "delivered_at": now, "last_error": claimed.last_error}
    if result.verdict == "refused":
        return change
    window = settings.callback_retry_for_seconds
    give_up_at = claimed.created_at + timedelta(seconds=window)
    if now >= give_up_at:
        hours = f"{window / 3600:g} h"
        return change | {
            "last_error": f"gave up after {attempts} attempts in {hours}: {result.error}"
        }
    backoff = send_retry_delay(
        attempts,
        base=settings.callback_backoff_base_seconds,
        cap=settings.callback_backoff_max_seconds,
    )
    if result.retry_after is not None:
        backoff = parse_retry_after(
            result.retry_after, now=now, default=backoff, cap=settings.callback_backoff_max_seconds
        )
    # The last attempt lands on the end of the window rather than past it.
    next_at = min(now + timedelta(seconds=backoff), give_up_at)
    return change | {"state": PENDING, "next_attempt_at": next_at}


def record(
    engine: Engine, settings: Settings, claimed: Sequence[Row[Any]], results: Sequence[Result]
) -> dict[str, int]:
    """Write every result to rows still under this run's lease; count the outcomes."""
    now = utcnow()
    by_pk = {row.pk: row for row in claimed}
    counts = {DELIVERED: 0, "retried": 0, DEAD: 0}
    updates = []
    for result in results:
        row = by_pk[result.pk]
        change = decide(row, result, settings, now)
        counts["retried" if change["state"] == PENDING else change["state"]] += 1
        if change["state"] == DEAD:
            log.warning(
                "callback %s to %s is dead: %s", row.pk, mask_url(row.target), change["last_error"]
            )
        updates.append(
            {"b_pk": row.pk, "b_lease": row.lease_until} | {f"v_{k}": v for k, v in change.items()}
        )
    stmt = (
        update(callbacks)
        .where(callbacks.c.pk == bindparam("b_pk"), callbacks.c.lease_until == bindparam("b_lease"))
        .values(
            {
                k: bindparam(f"v_{k}")
                for k in (
                    "state",
                    "attempts",
                    "next_attempt_at",
                    "lease_until",
                    "delivered_at",
                    "last_error",
                )
            }
        )
    )
    with engine.begin() as conn:
        conn.execute(stmt, updates)
    return counts


def deliver_due(engine: Engine, settings: Settings) -> dict[str, int]:
    """Create callbacks for new outcomes and send the due ones; answer what happened.

    Rounds go on while a step took a full batch (more are waiting), within a time budget.
    """
    totals = dict.fromkeys(("final", "late", DELIVERED, "retried", DEAD), 0)
    batch = settings.callback_batch_size
    stop_at = time.monotonic() + RUN_BUDGET_SECONDS
    while True:
        now = utcnow()
        step = {
            "final": collect_final(engine, now, batch),
            "late": collect_late(engine, now, batch),
        }
        claimed = claim_due(engine, now, batch, lease_seconds(settings))
        step |= send(engine, settings, claimed)
        for key, value in step.items():
            totals[key] += value
        more = max(step["final"], step["late"], len(claimed)) >= batch
        if not more or time.monotonic() >= stop_at:
            return totals


# --- operators ---------------------------------------------------------------------------


def list_callbacks(
    engine: Engine, state: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Newest first, for `cascade callbacks list`; passwords in URLs are masked."""
    query = (
        select(callbacks, messages.c.id.label("message_id"))
        .join(messages, messages.c.pk == callbacks.c.message_pk)
        .order_by(callbacks.c.pk.desc())
        .limit(limit)
    )
    if state is not None:
        query = query.where(callbacks.c.state == state)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [_listed(row) for row in rows]


def _listed(row: Row[Any]) -> dict[str, Any]:
    return {
        "pk": row.pk,
        "messageId": row.message_id,
        "kind": row.kind,
        "target": mask_url(row.target) if row.kind == URL else row.target,
        "event": EVENT_NAMES[row.event],
        "state": row.state,
        "attempts": row.attempts,
        "nextAttemptAt": _iso(row.next_attempt_at),
        "lastError": row.last_error,
        "createdAt": _iso(row.created_at),
        "deliveredAt": _iso(row.delivered_at),
    }


def retry_dead(engine: Engine, pks: list[int] | None) -> int:
    """Give dead callbacks (these, or all with None) a fresh window of attempts, due now."""
    now = utcnow()
    stmt = (
        update(callbacks)
        .where(callbacks.c.state == DEAD)
        .values(state=PENDING, attempts=0, created_at=now, next_attempt_at=now, lease_until=None)
    )
    if pks is not None:
        stmt = stmt.where(callbacks.c.pk.in_(pks))
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount
