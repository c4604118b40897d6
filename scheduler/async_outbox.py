"""The outbox's after-commit step for asyncio callers (`AsyncOrderTimeouts`).

The rows are written by the same statements as the synchronous API's (`Outbox.write_rows`, run
through `AsyncConnection.run_sync`); what differs is only what follows the commit, chosen once per
transport by `Outbox.asyncio`:

- `InRegistry` transports: nothing (`NothingAfterCommit`), as in the synchronous API.
- `AfterCommit` transports (`AsyncAfterCommit`): the messages go to the broker through the
  transport's `AsyncPublisher`, awaited, then their rows are marked published. A broker that is down
  never fails the caller: its rows stay unpublished, the relay publishes them later, and the outage's
  backoff is the one the synchronous outbox keeps for this transport.

When the caller's transaction is an `AsyncSession`, its commit is the moment: the publish runs as a
task started from the session's after_commit event, so the order's commit never waits for the
broker; `flush()` waits for those tasks, and `aclose()` does before it closes. A task lost with its
process (a crash right after the commit) leaves its rows unpublished: the relay covers them.
With an `AsyncConnection` there is no after-commit hook: the relay publishes its rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from scheduler import registry, tracing
from scheduler.clock import Clock
from scheduler.errors import TransportUnavailable
from scheduler.outbox import after_commit
from scheduler.registry import control
from scheduler.transports.base import AsyncPublisher, BrokerTransport
from scheduler.transports.message import TimerMessage

if TYPE_CHECKING:
    from scheduler.outbox import AfterCommit

log = logging.getLogger("order_timeouts.outbox")

#: the caller's transaction in the asyncio API, or None for one of our own
AsyncCaller = AsyncConnection | AsyncSession | None
T = TypeVar("T")


class AsyncHandOver:
    """What follows an asyncio write's commit; the base does nothing (the registry is the queue)."""

    async def committed(self, connection: AsyncCaller, messages: Sequence[TimerMessage]) -> None:
        """After the write: publish once the caller's transaction has committed."""

    async def revoked(self, connection: AsyncCaller, order_ids: Sequence[str]) -> None:
        """After a revoke: remove the timers once the caller's transaction has committed."""

    async def flush(self) -> None:
        """Wait for the publishes started by AsyncSession commits that are still under way."""

    async def aclose(self) -> None:
        """Flush, then release the broker clients."""


class NothingAfterCommit(AsyncHandOver):
    """The registry table is the queue: a committed row is the timer."""


class AsyncAfterCommit(AsyncHandOver):
    """A broker holds the timers: publish after commit with an asyncio client, mark published on confirm."""

    def __init__(self, outbox: AfterCommit, publisher: AsyncPublisher, engine: AsyncEngine, clock: Clock) -> None:
        self._outbox = outbox
        self._publisher = publisher
        self._engine = engine
        self._clock = clock
        #: the after-commit tasks of AsyncSession commits; a reference keeps each alive until it ends
        self._tasks: set[asyncio.Task[None]] = set()

    async def committed(self, connection: AsyncCaller, messages: Sequence[TimerMessage]) -> None:
        if messages:
            await self._after_commit(connection, partial(self.publish, list(messages)))

    async def revoked(self, connection: AsyncCaller, order_ids: Sequence[str]) -> None:
        if order_ids:
            await self._after_commit(connection, partial(self._remove_timers, list(order_ids)))

    async def publish(self, messages: Sequence[TimerMessage]) -> None:
        """Publish and mark published; a broker that is down leaves the rows to the relay."""
        if self._outbox.quiet():
            return
        attributes = self._outbox.span_attributes(messages)
        with tracing.span("order-timeouts publish", kind="producer", attributes=attributes) as step:
            try:
                await self._know_deployment()
                await self._publisher.publish(messages)
            except TransportUnavailable as exc:
                self._outbox.publish_failed(exc)
                step.set_attribute(tracing.OUTCOME, "left for the relay")
                return
            step.set_attribute(tracing.OUTCOME, "published")
        self._outbox.publish_succeeded()
        versions = [(m.order_id, m.version) for m in messages]
        async with self._engine.begin() as conn:
            await conn.run_sync(registry.mark_published, versions, now=self._clock.now_ms())

    async def _know_deployment(self) -> None:
        """The deployment's identity, which the broker's names and messages carry: read once, here,
        through the asyncio engine, before a publisher (or its thread) needs it."""
        deployment = self._outbox.transport.deployment
        if deployment.known:
            return
        try:
            async with self._engine.begin() as conn:
                identity = await conn.run_sync(lambda sync: control.ensure_deployment(sync, now=self._clock.now_ms()))
        except SQLAlchemyError as exc:
            raise deployment.unreadable(exc) from exc
        deployment.adopt(identity)

    async def flush(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        await self.flush()
        await self._publisher.aclose()

    async def _after_commit(self, connection: AsyncCaller, action: Callable[[], Awaitable[None]]) -> None:
        if connection is None:
            await action()  # our own transaction has committed already
        elif isinstance(connection, AsyncSession):
            # The session's after_commit event runs inside its commit, on the event loop's thread:
            # it starts the task, which runs once the commit has returned. Dropped on rollback.
            after_commit(connection.sync_session, partial(self._start, action))

    def _start(self, action: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(action))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, action: Callable[[], Awaitable[None]]) -> None:
        try:
            await action()
        except Exception as exc:  # nobody awaits this task: whatever failed is the relay's to cover
            log.warning("publishing after an AsyncSession commit failed, left for the relay: %s", exc)

    async def _remove_timers(self, order_ids: Sequence[str]) -> None:
        if self._outbox.quiet():
            return  # harmless, as in AfterCommit.revoke_failed
        try:
            await self._know_deployment()
            await self._publisher.revoke(order_ids)
        except TransportUnavailable as exc:
            self._outbox.revoke_failed(order_ids, exc)


class ThreadedPublisher(AsyncPublisher):
    """A broker transport's own synchronous `publish`/`revoke`, run on one thread of its own.

    The event loop awaits the thread and never blocks on the broker's socket; the one thread keeps
    the client library (pika's BlockingConnection, redis-py's pool as RQ uses it) to a single thread,
    as those clients require. The default for transports without an asyncio client."""

    def __init__(self, transport: BrokerTransport) -> None:
        self._transport = transport
        self._thread: ThreadPoolExecutor | None = None

    async def publish(self, messages: Sequence[TimerMessage]) -> None:
        await self._run(self._transport.publish, list(messages))

    async def revoke(self, order_ids: Sequence[str]) -> None:
        await self._run(self._transport.revoke, list(order_ids))

    async def aclose(self) -> None:
        # The transport itself is closed by its owner (AsyncOrderTimeouts.close), after this.
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="order-timeouts-async-publish")
        return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)
