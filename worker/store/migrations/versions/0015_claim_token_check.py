"""ck_messages_claim_token: a claim token only on a row being sent

Revision ID: 0015
Revises: 0014

The send path writes a claim's outcomes to the rows that still carry its token, found by
key and token alone (a guard on the state, too, let the planner walk the dead entries of
`ix_messages_sending_lease`). That is right only while no row outside `sending` keeps a
token: every way out of `sending` clears it, and this constraint makes PostgreSQL refuse
a change that would not. SQLite would rebuild the table to add it; there the invariant is
held by the code and checked by the stateful test (tests/test_send_model.py).

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECK = "claim_token IS NULL OR state = 'sending'"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_check_constraint("ck_messages_claim_token", "messages", CHECK)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("ck_messages_claim_token", "messages", type_="check")
