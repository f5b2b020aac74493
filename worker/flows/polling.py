"""Status polling: claim messages whose `next_poll_at` is due, check them, write the answers.

The schedule lives in the database, not in Celery countdowns: a claim pushes
`next_poll_at` forward by a lease, so a poll task lost with a flushed Redis or a killed
worker simply comes due again. Each check re-reads the row first and skips it if it
became final or was polled less than the minimum gap ago.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Boolean, ColumnElement, Engine, literal_column, select, update

from config import Settings
from worker.core.backoff import (
    NO_PLAN,
    POLL_TIME_LIMIT_SHARE,
    CheckPlan,
    explored_latency,
    explores,
)
from worker.core.sendpolicy import check_delay, learn_every, pause_for
from worker.core.states import FINAL, State
from worker.core.statuses import Report, apply
from worker.observe.metrics import count_checks, observe_finals
from worker.provider.smsbat import (
    NotFound,
    ProviderError,
    StatusClient,
    StatusReport,
    Throttled,
    Unauthorized,
)
from worker.store.db import AnyRow, among, bulk_update, claim_rows, insert_rows, utcnow
from worker.store.models import events, messages
from worker.store.pacing import Pacing

log = logging.getLogger(__name__)

THROTTLE = "poll:throttle"
CIRCUIT = "poll:circuit"
_POLLABLE = (State.SUBMITTED, State.SCHEDULED, State.PROCESSING)


@dataclass
class PollReport:
    checked: int = 0
    skipped: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def poll_task_room(queued: int, sending_behind: bool, settings: Settings) -> int:
    """How many poll tasks a sweep may add to the `queued` ones.

    A status check only learns what already happened; a send that waits delays a message.
    So while sending is behind (a full batch waits for a worker), polling keeps a few tasks,
    not a full queue: on a 2-core machine checks took three quarters of the workers' CPU
    mid-campaign.
    """
    cap = settings.poll_tasks_while_sending if sending_behind else settings.poll_max_queued_tasks
    return max(0, min(cap, settings.poll_max_queued_tasks) - queued)


def lease_end(now: datetime, lease: float) -> datetime:
    """The `next_poll_at` a claim made at `now` sets: the claim's mark on its rows."""
    return now + timedelta(seconds=lease)


def claim_due(
    engine: Engine, now: datetime, limit: int, lease: float, explorers_of: int = 0
) -> list[int]:
    """Take up to `limit` messages due for a check, pushing their next check out by a lease.

    `explorers_of`: only the explorers (`backoff.explores`) among them. A check that runs
    late teaches the plan nothing, so while checks are behind (a burst of sends), the
    explorers go first or the plan never learns.
    """
    # Literal, so the planner matches the predicate of ix_messages_explorers (0019).
    only: list[ColumnElement[bool]] = (
        [literal_column(f"pk % {int(explorers_of)} = 0", Boolean)] if explorers_of else []
    )
    rows = claim_rows(
        engine,
        messages,
        where=[messages.c.next_poll_at <= now, *only],
        order_by=[messages.c.next_poll_at],
        limit=limit,
        values={"next_poll_at": lease_end(now, lease)},
        returning=[messages.c.pk],
    )
    return [row.pk for row in rows]


def claim_batch(
    engine: Engine, now: datetime, size: int, lease: float, explorers_of: int
) -> list[int]:
    """One poll task's checks: the due explorers first, then the oldest due, `size` in all.

    An explorer's check that runs late teaches the plan nothing (`explored_latency`): in a
    backlog (a campaign's first checks all due at once) the plan would be learned from the
    fastest explorers alone, and time every other message's checks too early.
    """
    pks = claim_due(engine, now, size, lease, explorers_of) if explorers_of else []
    if len(pks) < size:
        pks += claim_due(engine, now, size - len(pks), lease)
    return pks


# What deciding whether a message is due for a check needs.
_CHECK_COLUMNS = (
    messages.c.pk,
    messages.c.route,
    messages.c.state,
    messages.c.provider_message_id,
    messages.c.last_polled_at,
)


def needs_fresh_lease(claimed: datetime, now: datetime, lease: float) -> bool:
    """Whether a task starting at `now` could outlive its claim's lease (it sat in the queue).

    With more of the lease left than the task may run, no sweep can claim its rows before
    it ends, so reading them is enough: an UPDATE per poll was a third of polling's writes.
    """
    return (claimed - now).total_seconds() < lease * POLL_TIME_LIMIT_SHARE


def take(engine: Engine, pks: Sequence[int], claimed: datetime, lease: float) -> list[AnyRow]:
    """The rows still under the claim marked `claimed`, leased afresh if the claim is old.

    A task can wait in the queue past its claim's lease; by then another sweep may have
    claimed the same rows again. Only one of the two may poll them, and only the one that
    holds a row may write its next check (else it ends the other's lease early).
    """
    now = utcnow()
    held = [among(engine, messages.c.pk, pks), messages.c.next_poll_at == claimed]
    if not needs_fresh_lease(claimed, now, lease):
        with engine.connect() as conn:
            return list(conn.execute(select(*_CHECK_COLUMNS).where(*held)).all())
    stmt = (
        update(messages)
        .where(*held)
        .values(next_poll_at=lease_end(now, lease))
        .returning(*_CHECK_COLUMNS)
    )
    with engine.begin() as conn:
        return list(conn.execute(stmt).all())


def _due(row: AnyRow, now: datetime, min_gap: float) -> bool:
    return (
        row.state in _POLLABLE
        and row.provider_message_id is not None
        and (row.last_polled_at is None or (now - row.last_polled_at).total_seconds() >= min_gap)
    )


Answer = StatusReport | ProviderError
# When the answer came back, and what it was. The answer time, not the send time: the
# provider saw the request no later than that, so a next poll ≥ 1 s after it keeps the
# provider's 1 s rule even when the request sat in a slow connect or a busy event loop.
Checked = tuple[datetime, Answer]


def check_all(
    client: StatusClient,
    pacing: Pacing,
    settings: Settings,
    message_ids: Sequence[str],
    threads: Executor,
    budget: float,
) -> dict[str, Checked]:
    """Check every id, POLL_CONCURRENCY at a time, within the shared status request rate,
    for `budget` s.

    Checks not started within the budget are left for the next round, and those still
    unanswered at its end count as polls the provider may have seen: answers in hand are
    never lost to a slow provider running the task into its time limit. A 429 or a 401
    stops the checks not started yet.
    """
    deadline = time.monotonic() + budget
    results: dict[str, Checked] = {}
    stopped = False

    def go_on() -> bool:
        return not stopped

    step = settings.status_requests_per_second or len(message_ids) or 1
    for start in range(0, len(message_ids), step):
        chunk = message_ids[start : start + step]
        pacing.acquire("poll:requests", settings.status_requests_per_second, len(chunk))
        answers = client.status_all(
            chunk,
            width=settings.poll_concurrency,
            deadline=deadline,
            go_on=go_on,
            threads=threads,
        )
        for message_id, answer, _ in answers:
            results[message_id] = utcnow(), answer
            stopped = stopped or isinstance(answer, Throttled | Unauthorized)
        if stopped or time.monotonic() >= deadline:
            break
    return results


def poll_batch(
    engine: Engine,
    client: StatusClient,
    pacing: Pacing,
    settings: Settings,
    pks: Sequence[int],
    threads: Executor,
    claimed: datetime | None = None,
) -> PollReport:
    """The body of `cascade.poll_batch`: check the given messages and record what came back.

    `claimed` is the claim's mark (`lease_end`); rows no longer under it are left alone.
    """
    report = PollReport()
    if claimed is not None:  # the rows come back with the claim: no second read
        rows = take(engine, pks, claimed, settings.poll_lease_seconds)
        report.skipped = len(pks) - len(rows)
    else:
        with engine.begin() as conn:
            rows = list(
                conn.execute(select(*_CHECK_COLUMNS).where(among(conn, messages.c.pk, pks)))
            )
    paused = max(pacing.paused_for(THROTTLE), pacing.paused_for(CIRCUIT))
    now = utcnow()
    due = [r for r in rows if _due(r, now, settings.poll_min_gap_seconds)]
    report.skipped += len(rows) - len(due)
    results: dict[str, Checked] = {}
    if due and not paused:
        ids = [r.provider_message_id for r in due]
        budget = settings.poll_lease_seconds / 2  # well inside the lease and time limits
        results = check_all(client, pacing, settings, ids, threads, budget)
        report.checked = len(results)
        count_checks(results.values())
    paused = max(paused, heed(pacing, settings, [answer for _, answer in results.values()]))
    plans = {route: pacing.check_plan(route, settings) for route in {r.route for r in rows}}
    report.counts, learned, finals = record_polls(
        engine, settings, [r.pk for r in rows], results, paused, plans
    )
    observe_finals(finals)
    for route, latencies in learned.items():
        pacing.note_latencies(route, latencies)
    return report


def heed(pacing: Pacing, settings: Settings, answers: Sequence[Answer]) -> float:
    """Pause every worker's checks as the send path would (`sendpolicy.pause_for`): for a
    429, a 401, or a round in which the provider answered no check at all."""
    failures = 0 if any(isinstance(a, StatusReport | NotFound) for a in answers) else len(answers)
    for answer in answers:
        pause = pause_for(answer, failures=failures, settings=settings)
        if pause is None:
            continue
        pacing.pause(THROTTLE if pause.kind == "throttle" else CIRCUIT, pause.seconds)
        if pause.kind == "circuit":
            log.error("status checks paused %.0fs: %s", pause.seconds, pause.reason)
        return pause.seconds
    return 0.0


def record_polls(
    engine: Engine,
    settings: Settings,
    pks: Sequence[int],
    results: dict[str, Checked],
    paused: float,
    plans: Mapping[str, CheckPlan] | None = None,
) -> tuple[dict[str, int], dict[str, list[float]], list[float]]:
    """Apply answers forward-only, schedule the next check of every unfinished message on
    its route's plan; answer the counts of new states, by route the latencies the exploring
    messages that became final showed, and the seconds from submit to final of every
    message that did (for the latency histogram)."""
    now = utcnow()
    counts: dict[str, int] = {}
    learned: dict[str, list[float]] = {}
    finals: list[float] = []
    every = learn_every(settings)
    changes: dict[int, dict[str, Any]] = {}
    journal: list[dict[str, Any]] = []
    with engine.begin() as conn:
        rows = conn.execute(
            select(
                messages.c.pk,
                messages.c.state,
                messages.c.provider_message_id,
                messages.c.polls,
                messages.c.last_polled_at,
                messages.c.poll_deadline,
                messages.c.next_poll_at,
                messages.c.route,
                messages.c.submitted_at,
                messages.c.scheduled_sent,
            )
            .where(among(conn, messages.c.pk, pks))
            .order_by(messages.c.pk)  # one lock order everywhere: no deadlocks with webhooks
            .with_for_update()
        )
        for row in rows:
            checked = results.get(row.provider_message_id)
            plan = (plans or {}).get(row.route, NO_PLAN)
            change = _next(row, checked, settings, now, plan)
            if paused and change.get("next_poll_at"):
                change["next_poll_at"] = max(
                    change["next_poll_at"], now + timedelta(seconds=paused)
                )
            new_state = change.get("state", row.state)
            if new_state != row.state:
                counts[new_state] = counts.get(new_state, 0) + 1
                timed_out = new_state == State.TIMEOUT
                start = _start(row)
                if new_state in FINAL and row.submitted_at is not None:
                    finals.append((now - row.submitted_at).total_seconds())
                learn = new_state in FINAL and not timed_out and explores(row.pk, every)
                if learn and checked is not None and start is not None:
                    latency = explored_latency(
                        start, row.last_polled_at, checked[0], settings.poll_learn_step_seconds
                    )
                    if latency is not None:
                        learned.setdefault(row.route, []).append(latency)
                journal.append(
                    {
                        "message_pk": row.pk,
                        "at": now,
                        "source": "system" if timed_out else "poll",
                        "from_state": row.state,
                        "to_state": new_state,
                        "detail": "no final status before the deadline"
                        if timed_out
                        else _describe(checked[1] if checked else None),
                    }
                )
            changes[row.pk] = change
        bulk_update(conn, messages, changes)
        insert_rows(conn, events, journal)
    return counts, learned, finals


def as_report(status: StatusReport) -> Report:
    return Report(
        status.message_id,
        status.state,
        "poll",
        status.fields(),
        f"deliverystatus {status.deliverystatus}",
    )


def _describe(result: Answer | None) -> str | None:
    if isinstance(result, StatusReport):
        return f"deliverystatus {result.deliverystatus}"
    return None


def _start(row: AnyRow) -> datetime | None:
    """When a message's latency starts: its submit, or its scheduled time if later."""
    submitted: datetime | None = row.submitted_at
    scheduled: datetime | None = row.scheduled_sent
    if submitted is None or scheduled is None:
        return submitted
    return max(submitted, scheduled)


def _next(
    row: AnyRow,
    checked: Checked | None,
    settings: Settings,
    now: datetime,
    plan: CheckPlan = NO_PLAN,
) -> dict[str, Any]:
    """Column changes for one message after a round of checks (pure)."""
    if row.state in FINAL:
        return {"next_poll_at": None}
    change: dict[str, Any] = {}
    polls = row.polls
    polled_at, result = checked if checked else (None, None)
    if polled_at is not None:
        polls += 1
        change |= {"polls": polls, "last_polled_at": polled_at}
    if isinstance(result, StatusReport):
        change |= apply(row.state, as_report(result), now)
        if change.get("state") in FINAL:
            return change
    elif isinstance(result, NotFound):
        change["error_message"] = "status check: message not found at the provider"
    if _timed_out(row.poll_deadline, result, settings, now):
        return change | {
            "state": State.TIMEOUT,
            "next_poll_at": None,
            "final_at": now,
            "final_source": "system",
            "error_code": "TIMEOUT",
            "error_message": "no final status before the deadline",
        }
    last = polled_at or row.last_polled_at
    start = _start(row)
    age = ((last or now) - start).total_seconds() if start else 0.0
    next_at = (last or now) + timedelta(seconds=check_delay(age, polls, row.pk, plan, settings))
    if row.poll_deadline is not None and now < row.poll_deadline:
        next_at = min(next_at, row.poll_deadline)
    return change | {"next_poll_at": max(next_at, now + timedelta(seconds=0.05))}


def _timed_out(
    deadline: datetime | None, result: Answer | None, settings: Settings, now: datetime
) -> bool:
    """Past its deadline a message times out on an answer; an outage of the status endpoint
    delays that (checks go on) for up to POLL_OUTAGE_GRACE_SECONDS, never brings it early."""
    if deadline is None or now < deadline:
        return False
    if isinstance(result, StatusReport | NotFound):
        return True
    return now >= deadline + timedelta(seconds=settings.poll_outage_grace_seconds)
