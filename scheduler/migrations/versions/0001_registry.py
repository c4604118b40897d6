"""The registry table and its due-time indexes.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_pending = sa.text("state = 'pending'")
_unpublished = sa.text("state = 'pending' AND published_ms IS NULL")


def upgrade() -> None:
    op.create_table(
        "order_timeouts",
        sa.Column("order_id", sa.String(255), primary_key=True),
        sa.Column("due_ms", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(24)),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
        sa.Column("published_ms", sa.BigInteger),
        sa.Column("fired_ms", sa.BigInteger),
        sa.Column("finished_ms", sa.BigInteger),
        sa.Column("worker", sa.String(64)),
        sa.Column("error", sa.Text),
    )
    op.create_index(
        "ix_order_timeouts_pending_due",
        "order_timeouts",
        ["due_ms", "order_id"],
        postgresql_where=_pending,
        sqlite_where=_pending,
    )
    op.create_index(
        "ix_order_timeouts_unpublished",
        "order_timeouts",
        ["due_ms"],
        postgresql_where=_unpublished,
        sqlite_where=_unpublished,
    )
    op.create_index("ix_order_timeouts_state_finished", "order_timeouts", ["state", "finished_ms"])


def downgrade() -> None:
    op.drop_table("order_timeouts")
