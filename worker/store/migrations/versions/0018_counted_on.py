"""messages.counted_on, released_on: a message counts once a UTC day against a daily cap

Revision ID: 0018
Revises: 0017

Every send request a message was admitted to counted against DAILY_MESSAGE_CAP and
DAILY_SPEND_BUDGET (worker/flows/quota.py), so the retries of a provider outage spent the
day's cap on messages the provider never took. The day a message was counted is now kept
on it (`counted_on`); a retry that day is not counted again, and is still sent once the cap
is reached. A capped day claims only the queued messages it counted: a partial index over
the queued rows counted on some day (retries, a few), so that claim never walks the queue
of messages waiting for midnight.

A metered campaign's daily cap (worker/flows/campaigns.py) counts releases from `held`: a
message released, then held again before it was sent (a pause or a new limit, say while it
waited to be retried), was released and counted again. The day it was released is now
kept on it (`released_on`); released again that day, it does not count again. A partial
index finds those among a campaign's held messages without reading the others.

Nullable columns without a default: no rewrite of the table. SQLite adds and drops them in
place (no batch copy: that would drop the tallies' triggers of 0017).

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_messages_counted": (
        ["route", "counted_on", "priority", "pk"],
        "state = 'queued' AND counted_on IS NOT NULL",
    ),
    "ix_messages_released": (
        ["campaign", "released_on"],
        "state = 'held' AND released_on IS NOT NULL",
    ),
}


def upgrade() -> None:
    op.add_column("messages", sa.Column("counted_on", sa.String(10), nullable=True))
    op.add_column("messages", sa.Column("released_on", sa.String(10), nullable=True))
    for name, (columns, where) in INDEXES.items():
        op.create_index(
            name,
            "messages",
            columns,
            postgresql_where=sa.text(where),
            sqlite_where=sa.text(where),
        )


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="messages")
    op.drop_column("messages", "released_on")
    op.drop_column("messages", "counted_on")
