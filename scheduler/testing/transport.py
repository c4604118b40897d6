"""A broker in memory, for tests that should run without servers and without sleeping."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from sqlalchemy import Engine

from scheduler.clock import Clock
from scheduler.errors import MalformedMessage, TransportUnavailable
from scheduler.transports.base import (
    FAILED_REDELIVERY_MS,
    Batch,
    BrokerTransport,
    Delivery,
    Deployment,
    Settlement,
)
from scheduler.transports.message import TimerMessage


@dataclass(frozen=True)
class DeadLetter:
    body: bytes  #: the message as the broker held it
    reason: str


@dataclass
class _Armed:
    due_ms: int
    body: bytes
    deliveries: int = 0  #: deliveries since it was last armed


class InMemoryTransport(BrokerTransport):
    """A broker transport whose timers live in this process, timed by the given clock.

    It keeps the rules of `scheduler.transports.base` the way the real brokers do: a timer is
    delivered once its due time has come by `clock` and never before; publishing again for an
    order replaces its timer (as a Redis sorted set does); a delivery stays in flight until
    `settle`; `crash()` hands every in-flight delivery back, counted, as a broker does when its
    consumer dies; `lose_everything()` empties it as a restart without persistence does, and
    `lost_timers` says so; a body that is not a timer message is dead-lettered inside `receive`.

    `receive` never waits: with a ManualClock, time moves only when the test moves it. Set
    `available = False` to simulate an outage: every call then raises TransportUnavailable.
    """

    name = "memory"

    @classmethod
    def from_url(cls, broker_url: str, engine: Engine, clock: Clock) -> Self:
        return cls(clock)

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        # One broker per test, shared with no other deployment: unbound, nothing is foreign.
        self.deployment = Deployment(None, clock)
        self._lock = threading.Lock()
        self._armed: dict[str, _Armed] = {}  # by order id, or a key of its own for a raw body
        self._in_flight: dict[int, tuple[str, _Armed]] = {}
        self._receipts = itertools.count(1)
        #: every message the transport confirmed, in order, for assertions
        self.published: list[TimerMessage] = []
        self.dead_letters: list[DeadLetter] = []
        self.available = True
        self._marker = True  # a broker that has held its timers all along

    # -- producer side ---------------------------------------------------------------------------

    def publish(self, messages: Sequence[TimerMessage]) -> None:
        with self._lock:
            self._check()
            for message in messages:
                self._armed[message.order_id] = _Armed(message.due_ms, message.encode())
            self.published.extend(messages)

    def publish_raw(self, body: bytes, due_ms: int) -> None:
        """Arm a body as it came from somewhere else: a malformed message, for instance."""
        with self._lock:
            self._armed[f"raw:{next(self._receipts)}"] = _Armed(due_ms, body)

    def revoke(self, order_ids: Sequence[str]) -> None:
        with self._lock:
            self._check()
            for order_id in order_ids:
                self._armed.pop(order_id, None)

    # -- consumer side ---------------------------------------------------------------------------

    def receive(self, limit: int, timeout: float) -> Batch:
        with self._lock:
            self._check()
            now = self._clock.now_ms()
            due = sorted((armed.due_ms, key) for key, armed in self._armed.items() if armed.due_ms <= now)
            deliveries: list[Delivery] = []
            for _, key in due:
                if len(deliveries) >= limit:
                    break
                armed = self._armed.pop(key)
                armed.deliveries += 1
                try:
                    message = TimerMessage.decode(armed.body)
                except MalformedMessage as exc:
                    self.dead_letters.append(DeadLetter(armed.body, f"malformed message: {exc}"))
                    continue
                receipt = next(self._receipts)
                self._in_flight[receipt] = (key, armed)
                deliveries.append(Delivery(message, receipt=receipt, deliveries=armed.deliveries))
            return Batch(deliveries)

    def settle(self, settlement: Settlement) -> None:
        with self._lock:
            self._check()
            now = self._clock.now_ms()
            # Re-arm and dead-letter first, then ack (here: forget the delivery).
            for _, message in settlement.retry:
                self._armed[message.order_id] = _Armed(message.due_ms, message.encode())
            for delivery, reason in settlement.dead:
                self.dead_letters.append(DeadLetter(delivery.message.encode(), reason))
            for delivery in settlement.failed:
                taken = self._in_flight.get(delivery.receipt)
                if taken is not None:  # else crash() has handed it back already
                    key, armed = taken
                    # A fresh delivery soon; a timer armed for the order meanwhile (a reschedule) is kept.
                    self._armed.setdefault(key, _Armed(now + FAILED_REDELIVERY_MS, armed.body))
            settled = [*settlement.done, *(d for d, _ in settlement.retry), *(d for d, _ in settlement.dead)]
            for delivery in [*settled, *settlement.failed]:
                self._in_flight.pop(delivery.receipt, None)

    def crash(self) -> int:
        """The consumer holding the in-flight deliveries died: they are delivered again, counted.
        Returns how many."""
        with self._lock:
            count = len(self._in_flight)
            for key, armed in self._in_flight.values():
                self._armed.setdefault(key, armed)
            self._in_flight.clear()
            return count

    def lose_everything(self) -> None:
        """What a restart without persistence does: every timer, every in-flight delivery and the
        marker of `lost_timers` are gone."""
        with self._lock:
            self._armed.clear()
            self._in_flight.clear()
            self._marker = False

    def lost_timers(self) -> bool:
        with self._lock:
            self._check()
            return not self._marker

    def timers_restored(self) -> None:
        with self._lock:
            self._check()
            self._marker = True

    # -- inspection ------------------------------------------------------------------------------

    def armed(self) -> dict[str, int]:
        """Due time of every armed timer, by order id."""
        with self._lock:
            return {key: armed.due_ms for key, armed in self._armed.items() if not key.startswith("raw:")}

    def figures(self) -> dict[str, Any]:
        with self._lock:
            self._check()
            return {"armed": len(self._armed), "in_flight": len(self._in_flight), "dead": len(self.dead_letters)}

    def close(self) -> None:
        """Nothing to release: the timers stay, as on a broker."""

    def _check(self) -> None:
        if not self.available:
            raise TransportUnavailable("memory: the broker is away (available = False)")
