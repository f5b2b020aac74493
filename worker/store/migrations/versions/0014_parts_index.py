"""ix_messages_parts: find the oldest isolation part without reading the queue

Revision ID: 0014
Revises: 0013

Every send batch first asks for the oldest isolation part of its route (`ORDER BY
priority, pk`). With no index in that order over part rows alone, PostgreSQL walked
`ix_messages_sendable` and filtered out every queued row: 34 ms per batch at 100,000
queued, growing with the queue. Parts are rare, so this index is nearly always empty.

"""

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PARTS = "state = 'queued' AND isolation IS NOT NULL"


def upgrade() -> None:
    op.create_index(
        "ix_messages_parts",
        "messages",
        ["route", "priority", "pk"],
        postgresql_where=text(PARTS),
        sqlite_where=text(PARTS),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_parts", table_name="messages")
