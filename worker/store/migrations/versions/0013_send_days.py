"""send_days: what was sent per UTC day, against the global caps

Revision ID: 0013
Revises: 0012

One row a UTC day: the messages the workers admitted to send and their rate-card spend,
counted against DAILY_MESSAGE_CAP and DAILY_SPEND_BUDGET (worker/flows/quota.py), and why sending
stopped for the day when a cap was reached. A few hundred rows a year: no index.

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "send_days",
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.Column("spend", sa.Float(), nullable=False),
        sa.Column("capped", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("spend_budget", sa.Float(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("send_days")
