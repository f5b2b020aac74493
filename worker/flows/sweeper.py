"""Periodic repair from database state, so no message depends on Redis or a live worker.

- a send claim whose lease ran out (the worker died mid-batch) is treated as an unknown
  outcome: the request may have reached the provider;
- a queued message whose TTL ran out is `expired`, one past its send deadline `failed`;
- a message with the provider and no final status past its deadline is `timeout`;
- an unsent promo or survey whose number opted out is `suppressed` (worker/flows/consent.py);
- a campaign's tally rows are folded into their sums (worker/flows/tallies.py).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, insert, select, update

from config import Settings
from worker.core.backoff import send_retry_delay
from worker.core.quiet import WAITING_DETAIL
from worker.core.sendpolicy import Current, MessageChange, Unknown, decide
from worker.core.states import State
from worker.flows.campaigns import cancelled_campaigns
from worker.flows.consent import suppress_queued
from worker.flows.tallies import fold
from worker.store.db import among, bulk_update, insert_rows, utcnow
from worker.store.models import events, messages

log = logging.getLogger(__name__)

CHUNK = 5000


def _event(pk: int, now: datetime, old: str, new: str, detail: str) -> dict[str, Any]:
    return {
        "message_pk": pk,
        "at": now,
        "source": "system",
        "from_state": old,
        "to_state": new,
        "detail": detail,
    }


def recover_stale_claims(engine: Engine, settings: Settings, now: datetime | None = None) -> int:
    """Re-queue (or fail, per SEND_UNKNOWN_OUTCOME) sends whose worker vanished.

    The request may have reached the provider: an unknown outcome, decided as the send
    path decides one. An isolation part stays a part, so the halving goes on from there.
    """
    now = now or utcnow()
    stale = [messages.c.state == State.SENDING, messages.c.lease_until < now]
    if not any_due(engine, stale, messages.c.lease_until):
        return 0
    with engine.begin() as conn:
        rows = list(
            conn.execute(
                select(
                    messages.c.pk,
                    messages.c.campaign,
                    messages.c.attempts,
                    messages.c.unknown_outcomes,
                    messages.c.send_deadline,
                )
                .where(*stale)
                .order_by(messages.c.pk)
                .limit(CHUNK)
                .with_for_update(skip_locked=True)
            )
        )
        stopped = cancelled_campaigns(conn, {r.campaign for r in rows} - {None})
        delay = send_retry_delay(
            1, base=settings.send_backoff_base_seconds, cap=settings.send_backoff_max_seconds
        )
        lapsed = Unknown(0, "send claim expired: the worker stopped mid-batch", delay)
        changes: dict[int, MessageChange] = {}
        journal = []
        for row in rows:
            current = Current(row.attempts, row.unknown_outcomes, row.send_deadline)
            resend = settings.send_unknown_outcome == "resend" and row.campaign not in stopped
            values, target, _ = decide(lapsed, current, settings, now, resend_unknown=resend)
            if target == State.FAILED:
                values["final_source"] = "system"
            changes[row.pk] = values
            journal.append(
                _event(row.pk, now, State.SENDING, target, "claim lease expired; outcome unknown")
            )
        bulk_update(conn, messages, changes)
        insert_rows(conn, events, journal)
    if rows:
        log.warning("recovered %d send claims whose lease ran out", len(rows))
    return len(rows)


def give_up(engine: Engine, now: datetime | None = None) -> int:
    """Fail queued messages past their send deadline: however they were kept from the
    provider (an outage, a circuit held open by a 401, a bug), none waits forever."""
    now = now or utcnow()
    return _close(
        engine,
        [messages.c.state == State.QUEUED, messages.c.send_deadline <= now],
        messages.c.send_deadline,
        State.FAILED,
        "SEND_DEADLINE",
        "not sent before its send deadline (SEND_RETRY_FOR_SECONDS)",
        now,
    )


def any_due(engine: Engine, where: list[Any], deadline: ColumnElement[Any]) -> bool:
    """Whether a row matches, asked by walking `deadline`'s partial index in order.

    With autovacuum off, the index keeps an entry for every row that ever matched, and once
    their deadlines pass they are all in range. A bitmap scan (the planner's choice for the
    sweep's own query) visits the heap for each of them on every sweep: 150–300 ms at
    1,000,000 messages, growing with every campaign. An ordered scan marks the dead entries
    it meets, so later sweeps step over them: 4 ms.
    """
    with engine.connect() as conn:
        found = conn.execute(select(messages.c.pk).where(*where).order_by(deadline).limit(1))
        return found.first() is not None


def _close(
    engine: Engine,
    where: list[Any],
    deadline: ColumnElement[Any] | None,
    target: State,
    code: str,
    detail: str,
    now: datetime | None = None,
) -> int:
    """Close up to CHUNK rows matching `where`; with `deadline`, an indexed column that
    orders them, ask `any_due` first."""
    now = now or utcnow()
    if deadline is not None and not any_due(engine, where, deadline):
        return 0
    with engine.begin() as conn:
        rows = _lock(conn, where, deadline)
        _finish(conn, rows, target, code, detail, now)
    return len(rows)


def _lock(conn: Connection, where: list[Any], order: ColumnElement[Any] | None) -> list[Any]:
    """Up to CHUNK rows matching `where` (pk, state, window_at), locked, skipping locked."""
    return list(
        conn.execute(
            select(messages.c.pk, messages.c.state, messages.c.window_at)
            .where(*where)
            .order_by(*([] if order is None else [order]))
            .limit(CHUNK)
            .with_for_update(skip_locked=True)
        )
    )


def _finish(
    conn: Connection, rows: list[Any], target: State, code: str, detail: str, now: datetime
) -> None:
    """End the locked `rows` (pk, state) in `target` with the error `code` and `detail`."""
    if rows:
        conn.execute(
            update(messages)
            .where(among(conn, messages.c.pk, [r.pk for r in rows]))
            .values(
                state=target,
                isolation=None,
                next_poll_at=None,
                claim_token=None,
                lease_until=None,
                final_at=now,
                final_source="system",
                error_code=code,
                error_message=detail,
            )
        )
        conn.execute(insert(events), [_event(r.pk, now, r.state, target, detail) for r in rows])


def expire_queued(engine: Engine) -> int:
    """A backstop: the claim itself expires the rows it takes. No index on `expires_at`
    among queued rows: it cost every enqueued message 3 µs of CPU (8 % of intake), for a
    pass that reads the queue's index once every SWEEP_INTERVAL_SECONDS.

    One whose send window had not opened yet (held at the claim: approved at night) was held
    by quiet hours, not by us, and ends as one expiring at the door does: QUIET_HOURS. The
    claim never sees those: they are not available before the opening.
    """
    now = utcnow()
    with engine.begin() as conn:
        rows = _lock(conn, [messages.c.state == State.QUEUED, messages.c.expires_at <= now], None)
        held = [r for r in rows if r.window_at is not None and r.window_at > now]
        rest = [r for r in rows if r.window_at is None or r.window_at <= now]
        _finish(conn, held, State.EXPIRED, "QUIET_HOURS", WAITING_DETAIL, now)
        detail = "TTL ran out before the message could be sent"
        _finish(conn, rest, State.EXPIRED, "TTL_EXPIRED", detail, now)
    return len(rows)


def time_out(engine: Engine, settings: Settings) -> int:
    """Close overdue messages the poller has not reached (it closes the rest itself): those
    whose check is as overdue as their deadline. A message with a check still to come is
    the poller's to time out, so the pass walks the next-check index, not the table."""
    late = utcnow() - timedelta(
        seconds=settings.poll_lease_seconds + settings.poll_outage_grace_seconds
    )
    return _close(
        engine,
        [
            messages.c.state.in_([State.SUBMITTED, State.SCHEDULED, State.PROCESSING]),
            messages.c.next_poll_at < late,
            messages.c.poll_deadline < late,
        ],
        messages.c.next_poll_at,
        State.TIMEOUT,
        "TIMEOUT",
        "no final status before the deadline",
    )


class ConsentPasses:
    """When the consent backstop reads every unsent row: at a process's first sweep and
    every `full_every` seconds. In between it looks up only the numbers listed since the
    last whole pass (less `margin`, for a listing or an intake still committing then)."""

    def __init__(self, full_every: float = 3600.0, margin: float = 600.0) -> None:
        self.full_every = full_every
        self.margin = margin
        self._full_at: datetime | None = None

    def since(self, now: datetime) -> datetime | None:
        """None for a whole pass (and it counts as done), else where the listings start."""
        if self._full_at is None or (now - self._full_at).total_seconds() >= self.full_every:
            self._full_at = now
            return None
        return self._full_at - timedelta(seconds=self.margin)


def sweep(
    engine: Engine, settings: Settings, consent_since: datetime | None = None
) -> dict[str, int]:
    return {
        "stale_claims": recover_stale_claims(engine, settings),
        "expired": expire_queued(engine),
        "gave_up": give_up(engine),
        "timeout": time_out(engine, settings),
        "suppressed": suppress_queued(engine, consent_since),
        "tallies_folded": fold(engine),
    }
