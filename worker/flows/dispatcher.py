"""The send path: claim queued messages, POST them in one batch, record every outcome.

A claim commits before any HTTP call and no connection is held while the provider
answers. Each claimed row carries a claim token; results are written only to rows
that still carry it, so a claim taken over after its lease ran out is never
overwritten by the worker that lost it.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, func, select

from config import Settings
from worker.core.backoff import NO_PLAN, CheckPlan
from worker.core.sendpolicy import (
    Answer,
    Cancelled,
    Current,
    Expired,
    Held,
    Isolate,
    Item,
    MessageChange,
    Outcome,
    Retry,
    Submitted,
    Unknown,
    answer_label,
    decide,
    outcomes,
    pause_for,
    provider_answered,
    provider_failed,
    submitted_values,
)
from worker.core.states import State
from worker.core.validation import OutgoingMessage
from worker.flows import quota
from worker.flows.campaigns import cancelled_campaigns, hold_outside_window
from worker.flows.consent import claimable
from worker.provider.smsbat import BadRequest, OutcomeUnknown, ProviderError, SendClient
from worker.store.db import AnyRow, among, bulk_update, claim_rows, insert_rows, utcnow
from worker.store.models import events, messages

log = logging.getLogger(__name__)

THROTTLE = "send:throttle"
CIRCUIT = "send:circuit"


@dataclass
class BatchReport:
    route: str
    claimed: int = 0
    requests: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    # Provider requests by answer: 200, 400, 401, 429, 5xx, unknown, held (not sent).
    answers: dict[str, int] = field(default_factory=dict)
    paused: float = 0.0
    isolating: bool = False  # the claim was an isolation part, or split into parts
    capped: str | None = None  # a global daily cap stopped sending (worker/flows/quota.py)


class SendPacing(Protocol):
    """What the send path needs of the shared pacing (`worker.store.pacing.Pacing`)."""

    def pause(self, name: str, seconds: float, reason: str = ...) -> None: ...
    def paused_for(self, name: str) -> float: ...
    def pause_reason(self, name: str) -> str | None: ...
    def failed(self, name: str) -> int: ...
    def open_circuit(self, name: str, seconds: float, reason: str = ...) -> None: ...
    def half_open(self, name: str) -> bool: ...
    def take_probe(self, name: str, seconds: float) -> bool: ...
    def answered(self, name: str) -> None: ...
    def release_probe(self, name: str) -> None: ...
    def acquire(self, name: str, per_second: int, cost: int = 1) -> None: ...
    def check_plan(self, route: str, settings: Settings) -> CheckPlan: ...


# --- decisions -----------------------------------------------------------------------


def should_flush(ready: int, oldest_wait: float, *, batch_min: int, linger: float) -> bool:
    """A batch goes out when it is big enough or its oldest message has waited long enough."""
    return ready >= batch_min or (ready > 0 and oldest_wait >= linger)


@dataclass(frozen=True)
class SendingPause:
    """Why no worker sends now, for every campaign, and for about how long."""

    seconds: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"paused_for_seconds": round(self.seconds, 1), "reason": self.reason}


def sending_pause(pacing: SendPacing) -> SendingPause | None:
    """The longer of a 429's pause and an open circuit, with what caused it; None while
    workers may send. Status pages show it: a campaign "running" may not be moving."""
    seconds, name = max((pacing.paused_for(name), name) for name in (THROTTLE, CIRCUIT))
    if seconds <= 0:
        return None
    return SendingPause(seconds, pacing.pause_reason(name) or "paused")


def send_paused(pacing: SendPacing) -> float:
    """Seconds left of a pause of all sending: a 429's Retry-After or an open circuit."""
    pause = sending_pause(pacing)
    return pause.seconds if pause else 0.0


def batch_limit(settings: Settings) -> int:
    rate = settings.send_messages_per_second
    return min(settings.send_batch_max, rate) if rate else settings.send_batch_max


def probe_lease(settings: Settings) -> float:
    """How long a probe may take before another worker may probe instead."""
    return (
        settings.http_connect_timeout_seconds
        + settings.http_write_timeout_seconds
        + settings.http_read_timeout_seconds
        + 5
    )


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
    messages.c.isolation,
    messages.c.counted_on,
)


def _ready_filter(route: str, now: datetime, counted_on: str | None = None) -> list[Any]:
    """Queued rows of a route whose time has come, outside any isolation part; with
    `counted_on`, only those counted against the global caps that day (a capped day's)."""
    return [
        messages.c.state == State.QUEUED,
        messages.c.route == route,
        messages.c.available_at <= now,
        messages.c.isolation.is_(None),
        claimable(),  # never a promo or survey to a number that opted out
        *_counted(counted_on),
    ]


def _counted(day: str | None) -> list[Any]:
    """Once a global cap stops new messages, only the ones counted today go (their retries):
    `ix_messages_counted` finds those without reading the queue waiting for midnight."""
    return [] if day is None else [messages.c.counted_on == day]


def ready_summary(
    engine: Engine,
    route: str,
    now: datetime,
    cap: int,
    batch_min: int,
    counted_on: str | None = None,
) -> tuple[int, float]:
    """How many messages are ready (counted up to `cap`) and how long the oldest has waited.

    The wait only decides a batch smaller than `batch_min`, so a full one skips that query.
    """
    where = _ready_filter(route, now, counted_on)
    ready = select(messages.c.pk).where(*where).limit(cap).subquery()
    with engine.begin() as conn:
        count = conn.execute(select(func.count()).select_from(ready)).scalar_one()
        if not count or count >= batch_min:
            return count, 0.0
        oldest = conn.execute(select(func.min(messages.c.available_at)).where(*where)).scalar_one()
    return count, (now - oldest).total_seconds() if oldest else 0.0


def _part_filter(route: str, now: datetime, counted_on: str | None = None) -> list[Any]:
    return [
        messages.c.state == State.QUEUED,
        messages.c.route == route,
        messages.c.isolation.is_not(None),
        messages.c.available_at <= now,
        claimable(),
        *_counted(counted_on),
    ]


def parts_ready(engine: Engine, route: str, now: datetime) -> bool:
    """Whether an isolation part of this route waits to be sent."""
    with engine.begin() as conn:
        found = conn.execute(select(messages.c.pk).where(*_part_filter(route, now)).limit(1))
        return found.first() is not None


def claim(
    engine: Engine,
    route: str,
    now: datetime,
    limit: int,
    lease: float,
    token: str,
    counted_on: str | None = None,
) -> list[AnyRow]:
    """Take up to `limit` ready messages, urgent types first, in one statement."""
    return claim_rows(
        engine,
        messages,
        where=_ready_filter(route, now, counted_on),
        order_by=[messages.c.priority, messages.c.pk],
        limit=limit,
        values=_claimed(now, lease, token),
        returning=_CLAIM_COLUMNS,
    )


def claim_part(
    engine: Engine,
    route: str,
    now: datetime,
    limit: int,
    lease: float,
    token: str,
    counted_on: str | None = None,
) -> list[AnyRow]:
    """Take the ready rows of the oldest isolation part: a part is never mixed with others."""
    oldest = (
        select(messages.c.isolation)
        .where(*_part_filter(route, now, counted_on))
        .order_by(messages.c.priority, messages.c.pk)
        .limit(1)
        .scalar_subquery()
    )
    return claim_rows(
        engine,
        messages,
        where=[
            messages.c.state == State.QUEUED,
            messages.c.isolation == oldest,
            messages.c.available_at <= now,
            claimable(),
            *_counted(counted_on),
        ],
        order_by=[messages.c.pk],
        limit=limit,
        values=_claimed(now, lease, token),
        returning=_CLAIM_COLUMNS,
    )


def _claimed(now: datetime, lease: float, token: str) -> dict[str, Any]:
    return {
        "state": State.SENDING,
        "claim_token": token,
        "lease_until": now + timedelta(seconds=lease),
    }


def provider_payload(row: AnyRow) -> dict[str, Any]:
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
    claimed: dict[int, AnyRow],
    settings: Settings,
    now: datetime | None = None,
    plan: CheckPlan = NO_PLAN,
) -> dict[str, int]:
    """Write every outcome of one claim, and its event, in one transaction; `plan` times
    the submitted messages' first status checks.

    A submitted message's new values depend on nothing in its row, so they are written
    straight to the rows that still carry the claim token. Other outcomes read the row
    (attempts, campaign, deadline) under a lock first.
    """
    now = now or utcnow()
    # The token alone: only a row in `sending` carries one (ck_messages_claim_token), and a
    # guard on the state let PostgreSQL walk every entry `ix_messages_sending_lease` ever
    # had (dead ones too, 900,000 into a campaign of 1,000,000: 157 ms a batch) instead of
    # looking the 1,000 keys up.
    held = {"claim_token": token}
    submitted = {o.pk: o for o in outcomes if isinstance(o, Submitted)}
    others = [o for o in outcomes if not isinstance(o, Submitted)]
    with engine.begin() as conn:
        sent = {
            pk: submitted_values(
                pk,
                outcome.message_id,
                claimed[pk].ttl,
                claimed[pk].scheduled_sent,
                settings,
                now,
                plan,
            )
            for pk, outcome in submitted.items()
        }
        written = bulk_update(conn, messages, sent, only_if=held)
        journal = [
            _event(pk, now, State.SUBMITTED, f"messageId {submitted[pk].message_id}")
            for pk in sorted(written)
        ]
        counts: dict[str, int] = {State.SUBMITTED: len(written)} if written else {}
        lost = len(submitted) - len(written)
        ours = _locked_claim(conn, token, [o.pk for o in others]) if others else {}
        requeued = {ours[o.pk].campaign for o in others if _requeues(o) and o.pk in ours}
        stopped = cancelled_campaigns(conn, requeued - {None})
        changes: dict[int, MessageChange] = {}
        for outcome in others:
            row = ours.get(outcome.pk)
            if row is None:
                lost += 1
                continue
            halted = row.campaign in stopped
            if halted and isinstance(outcome, Retry | Isolate):
                outcome = Cancelled(outcome.pk)
            # The provider may have an unknown outcome: never resend it for a cancelled campaign.
            resend_unknown = settings.send_unknown_outcome == "resend" and not halted
            current = Current(row.attempts, row.unknown_outcomes, row.send_deadline)
            changes[outcome.pk], to_state, detail = decide(
                outcome, current, settings, now, resend_unknown=resend_unknown
            )
            journal.append(_event(outcome.pk, now, to_state, detail))
            counts[to_state] = counts.get(to_state, 0) + 1
        bulk_update(conn, messages, changes)
        insert_rows(conn, events, journal)
    if lost:
        counts["lost_claim"] = lost
    return counts


def _locked_claim(conn: Connection, token: str, pks: list[int]) -> dict[int, AnyRow]:
    """The rows still under this claim, locked in key order (as every writer locks them);
    looked up by key and token, as `record` writes them."""
    rows = conn.execute(
        select(
            messages.c.pk,
            messages.c.campaign,
            messages.c.attempts,
            messages.c.unknown_outcomes,
            messages.c.send_deadline,
        )
        .where(
            among(conn, messages.c.pk, pks),
            messages.c.claim_token == token,
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
    return isinstance(outcome, Retry | Unknown | Isolate)


# --- the provider call ---------------------------------------------------------------


def post(
    client: SendClient,
    pacing: SendPacing,
    settings: Settings,
    route: str,
    rows: Sequence[AnyRow],
) -> Answer:
    """One request for the claimed rows: the provider's answer, or why nothing was sent.

    Never raises: whatever stops it (Redis failing, a soft time limit) still answers for
    every row, so the claim is recorded now instead of waiting for its lease to run out.
    """
    try:
        pacing.acquire("send:requests", settings.send_requests_per_second)
        pacing.acquire("send:messages", settings.send_messages_per_second, len(rows))
        paused = send_paused(pacing)
    except Exception as exc:
        return Held(f"pacing unavailable: {type(exc).__name__}")
    if paused:  # another worker was told to back off while we were claiming
        return Held("paused", paused)
    try:
        return client.send(route, [provider_payload(row) for row in rows])
    except ProviderError as exc:
        return exc
    except Exception as exc:  # the request may have been written
        log.error("send interrupted (%s); recording what is known", type(exc).__name__)
        return OutcomeUnknown(f"interrupted: {type(exc).__name__}")


def heed(pacing: SendPacing, settings: Settings, answer: Answer) -> float:
    """Share what an answer says about the provider with every worker; answer the pause."""
    try:
        if provider_answered(answer):
            pacing.answered(CIRCUIT)
            return 0.0
        failures = pacing.failed(CIRCUIT) if provider_failed(answer) else 0
        pause = pause_for(answer, failures=failures, settings=settings)
        if pause is None:
            return 0.0
        if pause.kind == "throttle":
            pacing.pause(THROTTLE, pause.seconds, f"the provider throttled sends ({pause.reason})")
            log.warning("provider throttled sends: pausing all workers %.1fs", pause.seconds)
        else:
            pacing.open_circuit(CIRCUIT, pause.seconds, pause.reason)
            log.error(
                "send circuit open for %.0fs (%s): messages stay queued, then one probe",
                pause.seconds,
                pause.reason,
            )
        return pause.seconds
    except Exception as exc:  # Redis down: the next request probes the provider anyway
        log.error("could not share the provider's state (%s)", type(exc).__name__)
        return 0.0


def send_batch(
    engine: Engine,
    client: SendClient,
    pacing: SendPacing,
    settings: Settings,
    route: str,
    *,
    clock: Callable[[], datetime] = utcnow,
    rng: random.Random | None = None,
    due: bool = False,
) -> BatchReport:
    """One provider request's worth of work: the body of the `cascade.send_batch` task.

    Isolation parts go first, each alone; then a batch of new rows once one is due. `due`:
    the caller just saw a full batch go, so the rows are claimed without counting them
    first (a count that walks the queue index's dead entries: 11 ms a batch late in a
    campaign of 1,000,000). While the circuit is half-open only the worker holding the
    probe sends, and only a few rows.
    """
    report = BatchReport(route)
    report.paused = send_paused(pacing)
    if report.paused:
        return report
    now = clock()
    report.capped = quota.stopped(engine, settings, now)
    # A global cap stops new messages: the rest stay queued for 00:00 UTC or a raised
    # limit. Those it counted today go on (a send retried after a provider error).
    counted_on = quota.day_of(now) if report.capped else None
    probing = pacing.half_open(CIRCUIT)
    if probing and not pacing.take_probe(CIRCUIT, probe_lease(settings)):
        return report
    token = uuid.uuid4().hex
    lease = settings.send_lease_seconds
    batch_max = settings.send_batch_max
    # A probe is small: new rows first, a whole part only when nothing else waits.
    rows = [] if probing else claim_part(engine, route, now, batch_max, lease, token, counted_on)
    if not rows:
        limit = settings.send_probe_size if probing else batch_limit(settings)
        least = settings.send_batch_min
        ready, oldest_wait = (
            (least, 0.0)
            if due and not probing
            else ready_summary(engine, route, now, least, least, counted_on)
        )
        flush = should_flush(
            ready,
            oldest_wait,
            batch_min=settings.send_batch_min,
            linger=settings.send_linger_seconds,
        )
        if flush or (probing and ready):
            rows = claim(engine, route, now, limit, lease, token, counted_on)
    if not rows and probing:
        rows = claim_part(engine, route, now, batch_max, lease, token, counted_on)
    # A message whose TTL ran out is never sent: it ends `expired` here, neither held for
    # its send window nor counted against the day's cap and budget.
    expired = [r for r in rows if r.expires_at is not None and r.expires_at <= now]
    live = [r for r in rows if r.expires_at is None or r.expires_at > now]
    if live:  # inside their send window now (an approval at night), then within the
        # global daily cap and budget; the rest goes back to the queue
        live = hold_outside_window(engine, settings, live, token, now)
        live, capped = quota.admit(engine, settings, live, token, now)
        report.capped = capped or report.capped
    rows = expired + live
    report.isolating = bool(rows) and rows[0].isolation is not None
    report.claimed = len(rows)
    if not rows:
        if probing:  # nothing to probe with: let the next worker try
            pacing.release_probe(CIRCUIT)
        return report
    done: list[Outcome] = [Expired(r.pk) for r in expired]
    answer: Answer = {}
    if live:
        answer = post(client, pacing, settings, route, live)
        label = answer_label(answer)
        report.answers[label] = 1
        report.requests = 0 if label == "held" else 1
        report.paused = max(report.paused, heed(pacing, settings, answer))
        if probing and not (provider_answered(answer) or provider_failed(answer)):
            pacing.release_probe(CIRCUIT)  # a 429 or a pause: the probe proved nothing
        items = [Item(r.pk, r.id, r.to_phone, r.attempts) for r in live]
        done += outcomes(items, answer, settings=settings, rng=rng or random.Random())
        report.isolating |= isinstance(answer, BadRequest)
    plan = (
        pacing.check_plan(route, settings)
        if any(isinstance(o, Submitted) for o in done)
        else NO_PLAN
    )
    report.counts = record(engine, token, done, {r.pk: r for r in rows}, settings, clock(), plan)
    log.info(
        "batch route=%s claimed=%d part=%s answer=%s%s outcome=%s",
        route,
        report.claimed,
        "yes" if rows[0].isolation else "no",
        answer_label(answer) if live else "none",
        f" ({_why(answer)})" if live and not isinstance(answer, Mapping) else "",
        report.counts,
        extra={"route": route, "claim_token": token, "campaign": rows[0].campaign},
    )
    return report


def _why(answer: Answer) -> str:
    """One phrase on why a request was not accepted; never a phone number or a text."""
    if isinstance(answer, BadRequest):
        return f"{answer.code}" + (f", field {answer.field}" if answer.field else "")
    if isinstance(answer, Held):
        return answer.reason
    return str(answer)
