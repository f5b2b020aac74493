"""ix_messages_poll_deadline, ix_messages_expires: the sweeper's scans without the history

Revision ID: 0017
Revises: 0016

Every 15 s the sweeper looks for queued messages past their TTL and messages with the
provider past their polling deadline. With no index on either column among those rows,
PostgreSQL read the (campaign, state) or the queue's deadline index whole, every entry the
table ever had (autovacuum off keeps dead ones), and then the heap: 170–190 ms a sweep each
at 1,000,000 messages, growing with every campaign sent. Both partial indexes hold only the
rows the sweep may close: 0.02 ms.

"""

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POLLABLE = "state IN ('submitted', 'scheduled', 'processing')"
EXPIRING = "state = 'queued' AND expires_at IS NOT NULL"


def upgrade() -> None:
    op.create_index(
        "ix_messages_poll_deadline",
        "messages",
        ["poll_deadline"],
        postgresql_where=text(POLLABLE),
        sqlite_where=text(POLLABLE),
    )
    op.create_index(
        "ix_messages_expires",
        "messages",
        ["expires_at"],
        postgresql_where=text(EXPIRING),
        sqlite_where=text(EXPIRING),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_expires", table_name="messages")
    op.drop_index("ix_messages_poll_deadline", table_name="messages")
