"""Periodic repair from database state, so no message depends on Redis or a live worker.

- a send claim whose lease ran out (the worker died mid-batch) is treated as an unknown
  outcome: the request may have reached the provider;
- a queued message whose TTL ran out is `expired`;
- a message with the provider and no final status past its deadline is `timeout`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert, select, update

from config import Settings
from worker.backoff import send_retry_delay
from worker.campaigns import cancelled_campaigns
from worker.db import among, utcnow
from worker.dispatcher import after_failed_attempt
from worker.models import events, messages
from worker.states import State

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


def recover_stale_claims(engine: Engine, settings: Settings) -> int:
    """Re-queue (or fail, per SEND_UNKNOWN_OUTCOME) sends whose worker vanished."""
    now = utcnow()
    with engine.begin() as conn:
        rows = list(
            conn.execute(
                select(
                    messages.c.pk,
                    messages.c.campaign,
                    messages.c.attempts,
                    messages.c.unknown_outcomes,
                )
                .where(messages.c.state == State.SENDING, messages.c.lease_until < now)
                .limit(CHUNK)
                .with_for_update(skip_locked=True)
            )
        )
        stopped = cancelled_campaigns(conn, {r.campaign for r in rows} - {None})
        journal = []
        for row in rows:
            attempts = row.attempts + 1
            if settings.send_unknown_outcome == "fail" or row.campaign in stopped:
                target = State.FAILED  # never resend what the provider may already have
            else:
                target = after_failed_attempt(attempts, settings.send_max_attempts)
            delay = send_retry_delay(
                attempts,
                base=settings.send_backoff_base_seconds,
                cap=settings.send_backoff_max_seconds,
            )
            final = target != State.QUEUED
            conn.execute(
                update(messages)
                .where(messages.c.pk == row.pk)
                .values(
                    state=target,
                    attempts=attempts,
                    unknown_outcomes=row.unknown_outcomes + 1,
                    claim_token=None,
                    lease_until=None,
                    available_at=now + timedelta(seconds=delay),
                    error_code="UNKNOWN_OUTCOME",
                    error_message="send claim expired: the worker stopped mid-batch",
                    final_at=now if final else None,
                    final_source="system" if final else None,
                )
            )
            journal.append(
                _event(row.pk, now, State.SENDING, target, "claim lease expired; outcome unknown")
            )
        if journal:
            conn.execute(insert(events), journal)
    if rows:
        log.warning("recovered %d send claims whose lease ran out", len(rows))
    return len(rows)


def _close(engine: Engine, where: list[Any], target: State, code: str, detail: str) -> int:
    now = utcnow()
    with engine.begin() as conn:
        rows = list(
            conn.execute(
                select(messages.c.pk, messages.c.state)
                .where(*where)
                .limit(CHUNK)
                .with_for_update(skip_locked=True)
            )
        )
        if not rows:
            return 0
        conn.execute(
            update(messages)
            .where(among(conn, messages.c.pk, [r.pk for r in rows]))
            .values(
                state=target,
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
    return len(rows)


def expire_queued(engine: Engine) -> int:
    now = utcnow()
    return _close(
        engine,
        [messages.c.state == State.QUEUED, messages.c.expires_at <= now],
        State.EXPIRED,
        "TTL_EXPIRED",
        "TTL ran out before the message could be sent",
    )


def time_out(engine: Engine, settings: Settings) -> int:
    """Close overdue messages the poller has not reached (it closes the rest itself)."""
    late = utcnow() - timedelta(seconds=settings.poll_lease_seconds)
    return _close(
        engine,
        [
            messages.c.state.in_([State.SUBMITTED, State.SCHEDULED, State.PROCESSING]),
            messages.c.poll_deadline < late,
        ],
        State.TIMEOUT,
        "TIMEOUT",
        "no final status before the deadline",
    )


def sweep(engine: Engine, settings: Settings) -> dict[str, int]:
    return {
        "stale_claims": recover_stale_claims(engine, settings),
        "expired": expire_queued(engine),
        "timeout": time_out(engine, settings),
    }
