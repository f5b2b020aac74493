"""Pushed reports (SMSBAT webhooks, BulkGate DLRs) and inbound SMS: stored, then applied.

A webhook only stores what it was told and answers; `apply_pending` (task
`cascade.apply_reports`) applies the reports later through `statuses.apply`, the same
forward-only path polls use. A report can arrive before our send answer was committed, so
one whose message is not known yet (or is still `queued`/`sending`) stays parked, and is
tried again later the longer it has waited (`PARK_BACKOFF`), until REPORT_PARK_MAX_SECONDS
make it an orphan.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Select,
    func,
    insert,
    or_,
    select,
    update,
)

from config import Settings
from worker.core.states import FINAL, State
from worker.core.statuses import Report, apply
from worker.provider.dlr import Inbound
from worker.store.db import among, bulk_update, insert_or_skip, insert_rows, utcnow
from worker.store.models import events, inbound_messages, messages, provider_reports

BATCH_SIZE = 500
MAX_BATCHES = 20  # per run; the next run (beat or a webhook's wake) takes the rest
# States in which the message never left us: a reply cannot be an answer to it.
_NEVER_SENT = (
    State.QUEUED,
    State.HELD,
    State.REJECTED,
    State.EXPIRED,
    State.CANCELLED,
    State.SUPPRESSED,
)
# A report for a message in these states waits: our send answer is not committed yet.
_NOT_YET_SUBMITTED = (State.QUEUED, State.HELD, State.SENDING)
# A report parked at least this long (s) is tried again that much later (s); a younger one
# on every run. Young ones wait on a send answer being committed (milliseconds, mostly);
# older ones are mostly for another sender on the same account, and trying each on every
# run cost 340 ms a run at 1,000,000 parked (measured). From 5 s old every 2 s: a burst of
# such reports (50,000 a second) was otherwise joined whole on every run for a minute.
# About 170 tries over the default three days of parking.
PARK_BACKOFF: tuple[tuple[float, float], ...] = (
    (5, 2),
    (60, 30),
    (600, 120),
    (3600, 600),
    (21600, 3600),
)


# --- storing --------------------------------------------------------------------------------


def report_rows(reports: Sequence[Report], received_at: datetime) -> list[dict[str, Any]]:
    """The provider_reports rows of reports received at `received_at`, due at once."""
    return [
        {
            "received_at": received_at,
            "source": r.source,
            "provider_message_id": r.message_id,
            "state": str(r.state),
            "payload": {"fields": r.fields, "detail": r.detail},
            "processed_at": None,
            "outcome": None,
            "retry_at": received_at,
        }
        for r in reports
    ]


def store_reports(engine: Engine, reports: Sequence[Report], received_at: datetime) -> int:
    """Insert reports unprocessed, in a transaction of their own; answer how many were stored.
    (The webhooks store theirs through `worker.intake`, many requests per transaction.)"""
    if not reports:
        return 0
    rows = report_rows(reports, received_at)
    with engine.begin() as conn:
        conn.execute(insert(provider_reports), rows)
    return len(rows)


def inbound_key(sender: str, text: str | None, sent_at: datetime | None) -> str | None:
    """What tells a provider's retry of an inbound SMS from a new one: sender, text, send time.

    Without a send time nothing does, so such an SMS is always stored (no key).
    """
    if sent_at is None:
        return None
    parts = (sender, sent_at.astimezone(UTC).isoformat(), "" if text is None else "=" + text)
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def store_inbound(
    engine: Engine,
    items: Sequence[Inbound],
    received_at: datetime | None = None,
    settings: Settings | None = None,
) -> int:
    """Insert inbound SMS linked to the last message we sent that number; skip exact repeats.

    A provider retry sends the same SMS again: its key (`inbound_key`) is unique, so two
    pushes of it arriving at once store it once. Answers how many rows were inserted.
    A STOP- or START-type reply changes the suppression list in the same transaction
    (worker/flows/consent.py), so no promo is claimed after the reply is stored.
    """
    from config import get_settings
    from worker.flows.consent import apply_replies

    if not items:
        return 0
    settings = settings or get_settings()
    received_at = received_at or utcnow()
    inserted = 0
    stored: list[tuple[int, str, str | None]] = []
    with engine.begin() as conn:
        links: dict[str, int | None] = {}
        for item in items:
            if item.sender not in links:
                links[item.sender] = _last_sent_to(conn, item.sender)
            stmt = (
                insert_or_skip(conn, inbound_messages)
                .values(
                    received_at=received_at,
                    sender=item.sender,
                    text=item.text,
                    sent_at=item.sent_at,
                    message_pk=links[item.sender],
                    source="bulkgate",
                    raw=item.raw,
                    dedup_key=inbound_key(item.sender, item.text, item.sent_at),
                )
                .on_conflict_do_nothing(index_elements=["dedup_key"])
                .returning(inbound_messages.c.pk)
            )
            pks = conn.execute(stmt).scalars().all()
            inserted += len(pks)
            stored += [(pk, item.sender, item.text) for pk in pks]
        apply_replies(conn, stored, settings.keywords, settings.suppressed_types, received_at)
    return inserted


def _last_sent_to(conn: Connection, phone: str) -> int | None:
    return conn.execute(
        select(messages.c.pk)
        .where(messages.c.to_phone == phone, messages.c.state.not_in(_NEVER_SENT))
        .order_by(messages.c.pk.desc())
        .limit(1)
    ).scalar()


# --- applying -------------------------------------------------------------------------------


@dataclass
class _Batch:
    """What one batch decided: message updates, event rows, report outcomes, latencies."""

    updates: dict[int, dict[str, Any]]
    journal: list[dict[str, Any]]
    outcomes: dict[str, list[int]]
    finals: list[float]  # seconds from submit to final, a message each


def apply_pending(
    engine: Engine, settings: Settings, finals: list[float] | None = None
) -> dict[str, int]:
    """Apply the due reports whose message is with the provider; orphan the too-old parked
    ones; put off the rest.

    Answers counts: `applied` (something changed), `ignored` (duplicate, late, after a
    final state), `orphan`, and `parked` (tried this run, still waiting for their message).
    `finals`, when given, receives the seconds from submit to final of each message these
    reports made final (the latency histogram's, as a poll's answers give them).
    """
    counts = {"applied": 0, "ignored": 0, "orphan": 0, "parked": 0}
    started = utcnow()
    finished = False
    for _ in range(MAX_BATCHES):
        finished = _apply_batch(engine, utcnow(), counts, finals) < BATCH_SIZE
        if finished:
            break
    cutoff = started - timedelta(seconds=settings.report_park_max_seconds)
    with engine.begin() as conn:
        counts["orphan"] = conn.execute(
            update(provider_reports)
            .where(provider_reports.c.processed_at.is_(None))
            .where(provider_reports.c.received_at < cutoff)
            .where(~_matched().exists())  # one that has its message is applied when due
            .values(processed_at=started, outcome="orphan")
        ).rowcount
        if finished:  # else due reports with a message may be left: the next run goes on
            counts["parked"] = _park(conn, started)
    return counts


def _apply_batch(
    engine: Engine, now: datetime, counts: dict[str, int], finals: list[float] | None = None
) -> int:
    """Claim one batch of matchable reports, apply them in arrival order; answer how many."""
    with engine.begin() as conn:
        found = sorted(conn.execute(_claim_stmt(now)), key=lambda row: row.pk)
        claimed = [(row.pk, _as_report(row)) for row in found]
        if not claimed:
            return 0
        rows = _lock_messages(conn, [report for _, report in claimed])
        batch = _decide(claimed, rows, now)
        _write(conn, batch, now)
    for outcome, pks in batch.outcomes.items():
        counts[outcome] += len(pks)
    if finals is not None:
        finals.extend(batch.finals)
    return len(claimed)


def _park(conn: Connection, due: datetime) -> int:
    """Put off the reports still due after every batch ran (none had a message to match)
    by their age; answer how many were still due."""
    waiting = [provider_reports.c.processed_at.is_(None), _due(due)]
    parked = 0
    for least, delay in reversed(PARK_BACKOFF):  # oldest first: those put off are not due
        parked += conn.execute(
            update(provider_reports)
            .where(*waiting, provider_reports.c.received_at <= due - timedelta(seconds=least))
            .values(retry_at=due + timedelta(seconds=delay))
        ).rowcount
    young = select(func.count()).select_from(provider_reports).where(*waiting)
    return parked + conn.execute(young).scalar_one()


def _due(now: datetime) -> ColumnElement[bool]:
    """Due for a try; a report stored by a writer older than migration 0007 has no time."""
    return or_(provider_reports.c.retry_at <= now, provider_reports.c.retry_at.is_(None))


def _matched() -> Select[Any]:
    """The message a report belongs to, once it is with the provider."""
    return select(messages.c.pk).where(
        messages.c.provider_message_id == provider_reports.c.provider_message_id,
        messages.c.state.not_in(_NOT_YET_SUBMITTED),
    )


def _claim_stmt(now: datetime) -> Select[Any]:
    """Due reports whose message has been submitted, skipping locked.

    In no order: ordered, PostgreSQL looked up the message of every due report and sorted
    them all for each batch of 500 (33 ms a claim, the largest statement while taking
    pushes for 100,000 messages; auto_explain); unordered it stops at the batch's 500th.
    The reports come in the table's order, which is their arrival order but where one was
    put off, and the batch is applied sorted by arrival. Across batches arrival order was
    never kept (concurrent appliers skip each other's rows); by the forward-only rule a
    late-applied earlier report moves no state back.
    """
    return (
        select(provider_reports)
        .where(provider_reports.c.processed_at.is_(None))
        .where(_due(now))
        .where(_matched().exists())
        .limit(BATCH_SIZE)
        .with_for_update(skip_locked=True)
    )


def _as_report(stored: Row[Any]) -> Report:
    """The stored report again; fields that are not message columns are dropped, not fatal."""
    payload = stored.payload or {}
    fields = {k: v for k, v in (payload.get("fields") or {}).items() if k in messages.c}
    return Report(
        stored.provider_message_id,
        State(stored.state),
        stored.source,
        fields,
        payload.get("detail"),
    )


def _lock_messages(conn: Connection, reports: Sequence[Report]) -> dict[str, dict[str, Any]]:
    """Lock the matched messages (in pk order, so concurrent batches cannot deadlock).

    Reads the state and every column the reports would set, to tell a real change from a
    repeat, and when it was submitted, for the latency of those made final: read again
    after the batch by their keys, the planner seq-scanned the table with a list of
    thousands (about 1 s a run at 50,000 messages, and 0.9 of PostgreSQL's active time
    while taking pushes, measured).
    """
    columns = sorted({k for r in reports for k in r.fields})
    rows = conn.execute(
        select(
            messages.c.pk,
            messages.c.state,
            messages.c.provider_message_id,
            messages.c.submitted_at,
            *(messages.c[k] for k in columns),
        )
        .where(among(conn, messages.c.provider_message_id, {r.message_id for r in reports}))
        .order_by(messages.c.pk)
        .with_for_update()
    )
    return {row.provider_message_id: dict(row._mapping) for row in rows}


def _decide(
    claimed: Sequence[tuple[int, Report]], rows: dict[str, dict[str, Any]], now: datetime
) -> _Batch:
    """Pure: fold each message's reports over its row, in arrival order (claim order)."""
    batch = _Batch(updates={}, journal=[], outcomes={"applied": [], "ignored": []}, finals=[])
    for report_pk, report in claimed:
        row = rows[report.message_id]
        proposed = apply(row["state"], report, now)
        change = {k: v for k, v in proposed.items() if k not in row or row[k] != v}
        if not change:
            batch.outcomes["ignored"].append(report_pk)
            continue
        batch.outcomes["applied"].append(report_pk)
        if "state" in change:
            batch.journal.append(
                {
                    "message_pk": row["pk"],
                    "at": now,
                    "source": report.source,
                    "from_state": row["state"],
                    "to_state": change["state"],
                    "detail": report.detail,
                }
            )
            if change["state"] in FINAL and row["submitted_at"] is not None:
                batch.finals.append((now - row["submitted_at"]).total_seconds())
        row.update(change)
        batch.updates.setdefault(row["pk"], {}).update(change)
    return batch


def _write(conn: Connection, batch: _Batch, now: datetime) -> None:
    """Bulk: one UPDATE per shape of change, the events, the report outcomes."""
    bulk_update(conn, messages, batch.updates)
    insert_rows(conn, events, batch.journal)
    for outcome, pks in batch.outcomes.items():
        if pks:
            conn.execute(
                update(provider_reports)
                .where(provider_reports.c.pk.in_(pks))
                .values(processed_at=now, outcome=outcome)
            )


# --- reading --------------------------------------------------------------------------------


def list_inbound(
    engine: Engine,
    limit: int = 100,
    *,
    campaign: str | None = None,
    since: datetime | None = None,
    keywords: Any = None,
) -> list[dict[str, Any]]:
    """The newest inbound SMS first, each with the id of the message it answers (or null),
    optionally only replies to a campaign's messages or received since a time. `consent`
    says whether the reply opted out or in (by the keywords in force now)."""
    from config import get_settings

    keywords = keywords or get_settings().keywords
    stmt = (
        select(inbound_messages, messages.c.id.label("reply_to"))
        .outerjoin(messages, messages.c.pk == inbound_messages.c.message_pk)
        .order_by(inbound_messages.c.received_at.desc(), inbound_messages.c.pk.desc())
        .limit(limit)
    )
    if campaign is not None:
        stmt = stmt.where(messages.c.campaign == campaign)
    if since is not None:
        stmt = stmt.where(inbound_messages.c.received_at >= since)
    with engine.connect() as conn:
        return [
            {
                "receivedAt": _iso(row.received_at),
                "from": row.sender,
                "text": row.text,
                "sentAt": _iso(row.sent_at),
                "replyTo": row.reply_to,
                "source": row.source,
                "consent": keywords.classify(row.text),
            }
            for row in conn.execute(stmt)
        ]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
