"""Alembic environment for the registry. `init-db` runs it on the caller's connection;
`init-db --print-sql` runs it offline, writing the SQL for the dialect it is given instead.

The version table has a name of our own, so that it never collides with the order service's own
Alembic history in the same database.
"""

from __future__ import annotations

from alembic import context

from scheduler.names import MIGRATIONS_VERSION_TABLE
from scheduler.registry import metadata

if context.is_offline_mode():
    context.configure(
        dialect_name=context.config.attributes["dialect_name"],
        target_metadata=metadata,
        version_table=MIGRATIONS_VERSION_TABLE,
        literal_binds=True,
        output_buffer=context.config.attributes["output"],
    )
else:
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=metadata, version_table=MIGRATIONS_VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
