"""The `rabbitmq` transport: a binary cascade of TTL quorum queues dead-lettering into a ready queue
that the workers consume as competing consumers.

    publish ─confirmed─▶ order_timeouts.timers ─▶ delay.NN ─TTL─▶ … ─▶ order_timeouts.ready ─▶ workers
                                                                          │ x-delivery-limit
                                                  dead letters ─────────▶ order_timeouts.dead

The ready, dead-letter and marker queues are the deployment's own, `order_timeouts.<identity>.…`,
and every routing key ends in its identity (keys.RabbitMQNames); the cascade is shared by every
deployment on the vhost. A timer of another deployment that arrives anyway is dead-lettered in
`receive` with the reason, and counted (base.Deployment).
The cascade and why it is built that way: scheduler/transports/rabbitmq/topology.py. The connection
and its I/O thread (heartbeats, windowed publisher confirms): scheduler/transports/rabbitmq/link.py.

Guarantees:
- `publish` returns only when the broker has confirmed every message as routed (`mandatory`); a
  nack, a returned message, a lost connection or an unreachable broker raise TransportUnavailable
  and the registry rows stay unpublished for the relay. Nothing is assumed sent.
- A delivery is acked only in `settle`, after the batch transaction has committed; a worker that
  dies holding deliveries loses its connection and the broker hands them to another worker.
  Prefetch = the batch size. Re-arming (retry) and dead-lettering publish first, confirmed, then
  ack: a crash in between leaves a duplicate, which the handler acks as stale, never a loss.
- `revoke` removes nothing: a queued message cannot be taken out of the middle of a queue. The
  registry says revoked, so the handler acks the timer as stale when it arrives.
- Timers are routed to reach the ready queue between ARRIVE_EARLIEST_MS and ARRIVE_LATEST_MS
  before their due time, and the consumer holds them (unacked, in memory) until they are due. The
  window lets the cascade take fewer hops, and the lead absorbs the cascade's own backlog: each hop
  is a dead-letter the broker performs at a limited rate, and a hop that waits makes the timer late
  by as much. Timers due sooner skip the cascade altogether. Holding costs prefetch slots only: a
  held timer never delays a due one the consumer already has.
- A timer that arrives more than HOLD_MS before its due time (delays beyond the cascade's 38.8
  days, clocks that disagree) is re-armed for what remains rather than held; no timer is handed
  to the handler early, which would ack it as stale.
- Timers published together that take the same route share one message (up to ENVELOPE_MAX, a
  JSON array of timer messages; a single timer is a JSON object). The broker's work is per
  message (a quorum-queue append per hop, CPU bound: the rate is in docs/performance.md), so a
  bulk of 100k timers due together costs it 1,000 messages, not 100k. The message is acked once every
  timer in it is settled (possibly over several batches); a timer of a failed batch is published
  again on its own first (`settle`).
  A shared message that comes back (its worker died, or its batch failed) is split: each timer is
  published again on its own, with the deliveries it had so far in a header, so that a timer that
  kills workers is counted, and dead-lettered, alone and not with the others it travelled with.
- A body that is not a timer message goes to the dead-letter queue with the reason in the
  `order-timeouts-reason` header and is acked inside `receive`; the worker carries on.
- When the broker goes away, `receive`/`publish` raise TransportUnavailable and the next call
  connects again, to another node first when the URL names several (the worker loop backs off in
  between). A publish whose confirms have not all come back when its connection goes, or that a
  queue nacks while it changes leader, has failed: nothing is counted as sent that was not confirmed.
- `lost_timers` reads the marker queue that `timers_restored` fills: a queue missing or empty means
  the broker lost what it held (the cluster rebuilt, the queues deleted), and the relay publishes
  every pending timeout again at once.

URL: `amqp://user:password@host:port[,host:port...]/vhost?option=value`, `amqps://` for TLS; several
hosts are the nodes of one cluster, and a connection goes to the first one that answers, the host
of a lost connection last. The vhost is the URL-quoted path (`%2F` for `/`). Query options are
pika's URLParameters (`heartbeat`, `socket_timeout`, `stack_timeout`, `blocked_connection_timeout`,
`connection_attempts`, `retry_delay`, `ssl_options`, ...), `quorum_group_size` and `dead_maxlen`; this transport
changes only the defaults of a few of pika's, see options.py and docs/transports.md.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import pika
from sqlalchemy import Engine

from scheduler.clock import Clock
from scheduler.errors import MalformedMessage
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
from scheduler.transports.rabbitmq.keys import (
    RABBITMQ_DELIVERIES_HEADER,
    RABBITMQ_REASON_HEADER,
    RABBITMQ_TIMERS_EXCHANGE,
    RabbitMQNames,
)
from scheduler.transports.rabbitmq.link import Inbound, Link, Outgoing
from scheduler.transports.rabbitmq.options import rabbitmq_options
from scheduler.transports.rabbitmq.topology import declarations, fewest_hops, figure_queues, routing_key

log = logging.getLogger("order_timeouts.rabbitmq")

#: seconds to declare the topology once connected (connecting itself has the hosts' stack_timeout each)
CONNECT_TIMEOUT_S = 20.0
#: seconds to wait for the confirms of one publish before it counts as failed
CONFIRM_TIMEOUT_S = 15.0
#: once a delivery is there, wait this long for more to fill the batch
COLLECT_S = 0.005
#: shortest wait of a receive, even with timeout 0 (`worker --burst`): deliveries the broker sends
#: in reply to the previous batch's acks are a round trip away, not absent
MIN_WAIT_S = 0.05
#: timers reach the ready queue this long before they are due, at most and at least (plus the
#: cascade's backlog); the consumer holds them until then
ARRIVE_EARLIEST_MS = 1500
ARRIVE_LATEST_MS = 500
#: a timer arriving earlier than this before its due time is re-armed instead of held
HOLD_MS = 2500
#: most timers in one message
ENVELOPE_MAX = 100

_TIMER = pika.BasicProperties(content_type="application/json", delivery_mode=2)


def _persistent(deliveries: int, headers: dict[str, Any] | None = None) -> pika.BasicProperties:
    """Properties of a JSON message that survives a broker restart and carries its delivery count."""
    headers = {**(headers or {}), RABBITMQ_DELIVERIES_HEADER: deliveries}
    return pika.BasicProperties(content_type="application/json", delivery_mode=2, headers=headers)


def encode_timers(messages: Sequence[TimerMessage]) -> bytes:
    """One timer as a JSON object, several as a JSON array of them."""
    if len(messages) == 1:
        return messages[0].encode()
    return b"[" + b",".join(m.encode() for m in messages) + b"]"


def decode_timers(body: bytes) -> list[TimerMessage]:
    """The timers of a message body; MalformedMessage names what is wrong."""
    stripped = body.lstrip()
    if not stripped.startswith(b"["):
        return [TimerMessage.decode(body)]
    try:
        items = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"body is not JSON: {exc}") from None
    if not items or not isinstance(items, list):
        raise MalformedMessage("an envelope must be a non-empty JSON array of timer messages")
    return [TimerMessage.from_json(item) for item in items]


@dataclass(eq=False)
class _Envelope:
    """One delivered message and the settling of the timers it carries: acked when all are settled."""

    link: Link
    tag: int
    outstanding: int

    def settled(self) -> bool:
        """Count one timer settled; True once the message can be acked."""
        self.outstanding -= 1
        return self.outstanding == 0


@dataclass(order=True)
class _Held:
    """A delivered timer the consumer keeps, unacked, until its due time."""

    due_ms: int
    seq: int  # arrival order among timers due at the same ms (an envelope's share one tag)
    envelope: _Envelope = field(compare=False)
    message: TimerMessage = field(compare=False)
    deliveries: int = field(compare=False)


def _earlier_deliveries(headers: dict[str, Any]) -> int:
    """Deliveries before the message was published again on its own (0 when it never was)."""
    count = headers.get(RABBITMQ_DELIVERIES_HEADER, 0)
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else 0


class RabbitMQTransport(BrokerTransport):
    name = "rabbitmq"

    @classmethod
    def from_url(cls, broker_url: str, engine: Engine, clock: Clock) -> Self:
        return cls(broker_url, clock, engine)

    def __init__(self, broker_url: str, clock: Clock, engine: Engine | None = None) -> None:
        options = rabbitmq_options(broker_url)
        self._options = options
        self._hosts = options.hosts  # the order to try them in: a host whose connection was lost goes last
        self.deployment = Deployment(engine, clock)
        self._names_known: RabbitMQNames | None = None  # once the deployment is known (first connect)
        self._foreign: dict[str, int] = {}  # dead-lettered since the last receive returned, by owner
        self._clock = clock
        self._link: Link | None = None
        self._connecting = threading.RLock()  # publish may be called from many threads
        self._held: list[_Held] = []  # a heap, earliest due first; only the consumer thread touches it
        self._arrivals = itertools.count()

    @property
    def names(self) -> RabbitMQNames:
        """This deployment's queue names and routing-key ending (keys.py); read from the registry once."""
        if self._names_known is None:
            self._names_known = RabbitMQNames(self.deployment.id)
        return self._names_known

    def publish(self, messages: Sequence[TimerMessage]) -> None:
        if messages:
            self._connected().publish(self._timers(messages), CONFIRM_TIMEOUT_S)

    def revoke(self, order_ids: Sequence[str]) -> None:
        """Nothing to remove: the registry says revoked and the timer is acked as stale when it fires."""

    def async_publisher(self) -> AsyncPublisher:
        """The same link, awaited from the event loop (async_publisher.py)."""
        from scheduler.transports.rabbitmq.async_publisher import RabbitMQAsyncPublisher

        return RabbitMQAsyncPublisher(self)

    def _live_link(self) -> Link | None:
        """The open link, if there is one, without waiting for the connecting lock."""
        link = self._link
        return link if link is not None and link.alive else None

    def receive(self, limit: int, timeout: float) -> Batch:
        link = self._connected()
        link.consume(limit)
        deadline = time.monotonic() + max(timeout, MIN_WAIT_S)
        while True:
            deliveries = self._release(limit)
            if deliveries:
                return self._batch(deliveries)
            wait = deadline - time.monotonic()
            if self._held:
                wait = min(wait, (self._held[0].due_ms - self._clock.now_ms()) / 1000)
            self._sort(link, link.take(limit, max(wait, 0.0), COLLECT_S))
            if not self._due() and time.monotonic() >= deadline:
                return self._batch([])

    def _batch(self, deliveries: list[Delivery]) -> Batch:
        batch, self._foreign = Batch(deliveries, foreign=self._foreign), {}
        return batch

    def settle(self, settlement: Settlement) -> None:
        republish = self._timers([message for _, message in settlement.retry])
        republish += [self._dead_letter(d.message.encode(), reason, d.deliveries) for d, reason in settlement.dead]
        # A failed batch (database trouble, a paused fleet) says nothing against its timers: each goes
        # back on its own, due in FAILED_REDELIVERY_MS and carrying the deliveries it had before this
        # one, and this delivery is acked. A nack would requeue it at once, a busy loop for as long as
        # the trouble lasts, and each requeue would count a delivery on the quorum queue: towards the
        # poison limit and the broker's x-delivery-limit, which would dead-letter it.
        again = self._clock.now_ms() + FAILED_REDELIVERY_MS
        for delivery in settlement.failed:
            message = delivery.message
            republish.append(
                self._alone(TimerMessage(message.order_id, again, message.version), delivery.deliveries - 1)
            )
        if republish:
            self._connected().publish(republish, CONFIRM_TIMEOUT_S)
        settled = [
            *settlement.done,
            *(d for d, _ in settlement.retry),
            *(d for d, _ in settlement.dead),
            *settlement.failed,
        ]
        by_link: dict[Link, list[int]] = {}
        for delivery in settled:
            envelope: _Envelope = delivery.receipt
            if envelope.settled():
                by_link.setdefault(envelope.link, []).append(envelope.tag)
        for link, acks in by_link.items():
            # Deliveries of a link that has died were requeued by the broker: nothing to settle.
            if link.alive:
                link.settle(acks, [])

    def figures(self) -> dict[str, Any]:
        """Messages per queue (delay queues that hold any, ready, dead letters) and ready-queue consumers.

        Counts are messages, as the broker knows them: timers published together share one (up to
        ENVELOPE_MAX), so the registry, not these figures, counts pending timeouts."""
        labels = figure_queues(self.names)
        depths = self._connected().queue_depths(list(labels.values()), CONFIRM_TIMEOUT_S)
        figures: dict[str, Any] = {}
        delayed = 0
        for label, queue in labels.items():
            messages, consumers = depths.get(queue, (0, 0))
            if label.startswith("delay_"):
                delayed += messages
                if messages:
                    figures[label] = messages
            else:
                figures[label] = messages
                if label == "ready":
                    figures["consumers"] = consumers
        figures["delayed"] = delayed
        return figures

    def foreign_consumers(self) -> str | None:
        """Consumers of the ready queue of releases before identities (`order_timeouts.ready`): workers
        not upgraded yet, of this deployment or of another one on the vhost."""
        legacy = RabbitMQNames()
        if self.names == legacy:
            return None
        found = self._connected().queue_depths([legacy.ready], CONFIRM_TIMEOUT_S).get(legacy.ready)
        if found is None or not found[1]:
            return None
        return f"{found[1]} consumers on {legacy.ready}, the queue of releases before deployment identities"

    def ready_backlog(self) -> int | None:
        """Messages in the ready queue (each up to ENVELOPE_MAX timers): one passive declare."""
        depth = self._connected().queue_depths([self.names.ready], CONFIRM_TIMEOUT_S).get(self.names.ready)
        return None if depth is None else depth[0]

    def lost_timers(self) -> bool:
        """Whether the marker message `timers_restored` left is gone: the queues were deleted, or the
        cluster lost them all (a reset, a full rebuild). One passive declare on an open channel.

        Losing a node loses nothing of a quorum queue that still has a majority of its replicas: the
        marker stays, like the timers."""
        link = self._connected()
        marker = self.names.marker
        depth = link.queue_depths([marker], CONFIRM_TIMEOUT_S).get(marker)
        if depth is None:
            # The queues were deleted under this connection: the next one declares them again.
            self._drop(link)
            return True
        return depth[0] == 0

    def timers_restored(self) -> None:
        marker: Outgoing = ("", self.names.marker, b"{}", pika.BasicProperties(delivery_mode=2))
        self._connected().publish([marker], CONFIRM_TIMEOUT_S)

    def close(self) -> None:
        with self._connecting:
            if self._link is not None:
                self._link.close()
                self._link = None

    def _connected(self) -> Link:
        with self._connecting:
            if self._link is not None and self._link.alive:
                return self._link
            if self._link is not None:
                self._drop(self._link)
            timeout = CONNECT_TIMEOUT_S + sum(host.stack_timeout or 0.0 for host in self._hosts)
            names = self.names
            topology = declarations(self._options.quorum_group_size, self._options.dead_maxlen, names)
            self._link = Link(self._hosts, topology, timeout, names.ready)
            return self._link

    def _drop(self, link: Link) -> None:
        """Close a link; the next connection tries the host it used last, after the others."""
        link.close()
        if link.host is not None:
            used = (link.host.host, link.host.port)
            self._hosts.sort(key=lambda host: (host.host, host.port) == used)  # stable: the others keep their order
        with self._connecting:
            if self._link is link:
                self._link = None

    def _timers(self, messages: Sequence[TimerMessage]) -> list[Outgoing]:
        """The messages to publish: timers that take the same route share one, ENVELOPE_MAX at most."""
        # The remaining delay is taken from the absolute due time now, at publish: a timer published
        # late (by the relay, after an outage) still lands at its due time, or at once if overdue.
        # Sharing a route means arriving within every one's window before its due time.
        now = self._clock.now_ms()
        routes: dict[int, list[TimerMessage]] = {}
        for message in self.deployment.stamp(messages):
            routes.setdefault(self._delay_ticks(message.due_ms - now), []).append(message)
        outgoing: list[Outgoing] = []
        for ticks, timers in routes.items():
            key = routing_key(ticks, self.names)
            for start in range(0, len(timers), ENVELOPE_MAX):
                body = encode_timers(timers[start : start + ENVELOPE_MAX])
                outgoing.append((RABBITMQ_TIMERS_EXCHANGE, key, body, _TIMER))
        return outgoing

    @staticmethod
    def _delay_ticks(remaining_ms: int) -> int:
        return fewest_hops(remaining_ms - ARRIVE_EARLIEST_MS, remaining_ms - ARRIVE_LATEST_MS)

    def _alone(self, message: TimerMessage, deliveries: int) -> Outgoing:
        """The timer as a message of its own that remembers how often it was delivered before."""
        ticks = self._delay_ticks(message.due_ms - self._clock.now_ms())
        properties = _persistent(deliveries)
        (stamped,) = self.deployment.stamp([message])
        return (RABBITMQ_TIMERS_EXCHANGE, routing_key(ticks, self.names), stamped.encode(), properties)

    def _dead_letter(self, body: bytes, reason: str, deliveries: int) -> Outgoing:
        return (self.names.dead, "", body, _persistent(deliveries, {RABBITMQ_REASON_HEADER: reason}))

    def _due(self) -> bool:
        return bool(self._held) and self._held[0].due_ms <= self._clock.now_ms()

    def _release(self, limit: int) -> list[Delivery]:
        """Held timers that are due now, earliest first."""
        now = self._clock.now_ms()
        deliveries: list[Delivery] = []
        while self._held and self._held[0].due_ms <= now and len(deliveries) < limit:
            held = heapq.heappop(self._held)
            if not held.envelope.link.alive:
                continue  # its connection died: the broker has requeued it for some consumer
            deliveries.append(Delivery(held.message, receipt=held.envelope, deliveries=held.deliveries))
        return deliveries

    def _sort(self, link: Link, inbound: Sequence[Inbound]) -> None:
        """Timers to hold until due; malformed bodies to the dead letters, far too early timers re-armed."""
        handled: list[int] = []
        republish: list[Outgoing] = []
        now = self._clock.now_ms()
        for item in inbound:
            try:
                timers = decode_timers(item.body)
            except MalformedMessage as exc:
                log.warning("malformed message dead-lettered: %s", exc)
                republish.append(self._dead_letter(item.body, f"malformed message: {exc}", item.redeliveries + 1))
                handled.append(item.tag)
                continue
            deliveries = item.redeliveries + _earlier_deliveries(item.headers) + 1
            foreign = [(m, self.deployment.foreign(m)) for m in timers]
            for message, reason in foreign:
                if reason is not None:
                    republish.append(self._dead_letter(message.encode(), reason, deliveries))
                    owner = str(message.deployment)
                    self._foreign[owner] = self._foreign.get(owner, 0) + 1
            timers = [m for m, reason in foreign if reason is None]
            if not timers:
                handled.append(item.tag)
                continue
            if len(timers) > 1 and item.redeliveries > 0:
                republish += [self._alone(message, deliveries - 1) for message in timers]
                handled.append(item.tag)
                continue
            early = [m for m in timers if m.due_ms - now > HOLD_MS]
            republish += self._timers(early)
            hold = [m for m in timers if m.due_ms - now <= HOLD_MS]
            if not hold:
                handled.append(item.tag)
                continue
            envelope = _Envelope(link, item.tag, outstanding=len(hold))
            for message in hold:
                held = _Held(message.due_ms, next(self._arrivals), envelope, message, deliveries)
                heapq.heappush(self._held, held)
        if republish:
            # Confirmed before the ack: a crash in between duplicates the message, never loses it.
            link.publish(republish, CONFIRM_TIMEOUT_S)
            link.settle(handled, [])
