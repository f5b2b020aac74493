"""Drop ix_provider_reports_parked: no statement reads it, and every stored report paid it

Revision ID: 0020
Revises: 0019

The index of the unprocessed reports by messageId came with the first schema of pushed
reports (0003). Every statement since reaches a report's message from the report (through
`ix_messages_provider_message_id`), never the reports from a message, so the index was one
more insert for every report a webhook stored, read by nothing.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_provider_reports_parked", table_name="provider_reports")


def downgrade() -> None:
    op.create_index(
        "ix_provider_reports_parked",
        "provider_reports",
        ["provider_message_id"],
        postgresql_where=sa.text("processed_at IS NULL"),
        sqlite_where=sa.text("processed_at IS NULL"),
    )
