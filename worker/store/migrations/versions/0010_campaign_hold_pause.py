"""campaigns.held_at, paused_at, pause_reason (hold-then-approve, pause/resume), retry_of

Revision ID: 0010
Revises: 0009

A held or paused campaign's unsent messages are in the state `held` (not claimable);
these columns say why, since when, and make the producer store new messages as held.
`retry_of` links a campaign made by `cascade campaign retry` to the one it retries.
No index: the campaigns table has a row per campaign, not per message.

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("held_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("pause_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("retry_of", sa.String(200), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE messages SET state = 'queued' WHERE state = 'held'")
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("retry_of")
        batch.drop_column("pause_reason")
        batch.drop_column("paused_at")
        batch.drop_column("held_at")
