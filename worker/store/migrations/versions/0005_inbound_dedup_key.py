"""inbound_messages.dedup_key: a provider's retry of an inbound SMS is stored once

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence
from datetime import UTC

import sqlalchemy as sa
from alembic import op

from worker.flows.inbox import inbound_key

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

inbound = sa.table(
    "inbound_messages",
    sa.column("pk", sa.BigInteger()),
    sa.column("sender", sa.String()),
    sa.column("text", sa.Text()),
    sa.column("sent_at", sa.DateTime(timezone=True)),
    sa.column("dedup_key", sa.String()),
)


def upgrade() -> None:
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dedup_key", sa.String(length=64), nullable=True))
    # Rows stored before: the first of each SMS gets its key, repeats stored by a race keep none.
    conn = op.get_bind()
    seen: set[str] = set()
    rows = conn.execute(
        sa.select(inbound.c.pk, inbound.c.sender, inbound.c.text, inbound.c.sent_at)
        .where(inbound.c.sent_at.is_not(None))
        .order_by(inbound.c.pk)
    )
    for row in rows.all():
        sent_at = row.sent_at if row.sent_at.tzinfo else row.sent_at.replace(tzinfo=UTC)
        key = inbound_key(row.sender, row.text, sent_at)
        if key is not None and key not in seen:
            seen.add(key)
            conn.execute(inbound.update().where(inbound.c.pk == row.pk).values(dedup_key=key))
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_inbound_messages_dedup_key", ["dedup_key"])


def downgrade() -> None:
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.drop_constraint("uq_inbound_messages_dedup_key", type_="unique")
        batch_op.drop_column("dedup_key")
