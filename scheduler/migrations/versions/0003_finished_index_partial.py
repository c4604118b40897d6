"""The finished-rows index covers finished rows only.

ix_order_timeouts_state_finished serves the stats (timeouts finished in the last minutes) and the
dead-letter listing, which read finished rows only; every pending row was in it as ('pending',
NULL) all the same. Each scheduled timeout cost PostgreSQL an index insert there, and each
outcome recorded an update of it: leaving pending rows out makes a bulk schedule 20-40 % faster
on PostgreSQL (100k rows, alternating runs).

Rebuilding the index reads the whole table and holds writes to it meanwhile (CREATE INDEX takes
a SHARE lock): 0.3 s on PostgreSQL and 0.5 s on SQLite for a million rows, half of them finished,
during which schedule() calls and worker batches wait, and none fails.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_INDEX = "ix_order_timeouts_state_finished"
_finished = sa.text("state <> 'pending'")


def upgrade() -> None:
    op.drop_index(_INDEX, table_name="order_timeouts")
    op.create_index(
        _INDEX, "order_timeouts", ["state", "finished_ms"], postgresql_where=_finished, sqlite_where=_finished
    )


def downgrade() -> None:
    op.drop_index(_INDEX, table_name="order_timeouts")
    op.create_index(_INDEX, "order_timeouts", ["state", "finished_ms"])
