"""messages.provider_message_id: unique over the rows that have one (a partial index)

Revision ID: 0006
Revises: 0005

Every update of a message row that is not HOT adds an entry to each of its indexes; the
unique constraint indexed the NULL of every message not sent yet, so each claim paid for
an entry no lookup can use. PostgreSQL only: SQLite keeps its table-level constraint (it
would take a copy of the whole table to drop), which answers the same lookups.

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.create_index(
        "ix_messages_provider_message_id",
        "messages",
        ["provider_message_id"],
        unique=True,
        postgresql_where=sa.text("provider_message_id IS NOT NULL"),
    )
    op.drop_constraint("messages_provider_message_id_key", "messages", type_="unique")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.create_unique_constraint(
        "messages_provider_message_id_key", "messages", ["provider_message_id"]
    )
    op.drop_index("ix_messages_provider_message_id", table_name="messages")
