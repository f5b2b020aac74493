"""Consent: the suppression list and its record; quiet hours' columns

Revision ID: 0012
Revises: 0011

`suppressions` holds the numbers (E.164, the key) that opted out of promo and surveys,
with the reply or note that put them there; `suppression_events` keeps every opt-out and
opt-in after a number is removed. `messages.needs_consent` marks the rows the list applies
to (their type, per SUPPRESS_MESSAGE_TYPES when enqueued): the claim skips such a row while
its number is on the list, one primary-key probe per candidate row. Rows already queued or
held get it from their type (promo, viber_survey), so an upgrade protects them too.
`messages.window_at` is when quiet hours let a message go, when they held it back;
`campaigns.send_window` is a campaign's own window.

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("phone", sa.String(20), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=True),
        sa.Column(
            "inbound_pk",
            BigPK,
            sa.ForeignKey("inbound_messages.pk", ondelete="SET NULL"),
            nullable=True,
        ),
    )
    op.create_table(
        "suppression_events",
        sa.Column("pk", BigPK, primary_key=True, autoincrement=True),
        sa.Column("phone", sa.String(20), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(8), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=True),
        sa.Column(
            "inbound_pk",
            BigPK,
            sa.ForeignKey("inbound_messages.pk", ondelete="SET NULL"),
            nullable=True,
        ),
    )
    op.create_index("ix_suppression_events_phone", "suppression_events", ["phone"])
    with op.batch_alter_table("messages") as batch:
        batch.add_column(
            sa.Column("needs_consent", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.add_column(sa.Column("window_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("send_window", sa.String(32), nullable=True))
    op.execute(
        "UPDATE messages SET needs_consent = true WHERE state IN ('queued', 'held', 'sending')"
        " AND message_type IN ('promo', 'viber_survey')"
    )


def downgrade() -> None:
    op.execute("UPDATE messages SET state = 'cancelled' WHERE state = 'suppressed'")
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("send_window")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("window_at")
        batch.drop_column("needs_consent")
    op.drop_index("ix_suppression_events_phone", table_name="suppression_events")
    op.drop_table("suppression_events")
    op.drop_table("suppressions")
