"""campaigns.daily_cap, rate_limit, cap_day, cap_released: caps and a per-campaign rate

Revision ID: 0011
Revises: 0010

A metered campaign's unsent messages wait `held`; beat releases them oldest first within
its daily cap (counted per UTC day in cap_day/cap_released) and its rate. No index: the
campaigns table has a row per campaign, not per message.

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("daily_cap", sa.Integer()),
    ("rate_limit", sa.Float()),
    ("cap_day", sa.String(10)),
    ("cap_released", sa.Integer()),
)


def upgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        for name, kind in COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    # A metered campaign's held messages go back to the queue (caps are gone with them);
    # a held or paused campaign's stay held (0010 still knows those).
    op.execute(
        "UPDATE messages SET state = 'queued' WHERE state = 'held' AND campaign IN "
        "(SELECT name FROM campaigns WHERE held_at IS NULL AND paused_at IS NULL)"
    )
    with op.batch_alter_table("campaigns") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
