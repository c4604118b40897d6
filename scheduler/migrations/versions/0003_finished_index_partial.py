"""The finished-rows index covers finished rows only.

ix_order_timeouts_state_finished serves the stats (timeouts finished in the last minutes) and the
dead-letter listing, which read finished rows only; revision 0001 indexed every pending row in it
as well, as ('pending', NULL). That entry costs every scheduled timeout an index insert, and
every recorded outcome an update of it: leaving pending rows out spares a bulk schedule on
PostgreSQL that work (the gain is in docs/performance.md).

Rebuilding the index reads the whole table and holds writes to it meanwhile (CREATE INDEX takes
a SHARE lock), for a time that grows with the table (docs/operations.md, Migrations), during which
schedule() calls and worker batches wait, and none fails.

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
