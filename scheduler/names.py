"""Every table, channel, key, queue and exchange name in one place (arq keeps its own in constants.py)."""

from __future__ import annotations

#: the registry table: one row per order, the source of truth for every transport
REGISTRY_TABLE = "order_timeouts"
#: PostgreSQL NOTIFY channel that wakes sleeping `sql` workers when a nearer timeout is scheduled
PG_WAKE_CHANNEL = "order_timeouts_wake"
#: maintenance lease rows (one per job) so that several `maintain` processes never overlap
LEASE_TABLE = "order_timeouts_leases"

DEFAULT_SQLITE_FILE = "order-timeouts.sqlite3"

# --- Redis transport (scheduler/transports/redis.py) ---

# --- RabbitMQ transport (scheduler/transports/rabbitmq.py) ---
