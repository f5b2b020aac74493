"""messages.send_deadline and messages.isolation: a time-bounded send, a durable halving

Revision ID: 0008
Revises: 0007

A message's retries were bounded by a count (SEND_MAX_ATTEMPTS), which a 90 s outage
exhausted; now by a time, `send_deadline` (set at enqueue; rows already waiting get
created_at + 6 h). A refused batch was halved inside one worker, so a 429, a 5xx or a
restart lost the halving's progress; now each part carries an `isolation` key and is
claimed alone.

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WAITING = "state IN ('queued', 'sending')"


def upgrade() -> None:
    op.add_column("messages", sa.Column("send_deadline", sa.DateTime(timezone=True)))
    op.add_column("messages", sa.Column("isolation", sa.String(32)))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"UPDATE messages SET send_deadline = created_at + interval '6 hours' WHERE {WAITING}"
        )
    else:  # stored naive UTC, in the format SQLAlchemy reads back
        op.execute(
            "UPDATE messages SET send_deadline = "
            f"strftime('%Y-%m-%d %H:%M:%f000', created_at, '+6 hours') WHERE {WAITING}"
        )
    op.create_index(
        "ix_messages_isolation",
        "messages",
        ["isolation"],
        postgresql_where=sa.text("state = 'queued' AND isolation IS NOT NULL"),
        sqlite_where=sa.text("state = 'queued' AND isolation IS NOT NULL"),
    )
    op.create_index(
        "ix_messages_send_deadline",
        "messages",
        ["send_deadline"],
        postgresql_where=sa.text("state = 'queued'"),
        sqlite_where=sa.text("state = 'queued'"),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_send_deadline", table_name="messages")
    op.drop_index("ix_messages_isolation", table_name="messages")
    op.drop_column("messages", "isolation")
    op.drop_column("messages", "send_deadline")
