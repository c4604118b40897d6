"""The registry's table, channel and file names. Each transport keeps its broker names in its own `keys.py`."""

from __future__ import annotations

#: the registry table: one row per order, the source of truth for every transport
REGISTRY_TABLE = "order_timeouts"
#: PostgreSQL NOTIFY channel that wakes sleeping `sql` workers when a nearer timeout is scheduled
PG_WAKE_CHANNEL = "order_timeouts_wake"
#: Alembic's version table for the registry: its own name, apart from the order service's history
MIGRATIONS_VERSION_TABLE = "order_timeouts_alembic_version"
#: maintenance lease rows (one per job) so that several `maintain` processes never overlap
LEASE_TABLE = "order_timeouts_leases"
#: settings the whole fleet shares through the registry (a pause, the deployment's identity): one row each
CONTROL_TABLE = "order_timeouts_control"

DEFAULT_SQLITE_FILE = "order-timeouts.sqlite3"
