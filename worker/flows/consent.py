"""Consent: STOP-type replies put a number on the suppression list, START-type ones take it off.

Matching is what carriers do: the reply, with case, accents, spaces and punctuation taken
away, must *be* a keyword ("Stop!" and "s t o p" opt out, "stop by the shop tomorrow?"
does not). `OPTOUT_KEYWORDS` / `OPTIN_KEYWORDS` replace the defaults below.

The list applies to the message types in `SUPPRESS_MESSAGE_TYPES` (promo and surveys by
default; transactional and flash-call messages still go). Such a message to a listed
number is refused at the door (`enqueue`), and one already queued or held when the opt-out
is stored is moved to `suppressed` in the opt-out's own transaction. The claim also skips
such rows while their number is listed (`claimable`), so a row that slipped between the two
(enqueued while the opt-out committed, a send retried after it) is never sent either: the
sweeper then ends it as `suppressed` (`suppress_queued`).

Numbers are stored in E.164 only; phones in logs are masked.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)

from worker.core.keywords import DEFAULT_SUPPRESSED_TYPES, Keywords, phone_problem
from worker.core.redact import mask_phone
from worker.core.states import State
from worker.store.db import among, insert_or_skip, utcnow
from worker.store.models import events, inbound_messages, messages, suppression_events, suppressions

log = logging.getLogger(__name__)

# --- the store ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """What adding or removing one number did."""

    phone: str
    changed: bool  # False: it was already on (add) or not on (remove) the list
    suppressed: int = 0  # queued or held messages ended as `suppressed`


def add(
    conn: Connection,
    phone: str,
    *,
    source: str,
    evidence: str | None = None,
    inbound_pk: int | None = None,
    types: Iterable[str] = DEFAULT_SUPPRESSED_TYPES,
    now: datetime | None = None,
) -> Change:
    """Put `phone` (E.164) on the list in the caller's transaction, and end its unsent
    messages of the suppressed types as `suppressed` in the same transaction."""
    now = now or utcnow()
    inserted = conn.execute(
        insert_or_skip(conn, suppressions)
        .values(
            phone=phone, created_at=now, source=source, evidence=evidence, inbound_pk=inbound_pk
        )
        .on_conflict_do_nothing(index_elements=["phone"])
        .returning(suppressions.c.phone)
    ).first()
    conn.execute(
        insert(suppression_events).values(
            phone=phone,
            at=now,
            action="add",
            source=source,
            evidence=evidence,
            inbound_pk=inbound_pk,
        )
    )
    ended = _suppress(conn, [messages.c.to_phone == phone], list(types), now)
    return Change(phone, inserted is not None, ended)


def remove(
    conn: Connection,
    phone: str,
    *,
    source: str,
    evidence: str | None = None,
    inbound_pk: int | None = None,
    now: datetime | None = None,
) -> Change:
    """Take `phone` off the list (a START reply, an operator); the record keeps both."""
    now = now or utcnow()
    gone = conn.execute(delete(suppressions).where(suppressions.c.phone == phone)).rowcount
    conn.execute(
        insert(suppression_events).values(
            phone=phone,
            at=now,
            action="remove",
            source=source,
            evidence=evidence,
            inbound_pk=inbound_pk,
        )
    )
    return Change(phone, bool(gone))


def _suppress(conn: Connection, where: list[Any], types: list[str], now: datetime) -> int:
    """End unsent messages of the suppressed types as `suppressed`, journalled; answer how
    many. A row being sent right now is not touched: its claim came first."""
    rows = conn.execute(
        select(messages.c.pk, messages.c.state)
        .where(
            *where,
            messages.c.state.in_([State.QUEUED, State.HELD]),
            or_(messages.c.needs_consent.is_(True), messages.c.message_type.in_(types)),
        )
        .order_by(messages.c.pk)
        .with_for_update()
    ).all()
    if not rows:
        return 0
    detail = "the recipient opted out (suppression list)"
    conn.execute(
        update(messages)
        .where(
            among(conn, messages.c.pk, [r.pk for r in rows]),
            messages.c.state.in_([State.QUEUED, State.HELD]),
        )
        .values(
            state=State.SUPPRESSED,
            isolation=None,
            claim_token=None,
            lease_until=None,
            final_at=now,
            final_source="system",
            error_code="SUPPRESSED",
            error_message=detail,
        )
    )
    conn.execute(
        insert(events),
        [
            {
                "message_pk": r.pk,
                "at": now,
                "source": "system",
                "from_state": r.state,
                "to_state": State.SUPPRESSED,
                "detail": detail,
            }
            for r in rows
        ],
    )
    return len(rows)


def claimable() -> ColumnElement[bool]:
    """The claim's guard: a row needing consent is not taken while its number is listed.

    A correlated probe of the list's primary key per candidate row, written with LIMIT 1 so
    PostgreSQL cannot turn it into a hashed subplan that reads the whole list on every claim
    (NOT EXISTS did: 50,000 numbers cost each 1,000-row claim a sequential scan, measured).
    """
    probe = (
        select(literal(1))
        .where(suppressions.c.phone == messages.c.to_phone)
        .limit(1)
        .scalar_subquery()
    )
    return or_(messages.c.needs_consent.is_(False), probe.is_(None))


def suppress_queued(engine: Engine, since: datetime | None = None, limit: int = 5000) -> int:
    """The sweeper's backstop: unsent rows needing consent whose number is listed (they
    slipped past the door and the opt-out's own pass) end as `suppressed`.

    `since`: only numbers listed since then, looked up by number. The whole pass reads every
    unsent row's entry (and, with autovacuum off, every one its rows ever had): 190 ms a
    sweep at 1,000,000 queued, for a race that only numbers listed a moment ago can lose.
    """
    listed = exists().where(suppressions.c.phone == messages.c.to_phone)
    unsent = [messages.c.state.in_([State.QUEUED, State.HELD]), messages.c.needs_consent.is_(True)]
    with engine.begin() as conn:
        if since is None:
            wheres = [[*unsent, listed]]
        else:
            recent = select(suppressions.c.phone).where(suppressions.c.created_at >= since)
            phones = list(conn.execute(recent).scalars())
            wheres = [
                [*unsent, among(conn, messages.c.to_phone, phones[i : i + 1000])]
                for i in range(0, len(phones), 1000)
            ]
        pks: list[int] = []
        for where in wheres:
            pks += conn.execute(select(messages.c.pk).where(*where).limit(limit)).scalars()
            if len(pks) >= limit:
                break
        if not pks:
            return 0
        return _suppress(conn, [among(conn, messages.c.pk, pks[:limit])], [], utcnow())


def listed(conn: Connection, phones: Iterable[str]) -> set[str]:
    """Which of these numbers are on the list (one query)."""
    wanted = sorted(set(phones))
    if not wanted:
        return set()
    return set(
        conn.execute(
            select(suppressions.c.phone).where(among(conn, suppressions.c.phone, wanted))
        ).scalars()
    )


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(suppressions)).scalar_one()


# --- inbound replies ------------------------------------------------------------------------


def apply_replies(
    conn: Connection,
    replies: Sequence[tuple[int, str, str | None]],
    keywords: Keywords,
    types: Iterable[str],
    now: datetime,
) -> dict[str, int]:
    """Act on stored inbound SMS (pk, sender, text), in the transaction that stored them,
    in arrival order: the last of a STOP and a START from one number stands."""
    counts = {"optout": 0, "optin": 0, "suppressed": 0}
    types = list(types)
    for pk, sender, text in replies:
        kind = keywords.classify(text)
        if kind is None:
            continue
        phone, _ = phone_problem(sender)
        if phone is None:  # an alphanumeric sender, a short code: nothing to suppress
            log.info("a %s reply from %s is not an E.164 number: ignored", kind, mask_phone(sender))
            continue
        ended = 0
        if kind == "optout":
            change = add(
                conn, phone, source="reply", evidence=text, inbound_pk=pk, types=types, now=now
            )
            ended = change.suppressed
        else:
            remove(conn, phone, source="reply", evidence=text, inbound_pk=pk, now=now)
        counts[kind] += 1
        counts["suppressed"] += ended
        log.info(
            "%s from %s by reply; %d unsent messages suppressed",
            "opt-out" if kind == "optout" else "opt-in",
            mask_phone(phone),
            ended,
        )
    return counts


# --- operators: list, import, export --------------------------------------------------------


def list_numbers(
    engine: Engine, limit: int | None = 100, mask: bool = True
) -> list[dict[str, Any]]:
    stmt = select(suppressions).order_by(suppressions.c.created_at.desc(), suppressions.c.phone)
    if limit is not None:
        stmt = stmt.limit(limit)
    with engine.connect() as conn:
        return [
            {
                "phone": mask_phone(row.phone) if mask else row.phone,
                "addedAt": _iso(row.created_at),
                "source": row.source,
                "evidence": row.evidence,
            }
            for row in conn.execute(stmt)
        ]


def export_csv(engine: Engine) -> Iterator[str]:
    """The whole list as CSV lines (full E.164: it is for re-importing elsewhere)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(("phone", "added_at", "source", "evidence"))
    yield buffer.getvalue()
    for row in list_numbers(engine, None, mask=False):
        buffer.seek(0)
        buffer.truncate()
        writer.writerow((row["phone"], row["addedAt"], row["source"], row["evidence"] or ""))
        yield buffer.getvalue()


@dataclass
class ImportResult:
    added: int = 0
    already: int = 0
    suppressed: int = 0  # unsent messages ended
    refused: list[tuple[int, str, str]] | None = None  # (line, value, reason)


PHONE_HEADERS = ("phone", "tophone", "to_phone", "number", "msisdn")


def import_rows(
    engine: Engine,
    lines: Iterable[str],
    *,
    source: str = "import",
    region: str | None = None,
    types: Iterable[str] = DEFAULT_SUPPRESSED_TYPES,
) -> ImportResult:
    """Add every number of a CSV (a `phone` column, or one number per line without a
    header); a row that is not a number is refused with its line and reason, the rest go on.
    """
    result = ImportResult(refused=[])
    assert result.refused is not None
    types = list(types)
    reader = csv.reader(_strip_bom(lines))
    column = 0
    evidence_column: int | None = None
    chosen: list[tuple[int, str, str | None]] = []
    for line, row in enumerate(reader, 1):
        if not row or not "".join(row).strip():
            continue
        if line == 1:
            headers = [h.strip().lower() for h in row]
            found = [i for i, h in enumerate(headers) if h in PHONE_HEADERS]
            if found:
                column = found[0]
                evidence_column = next(
                    (i for i, h in enumerate(headers) if h in ("evidence", "note")), None
                )
                continue
        value = row[column] if column < len(row) else ""
        phone, problem = phone_problem(value, region)
        if phone is None:
            result.refused.append((line, value, f"phone {problem}"))
            continue
        note = (
            row[evidence_column]
            if evidence_column is not None and evidence_column < len(row)
            else None
        )
        chosen.append((line, phone, note or None))
    with engine.begin() as conn:
        now = utcnow()
        for _, phone, note in chosen:
            change = add(conn, phone, source=source, evidence=note, types=types, now=now)
            result.added += change.changed
            result.already += not change.changed
            result.suppressed += change.suppressed
    return result


def _strip_bom(lines: Iterable[str]) -> Iterator[str]:
    first = True
    for line in lines:
        yield line.removeprefix("\ufeff") if first else line
        first = False


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def inbound_of(conn: Connection, pks: Sequence[int]) -> list[tuple[int, str, str | None]]:
    """Stored inbound SMS (pk, sender, text) in arrival order."""
    if not pks:
        return []
    rows = conn.execute(
        select(inbound_messages.c.pk, inbound_messages.c.sender, inbound_messages.c.text)
        .where(among(conn, inbound_messages.c.pk, list(pks)))
        .order_by(inbound_messages.c.pk)
    )
    return [(r.pk, r.sender, r.text) for r in rows]


# --- the door -------------------------------------------------------------------------------

REFUSED = "is on the suppression list (the recipient opted out): {kind} messages are not sent to it"


def door(engine: Engine, rows: Sequence[dict[str, Any]], types: Iterable[str]) -> dict[str, Any]:
    """Mark new messages rows the list applies to (`needs_consent`); answer the refusals of
    those whose number is listed, by message id (one query per chunk)."""
    from worker.core.validation import FieldError

    types = frozenset(types)
    for row in rows:
        row["needs_consent"] = row["message_type"] in types
    subject = [row for row in rows if row["needs_consent"]]
    if not subject:
        return {}
    with engine.connect() as conn:
        on = listed(conn, (row["to_phone"] for row in subject))
    return {
        row["id"]: FieldError("toPhone", REFUSED.format(kind=row["message_type"]))
        for row in subject
        if row["to_phone"] in on
    }
