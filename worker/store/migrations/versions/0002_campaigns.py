"""campaigns: names messages were enqueued under, and their cancellation

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 07:08:12.643297
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.execute(
        "INSERT INTO campaigns (name, created_at) SELECT campaign, MIN(created_at) "
        "FROM messages WHERE campaign IS NOT NULL GROUP BY campaign"
    )


def downgrade() -> None:
    op.drop_table("campaigns")
