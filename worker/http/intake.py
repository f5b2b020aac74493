"""Group commit for pushed reports: concurrent webhook requests share one INSERT and one commit.

A push is answered 200 only once its reports are committed (a crash after the answer loses
nothing). Committing each request on its own cost a transaction, a pooled connection and a
thread per push, which bounded intake at a few hundred pushes/s. Here every request hands
its parsed reports to the committer of its event loop and database, and waits: a single
writer takes everything waiting, writes it in one transaction (COPY on PostgreSQL, one
executemany on SQLite) in a thread off the event loop, then answers each request. While it
writes, the next requests gather, so the group grows with the load by itself.

A group that fails is written again request by request, each in its own transaction: a
request whose own rows cannot be stored gets the error (a 5xx: the provider retries), the
others commit. When the database is down every request of the group gets its error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

import orjson
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.pool import SingletonThreadPool

from worker.core.statuses import Report
from worker.flows.inbox import report_rows
from worker.store.db import (
    _raw_cursor,
    insert_rows,
    is_sqlite,
    sqlite_begin,
    sqlite_connect,
    timestamp_text,
)
from worker.store.models import provider_reports

log = logging.getLogger(__name__)

# Rows per transaction at most: a backlog after a stall is written in groups of this size.
MAX_GROUP_ROWS = 20_000


@dataclass
class Job:
    """One request's reports, stored as received at `received_at`."""

    reports: Sequence[Report]
    received_at: datetime
    wake: Callable[[str], None] | None = None
    broker_url: str = ""
    done: asyncio.Future[None] = field(init=False)  # made on the loop that awaits it


# What COPY writes per report; processed_at and outcome stay NULL (unprocessed).
_COPY = (
    "COPY provider_reports (received_at, source, provider_message_id, state, payload, retry_at)"
    " FROM STDIN"
)


def write_reports(conn: Connection, jobs: Sequence[Job]) -> None:
    """Append the jobs' reports in the caller's transaction, unprocessed and due at once.

    PostgreSQL: one COPY of plain tuples; building a dict per row and converting it column
    by column (`insert_rows`) took a quarter of the API's CPU on BulkGate arrays (measured).
    A job's time is written once as text: psycopg formats an aware datetime per value, and
    the two per report were half of a row's COPY cost (py-spy, 2.7 of 3.7 µs measured).
    """
    if conn.dialect.name != "postgresql":
        rows = [row for job in jobs for row in report_rows(job.reports, job.received_at)]
        insert_rows(conn, provider_reports, rows)
        return
    dumps = orjson.dumps
    with _raw_cursor(conn, "COPY provider_reports") as cursor, cursor.copy(_COPY) as copy:
        for job in jobs:
            at = timestamp_text(job.received_at)
            for r in job.reports:
                payload = dumps({"fields": r.fields, "detail": r.detail}).decode()
                copy.write_row((at, r.source, r.message_id, str(r.state), payload, at))


class GroupCommitter:
    """The writer of one event loop and one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # SQLite: one connection kept open in one thread. Its engine opens a connection per
        # transaction (NullPool), and closing the last one checkpoints the whole WAL: half
        # the writer's time at 2,500 pushes/s (measured).
        self.executor = _sqlite_writer() if is_sqlite(engine) else None
        self.writes = _held_engine(str(engine.url)) if is_sqlite(engine) else engine
        self.waiting: deque[Job] = deque()
        self.writer: asyncio.Task[None] | None = None
        self.groups = 0  # committed groups, for tests and logs

    async def store(self, job: Job) -> None:
        """Return once the job's reports are committed; raise what stopped them."""
        loop = asyncio.get_running_loop()
        job.done = loop.create_future()
        self.waiting.append(job)
        if self.writer is None or self.writer.done():
            self.writer = loop.create_task(self._drain())
        # Shielded: a caller that goes away (client disconnect) must not cancel a write
        # that other requests of the group wait on; the future is only its own.
        await asyncio.shield(job.done)

    async def _drain(self) -> None:
        """Write groups until nothing waits; the task ends then (a new one starts later)."""
        loop = asyncio.get_running_loop()
        try:
            await self._write_while_waiting(loop)
        finally:  # a finished task holds its loop: let a loop that is done be collected
            self.writer = None

    async def _write_while_waiting(self, loop: asyncio.AbstractEventLoop) -> None:
        while self.waiting:
            group = [self.waiting.popleft()]
            rows = len(group[0].reports)
            while self.waiting and rows + len(self.waiting[0].reports) <= MAX_GROUP_ROWS:
                group.append(self.waiting.popleft())
                rows += len(group[-1].reports)
            stopped: BaseException | None = None
            try:
                outcomes = await loop.run_in_executor(self.executor, self._write, group)
            except BaseException as exc:  # every waiter must hear of it
                outcomes, stopped = [exc] * len(group), exc
            for job, outcome in zip(group, outcomes, strict=True):
                if job.done.done():
                    continue
                if outcome is None:
                    job.done.set_result(None)
                else:
                    job.done.set_exception(outcome)
            if isinstance(stopped, asyncio.CancelledError):  # the loop is shutting down
                raise stopped

    def _write(self, group: list[Job]) -> list[BaseException | None]:
        """In a thread: the group in one transaction, else each job in its own."""
        try:
            with self.writes.begin() as conn:
                write_reports(conn, group)
            outcomes: list[BaseException | None] = [None] * len(group)
        except Exception as exc:
            if len(group) == 1:
                return [exc]
            log.warning(
                "webhook intake: a group of %d requests failed (%s); writing each alone",
                len(group),
                type(exc).__name__,
            )
            outcomes = [self._write_one(job) for job in group]
        self.groups += 1
        _wake([job for job, failed in zip(group, outcomes, strict=True) if failed is None])
        return outcomes

    def _write_one(self, job: Job) -> BaseException | None:
        try:
            with self.writes.begin() as conn:
                write_reports(conn, [job])
        except Exception as exc:
            return exc
        return None


def _wake(stored: Sequence[Job]) -> None:
    """Wake the applier once per waker and broker of the jobs stored (wakes are coalesced)."""
    seen: set[tuple[int, str]] = set()
    for job in stored:
        key = (id(job.wake), job.broker_url)
        if job.wake is None or not job.reports or key in seen:
            continue
        seen.add(key)
        try:
            job.wake(job.broker_url)
        except Exception as exc:  # beat runs the applier anyway
            log.warning("webhook intake: waking the applier failed: %s", exc)


_committers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, GroupCommitter]] = (
    weakref.WeakKeyDictionary()
)


@lru_cache(maxsize=8)
def _held_engine_for(url: str, pid: int) -> Engine:
    engine = create_engine(
        url, poolclass=SingletonThreadPool, connect_args={"timeout": 60}, hide_parameters=True
    )
    event.listen(engine, "connect", sqlite_connect)
    event.listen(engine, "begin", sqlite_begin)
    return engine


def _held_engine(url: str) -> Engine:
    """A SQLite engine that keeps its connection (one per thread: the writer's thread)."""
    return _held_engine_for(url, os.getpid())


@lru_cache(maxsize=1)
def _sqlite_writer_for(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake-sqlite")


def _sqlite_writer() -> ThreadPoolExecutor:
    """The one thread that writes SQLite intake in this process (SQLite has one writer)."""
    return _sqlite_writer_for(os.getpid())


def committer(engine: Engine) -> GroupCommitter:
    """The committer of the running event loop for this engine's database."""
    loop = asyncio.get_running_loop()
    by_url = _committers.setdefault(loop, {})
    key = str(engine.url)
    if key not in by_url or by_url[key].engine is not engine:
        by_url[key] = GroupCommitter(engine)
    return by_url[key]
