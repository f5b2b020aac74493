"""callbacks.event: a final or a late callback, in a column of its own

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("callbacks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("event", sa.String(length=16), server_default="final", nullable=False)
        )
    # Rows written before this column kept the event in the kind ("lateurl", "latetask").
    op.execute(
        "UPDATE callbacks SET event = 'late', kind = substr(kind, 5) WHERE kind LIKE 'late%'"
    )


def downgrade() -> None:
    with op.batch_alter_table("callbacks", schema=None) as batch_op:
        batch_op.drop_column("event")
