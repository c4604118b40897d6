"""`OrderTimeouts`: the order service's entry point.

    timeouts = OrderTimeouts.from_env()
    with Session(engine) as session, session.begin():
        session.add(order)
        timeouts.schedule(order.id, delay=timedelta(minutes=30), connection=session)
    ...
    timeouts.cancel(order.id)            # payment arrived

The registry row is written in the caller's transaction (the outbox): it commits or rolls back
with the order. Broker transports publish right after commit; a publish that fails leaves the row
unpublished and the relay (`order-timeouts maintain`) publishes it when the broker is back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from scheduler import producer, registry, tracing, validation
from scheduler.clock import Clock, RegistryClock
from scheduler.config import Settings
from scheduler.database import make_engine, reading
from scheduler.outbox import SCHEDULE_CHUNK, Outbox, transaction
from scheduler.producer import DueSpec, ScheduleResult, ScheduleSummary
from scheduler.registry import TimeoutRecord, control
from scheduler.registry.control import Pause, PausedBy
from scheduler.transports import Transport, open_transport

__all__ = ["DueSpec", "OrderTimeouts", "ScheduleResult", "ScheduleSummary"]


class OrderTimeouts(producer.Producer):
    """The payment timeouts of orders: schedule, cancel, reschedule, fire, inspect.

    Configured from `settings` (or `from_env()`), with `database_url`/`broker_url` overriding them.
    `engine`, `clock` and `transport` replace the ones the settings would build: a shared engine,
    or `scheduler.testing`'s ManualClock and InMemoryTransport in tests. The default clock is the
    registry database's, so that every process of a deployment agrees on when a timeout is due.
    The asyncio twin, with the same methods and semantics, is `scheduler.AsyncOrderTimeouts`.
    """

    def __init__(
        self,
        database_url: str | None = None,
        broker_url: str | None = None,
        *,
        settings: Settings | None = None,
        engine: Engine | None = None,
        clock: Clock | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.settings = producer.configured(settings, database_url, broker_url)
        self.engine = engine or make_engine(self.settings.database_url)
        #: one clock for the fleet: the registry database's (scheduler/clock.py)
        self.clock = clock or RegistryClock(
            partial(registry.database_now_ms, self.engine), tolerance=self.settings.max_clock_skew
        )
        self.transport: Transport = transport or open_transport(self.settings.broker_url, self.engine, self.clock)
        #: how this transport's writes reach their timers (scheduler/outbox.py)
        self.outbox: Outbox = self.transport.outbox(self.engine, self.clock)

    @classmethod
    def from_env(cls, **overrides: Any) -> OrderTimeouts:
        return cls(settings=Settings.from_env(**overrides))

    def close(self) -> None:
        self.transport.close()
        self.engine.dispose()

    def __enter__(self) -> OrderTimeouts:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- producer side -------------------------------------------------------------------------

    def schedule(
        self,
        order_id: str,
        delay: timedelta | None = None,
        due_at: datetime | None = None,
        *,
        connection: Connection | Session | None = None,
        replace: bool = False,
    ) -> ScheduleResult:
        """Schedule the order's payment timeout. Scheduling a pending order again changes nothing
        (returns EXISTS) unless `replace`."""
        oid = validation.order_id(order_id)
        due = self._due(delay, due_at, self.clock.now_ms())
        with tracing.span("order-timeouts schedule", kind="producer", attributes=self._traced(oid)) as step:
            versions = self.outbox.write([(oid, due)], connection, replace, tracing.current_traceparent())
            result = producer.schedule_result(oid, versions)
            step.set_attribute(tracing.OUTCOME, result.value)
        return result

    def schedule_many(
        self,
        orders: Iterable[str | tuple[str, DueSpec]],
        *,
        delay: timedelta | None = None,
        due_at: datetime | None = None,
        connection: Connection | Session | None = None,
        replace: bool = False,
    ) -> ScheduleSummary:
        """Bulk schedule: plain ids take `delay`/`due_at`; (id, timedelta | datetime) pairs carry their own.

        Every item is validated before anything is written: one bad item changes nothing.
        """
        items = self._due_items(orders, delay, due_at, self.clock.now_ms())
        with tracing.span("order-timeouts schedule_many", kind="producer", attributes=self._traced(None)) as step:
            step.set_attribute(tracing.COUNT, len(items))
            trace_context = tracing.current_traceparent()
            if connection is None:
                # Chunked transactions of our own: memory stays flat, and each chunk publishes as it
                # commits (timeouts due far enough ahead just before it commits).
                chunks = [items[start : start + SCHEDULE_CHUNK] for start in range(0, len(items), SCHEDULE_CHUNK)]
                written = self.outbox.write_chunks(chunks, replace, trace_context)
            else:
                written = self.outbox.write(items, connection, replace, trace_context)
        return producer.schedule_summary(len(items), written)

    def cancel(self, order_id: str, *, connection: Connection | Session | None = None) -> bool:
        """Revoke the order's timeout (payment arrived).

        False when it had already fired or been revoked, or a worker is firing it at this moment (that
        worker's conditional cancel then finds the order paid: the payment wins).
        """
        oid = validation.order_id(order_id)
        now = self.clock.now_ms()
        with transaction(self.engine, connection) as conn:
            revoked = producer.revoke(conn, oid, now=now)
        if revoked:
            self.outbox.revoked(connection, [oid])
        return revoked

    def reschedule(
        self,
        order_id: str,
        delay: timedelta | None = None,
        due_at: datetime | None = None,
        *,
        connection: Connection | Session | None = None,
    ) -> TimeoutRecord:
        """Move a pending timeout to a new due time; the old broker copy becomes stale."""
        oid = validation.order_id(order_id)
        return self._move(oid, self._due(delay, due_at, self.clock.now_ms()), connection)

    def fire(self, order_id: str) -> TimeoutRecord:
        """Make a pending timeout due now."""
        oid = validation.order_id(order_id)
        return self._move(oid, self.clock.now_ms(), None)

    def get(self, order_id: str) -> TimeoutRecord | None:
        oid = validation.order_id(order_id)
        with reading(self.engine) as conn:
            return registry.get(conn, oid)

    def replay_dead(self, order_ids: Sequence[str] | None) -> list[str]:
        """Re-arm dead timeouts to fire now: the given orders (all of them must be dead), or all."""
        ids = None if order_ids is None else [validation.order_id(oid) for oid in order_ids]
        now = self.clock.now_ms()
        with self.engine.begin() as conn:
            messages = producer.replay_dead(conn, self.outbox, ids, now=now)
        self.outbox.committed(None, messages)
        return [message.order_id for message in messages]

    def pause(self, reason: str) -> tuple[Pause, bool]:
        """Stop every worker from cancelling, from its next batch on; timers stay pending. Returns the
        pause in force and whether this call started it (a pause in force is kept as it is)."""
        with self.engine.begin() as conn:
            return control.pause(conn, reason, PausedBy.OPERATOR, now=self.clock.now_ms())

    def resume(self) -> Pause | None:
        """Lift the fleet's pause (the operator's or the circuit breaker's); returns the lifted one."""
        with self.engine.begin() as conn:
            return control.resume(conn, now=self.clock.now_ms())

    def paused(self) -> Pause | None:
        """The fleet's pause in force, or None."""
        with reading(self.engine) as conn:
            return control.read_pause(conn)

    def publish_unpublished(self, limit: int = 1000) -> int:
        """Publish registry rows the broker has not confirmed, in due order (the relay's step).

        Returns how many were published; raises TransportUnavailable while the broker is down.
        """
        return self.outbox.relay(limit)

    def republish_stranded(self, grace: timedelta, limit: int = 1000) -> int:
        """Publish again pending rows overdue by more than `grace` (the reconciler's step)."""
        return self.outbox.reconcile(grace, limit)

    def republish_held(self, limit: int = 1000) -> int:
        """Publish again timeouts a broker with no backlog holds past their due time, unless the
        fleet is paused (the relay's second step; Outbox.republish_held)."""
        return self.outbox.republish_held(limit, self.paused)

    # -- internals ----------------------------------------------------------------------------

    def _move(self, oid: str, due: int, connection: Connection | Session | None) -> TimeoutRecord:
        now = self.clock.now_ms()
        with transaction(self.engine, connection) as conn:
            message, record = producer.move(conn, self.outbox, oid, due, now=now)
        self.outbox.committed(connection, [message])
        return record
