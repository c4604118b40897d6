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
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from scheduler import registry, validation
from scheduler.clock import Clock, RegistryClock
from scheduler.config import Settings
from scheduler.database import make_engine, reading
from scheduler.errors import InvalidTimeout, TimeoutNotFound
from scheduler.outbox import SCHEDULE_CHUNK, Outbox, transaction
from scheduler.registry import TimeoutRecord, control
from scheduler.registry.control import Pause, PausedBy
from scheduler.transports import TimerMessage, Transport, open_transport


class ScheduleResult(StrEnum):
    CREATED = "created"  #: a new pending timeout
    EXISTS = "exists"  #: the order already had a timeout; nothing changed
    REPLACED = "replaced"  #: replace=True re-armed the existing timeout with the new due time


@dataclass(frozen=True)
class ScheduleSummary:
    created: int
    existing: int
    replaced: int


DueSpec = timedelta | datetime


class OrderTimeouts:
    """The payment timeouts of orders: schedule, cancel, reschedule, fire, inspect.

    Configured from `settings` (or `from_env()`), with `database_url`/`broker_url` overriding them.
    `engine`, `clock` and `transport` replace the ones the settings would build: a shared engine,
    or `scheduler.testing`'s ManualClock and InMemoryTransport in tests. The default clock is the
    registry database's, so that every process of a deployment agrees on when a timeout is due.
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
        self.settings = settings or Settings()
        if database_url is not None:
            self.settings = replace(self.settings, database_url=database_url)
        if broker_url is not None:
            self.settings = replace(self.settings, broker_url=broker_url)
        self.engine = engine or make_engine(self.settings.database_url)
        #: one clock for the fleet: the registry database's (scheduler/clock.py)
        self.clock: Clock = clock or RegistryClock(
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
        due = self._due(delay, due_at)
        versions = self.outbox.write([(oid, due)], connection, replace)
        if oid not in versions:
            return ScheduleResult.EXISTS
        return ScheduleResult.CREATED if versions[oid] == 1 else ScheduleResult.REPLACED

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
        now = self.clock.now_ms()
        shared: int | None = None
        due: dict[str, int] = {}
        for item in orders:
            if isinstance(item, tuple):
                raw_id, spec = item
                oid = validation.order_id(raw_id)
                if isinstance(spec, datetime):
                    due[oid] = self._due(None, spec, now)
                else:
                    due[oid] = self._due(spec, None, now)
            else:
                oid = validation.order_id(item)
                if shared is None:
                    shared = self._due(delay, due_at, now)
                due[oid] = shared
        items = list(due.items())
        written: dict[str, int] = {}
        if connection is None:
            # Chunked transactions of our own: memory stays flat, and each chunk publishes as it commits
            # (timeouts due far enough ahead just before it commits).
            chunks = [items[start : start + SCHEDULE_CHUNK] for start in range(0, len(items), SCHEDULE_CHUNK)]
            written = self.outbox.write_chunks(chunks, replace)
        else:
            written = self.outbox.write(items, connection, replace)
        created = sum(1 for version in written.values() if version == 1)
        return ScheduleSummary(created=created, existing=len(items) - len(written), replaced=len(written) - created)

    def cancel(self, order_id: str, *, connection: Connection | Session | None = None) -> bool:
        """Revoke the order's timeout (payment arrived).

        False when it had already fired or been revoked, or a worker is firing it at this moment (that
        worker's conditional cancel then finds the order paid: the payment wins).
        """
        oid = validation.order_id(order_id)
        now = self.clock.now_ms()
        with transaction(self.engine, connection) as conn:
            revoked = registry.revoke(conn, oid, now=now)
            if not revoked and registry.get(conn, oid) is None:
                raise TimeoutNotFound(f"no timeout is registered for order {oid!r}")
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
        return self._move(oid, self._due(delay, due_at), connection)

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
            replayed = registry.replay_dead(conn, ids, now=now, published=self.outbox.published_on_write)
            if ids is not None and len(replayed) != len(set(ids)):
                missing = sorted(set(ids) - {oid for oid, _ in replayed})
                # Raising rolls the whole replay back: all or nothing.
                raise InvalidTimeout(f"not dead-lettered: {', '.join(missing[:5])}")
            messages = [TimerMessage(oid, now, version) for oid, version in replayed]
            self.outbox.written(conn, messages)
        self.outbox.committed(None, messages)
        return [oid for oid, _ in replayed]

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

    # -- internals ----------------------------------------------------------------------------

    def _due(self, delay: timedelta | None, due_at: datetime | None, now: int | None = None) -> int:
        return validation.due_ms(
            now_ms=self.clock.now_ms() if now is None else now,
            delay=delay,
            due_at=due_at,
            default_delay=self.settings.default_delay,
            max_delay=self.settings.max_delay,
        )

    def _move(self, oid: str, due: int, connection: Connection | Session | None) -> TimeoutRecord:
        now = self.clock.now_ms()
        with transaction(self.engine, connection) as conn:
            version = registry.move_due(conn, oid, due, now=now, published=self.outbox.published_on_write)
            if version is None:
                record = registry.get(conn, oid)
                if record is None:
                    raise TimeoutNotFound(f"no timeout is registered for order {oid!r}")
                raise InvalidTimeout(f"the timeout of order {oid!r} is {record.state.value}, not pending")
            message = TimerMessage(oid, due, version)
            self.outbox.written(conn, [message])
            record = registry.get(conn, oid)
            assert record is not None
        self.outbox.committed(connection, [message])
        return record
