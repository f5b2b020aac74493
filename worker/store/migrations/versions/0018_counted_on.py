"""messages.counted_on: a message counts once a UTC day against the global caps

Revision ID: 0018
Revises: 0017

Every send request a message was admitted to counted against DAILY_MESSAGE_CAP and
DAILY_SPEND_BUDGET (worker/flows/quota.py), so the retries of a provider outage spent the
day's cap on messages the provider never took. The day a message was counted is now kept
on it; a retry that day is not counted again, and is still sent once the cap is reached.

A capped day claims only the queued messages it counted: a partial index over the queued
rows counted on some day (retries, a few), so that claim never walks the queue of messages
waiting for midnight. A nullable column without a default: no rewrite of the table. SQLite
adds and drops it in place (no batch copy: that would drop the tallies' triggers of 0017).

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTED = "state = 'queued' AND counted_on IS NOT NULL"


def upgrade() -> None:
    op.add_column("messages", sa.Column("counted_on", sa.String(10), nullable=True))
    op.create_index(
        "ix_messages_counted",
        "messages",
        ["route", "counted_on", "priority", "pk"],
        postgresql_where=sa.text(COUNTED),
        sqlite_where=sa.text(COUNTED),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_counted", table_name="messages")
    op.drop_column("messages", "counted_on")
