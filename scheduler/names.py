"""Every table, channel, key, queue and exchange name in one place (arq keeps its own in constants.py)."""

from __future__ import annotations

#: the registry table: one row per order, the source of truth for every transport
REGISTRY_TABLE = "order_timeouts"
#: PostgreSQL NOTIFY channel that wakes sleeping `sql` workers when a nearer timeout is scheduled
PG_WAKE_CHANNEL = "order_timeouts_wake"
#: Alembic's version table for the registry: its own name, apart from the order service's history
MIGRATIONS_VERSION_TABLE = "order_timeouts_alembic_version"
#: maintenance lease rows (one per job) so that several `maintain` processes never overlap
LEASE_TABLE = "order_timeouts_leases"

DEFAULT_SQLITE_FILE = "order-timeouts.sqlite3"

# --- Redis transport (scheduler/transports/redis.py) ---
#: default key prefix. Every shard's keys share the hash tag `{<prefix>:<shard>}`: one cluster slot per shard,
#: so the mover's script touches one node, and the shards spread over the cluster.
REDIS_DEFAULT_PREFIX = "order_timeouts"
#: the workers' consumer group on every shard stream
REDIS_GROUP = "workers"
#: stream entry fields: the JSON TimerMessage of a due timer; a wake-up marker that carries no timer
REDIS_FIELD_MESSAGE = "m"
REDIS_FIELD_WAKE = "w"


def redis_timers_key(prefix: str, shard: int) -> str:
    """Sorted set of pending timers: member = order id, score = due time in epoch ms."""
    return f"{{{prefix}:{shard}}}:timers"


def redis_due_key(prefix: str, shard: int) -> str:
    """Stream of due timers that the workers read through the consumer group."""
    return f"{{{prefix}:{shard}}}:due"


def redis_dead_key(prefix: str) -> str:
    """Stream of dead letters (malformed entries, poison deliveries, given-up timeouts) with their reason."""
    return f"{{{prefix}}}:dead"


# --- RabbitMQ transport (scheduler/transports/rabbitmq.py) ---
#: topic exchange every timer is published to; routes it to the delay queue of its highest set bit
RABBITMQ_TIMERS_EXCHANGE = "order_timeouts.timers"
#: quorum queue the workers consume: timers whose delay has run out
RABBITMQ_READY_QUEUE = "order_timeouts.ready"
#: fanout exchange and quorum queue of dead letters (malformed, poison, given up), reason in a header
RABBITMQ_DEAD_EXCHANGE = "order_timeouts.dead"
RABBITMQ_DEAD_QUEUE = "order_timeouts.dead"
#: header of a dead letter that says why it was dead-lettered
RABBITMQ_REASON_HEADER = "order-timeouts-reason"
#: header: deliveries a timer had before it was published again on its own (a dead letter, a split message)
RABBITMQ_DELIVERIES_HEADER = "order-timeouts-deliveries"


def rabbitmq_delay_queue(level: int) -> str:
    """Level `level` of the TTL cascade: holds timers for TICK_MS·2^level ms (rabbitmq_topology.py)."""
    return f"order_timeouts.delay.{level:02d}"


def rabbitmq_expired_exchange(level: int) -> str:
    """Topic exchange the delay queue of `level` dead-letters into: routes to the next lower set bit."""
    return f"order_timeouts.delay.{level:02d}.expired"


# --- RQ transport (scheduler/transports/rq.py) ---
#: default RQ queue of the timeout jobs: `rq worker --with-scheduler -S json order_timeouts` consumes it.
#: RQ's own key names (rq:queue:…, rq:scheduled:…, rq:job:…) follow from it and from the job ids.
RQ_DEFAULT_QUEUE = "order_timeouts"
#: default first part of every job id; RQ job ids are global, so one prefix per deployment
RQ_DEFAULT_JOB_PREFIX = "order-timeout"
#: the job function, by import path: the producer side never imports the consumer side
RQ_JOB_FUNCTION = "consumers.rq_job.fire_timeout"
#: job meta field: deliveries since the job was last armed, for the handler's poison check
RQ_META_DELIVERIES = "deliveries"

#: the characters RQ accepts in a job id
RQ_JOB_ID_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def rq_job_id(prefix: str, order_id: str) -> str:
    """The deterministic RQ job id of an order's timeout: one job per order, whatever publishes it.

    RQ accepts only `[A-Za-z0-9_-]` in job ids: such order ids follow `<prefix>-`, any other is
    base64url-encoded after `<prefix>_`. The separator tells the two apart, so no two orders share a job.
    """
    import base64  # here, not at the top: this section only appends to the module

    if order_id and set(order_id) <= RQ_JOB_ID_CHARACTERS:
        return f"{prefix}-{order_id}"
    return f"{prefix}_{base64.urlsafe_b64encode(order_id.encode()).decode().rstrip('=')}"


def rq_order_id(prefix: str, job_id: str) -> str | None:
    """The order whose timeout job this is (the inverse of `rq_job_id`); None for any other job id."""
    import base64
    import binascii

    if job_id.startswith(f"{prefix}-"):
        order_id = job_id[len(prefix) + 1 :]
    elif job_id.startswith(f"{prefix}_"):
        encoded = job_id[len(prefix) + 1 :]
        try:
            order_id = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        except (binascii.Error, ValueError):  # not base64, or not UTF-8 (UnicodeDecodeError)
            return None
    else:
        return None
    return order_id if order_id and rq_job_id(prefix, order_id) == job_id else None
