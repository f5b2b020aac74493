"""ix_messages_explorers: the explorers due for a check, found without reading the backlog

Revision ID: 0019
Revises: 0018

One message in POLL_LEARN_EVERY (default 100) is an explorer: checked every few seconds so
its route's latencies are learned, and the other messages' checks timed from them. A check
of an explorer that runs late is not learned from, so every poll task takes the due
explorers first. Found through the index of all due checks, they sit behind the whole
backlog (30,000 rows in a 100,000-message campaign); this partial index holds only them.

The predicate names the default of POLL_LEARN_EVERY; with another value the claim finds its
explorers through `ix_messages_next_poll` as before (slower in a backlog, still right).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHERE = "next_poll_at IS NOT NULL AND pk % 100 = 0"


def upgrade() -> None:
    op.create_index(
        "ix_messages_explorers",
        "messages",
        ["next_poll_at"],
        postgresql_where=sa.text(WHERE),
        sqlite_where=sa.text(WHERE),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_explorers", table_name="messages")
