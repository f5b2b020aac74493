"""The send path: claim queued messages, POST them in one batch, record every outcome.

A claim commits before any HTTP call and no connection is held while the provider
answers. Each claimed row carries a claim token; results are written only to rows
that still carry it, so a claim taken over after its lease ran out is never
overwritten by the worker that lost it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Row, func, select

from config import Settings
from worker.backoff import poll_deadline, send_retry_delay
from worker.campaigns import cancelled_campaigns
from worker.db import among, bulk_update, claim_rows, insert_rows, utcnow
from worker.models import events, messages
from worker.pacing import Pacing
from worker.smsbat import (
    BadRequest,
    OutcomeUnknown,
    SendClient,
    Throttled,
    Unauthorized,
    Unavailable,
)
from worker.states import State
from worker.validation import OutgoingMessage

log = logging.getLogger(__name__)

THROTTLE = "send:throttle"
CIRCUIT = "send:circuit"


# --- outcomes of one claim (pure data) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Submitted:
    pk: int
    message_id: str


@dataclass(frozen=True, slots=True)
class Rejected:
    pk: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Retry:
    """Back to the queue. `counts` says whether this was a failed attempt."""

    pk: int
    reason: str
    counts: bool
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Unknown:
    """The request was written but its answer was lost: the provider may have it."""

    pk: int
    reason: str


@dataclass(frozen=True, slots=True)
class Expired:
    pk: int


@dataclass(frozen=True, slots=True)
class Cancelled:
    """Would go back to the queue, but its campaign was cancelled meanwhile."""

    pk: int


Outcome = Submitted | Rejected | Retry | Unknown | Expired | Cancelled


@dataclass
class BatchReport:
    route: str
    claimed: int = 0
    requests: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    paused: float = 0.0


# --- decisions -----------------------------------------------------------------------


def should_flush(ready: int, oldest_wait: float, *, batch_min: int, linger: float) -> bool:
    """A batch goes out when it is big enough or its oldest message has waited long enough."""
    return ready >= batch_min or (ready > 0 and oldest_wait >= linger)


def after_failed_attempt(attempts: int, max_attempts: int) -> State:
    """Where a message goes after its `attempts`-th failed send."""
    return State.FAILED if attempts >= max_attempts else State.QUEUED


def first_poll_delay(settings: Settings) -> float:
    """With webhooks reporting, polling only reconciles what they missed: start it later."""
    if settings.webhooks_enabled:
        return settings.poll_first_delay_with_webhooks_seconds
    return settings.poll_first_delay_seconds


def send_paused(pacing: Pacing) -> float:
    """Seconds left of a pause of all sending: a 429's Retry-After or an open circuit."""
    return max(pacing.paused_for(THROTTLE), pacing.paused_for(CIRCUIT))


def batch_limit(settings: Settings) -> int:
    rate = settings.send_messages_per_second
    return min(settings.send_batch_max, rate) if rate else settings.send_batch_max


# --- database edges ------------------------------------------------------------------


_CLAIM_COLUMNS = (
    messages.c.pk,
    messages.c.id,
    messages.c.campaign,
    messages.c.from_name,
    messages.c.to_phone,
    messages.c.message_type,
    messages.c.text,
    messages.c.ttl,
    messages.c.scheduled_sent,
    messages.c.survey_options,
    messages.c.route,
    messages.c.attempts,
    messages.c.expires_at,
)


def _ready_filter(route: str, now: datetime) -> list[Any]:
    return [
        messages.c.state == State.QUEUED,
        messages.c.route == route,
        messages.c.available_at <= now,
    ]


def ready_summary(
    engine: Engine, route: str, now: datetime, cap: int, batch_min: int
) -> tuple[int, float]:
    """How many messages are ready (counted up to `cap`) and how long the oldest has waited.

    The wait only decides a batch smaller than `batch_min`, so a full one skips that query.
    """
    ready = select(messages.c.pk).where(*_ready_filter(route, now)).limit(cap).subquery()
    with engine.begin() as conn:
        count = conn.execute(select(func.count()).select_from(ready)).scalar_one()
        if not count or count >= batch_min:
            return count, 0.0
        oldest = conn.execute(
            select(func.min(messages.c.available_at)).where(*_ready_filter(route, now))
        ).scalar_one()
    return count, (now - oldest).total_seconds() if oldest else 0.0


def claim(
    engine: Engine, route: str, now: datetime, limit: int, lease: float, token: str
) -> list[Row[Any]]:
    """Take up to `limit` ready messages, urgent types first, in one statement."""
    return claim_rows(
        engine,
        messages,
        where=_ready_filter(route, now),
        order_by=[messages.c.priority, messages.c.pk],
        limit=limit,
        values={
            "state": State.SENDING,
            "claim_token": token,
            "lease_until": now + timedelta(seconds=lease),
        },
        returning=_CLAIM_COLUMNS,
    )


def provider_payload(row: Row[Any]) -> dict[str, Any]:
    return OutgoingMessage(
        id=row.id,
        from_name=row.from_name,
        to_phone=row.to_phone,
        message_type=row.message_type,
        text=row.text,
        ttl=row.ttl,
        scheduled_sent=row.scheduled_sent,
        survey_options=tuple(row.survey_options) if row.survey_options else None,
        route=row.route,
    ).to_provider()


def record(
    engine: Engine,
    token: str,
    outcomes: Sequence[Outcome],
    claimed: dict[int, Row[Any]],
    settings: Settings,
) -> dict[str, int]:
    """Write every outcome of one claim, and its event, in one transaction.

    A submitted message's new values depend on nothing in its row, so they are written
    straight to the rows that still carry the claim token. Other outcomes read the row
    (attempts, campaign) under a lock first.
    """
    now = utcnow()
    held = {"claim_token": token, "state": State.SENDING}
    submitted = {o.pk: o for o in outcomes if isinstance(o, Submitted)}
    others = [o for o in outcomes if not isinstance(o, Submitted)]
    with engine.begin() as conn:
        sent = {
            pk: _submitted(outcome, claimed[pk], settings, now) for pk, outcome in submitted.items()
        }
        written = bulk_update(conn, messages, sent, only_if=held)
        journal = [
            _event(pk, now, State.SUBMITTED, f"messageId {submitted[pk].message_id}")
            for pk in sorted(written)
        ]
        counts = {State.SUBMITTED: len(written)} if written else {}
        lost = len(submitted) - len(written)
        ours = _locked_claim(conn, token, [o.pk for o in others]) if others else {}
        requeued = {ours[o.pk].campaign for o in others if _requeues(o) and o.pk in ours}
        stopped = cancelled_campaigns(conn, requeued - {None})
        changes: dict[int, dict[str, Any]] = {}
        for outcome in others:
            current = ours.get(outcome.pk)
            if current is None:
                lost += 1
                continue
            halted = current.campaign in stopped
            if halted and isinstance(outcome, Retry):
                outcome = Cancelled(outcome.pk)
            # The provider may have an unknown outcome: never resend it for a cancelled campaign.
            resend_unknown = settings.send_unknown_outcome == "resend" and not halted
            changes[outcome.pk], to_state, detail = _decide(
                outcome, current, settings, now, resend_unknown=resend_unknown
            )
            journal.append(_event(outcome.pk, now, to_state, detail))
            counts[to_state] = counts.get(to_state, 0) + 1
        bulk_update(conn, messages, changes)
        insert_rows(conn, events, journal)
    if lost:
        counts["lost_claim"] = lost
    return counts


def _locked_claim(conn: Connection, token: str, pks: list[int]) -> dict[int, Row[Any]]:
    """The rows still under this claim, locked in key order (as every writer locks them)."""
    rows = conn.execute(
        select(
            messages.c.pk,
            messages.c.campaign,
            messages.c.attempts,
            messages.c.unknown_outcomes,
        )
        .where(
            among(conn, messages.c.pk, pks),
            messages.c.claim_token == token,
            messages.c.state == State.SENDING,
        )
        .order_by(messages.c.pk)
        .with_for_update()
    )
    return {row.pk: row for row in rows}


def _event(pk: int, now: datetime, to_state: str, detail: str | None) -> dict[str, Any]:
    return {
        "message_pk": pk,
        "at": now,
        "source": "send",
        "from_state": State.SENDING,
        "to_state": to_state,
        "detail": detail,
    }


def _requeues(outcome: Outcome) -> bool:
    return isinstance(outcome, Retry | Unknown)


_RELEASE = {"claim_token": None, "lease_until": None}


def _submitted(
    outcome: Submitted, row: Row[Any], settings: Settings, now: datetime
) -> dict[str, Any]:
    """Column values of a message the provider accepted (pure)."""
    start = max(now, row.scheduled_sent) if row.scheduled_sent else now
    return {
        **_RELEASE,
        "state": State.SUBMITTED,
        "provider_message_id": outcome.message_id,
        "submitted_at": now,
        "next_poll_at": start + timedelta(seconds=first_poll_delay(settings)),
        "poll_deadline": poll_deadline(
            start,
            row.ttl,
            grace=settings.poll_grace_seconds,
            max_age=settings.poll_max_age_seconds,
        ),
    }


def _decide(
    outcome: Outcome,
    current: Row[Any],
    settings: Settings,
    now: datetime,
    *,
    resend_unknown: bool,
) -> tuple[dict[str, Any], str, str | None]:
    """(column values, new state, event detail) for an outcome other than submitted."""
    if isinstance(outcome, Rejected):
        values = {
            **_RELEASE,
            "state": State.REJECTED,
            "error_code": outcome.code,
            "error_message": outcome.message,
            "final_at": now,
            "final_source": "send",
        }
        return values, State.REJECTED, f"{outcome.code}: {outcome.message}"
    if isinstance(outcome, Expired):
        values = {
            **_RELEASE,
            "state": State.EXPIRED,
            "error_code": "TTL_EXPIRED",
            "error_message": "TTL ran out before the message could be sent",
            "final_at": now,
            "final_source": "send",
        }
        return values, State.EXPIRED, "TTL ran out before sending"
    if isinstance(outcome, Cancelled):
        values = {
            **_RELEASE,
            "state": State.CANCELLED,
            "error_code": "CANCELLED",
            "error_message": "campaign cancelled before the message was sent",
            "final_at": now,
            "final_source": "send",
        }
        return values, State.CANCELLED, "campaign cancelled; not resent"
    unknown = isinstance(outcome, Unknown)
    if unknown and not resend_unknown:
        values = {
            **_RELEASE,
            "state": State.FAILED,
            "unknown_outcomes": current.unknown_outcomes + 1,
            "error_code": "UNKNOWN_OUTCOME",
            "error_message": outcome.reason,
            "final_at": now,
            "final_source": "send",
        }
        return values, State.FAILED, f"outcome unknown ({outcome.reason}); not resent"
    counts = unknown or (isinstance(outcome, Retry) and outcome.counts)
    attempts = current.attempts + (1 if counts else 0)
    target = after_failed_attempt(attempts, settings.send_max_attempts)
    delay = (
        outcome.delay
        if isinstance(outcome, Retry) and not outcome.counts
        else send_retry_delay(
            attempts,
            base=settings.send_backoff_base_seconds,
            cap=settings.send_backoff_max_seconds,
        )
    )
    values = {
        **_RELEASE,
        "state": target,
        "attempts": attempts,
        "unknown_outcomes": current.unknown_outcomes + (1 if unknown else 0),
        "available_at": now + timedelta(seconds=delay),
        "error_code": "UNKNOWN_OUTCOME" if unknown else "SEND_RETRY",
        "error_message": outcome.reason,
        "final_at": now if target == State.FAILED else None,
        "final_source": "send" if target == State.FAILED else None,
    }
    prefix = "outcome unknown, resending" if unknown else "retry"
    detail = f"{prefix}: {outcome.reason} (attempt {attempts}/{settings.send_max_attempts})"
    return values, target, detail


# --- the provider call ---------------------------------------------------------------


def deliver(
    client: SendClient,
    pacing: Pacing,
    settings: Settings,
    route: str,
    rows: Sequence[Row[Any]],
) -> tuple[list[Outcome], int]:
    """POST the rows; isolate a 400 by halving; answer the outcome of every row.

    Whatever stops the loop early (a pause, half the lease spent on a long isolation, a
    soft time limit, Redis failing) still answers for every row, so the claim is recorded
    now instead of waiting for its lease to run out.
    """
    payloads = {row.pk: provider_payload(row) for row in rows}
    outcomes: list[Outcome] = []
    pending: list[list[Row[Any]]] = [list(rows)] if rows else []
    requests = 0
    budget_ends = time.monotonic() + settings.send_lease_seconds / 2
    in_flight: list[Row[Any]] = []

    def hold(reason: str, delay: float = 0.0) -> None:
        held = [row for part in pending for row in part]
        outcomes.extend(Retry(r.pk, reason, False, delay) for r in held)
        pending.clear()

    try:
        while pending:
            if time.monotonic() > budget_ends:
                hold("batch took half its lease; the rest goes in a later batch")
                break
            chunk = pending.pop()
            pending.append(chunk)  # held with the rest if we stop before sending it
            pacing.acquire("send:requests", settings.send_requests_per_second)
            pacing.acquire("send:messages", settings.send_messages_per_second, len(chunk))
            paused = send_paused(pacing)
            if paused:  # another worker was told to back off while we were claiming
                hold("paused", paused)
                break
            pending.pop()
            requests += 1
            in_flight = chunk
            try:
                accepted = client.send(route, [payloads[row.pk] for row in chunk])
            except BadRequest as exc:
                in_flight = []
                if len(chunk) == 1:
                    outcomes.append(Rejected(chunk[0].pk, exc.code, exc.message))
                else:
                    half = len(chunk) // 2
                    pending += [chunk[half:], chunk[:half]]
                continue
            except Throttled as exc:
                in_flight = []
                pacing.pause(THROTTLE, exc.retry_after)
                log.warning("provider throttled sends: pausing all workers %.1fs", exc.retry_after)
                pending.append(chunk)
                hold("HTTP 429", exc.retry_after)
                break
            except Unauthorized as exc:
                in_flight = []
                pacing.pause(CIRCUIT, settings.circuit_open_seconds)
                log.error(
                    "provider refused our credentials (%s): sending stopped for %.0fs, "
                    "messages stay queued; check SMSBAT_API_KEY",
                    exc,
                    settings.circuit_open_seconds,
                )
                pending.append(chunk)
                hold("HTTP 401")
                break
            except Unavailable as exc:
                in_flight = []
                outcomes += [Retry(r.pk, str(exc), True) for r in chunk]
                continue
            except OutcomeUnknown as exc:
                in_flight = []
                log.warning("send outcome unknown for %d messages: %s", len(chunk), exc)
                outcomes += [Unknown(r.pk, str(exc)) for r in chunk]
                continue
            in_flight = []
            for row in chunk:
                message_id = accepted.get(row.id)
                if message_id:
                    outcomes.append(Submitted(row.pk, message_id))
                else:
                    outcomes.append(Retry(row.pk, "missing from the provider's answer", True))
    except Exception as exc:
        log.error("send batch interrupted (%s); recording what is known", type(exc).__name__)
        outcomes += [Unknown(r.pk, f"interrupted: {type(exc).__name__}") for r in in_flight]
        hold(f"interrupted: {type(exc).__name__}")
    return outcomes, requests


def send_batch(
    engine: Engine, client: SendClient, pacing: Pacing, settings: Settings, route: str
) -> BatchReport:
    """One provider request's worth of work: the body of the `cascade.send_batch` task."""
    report = BatchReport(route)
    report.paused = send_paused(pacing)
    if report.paused:
        return report
    now = utcnow()
    limit = batch_limit(settings)
    ready, oldest_wait = ready_summary(
        engine, route, now, settings.send_batch_min, settings.send_batch_min
    )
    if not should_flush(
        ready, oldest_wait, batch_min=settings.send_batch_min, linger=settings.send_linger_seconds
    ):
        return report
    token = uuid.uuid4().hex
    rows = claim(engine, route, now, limit, settings.send_lease_seconds, token)
    report.claimed = len(rows)
    if not rows:
        return report
    expired = [r for r in rows if r.expires_at is not None and r.expires_at <= now]
    live = [r for r in rows if r.expires_at is None or r.expires_at > now]
    outcomes: list[Outcome] = [Expired(r.pk) for r in expired]
    sent, report.requests = deliver(client, pacing, settings, route, live)
    outcomes += sent
    report.counts = record(engine, token, outcomes, {r.pk: r for r in rows}, settings)
    log.info(
        "batch route=%s claimed=%d requests=%d outcome=%s",
        route,
        report.claimed,
        report.requests,
        report.counts,
    )
    return report
