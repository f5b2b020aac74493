"""campaigns.held_at, paused_at, pause_reason (hold-then-approve, pause/resume), retry_of

Revision ID: 0009
Revises: 0007

A held or paused campaign's unsent messages are in the state `held` (not claimable);
these columns say why, since when, and make the producer store new messages as held.
`retry_of` links a campaign made by `cascade campaign retry` to the one it retries.
`daily_cap` and `rate_limit` meter a campaign: its messages wait `held` and beat releases
them within the limits, counting releases per UTC day in `cap_day`/`cap_released`.
No index: the campaigns table has a row per campaign, not per message.

Merge note: migration 0008 (messages.send_deadline) is being written on another branch;
once both are on main, this one revises 0008 instead (down_revision = "0008").

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("held_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("pause_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("retry_of", sa.String(200), nullable=True))
        batch.add_column(sa.Column("daily_cap", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("rate_limit", sa.Float(), nullable=True))
        batch.add_column(sa.Column("cap_day", sa.String(10), nullable=True))
        batch.add_column(sa.Column("cap_released", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE messages SET state = 'queued' WHERE state = 'held'")
    with op.batch_alter_table("campaigns") as batch:
        for column in ("cap_released", "cap_day", "rate_limit", "daily_cap", "retry_of"):
            batch.drop_column(column)
        batch.drop_column("pause_reason")
        batch.drop_column("paused_at")
        batch.drop_column("held_at")
