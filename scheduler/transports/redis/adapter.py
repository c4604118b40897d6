"""The `redis` transport: timers in a sorted set per shard, moved when due into a stream per shard
that the workers read through a consumer group.

    publish ─ZADD─▶ {prefix:n}:timers     member = order id, score = due time in ms
                        │ move.lua: due members ─XADD─▶ stream, ─ZREM─▶ set, in one atomic step
                        ▼
                    {prefix:n}:due ─XREADGROUP (group "workers")─▶ worker ─▶ XACK + XDEL after the commit
                        ▲ XAUTOCLAIM (claim.lua): entries a dead worker left unacked longer than claim_idle_ms

Any worker runs the mover before it reads; scripts run one at a time, so movers racing each other
neither duplicate nor lose a timer. A worker with nothing to read blocks on XREADGROUP until the
earliest timer is due (or its timeout): it wakes on time without polling. It wakes sooner when
another worker moves timers into the stream, or when a publish makes a timer the shard's earliest
(the publisher moves a timer that is already due, or adds a wake-up entry for one due soon).

A Redis that lost timers it had confirmed (restarted empty, flushed, or replaced by a replica that
had not received the last writes) is noticed by a marker per shard (lineage.py), and the relay then
publishes every pending timeout again.

The registry is authoritative: the set holds only the order id, which keeps each pending timeout
small in Redis (the bytes per timeout are in docs/performance.md), so stream messages carry
version 0 and the handler's conditional claim decides what a delivery means.

URL: `redis://[[user]:password@]host[:port][/db][?option=value&...]`, `rediss://` for TLS, or under
Sentinel `redis+sentinel://[[user]:password@]h1:26379,h2:26379/SERVICE[/DB][?option=value&...]`
(`rediss+sentinel://` for TLS; sentinel.py: every connection goes to the primary the sentinels
name, and follows a failover).
Options:

- `prefix` (default `order_timeouts`): first part of every key. No `{` or `}`: it sits inside the
  per-shard hash tag `{<prefix>:<identity>:<shard>}`, where the registry's identity keeps apart
  deployments that share a Redis database and a prefix (`namespace`); a timer of another deployment
  found in our streams anyway is dead-lettered in `receive` with the reason, and counted.
- `shards` (default 1): sorted-set/stream pairs the timers are spread over (crc32 of the order id).
  Each shard hashes to its own cluster slot, so on Redis Cluster the shards spread over the nodes.
  Changing it strands timers on shards no longer read: the reconciler republishes them.
- `claim_idle_ms` (default 12000): an entry delivered and left unacked this long is taken over by
  another worker, within 2 s more: how long a frozen or partitioned worker holds its timeouts. Keep it well above the
  time one batch takes, or a slow batch is handled a second time meanwhile (the registry makes that
  second run a no-op, but it is work done twice).
- `cluster` (default 0): `1` connects through redis.cluster.RedisCluster; the host is a seed node.
  redis-py follows a failover in the cluster (a replica promoted in place of a lost primary).
- `sentinel_auth` (default 0, sentinel URLs only): `1` sends the URL's user and password to the
  sentinels as well as to the Redis servers.
- `move_batch` (default 1000): most timers one mover call moves per shard (bounds its run time).
- `dead_maxlen` (default 100000): the dead-letter stream is trimmed to about this many entries
  (the registry keeps every dead timeout regardless).

Other query options go to redis-py unchanged (`socket_timeout`, `ssl_ca_certs`, `ssl_cert_reqs`, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from importlib.resources import files
from typing import Any, Self

from redis.exceptions import RedisClusterException, RedisError, ResponseError
from sqlalchemy import Engine

from scheduler.clock import Clock
from scheduler.errors import MalformedMessage, TransportUnavailable
from scheduler.transports.base import (
    FAILED_REDELIVERY_MS,
    AsyncPublisher,
    Batch,
    BrokerTransport,
    Delivery,
    Deployment,
    Settlement,
    TimerMessage,
)
from scheduler.transports.redis.keys import (
    REDIS_FIELD_MESSAGE,
    REDIS_FIELD_WAKE,
    REDIS_GROUP,
    redis_dead_key,
    redis_due_key,
    redis_lineage_key,
    redis_timers_key,
)
from scheduler.transports.redis.lineage import LineageMarkers
from scheduler.transports.redis.options import MAX_BLOCK_MS, connect, parse_url

MOVE_SCRIPT = files("scheduler.transports.redis").joinpath("move.lua").read_text()
CLAIM_SCRIPT = files("scheduler.transports.redis").joinpath("claim.lua").read_text()

#: a consumer name in the group silent this long with nothing pending belongs to a worker that is gone
#: (a live one reads at least every MAX_BLOCK_MS): the claim step forgets it (claim.lua)
FORGET_CONSUMERS_AFTER_MS = 3_600_000
#: members per ZADD command when publishing a large batch
ZADD_CHUNK = 5000
#: a published timer due sooner than this that becomes its shard's earliest wakes a blocked worker;
#: later ones are seen anyway when the worker's block (at most MAX_BLOCK_MS) ends
WAKE_HORIZON_MS = MAX_BLOCK_MS

_FIELD_MESSAGE, _FIELD_WAKE = REDIS_FIELD_MESSAGE.encode(), REDIS_FIELD_WAKE.encode()

#: (shard, stream id, what the dead letter says) of an entry that is not a timer message of ours
_Rejected = tuple[int, bytes, dict[str, Any]]


class RedisTransport(BrokerTransport):
    name = "redis"

    @classmethod
    def from_url(cls, broker_url: str, engine: Engine, clock: Clock) -> Self:
        return cls(broker_url, clock, engine)

    def __init__(self, broker_url: str, clock: Clock, engine: Engine | None = None) -> None:
        self._url, self.options = parse_url(broker_url)
        self._clock = clock
        self.deployment = Deployment(engine, clock)
        self._client: Any = None  # connected on first use: a dead broker must not break start-up
        self._move: Any = None
        self._claim: Any = None
        self._timers: list[str] = []  # the key names: known once the deployment is (`_redis`)
        self._streams: list[str] = []
        self._shard_of_stream: dict[bytes, int] = {}
        self._dead = ""
        self._markers: LineageMarkers | None = None
        self._consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._groups_ready = False
        self._consumed = False
        self._claim_cursors = ["0-0"] * self.options.shards
        self._next_claim_at = 0.0
        # Every worker looks for idle entries this often, so a frozen worker's entries are taken over
        # at most claim_idle_ms + this (+ one receive) after they were delivered.
        self._claim_every_s = min(max(self.options.claim_idle_ms / 4000, 0.05), 2.0)
        self._earliest_shard = 0  # where a cluster worker blocks: the shard of the earliest timer
        self._first_shard = 0  # rotates, so that no shard's stream waits behind the others
        self._foreign: dict[str, int] = {}  # dead-lettered since the last receive returned, by owner

    @property
    def namespace(self) -> str:
        """What every key starts with: the prefix and the deployment's identity, `prefix:identity`
        (the prefix alone when unbound). Two deployments on one Redis database and one prefix never
        share a key; a deployment upgraded from a release without identities finds its new keys
        without a lineage marker, so its relay publishes every pending timeout into them at once."""
        identity = self.deployment.id
        return self.options.prefix if identity is None else f"{self.options.prefix}:{identity}"

    @property
    def bound(self) -> bool:
        """Whether the key names are known (the deployment's identity has been read)."""
        return bool(self._timers)

    def _bind(self) -> None:
        namespace, shards = self.namespace, range(self.options.shards)
        self._timers = [redis_timers_key(namespace, n) for n in shards]
        self._streams = [redis_due_key(namespace, n) for n in shards]
        self._shard_of_stream = {key.encode(): n for n, key in enumerate(self._streams)}
        self._dead = redis_dead_key(namespace)
        self._markers = LineageMarkers([redis_lineage_key(namespace, n) for n in shards], cluster=self.options.cluster)

    def shard_of(self, order_id: str) -> int:
        return zlib.crc32(order_id.encode()) % self.options.shards

    # -- producer side ---------------------------------------------------------------------------

    def publish(self, messages: Sequence[TimerMessage]) -> None:
        """ZADD in one pipeline; confirmed when the pipeline has returned."""
        due_by_shard = self._by_shard(messages)
        if not due_by_shard:
            return
        with self._edge("publish"):
            pipe = self._redis().pipeline(transaction=False)
            self._queue_timers(pipe, due_by_shard)
            now, due_now, wake = self._wake_plan(due_by_shard, pipe.execute())
            if due_now:
                # Due already (fire, replay, the relay catching up): moving it into the stream wakes a reader.
                self.move_due(due_now, now)
            if wake:
                pipe = self._redis().pipeline(transaction=False)
                self._queue_wake(pipe, wake)
                pipe.execute()

    def async_publisher(self) -> AsyncPublisher:
        """redis.asyncio, sending the same commands as `publish` (async_publisher.py)."""
        from scheduler.transports.redis.async_publisher import RedisAsyncPublisher

        return RedisAsyncPublisher(self, self._url)

    def lost_timers(self) -> bool:
        """A shard's marker is missing or names another replication ID than its server's (lineage.py)."""
        with self._edge("lineage"):
            client = self._redis()
            assert self._markers is not None
            return self._markers.lost(client)

    def timers_restored(self) -> None:
        with self._edge("lineage"):
            client = self._redis()
            assert self._markers is not None
            self._markers.restore(client)

    def revoke(self, order_ids: Sequence[str]) -> None:
        if order_ids:
            with self._edge("revoke"):
                pipe = self._redis().pipeline(transaction=False)
                self._queue_revoke(pipe, order_ids)
                pipe.execute()

    # The steps of a publish, shared by `publish` and the asyncio publisher: they queue commands on
    # a pipeline of either client and read its replies; sending it is the caller's.

    def _by_shard(self, messages: Sequence[TimerMessage]) -> dict[int, dict[str, int]]:
        due_by_shard: dict[int, dict[str, int]] = {}
        for message in messages:
            due_by_shard.setdefault(self.shard_of(message.order_id), {})[message.order_id] = message.due_ms
        return due_by_shard

    def _queue_timers(self, pipe: Any, due_by_shard: dict[int, dict[str, int]]) -> None:
        """ZADD the timers, then read each shard's earliest (for `_wake_plan`)."""
        for shard, due in due_by_shard.items():
            items = list(due.items())
            for start in range(0, len(items), ZADD_CHUNK):
                pipe.zadd(self._timers[shard], dict(items[start : start + ZADD_CHUNK]))
            pipe.zrange(self._timers[shard], 0, 0, withscores=True)

    def _wake_plan(
        self, due_by_shard: dict[int, dict[str, int]], replies: list[Any]
    ) -> tuple[int, list[int], list[int]]:
        """Workers block until the earliest timer they saw: tell them when a publish changed it.

        Returns (now, shards whose earliest timer is due already: move them, shards whose earliest
        timer is one just published and due soon: add a wake-up entry to their stream)."""
        # ZADD replies with a count, ZRANGE with a list: the lists are the heads, in shard order.
        heads = [reply for reply in replies if isinstance(reply, list)]
        now = self._clock.now_ms()
        due_now, wake = [], []
        for (shard, due), head in zip(due_by_shard.items(), heads, strict=True):
            if not head:
                continue
            member, score = head[0]
            if score <= now:
                due_now.append(shard)
            elif score - now < WAKE_HORIZON_MS and member.decode() in due:
                wake.append(shard)
        return now, due_now, wake

    def _queue_wake(self, pipe: Any, shards: Sequence[int]) -> None:
        # A stream entry, not pub/sub: a worker that starts blocking after this still sees it.
        for shard in shards:
            pipe.xadd(self._streams[shard], {_FIELD_WAKE: b""})

    def _queue_revoke(self, pipe: Any, order_ids: Sequence[str]) -> None:
        by_shard: dict[int, list[str]] = {}
        for order_id in order_ids:
            by_shard.setdefault(self.shard_of(order_id), []).append(order_id)
        for shard, ids in by_shard.items():
            pipe.zrem(self._timers[shard], *ids)

    def _move_call(self, shard: int, now_ms: int) -> tuple[list[str], list[Any]]:
        """The keys and arguments of move.lua for one shard."""
        args = [now_ms, self.options.move_batch, REDIS_FIELD_MESSAGE, self.deployment.id or ""]
        return [self._timers[shard], self._streams[shard]], args

    # -- consumer side ---------------------------------------------------------------------------

    def receive(self, limit: int, timeout: float) -> Batch:
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._edge("receive"):
            self._ensure_groups()
            deliveries: list[Delivery] = []
            if time.monotonic() >= self._next_claim_at:
                deliveries = self._take_over_idle(limit)
            while True:
                earliest = self.move_due()
                if len(deliveries) < limit:
                    deliveries += self._read(limit - len(deliveries))
                if deliveries:
                    return self._batch(deliveries)
                wait_ms = int((deadline - time.monotonic()) * 1000)
                if earliest is not None:
                    wait_ms = min(wait_ms, earliest - self._clock.now_ms())
                if wait_ms > 0:
                    deliveries = self._read(limit, block_ms=min(wait_ms, MAX_BLOCK_MS))
                elif time.monotonic() >= deadline:
                    return self._batch([])

    def _batch(self, deliveries: list[Delivery]) -> Batch:
        batch, self._foreign = Batch(deliveries, foreign=self._foreign), {}
        return batch

    def settle(self, settlement: Settlement) -> None:
        now = self._clock.now_ms()
        acks: dict[int, list[bytes]] = {}
        with self._edge("settle"):
            writes = self._redis().pipeline(transaction=False)
            for delivery in settlement.done:
                self._ack_later(acks, delivery)
            for delivery, message in settlement.retry:
                writes.zadd(self._timers[self.shard_of(message.order_id)], {message.order_id: message.due_ms})
                self._ack_later(acks, delivery)
            for delivery, reason in settlement.dead:
                message = delivery.message
                fields = {"order_id": message.order_id, "body": message.encode(), "reason": reason}
                self._dead_letter(writes, {**fields, "from": self._source(delivery)})
                self._ack_later(acks, delivery)
            for delivery in settlement.failed:
                # The batch transaction failed (database trouble), which says nothing against the
                # message: rather than leave it unacked, where it would wait claim_idle_ms for
                # XAUTOCLAIM and count one more delivery towards the poison limit, re-arm it shortly
                # and ack. NX keeps a timer that a reschedule has re-published in the meantime. If
                # Redis fails here, the entry stays pending and XAUTOCLAIM brings it back.
                oid = delivery.message.order_id
                writes.zadd(self._timers[self.shard_of(oid)], {oid: now + FAILED_REDELIVERY_MS}, nx=True)
                self._ack_later(acks, delivery)
            # Re-arm and dead-letter first, ack after: a crash in between redelivers (the registry
            # makes that a no-op) instead of losing. Two round trips, because on a cluster the dead
            # stream may live on another node than the acked stream.
            if len(writes):
                writes.execute()
            self._ack(acks)

    def _ensure_groups(self) -> None:
        if self._groups_ready:
            return
        self._redis()  # binds the names
        for stream in self._streams:
            try:
                # From id 0: an entry moved in before the group existed is still delivered.
                self._redis().xgroup_create(stream, REDIS_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = self._consumed = True

    def move_due(self, shards: Sequence[int] | None = None, now_ms: int | None = None) -> int | None:
        """Run the mover on these shards (all by default); return the earliest due time left in them."""
        shards = range(self.options.shards) if shards is None else shards
        with self._edge("move"):
            client = self._redis()  # the key names are known from here on
            now = self._clock.now_ms() if now_ms is None else now_ms
            calls = [self._move_call(n, now) for n in shards]
            if self.options.cluster:
                # Each shard's keys live on their own node: one script call each.
                replies = [self._move(keys=k, args=a) for k, a in calls]
            else:
                pipe = client.pipeline(transaction=False)
                for k, a in calls:
                    self._move(keys=k, args=a, client=pipe)
                replies = pipe.execute()
        earliest: int | None = None
        for shard, (_moved, head) in zip(shards, replies, strict=True):
            if head is not None and (earliest is None or int(float(head)) < earliest):
                earliest, self._earliest_shard = int(float(head)), shard
        return earliest

    def _read(self, count: int, block_ms: int | None = None) -> list[Delivery]:
        client = self._redis()
        shards = self.options.shards
        if block_ms is not None:
            # One blocking read over every stream; Redis Cluster cannot block on keys of several
            # slots, so there a worker blocks on the shard of the earliest timer (the one it must
            # move next) and finds the others' entries when it wakes.
            if self.options.cluster or shards == 1:
                streams = {self._streams[self._earliest_shard]: ">"}
            else:
                streams = dict.fromkeys(self._streams, ">")
            per_stream = max(count // len(streams), 1)
            return self._accept(
                client.xreadgroup(REDIS_GROUP, self._consumer, streams, count=per_stream, block=block_ms)
            )
        deliveries: list[Delivery] = []
        self._first_shard = (self._first_shard + 1) % shards
        for i in range(shards):
            stream = self._streams[(self._first_shard + i) % shards]
            reply = client.xreadgroup(REDIS_GROUP, self._consumer, {stream: ">"}, count=count - len(deliveries))
            deliveries += self._accept(reply)
            if len(deliveries) >= count:
                break
        return deliveries

    def _take_over_idle(self, limit: int) -> list[Delivery]:
        """XAUTOCLAIM what dead workers left behind, with delivery counts for the poison check."""
        deliveries: list[Delivery] = []
        for shard, stream in enumerate(self._streams):
            args = [REDIS_GROUP, self._consumer, self.options.claim_idle_ms, self._claim_cursors[shard]]
            cursor, taken = self._claim(keys=[stream], args=[*args, limit - len(deliveries), FORGET_CONSUMERS_AFTER_MS])
            self._claim_cursors[shard] = cursor.decode()
            entries = [(entry_id, _pairs(fields), int(count)) for entry_id, fields, count in taken]
            deliveries += self._accept_entries(shard, entries)
            if len(deliveries) >= limit:
                break
        # A cursor short of the end means more idle entries may wait: look again on the next receive.
        scanned = all(cursor == "0-0" for cursor in self._claim_cursors)
        self._next_claim_at = time.monotonic() + (self._claim_every_s if scanned else 0.0)
        return deliveries

    def _accept(self, reply: Any) -> list[Delivery]:
        deliveries: list[Delivery] = []
        for stream, entries in reply or []:
            shard = self._shard_of_stream[stream]
            deliveries += self._accept_entries(shard, [(entry_id, fields, 1) for entry_id, fields in entries])
        return deliveries

    def _accept_entries(self, shard: int, entries: list[tuple[bytes, dict[bytes, bytes], int]]) -> list[Delivery]:
        """Timer messages of this deployment become deliveries; wake-ups are dropped; anything else
        (not a timer, another deployment's timer) is dead-lettered with the reason."""
        deliveries: list[Delivery] = []
        drop: list[bytes] = []
        malformed: list[_Rejected] = []
        for entry_id, fields, count in entries:
            if _FIELD_MESSAGE in fields:
                try:
                    message = TimerMessage.decode(fields[_FIELD_MESSAGE])
                except MalformedMessage as exc:
                    malformed.append((shard, entry_id, {**_describe(fields), "reason": str(exc)}))
                    continue
                foreign = self.deployment.foreign(message)
                if foreign is not None:
                    letter = {"order_id": message.order_id, "body": fields[_FIELD_MESSAGE], "reason": foreign}
                    malformed.append((shard, entry_id, letter))
                    owner = str(message.deployment)
                    self._foreign[owner] = self._foreign.get(owner, 0) + 1
                else:
                    deliveries.append(Delivery(message, receipt=(shard, entry_id), deliveries=count))
                continue
            if _FIELD_WAKE in fields:
                drop.append(entry_id)
            else:
                reason = f"entry has no {REDIS_FIELD_MESSAGE!r} field"
                malformed.append((shard, entry_id, {**_describe(fields), "reason": reason}))
        if malformed:
            pipe = self._redis().pipeline(transaction=False)
            for _, entry_id, letter in malformed:
                self._dead_letter(pipe, {**letter, "from": self._source(shard, entry_id)})
            pipe.execute()
            drop += [entry_id for _, entry_id, _ in malformed]
        if drop:
            self._ack({shard: drop})
        return deliveries

    def _ack_later(self, acks: dict[int, list[bytes]], delivery: Delivery) -> None:
        shard, entry_id = delivery.receipt
        acks.setdefault(shard, []).append(entry_id)

    def _ack(self, acks: dict[int, list[bytes]]) -> None:
        if not acks:
            return
        pipe = self._redis().pipeline(transaction=False)
        for shard, ids in acks.items():
            pipe.xack(self._streams[shard], REDIS_GROUP, *ids)
            # Acked entries are of no further use; deleting them keeps the stream's memory flat.
            pipe.xdel(self._streams[shard], *ids)
        pipe.execute()

    def _dead_letter(self, pipe: Any, fields: dict[str, Any]) -> None:
        fields["at_ms"] = self._clock.now_ms()
        pipe.xadd(self._dead, fields, maxlen=self.options.dead_maxlen, approximate=True)

    def _source(self, delivery_or_shard: Delivery | int, entry_id: bytes | None = None) -> str:
        if isinstance(delivery_or_shard, Delivery):
            delivery_or_shard, entry_id = delivery_or_shard.receipt
        assert isinstance(delivery_or_shard, int) and entry_id is not None
        return f"{self._streams[delivery_or_shard]} {entry_id.decode()}"

    # -- figures and lifecycle -------------------------------------------------------------------

    def foreign_consumers(self) -> str | None:
        """Consumers in the groups of the streams of releases before identities (the prefix alone):
        workers not upgraded yet, of this deployment or of another one on this Redis database."""
        if self.namespace == self.options.prefix:
            return None
        found = 0
        with self._edge("figures"):
            client = self._redis()
            for shard in range(self.options.shards):
                legacy = redis_due_key(self.options.prefix, shard)
                if client.exists(legacy):
                    found += sum(int(group["consumers"]) for group in client.xinfo_groups(legacy))
        if not found:
            return None
        legacy = redis_due_key(self.options.prefix, 0)
        return f"{found} consumers on {legacy}…, the streams of releases before identities"

    def clock_offset_ms(self) -> int | None:
        """Redis's TIME minus the registry's clock."""
        with self._edge("time"):
            seconds, microseconds = self._redis().time()
        return int(seconds) * 1000 + int(microseconds) // 1000 - self._clock.now_ms()

    def figures(self) -> dict[str, Any]:
        """Timers per shard, stream lengths, pending entries per consumer, dead letters, mover lag."""
        now = self._clock.now_ms()
        with self._edge("figures"):
            pipe = self._redis().pipeline(transaction=False)
            for timers, stream in zip(self._timers, self._streams, strict=True):
                pipe.zcard(timers)
                pipe.zrange(timers, 0, 0, withscores=True)
                pipe.xlen(stream)
                pipe.xpending(stream, REDIS_GROUP)
            pipe.xlen(self._dead)
            replies = pipe.execute(raise_on_error=False)
        for reply in replies:
            # NOGROUP before any worker has started is an empty shard; anything else is an outage.
            if isinstance(reply, Exception) and "NOGROUP" not in str(reply):
                raise TransportUnavailable(f"redis figures: {reply}")
        timers, heads, lengths, pending = (replies[i:-1:4] for i in range(4))
        by_consumer: dict[str, int] = {}
        for summary in pending:
            for consumer in summary["consumers"] if isinstance(summary, dict) else []:
                name = consumer["name"].decode()
                by_consumer[name] = by_consumer.get(name, 0) + int(consumer["pending"])
        oldest_unmoved = min((int(head[0][1]) for head in heads if head), default=None)
        lag_ms = max(now - oldest_unmoved, 0) if oldest_unmoved is not None else 0
        return {
            "shards": self.options.shards,
            "timers": sum(timers),
            "timers_by_shard": list(timers),
            "stream_length": sum(lengths),
            "pending": sum(by_consumer.values()),
            "pending_by_consumer": by_consumer,
            "dead_letters": replies[-1],
            "unmoved_lag_seconds": lag_ms / 1000,
        }

    def close(self) -> None:
        if self._client is None:
            return
        try:
            if self._consumed:
                # Leave no empty consumer behind in the group (one holding entries stays, for XAUTOCLAIM).
                for stream in self._streams:
                    if not self._client.xpending_range(stream, REDIS_GROUP, "-", "+", 1, self._consumer):
                        self._client.xgroup_delconsumer(stream, REDIS_GROUP, self._consumer)
        except (RedisError, RedisClusterException):
            pass  # best effort: an empty consumer left behind costs a few bytes
        finally:
            self._client.close()
            self._client = None

    def _redis(self) -> Any:
        if self._client is None:
            self._bind()  # the registry first: a registry that cannot be read leaves us unconnected
            self._client = connect(self._url, self.options)
            self._move = self._client.register_script(MOVE_SCRIPT)
            self._claim = self._client.register_script(CLAIM_SCRIPT)
        return self._client

    @contextlib.contextmanager
    def _edge(self, action: str) -> Iterator[None]:
        """Every redis-py error becomes TransportUnavailable here: callers never import redis."""
        try:
            yield
        except (RedisError, RedisClusterException) as exc:
            if "NOGROUP" in str(exc):
                # The stream or its group has gone (Redis restarted empty): create them again next time.
                self._groups_ready = False
            raise TransportUnavailable(f"redis {action}: {exc}") from exc


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _describe(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """A malformed entry's content for the dead-letter stream: the body as it was, or every field."""
    if list(fields) == [_FIELD_MESSAGE]:
        return {"body": fields[_FIELD_MESSAGE]}
    return {"fields": json.dumps({k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()})}
