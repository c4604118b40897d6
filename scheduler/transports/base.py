"""The transport port: where a timeout waits for its due time and how it reaches a worker.

A transport is one folder under `scheduler/transports/` (adapter, options, key names, scripts) and one
line in the scheme table of `scheduler/transports/__init__.py`. It implements `Transport` (the registry
table is the queue) or, for a broker, `BrokerTransport`. The rules every transport keeps are written on
the methods below; the contract suite (tests/contract) holds each of them to these rules.

The consumer side works in three steps, always in this order:

    receive(limit, timeout) ─▶ Batch          outside any database transaction
    handler: one registry transaction         batch.claim() takes the rows still pending and due,
                                              the order store is asked once, outcomes are written
    settle(settlement)                        after the commit: ack, re-arm, dead-letter

Only the worker loop calls `settle`; the handler never touches the broker (dramatiq's rule). Exactly-once
in effect comes from at-least-once delivery here plus the handler's conditional claim: a transport may
deliver a timer twice, late, or after it was revoked or rescheduled, and nothing happens twice. It must
never lose one and never hand one to the handler before its due time.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Self

from sqlalchemy import Connection, Engine

from scheduler import registry
from scheduler.clock import Clock
from scheduler.errors import TransportUnavailable
from scheduler.registry import Claim
from scheduler.registry.control import Pause
from scheduler.transports.message import TimerMessage

if TYPE_CHECKING:
    from scheduler.outbox import Outbox

log = logging.getLogger("order_timeouts.transport")

__all__ = [
    "FAILED_REDELIVERY_MS",
    "AsyncPublisher",
    "Batch",
    "BrokerTransport",
    "Delivery",
    "Deployment",
    "Settlement",
    "TimerMessage",
    "Transport",
]

#: a delivery whose batch transaction failed comes back after this pause, as a fresh delivery
FAILED_REDELIVERY_MS = 1000


@dataclass(frozen=True)
class Delivery:
    """One message handed to this worker; `receipt` is the adapter's handle for ack/nack."""

    message: TimerMessage
    receipt: Any = None
    deliveries: int = 1  #: how many times the broker has delivered it, where it knows


@dataclass
class Batch:
    """What `receive` hands the worker: the delivered timers, and how the handler takes their rows."""

    deliveries: list[Delivery] = field(default_factory=list)
    #: timers of another deployment this receive dead-lettered (never among `deliveries`), by their owner
    foreign: dict[str, int] = field(default_factory=dict)

    def claim(self, conn: Connection, *, now: int, worker: str) -> list[Claim]:
        """Inside the batch transaction: take the registry rows of the delivered timers that are still
        pending and due. A duplicate, revoked or rescheduled delivery takes nothing and is acked."""
        order_ids = sorted({d.message.order_id for d in self.deliveries})
        return registry.claim(conn, order_ids, now=now, worker=worker)

    def __bool__(self) -> bool:
        return bool(self.deliveries)


#: a foreign delivery is logged as an error at most this often per process (with the count since)
FOREIGN_LOG_EVERY_S = 10.0


class Deployment:
    """The deployment a transport is bound to: its registry's identity (registry/control.py), read on
    first use and kept. Broker transports stamp it on every message they publish, namespace their
    names with it where the broker shares names, and dead-letter in `receive` what carries another.

    Built without a registry (`engine` None: tools and tests that only talk to a broker), it is
    unbound: no identity, the names of releases before identities, nothing is foreign.
    """

    def __init__(self, engine: Engine | None, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock
        self._id: str | None = None
        self._foreign_since_log = 0
        self._logged_at = -FOREIGN_LOG_EVERY_S

    @property
    def id(self) -> str | None:
        """The identity; TransportUnavailable while the registry cannot be read (no name is known)."""
        if self._id is None and self._engine is not None:
            from sqlalchemy.exc import SQLAlchemyError

            from scheduler.registry import control

            try:
                self._id = control.deployment_id(self._engine, now=self._clock.now_ms())
            except SQLAlchemyError as exc:
                raise self.unreadable(exc) from exc
        return self._id

    @staticmethod
    def unreadable(error: Exception) -> TransportUnavailable:
        """No name is known while the identity cannot be read: the broker counts as unavailable."""
        return TransportUnavailable(f"the deployment identity cannot be read from the registry: {type(error).__name__}")

    def read_through(self, engine: Engine) -> None:
        """Read the identity through `engine` instead (the asyncio API's synchronous engine)."""
        self._engine = engine

    @property
    def known(self) -> bool:
        """Whether `id` answers without a query (read already, or unbound)."""
        return self._id is not None or self._engine is None

    def adopt(self, identity: str) -> None:
        """The identity as the caller read it: the asyncio API reads it through its own engine, whose
        synchronous facade cannot run a query outside SQLAlchemy's greenlet."""
        self._id = identity

    def stamp(self, messages: Sequence[TimerMessage]) -> list[TimerMessage]:
        """The messages as this deployment publishes them: carrying its identity."""
        identity = self.id
        return [m if m.deployment == identity else replace(m, deployment=identity) for m in messages]

    def foreign(self, message: TimerMessage) -> str | None:
        """The dead-letter reason of a timer that belongs to another deployment (None for ours, and for
        one without an identity: a message of an earlier release, in names only ours use).

        Logged as an error, at most every FOREIGN_LOG_EVERY_S: a foreign timer means two
        deployments' workers share names on the broker (docs/operations.md)."""
        if not message.foreign_to(self.id):
            return None
        reason = f"foreign: timer of deployment {message.deployment}, delivered to deployment {self.id}"
        self._foreign_since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= FOREIGN_LOG_EVERY_S:
            log.error(
                "%d foreign timers dead-lettered (latest: order %s of deployment %s); this is deployment %s:"
                " two deployments share broker names, see docs/operations.md",
                self._foreign_since_log,
                message.order_id,
                message.deployment,
                self.id,
            )
            self._foreign_since_log, self._logged_at = 0, now
        return reason


@dataclass
class Settlement:
    """What the handler decided for a batch, for the transport to carry out after commit."""

    done: list[Delivery] = field(default_factory=list)  #: ack: handled, duplicate or stale
    retry: list[tuple[Delivery, TimerMessage]] = field(default_factory=list)  #: re-arm at a later due, then ack
    dead: list[tuple[Delivery, str]] = field(default_factory=list)  #: dead-letter with the reason, then ack
    failed: list[Delivery] = field(default_factory=list)  #: the transaction failed: deliver again
    claimed: int = 0  #: registry rows this batch took
    rolled_back: bool = False  #: the batch transaction failed; nothing it decided holds
    #: what could not be reached when the batch was handed back whole (the registry database, the order
    #: store): an outage, which the worker backs off from; nothing was decided and no attempt counted
    unavailable: str | None = None
    #: the fleet is paused: the batch was handed back whole before its claim (`failed`, rolled back)
    #: and the worker waits for `resume`; like an outage, it spends no attempt and no delivery count
    paused: Pause | None = None


class Transport(ABC):
    """A timer and a delivery channel for timeouts.

    Adapters convert their client library's errors at their edge: a broker that cannot be reached
    raises `TransportUnavailable`, a message that cannot be read `MalformedMessage`. Callers never
    import redis, pika or rq to catch errors.
    """

    #: short name shown by the CLI and the logs: sql, redis, rabbitmq, rq
    name: ClassVar[str]

    @property
    def component(self) -> str:
        """What the logs call this transport when it cannot be reached."""
        return f"the {self.name} broker"

    @classmethod
    @abstractmethod
    def from_url(cls, broker_url: str, engine: Engine, clock: Clock) -> Self:
        """The transport for this broker URL (options in its query string, see docs/transports.md).

        Connect lazily, on first use: a broker that is down must not break the start-up of a
        process that could otherwise work (the API writes to the registry, the relay catches up).
        Bad options raise ConfigurationError here, naming the option."""

    @abstractmethod
    def outbox(self, engine: Engine, clock: Clock) -> Outbox:
        """How a registry write reaches this transport's timer (scheduler/outbox.py): inside the
        registry itself, or published after the commit with the relay as backstop. Chosen here, once;
        the API, the handler, the worker and the CLI only ever talk to the outbox it returns."""

    @abstractmethod
    def receive(self, limit: int, timeout: float) -> Batch:
        """Wait at most `timeout` seconds (0: do not wait) for due timeouts; return up to `limit`.

        Rules:
        - Nothing before its due time. A timer the broker hands over early is held until it is due
          or armed again for what remains; it is never given to the handler early (the handler would
          find its row not yet due and ack it as stale: the timer would be lost).
        - At-least-once. A timer stays the transport's until `settle` acks it: a worker that dies
          holding it (process killed, connection lost) leaves it to be delivered again to another
          worker, within a bounded time.
        - A body that is not a timer message is dead-lettered with the reason, inside `receive`, and
          the worker carries on: it never reaches the handler and never stops the loop.
        - Where the broker counts deliveries, `Delivery.deliveries` carries the count, so that the
          handler can dead-letter a timer that keeps killing workers.
        - A timer of another deployment (`Deployment.foreign`) is dead-lettered with the reason, inside
          `receive`, and counted in `Batch.foreign`: acked as stale it would be lost to its owner
          until the owner's reconciler. A timer without an identity (an earlier release) is ours.
        """

    @abstractmethod
    def settle(self, settlement: Settlement) -> None:
        """Carry out what the batch decided, after its transaction committed (or rolled back).

        Rules:
        - Re-arm before ack: `retry` timers are armed again at their new due time and `dead` ones
          written to the dead letters with their reason first, then their deliveries are acked. A
          crash in between leaves a duplicate, which the handler acks as stale, never a loss.
        - `failed` deliveries (the batch transaction rolled back: database trouble, or a paused fleet,
          which say nothing against the message) come back soon, as fresh deliveries (FAILED_REDELIVERY_MS), without
          counting towards the poison limit; a later due time published meanwhile is kept.
        - `done` deliveries are acked and leave nothing behind on the broker.
        """

    def figures(self) -> dict[str, Any]:
        """Broker-side depths and lags for `stats` (empty for what the registry already gives)."""
        return {}

    def probe(self, registry_problem: str | None) -> None:
        """Raise TransportUnavailable when this transport cannot be used now (`order-timeouts check`).

        `registry_problem` is what the same check found wrong with the registry database, for a
        transport that lives in it."""
        self.figures()

    def foreign_consumers(self) -> str | None:
        """For `check`: consumers this broker shows on names another deployment's workers read where
        this deployment's could have been (the names of releases before identities), described;
        None when there are none or the transport has no shared names."""
        return None

    def clock_offset_ms(self) -> int | None:
        """The broker's clock minus the registry's, for `check` (None where the broker has no clock
        to read). No transport decides by the broker's clock; a broker far off it is reported."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release connections; the transport may be used again afterwards (it reconnects)."""


class AsyncPublisher(ABC):
    """A broker transport's producer side for asyncio callers (`BrokerTransport.async_publisher`).

    The rules of `BrokerTransport.publish` and `revoke` hold as written there; errors are converted
    at the edge in the same way (TransportUnavailable). Nothing here may block the event loop.
    """

    @abstractmethod
    async def publish(self, messages: Sequence[TimerMessage]) -> None:
        """Return once the broker has confirmed every message (raise otherwise)."""

    @abstractmethod
    async def revoke(self, order_ids: Sequence[str]) -> None:
        """Best-effort removal of timers, as `BrokerTransport.revoke`."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release what this publisher holds; it may be used again afterwards (it reconnects)."""


class BrokerTransport(Transport):
    """A transport whose timers live on a broker: writes publish after their commit (`AfterCommit`).

    Rules for the producer side:
    - Every message carries the deployment's identity (`Deployment.stamp`), and where deployments
      could share the broker's names (a Redis database, a RabbitMQ vhost) the names carry it too, so
      that two registries on one broker never see each other's timers. A broker whose names and
      messages cannot carry it (rq) owns its names instead: a process of another deployment is
      refused with ForeignNames.
    - `publish` returns only once the broker has confirmed every message (raise otherwise): a
      message is never assumed sent. The caller then marks its rows published; rows left unmarked
      are published again by the relay.
    - Publishing is idempotent per order: a second message for the same order (the relay after a
      lost confirm, a reschedule, a replay) may add a duplicate timer or replace the first, never
      anything worse; the registry's version and due time decide what a delivery means.
    - A timer published late (the relay after an outage, an overdue reschedule) is delivered at once.
    """

    #: the deployment this transport's names and messages belong to (set by each adapter)
    deployment: Deployment

    def outbox(self, engine: Engine, clock: Clock) -> Outbox:
        from scheduler.outbox import AfterCommit

        return AfterCommit(self, engine, clock)

    @abstractmethod
    def publish(self, messages: Sequence[TimerMessage]) -> None:
        """Hand timers to the broker and return once it has confirmed all of them (raise otherwise)."""

    def async_publisher(self) -> AsyncPublisher:
        """`publish` and `revoke` for the asyncio API (`AsyncOrderTimeouts`), with the same rules.

        The default runs this transport's own `publish`/`revoke` on one thread of its own, so that
        the event loop never waits on the broker's socket and the client library is used from one
        thread only. A transport with an asyncio client of its own returns a native publisher."""
        from scheduler.async_outbox import ThreadedPublisher

        return ThreadedPublisher(self)

    def ready_backlog(self) -> int | None:
        """How many messages are due and waiting for a worker on the broker now; None when this
        transport cannot tell (then overdue timers are left to the reconciler's grace). Raise
        TransportUnavailable while the broker cannot be reached."""
        return None

    def lost_timers(self) -> bool:
        """Whether the broker may have lost timers it once confirmed: it came back empty (a restart
        without persistence, a node reset, a flush) or another node took over from one that had not
        replicated everything (asynchronous replication). Read-only: answers the same until
        `timers_restored`. Raise TransportUnavailable while the broker cannot be reached.

        The relay asks before each run; on True it hands every pending timeout back to itself for
        publishing (registry.unpublish_pending), then calls `timers_restored`. A broker that cannot
        tell answers False and leaves such losses to the reconciler's grace period."""
        return False

    def timers_restored(self) -> None:
        """Record on the broker that it holds its timers again (the marker `lost_timers` reads), so
        that it answers False until the broker loses state again."""

    @abstractmethod
    def revoke(self, order_ids: Sequence[str]) -> None:
        """Best-effort removal of timers. The registry already says revoked, so a copy that still
        fires is acked as stale; a broker that cannot take a message out of a queue does nothing."""
