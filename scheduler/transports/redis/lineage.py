"""Whether a Redis still holds the timers it confirmed: a marker per shard naming the data's lineage.

Redis gives a primary's data a replication ID (INFO replication, `master_replid`) that its replicas
share. A primary that restarts starts a new one, and a replica promoted by a failover starts a new
one too: asynchronous replication may have lost the last writes the old primary confirmed. So the
relay writes the current ID into a marker key (`timers_restored`), and a marker that is missing (a
restart without persistence, a flush) or names another ID (a failover, a restart) means timers may be
lost (`lost_timers`): the relay publishes every pending timeout again. A restart that keeps the data
(RDB, AOF) also gets a new ID, so it costs one needless republish, never a lost timer.

One round trip per check on a single server; on Redis Cluster one per shard, since each shard's
marker lives on the node that holds the shard's keys, and that node's ID is the one that counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scheduler.errors import TransportUnavailable


class LineageMarkers:
    """The markers of one deployment's keys (one per shard; the keys decide where each lives)."""

    def __init__(self, keys: Sequence[str], *, cluster: bool = False) -> None:
        self._keys = list(keys)
        self._cluster = cluster
        #: key → the replication ID seen by the last check, which `restore` writes
        self._seen: dict[str, str] = {}

    def lost(self, client: Any) -> bool:
        """True when some marker is missing or names another lineage than its server's now."""
        stored: dict[str, bytes | None] = {}
        self._seen = {}
        if self._cluster:
            for key in self._keys:
                stored[key] = client.get(key)  # routed (and re-routed after a failover) by redis-py
                node = client.get_node_from_key(key)
                self._seen[key] = _primary_lineage(client.info("replication", target_nodes=node), client)
        else:
            pipe = client.pipeline(transaction=False)
            pipe.info("replication")
            for key in self._keys:
                pipe.get(key)
            info, *values = pipe.execute()
            lineage = _primary_lineage(info, client)
            self._seen = dict.fromkeys(self._keys, lineage)
            stored = dict(zip(self._keys, values, strict=True))
        return any(stored[key] != self._seen[key].encode() for key in self._keys)

    def restore(self, client: Any) -> None:
        """Write the lineage the last check saw: a failover in between leaves a marker that no longer
        matches, so the next check republishes again rather than missing that loss."""
        if not self._seen:
            self.lost(client)
        if self._cluster:
            for key, lineage in self._seen.items():
                client.set(key, lineage)
        else:
            pipe = client.pipeline(transaction=False)
            for key, lineage in self._seen.items():
                pipe.set(key, lineage)
            pipe.execute()


def _primary_lineage(info: Any, client: Any) -> str:
    """The replication ID of a primary; a server that is a replica now (a demoted primary still
    connected to) is refused, and the client's idle connections are dropped so that the next ones
    are made to the current primary (a Sentinel client asks the sentinels again)."""
    if info.get("role") != "master":
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            pool.disconnect(inuse_connections=False)
        raise TransportUnavailable(f"redis server is a {info.get('role')}, not the primary")
    return str(info["master_replid"])
