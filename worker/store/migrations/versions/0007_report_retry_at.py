"""provider_reports.retry_at: a parked report is tried again on a backoff, not every run

Revision ID: 0007
Revises: 0006

Every apply_reports run joined every parked report (messageId not ours, or not recorded
yet) to messages: 340 ms a run at 1,000,000 parked, measured. Parked reports now wait
longer between tries as they age, and a run joins only the ones due.

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "provider_reports", sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.execute("UPDATE provider_reports SET retry_at = received_at WHERE processed_at IS NULL")
    op.create_index(
        "ix_provider_reports_due",
        "provider_reports",
        ["retry_at"],
        postgresql_where=sa.text("processed_at IS NULL"),
        sqlite_where=sa.text("processed_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_provider_reports_due", table_name="provider_reports")
    op.drop_column("provider_reports", "retry_at")
