"""A campaign's counts from its tally rows, and the folding that keeps those rows few.

Triggers on `messages` append a delta row per (campaign, state, final source, currency)
for every write (migration 0017), so the counts are right whatever wrote the messages;
a status view sums a campaign's rows instead of counting its messages. The sweep folds
each campaign with many rows into one row per group, in one transaction that only takes
rows it has seen: deltas committed meanwhile stay, to be folded next time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, FromClause, Select, delete, func, insert, or_, select

from worker.store.db import AnyRow, among
from worker.store.models import campaign_tallies

t = campaign_tallies
SUMMED = ("n", "cost", "bill", "priced", "unknown_outcomes", "polls", "sent")
KEYS = ("campaign", "state", "final_source", "currency")
TIMES = ("first_created_at", "last_final_at")
# A campaign is folded once it has this many rows and twice as many as it has groups.
FOLD_MIN_ROWS = 64
FOLD_CAMPAIGNS = 100  # campaigns folded per transaction
# The sweep looks at campaigns among this many latest rows: far more than are written
# between two sweeps (a 1,000-message batch writes a few).
RECENT = 100_000


@dataclass(frozen=True)
class Tally:
    """One group's sums: messages in `state` with this final source and currency."""

    state: str
    final_source: str | None
    currency: str | None
    n: int
    cost: float
    bill: float
    priced: int  # messages with a cost or a bill
    unknown_outcomes: int
    polls: int
    sent: int  # messages with a provider messageId
    first_created_at: datetime | None
    last_final_at: datetime | None


def campaign_tallies_of(conn: Connection, campaign: str) -> list[Tally]:
    """The campaign's groups that hold messages, from its delta rows."""
    rows = conn.execute(
        select(
            t.c.state,
            t.c.final_source,
            t.c.currency,
            *(func.sum(t.c[name]) for name in SUMMED),
            func.min(t.c.first_created_at),
            func.max(t.c.last_final_at),
        )
        .where(t.c.campaign == campaign)
        .group_by(t.c.state, t.c.final_source, t.c.currency)
    ).all()
    return [_tally(row) for row in rows if row[3]]


def _tally(row: AnyRow) -> Tally:
    # PostgreSQL sums bigints as numeric: back to int and float here.
    state, source, currency, n, cost, bill, priced, unknown, polls, sent, first, last = row
    return Tally(
        state, source, currency, int(n), float(cost), float(bill), int(priced),
        int(unknown), int(polls), int(sent), first, last,
    )  # fmt: skip


def counts_by_campaign(conn: Connection) -> dict[str, dict[str, int]]:
    """Messages per state of every campaign."""
    counts: dict[str, dict[str, int]] = {}
    for name, state, n in conn.execute(
        select(t.c.campaign, t.c.state, func.sum(t.c.n)).group_by(t.c.campaign, t.c.state)
    ):
        if n:
            counts.setdefault(name, {})[state] = int(n)
    return counts


def should_fold(rows: int, groups: int) -> bool:
    """Folding rewrites a campaign's groups: worth it once deltas outnumber them."""
    return rows >= max(FOLD_MIN_ROWS, 2 * groups)


def fold(engine: Engine) -> int:
    """Replace the delta rows of every campaign written to lately that has many by their
    sums; answers how many campaigns were folded. Groups that sum to nothing are dropped.

    Only campaigns among the last RECENT rows are looked at, through the pk and campaign
    indexes: a scan of the whole table would grow with every row it ever held (deleted
    rows stay in the heap until a vacuum). A campaign missed still sums right.
    """
    with engine.connect() as conn:
        top = conn.execute(select(func.max(t.c.pk))).scalar_one()
        if top is None:
            return 0
        recent = select(t.c.campaign).where(t.c.pk > top - RECENT).distinct().scalar_subquery()
        groups = (
            select(t.c.campaign, func.count().label("rows"))
            .where(t.c.campaign.in_(recent))
            .group_by(*(t.c[key] for key in KEYS))
            .subquery()
        )
        found = conn.execute(
            select(groups.c.campaign, func.sum(groups.c.rows), func.count()).group_by(
                groups.c.campaign
            )
        ).all()
    names = sorted(name for name, rows, n in found if should_fold(int(rows), n))
    for start in range(0, len(names), FOLD_CAMPAIGNS):
        _fold(engine, names[start : start + FOLD_CAMPAIGNS])
    return len(names)


def _fold(engine: Engine, names: Sequence[str]) -> None:
    """PostgreSQL: one DELETE … RETURNING feeds the INSERT of the sums, so exactly the rows
    deleted are summed; a DELETE after a separate read would also take rows committed in
    between (a row's pk is drawn before its commit) and lose them. SQLite: the transaction
    holds the write lock (BEGIN IMMEDIATE), so nothing commits in between."""
    columns = [*KEYS, *SUMMED, *TIMES]
    with engine.begin() as conn:
        top = conn.execute(select(func.max(t.c.pk))).scalar_one()
        if top is None:
            return
        taken = [among(conn, t.c.campaign, names), t.c.pk <= top]
        if conn.dialect.name == "postgresql":
            gone = delete(t).where(*taken).returning(*t.c).cte("gone")
            conn.execute(insert(t).from_select(columns, _sums(gone)))
            return
        folded = conn.execute(_sums(select(t).where(*taken).subquery("gone"))).all()
        conn.execute(delete(t).where(*taken))
        if folded:
            conn.execute(insert(t), [dict(zip(columns, row, strict=True)) for row in folded])


def _sums(rows: FromClause) -> Select[Any]:
    """The rows' sums per group; a group whose sums are all zero holds nothing."""
    sums = [func.sum(rows.c[name]).label(name) for name in SUMMED]
    return (
        select(
            *(rows.c[key] for key in KEYS),
            *sums,
            func.min(rows.c.first_created_at),
            func.max(rows.c.last_final_at),
        )
        .group_by(*(rows.c[key] for key in KEYS))
        .having(or_(*(func.sum(rows.c[name]) != 0 for name in SUMMED)))
    )
