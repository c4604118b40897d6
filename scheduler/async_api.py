"""`AsyncOrderTimeouts`: the order service's entry point for asyncio code (FastAPI, SQLAlchemy's AsyncSession).

    timeouts = AsyncOrderTimeouts.from_env()
    async with AsyncSession(engine) as session, session.begin():
        session.add(order)
        await timeouts.schedule(order.id, delay=timedelta(minutes=30), connection=session)

The methods and their semantics are `OrderTimeouts`'s; the checks and the statements are the same
code (scheduler/producer.py, Outbox.write_rows), run through `AsyncConnection.run_sync`, so that
every statement goes through an asyncio driver: sqlite+aiosqlite, postgresql+psycopg (async mode)
or postgresql+asyncpg. Nothing here blocks the event loop: broker clients are asyncio ones or run on
a thread of their own (`BrokerTransport.async_publisher`), and the registry clock is read with an
awaited query.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from scheduler import producer, registry, tracing, validation
from scheduler.clock import Clock, RegistryClock
from scheduler.config import Settings
from scheduler.database import READ_ONLY, make_async_engine, make_engine
from scheduler.errors import InvalidTimeout
from scheduler.outbox import SCHEDULE_CHUNK, Outbox
from scheduler.producer import DueSpec, ScheduleResult, ScheduleSummary
from scheduler.registry import TimeoutRecord, sqlite
from scheduler.transports import TimerMessage, Transport, open_transport
from scheduler.transports.base import BrokerTransport

__all__ = ["AsyncOrderTimeouts"]

if TYPE_CHECKING:
    import aiosqlite

log = logging.getLogger("order_timeouts.clock")

#: the caller's transaction: an AsyncSession or AsyncConnection, or None for one of our own
AsyncCaller = AsyncConnection | AsyncSession | None


class AsyncOrderTimeouts(producer.Producer):
    """The payment timeouts of orders, for asyncio callers: `OrderTimeouts` with awaitable methods.

    `engine` is an `AsyncEngine` on the registry database (by default one built from the settings'
    URL, whose driver is switched to its asyncio counterpart: one URL serves the order service and
    the workers). `connection=` takes the caller's `AsyncSession` or `AsyncConnection`: the timeout
    commits or rolls back with the order. With an AsyncSession, broker transports publish right
    after the commit (in a task: `flush()` waits for it); with a bare AsyncConnection the relay does.
    """

    def __init__(
        self,
        database_url: str | None = None,
        broker_url: str | None = None,
        *,
        settings: Settings | None = None,
        engine: AsyncEngine | None = None,
        clock: Clock | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.settings = producer.configured(settings, database_url, broker_url)
        self.engine = engine or make_async_engine(self.settings.database_url)
        #: one clock for the fleet, the registry database's, read by awaited queries (`_now`)
        self.clock = clock or RegistryClock(None, tolerance=self.settings.max_clock_skew)
        # The transport and the outbox see the registry through the engine's synchronous facade: they
        # need its dialect and URL here, and the statements they add inside a write run in run_sync.
        self.transport: Transport = transport or open_transport(
            self.settings.broker_url, self.engine.sync_engine, self.clock
        )
        self.outbox: Outbox = self.transport.outbox(self.engine.sync_engine, self.clock)
        self._hand_over = self.outbox.asyncio(self.engine)
        # A broker transport's names carry the deployment's identity. Publishing reads it awaited
        # (async_outbox.py); the transport's own synchronous calls (its figures, the threaded rq
        # publisher) read it through a small synchronous engine, since the asyncio engine's facade
        # cannot run a query outside SQLAlchemy's greenlet. It connects only if they need it.
        self._identity_engine: Engine | None = None
        if isinstance(self.transport, BrokerTransport):
            url = self.engine.url.render_as_string(hide_password=False)
            self._identity_engine = make_engine(url, pool_size=1)
            self.transport.deployment.read_through(self._identity_engine)

    @classmethod
    def from_env(cls, **overrides: Any) -> AsyncOrderTimeouts:
        return cls(settings=Settings.from_env(**overrides))

    async def flush(self) -> None:
        """Wait until the publishes that AsyncSession commits started have ended."""
        await self._hand_over.flush()

    async def close(self) -> None:
        await self._hand_over.aclose()
        await asyncio.to_thread(self.transport.close)
        await self.engine.dispose()
        if self._identity_engine is not None:
            self._identity_engine.dispose()

    async def __aenter__(self) -> AsyncOrderTimeouts:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # -- producer side -------------------------------------------------------------------------

    async def schedule(
        self,
        order_id: str,
        delay: timedelta | None = None,
        due_at: datetime | None = None,
        *,
        connection: AsyncCaller = None,
        replace: bool = False,
    ) -> ScheduleResult:
        """Schedule the order's payment timeout. Scheduling a pending order again changes nothing
        (returns EXISTS) unless `replace`."""
        oid = validation.order_id(order_id)
        now = await self._now()
        due = self._due(delay, due_at, now)
        with tracing.span("order-timeouts schedule", kind="producer", attributes=self._traced(oid)) as step:
            versions = await self._write([(oid, due)], connection, replace, now, tracing.current_traceparent())
            result = producer.schedule_result(oid, versions)
            step.set_attribute(tracing.OUTCOME, result.value)
        return result

    async def schedule_many(
        self,
        orders: Iterable[str | tuple[str, DueSpec]],
        *,
        delay: timedelta | None = None,
        due_at: datetime | None = None,
        connection: AsyncCaller = None,
        replace: bool = False,
    ) -> ScheduleSummary:
        """Bulk schedule, as `OrderTimeouts.schedule_many`; without `connection`, in chunks of our own."""
        now = await self._now()
        items = self._due_items(orders, delay, due_at, now)
        written: dict[str, int] = {}
        with tracing.span("order-timeouts schedule_many", kind="producer", attributes=self._traced(None)) as step:
            step.set_attribute(tracing.COUNT, len(items))
            trace = tracing.current_traceparent()
            if connection is None:
                for start in range(0, len(items), SCHEDULE_CHUNK):
                    written.update(await self._write(items[start : start + SCHEDULE_CHUNK], None, replace, now, trace))
            else:
                written = await self._write(items, connection, replace, now, trace)
        return producer.schedule_summary(len(items), written)

    async def cancel(self, order_id: str, *, connection: AsyncCaller = None) -> bool:
        """Revoke the order's timeout (payment arrived); False when it had already fired or been
        revoked, or a worker is firing it at this moment (the payment wins there)."""
        oid = validation.order_id(order_id)
        now = await self._now()
        async with self._transaction(connection) as conn:
            revoked = await conn.run_sync(producer.revoke, oid, now=now)
        if revoked:
            await self._hand_over.revoked(connection, [oid])
        return revoked

    async def reschedule(
        self,
        order_id: str,
        delay: timedelta | None = None,
        due_at: datetime | None = None,
        *,
        connection: AsyncCaller = None,
    ) -> TimeoutRecord:
        """Move a pending timeout to a new due time; the old broker copy becomes stale."""
        oid = validation.order_id(order_id)
        now = await self._now()
        return await self._move(oid, self._due(delay, due_at, now), now, connection)

    async def fire(self, order_id: str) -> TimeoutRecord:
        """Make a pending timeout due now."""
        oid = validation.order_id(order_id)
        now = await self._now()
        return await self._move(oid, now, now, None)

    async def get(self, order_id: str) -> TimeoutRecord | None:
        oid = validation.order_id(order_id)
        async with self.engine.connect() as conn:
            reader = await conn.execution_options(**READ_ONLY)
            return await reader.run_sync(registry.get, oid)

    async def replay_dead(self, order_ids: Sequence[str] | None) -> list[str]:
        """Re-arm dead timeouts to fire now: the given orders (all of them must be dead), or all."""
        ids = None if order_ids is None else [validation.order_id(oid) for oid in order_ids]
        now = await self._now()
        async with self.engine.begin() as conn:
            messages = await conn.run_sync(producer.replay_dead, self.outbox, ids, now=now)
        await self._hand_over.committed(None, messages)
        return [message.order_id for message in messages]

    # -- internals ----------------------------------------------------------------------------

    async def _write(
        self, items: list[tuple[str, int]], connection: AsyncCaller, replace: bool, now: int, trace: str | None
    ) -> dict[str, int]:
        if not items:
            return {}
        async with self._transaction(connection) as conn:
            driver = _aiosqlite_in_transaction(conn) if len(items) == 1 and not replace else None
            if driver is None:
                versions, messages = await conn.run_sync(
                    self.outbox.write_rows, items, replace, now=now, trace_context=trace
                )
            else:
                # One new row on aiosqlite, the order service's `schedule()`: one trip to the
                # driver's thread instead of the four SQLAlchemy's adapter makes (registry/sqlite.py).
                ((order_id, due_ms),) = items
                versions = await sqlite.insert_one(
                    driver, order_id, due_ms, now=now, published=self.outbox.published_on_write, trace_context=trace
                )
                messages = await conn.run_sync(self.outbox.rows_written, items, versions)
        await self._hand_over.committed(connection, messages)
        return versions

    async def _move(self, oid: str, due: int, now: int, connection: AsyncCaller) -> TimeoutRecord:
        async with self._transaction(connection) as conn:
            moved: tuple[TimerMessage, TimeoutRecord] = await conn.run_sync(
                producer.move, self.outbox, oid, due, now=now
            )
        message, record = moved
        await self._hand_over.committed(connection, [message])
        return record

    @asynccontextmanager
    async def _transaction(self, connection: AsyncCaller) -> AsyncIterator[AsyncConnection]:
        """The caller's transaction, which we neither commit nor close; or one of our own."""
        if connection is None:
            async with self.engine.begin() as conn:
                yield conn
        elif isinstance(connection, AsyncSession):
            yield await connection.connection()
        elif isinstance(connection, AsyncConnection):
            yield connection
        else:
            raise InvalidTimeout(
                f"connection= takes an AsyncSession or an AsyncConnection, not {type(connection).__name__} "
                "(a synchronous Session or Connection goes with OrderTimeouts)"
            )

    async def _now(self) -> int:
        """The clock's time; a RegistryClock due a reading gets one first, by an awaited query."""
        clock = self.clock
        if isinstance(clock, RegistryClock) and clock.wants_reading():
            clock.record(await self._read_registry_clock())
        return clock.now_ms()

    async def _read_registry_clock(self) -> int | None:
        try:
            if self.engine.dialect.name == "sqlite":
                # SQLite's clock is the timestamp of a file it writes (registry/sqlite.py): off the loop.
                return await asyncio.to_thread(registry.database_now_ms, self.engine.sync_engine)
            async with self.engine.connect() as conn:
                return await conn.run_sync(registry.database_now_ms)
        except Exception as exc:  # any failure to read leaves the last reading in force
            log.warning("could not read the registry's clock, keeping the last reading: %s", exc)
            return None


def _aiosqlite_in_transaction(conn: AsyncConnection) -> aiosqlite.Connection | None:
    """The aiosqlite connection under `conn`, once SQLAlchemy has begun its transaction (and so
    said BEGIN, where the engine's `begin` event says it): a statement sent to it directly then
    commits or rolls back with that transaction."""
    if conn.dialect.driver != "aiosqlite" or not conn.in_transaction():
        return None
    return cast("aiosqlite.Connection", conn.sync_connection.connection.driver_connection)  # type: ignore[union-attr]
