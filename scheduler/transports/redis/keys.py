"""Every Redis key and stream field the redis transport uses (arq keeps its own in constants.py)."""

from __future__ import annotations

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


def redis_lineage_key(prefix: str, shard: int) -> str:
    """The shard's marker: the replication ID of the data that holds its timers (lineage.py)."""
    return f"{{{prefix}:{shard}}}:lineage"
