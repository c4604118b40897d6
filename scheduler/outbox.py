"""How a registry write reaches the transport's timer: the outbox.

The registry row is written in the caller's transaction, so the timeout commits or rolls back with
the order. What happens next depends on where the timer lives, and the transport decides it once
(`Transport.outbox`):

- `InRegistry`: the registry table is the queue (the `sql` transport). Rows are written already
  published; a write only wakes sleeping workers, from inside the transaction, so that the wake-up
  is delivered at commit and dropped on rollback.
- `AfterCommit`: a broker holds the timer. Rows are written unpublished; right after the commit the
  messages go to the broker and, once it has confirmed them, their rows are marked published. Any
  failure in between (the broker down, a crash, a bare Connection that has no after-commit hook)
  leaves rows unpublished, and the relay (`order-timeouts maintain`) publishes them later; the
  reconciler publishes again rows overdue for longer than a grace period, in case the broker lost them.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from time import monotonic
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import Session

from scheduler import registry, tracing
from scheduler.clock import Clock
from scheduler.database import reading
from scheduler.errors import TransportUnavailable
from scheduler.outage import Outage
from scheduler.transports.message import TimerMessage

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from scheduler.async_outbox import AsyncHandOver
    from scheduler.transports.base import BrokerTransport

log = logging.getLogger("order_timeouts.outbox")

#: rows per INSERT round trip in schedule_many
SCHEDULE_CHUNK = 5000
#: schedule_many hands a chunk to the broker before its commit when every timeout in it is due at
#: least this far ahead (see AfterCommit._write_published_ahead)
PUBLISH_AHEAD_MS = 30_000
_SESSION_KEY = "order_timeouts_unpublished"
#: a timeout overdue by this much while nothing waits on the broker's ready side is held where it
#: should not be (see AfterCommit.republish_held)
HELD_GRACE = timedelta(seconds=3)

#: the caller's transaction: a SQLAlchemy Session or Connection, or None for one of our own
Caller = Connection | Session | None
DueItems = Sequence[tuple[str, int]]


class Outbox(ABC):
    """Writes registry rows and sees that each reaches the timer, whatever fails on the way."""

    #: rows count as published as soon as they are written (the registry is the queue)
    published_on_write: bool

    def __init__(self, engine: Engine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock

    # -- the write paths ------------------------------------------------------------------------

    def write(
        self, items: DueItems, connection: Caller, replace: bool, trace_context: str | None = None
    ) -> dict[str, int]:
        """Insert timeouts in the caller's transaction (or one of our own); return {order_id: version}
        of those created or, with `replace`, re-armed. Existing rows are left alone otherwise."""
        if not items:
            return {}
        with transaction(self.engine, connection) as conn:
            versions, messages = self.write_rows(
                conn, items, replace, now=self.clock.now_ms(), trace_context=trace_context
            )
        self.committed(connection, messages)
        return versions

    def write_rows(
        self, conn: Connection, items: DueItems, replace: bool, *, now: int, trace_context: str | None = None
    ) -> tuple[dict[str, int], list[TimerMessage]]:
        """The part of a write inside the transaction, for both APIs (the asyncio one runs it through
        `AsyncConnection.run_sync`): the rows, then what the transport does before the commit."""
        versions = registry.insert_many(
            conn, items, now=now, published=self.published_on_write, replace=replace, trace_context=trace_context
        )
        return versions, self.rows_written(conn, items, versions)

    def rows_written(self, conn: Connection, items: DueItems, versions: dict[str, int]) -> list[TimerMessage]:
        """Once the rows of a write are in, still inside its transaction: their messages, and what the
        transport does before the commit."""
        messages = _messages(items, versions)
        self.written(conn, messages)
        return messages

    def write_chunks(
        self, chunks: Sequence[DueItems], replace: bool, trace_context: str | None = None
    ) -> dict[str, int]:
        """`schedule_many` without a caller's transaction: each chunk is a transaction of its own."""
        written: dict[str, int] = {}
        for chunk in chunks:
            written.update(self.write(chunk, None, replace, trace_context))
        return written

    # -- what each kind of transport does around a write ------------------------------------------

    @abstractmethod
    def written(self, conn: Connection, messages: Sequence[TimerMessage]) -> None:
        """Inside the writing transaction, after the rows of these messages were written."""

    @abstractmethod
    def committed(self, connection: Caller, messages: Sequence[TimerMessage]) -> None:
        """After the write: publish once the caller's transaction has committed."""

    @abstractmethod
    def revoked(self, connection: Caller, order_ids: Sequence[str]) -> None:
        """After a revoke: remove the timers once the caller's transaction has committed."""

    @abstractmethod
    def rearmed(self, messages: Sequence[TimerMessage]) -> None:
        """The worker has re-armed these timers with the transport (retries, after `settle`)."""

    @abstractmethod
    def asyncio(self, engine: AsyncEngine) -> AsyncHandOver:
        """The after-commit step of the asyncio API (scheduler/async_outbox.py) for this transport."""

    # -- the maintenance steps ------------------------------------------------------------------

    def relay(self, limit: int) -> int:
        """Publish rows the transport has not confirmed, in due order; return how many."""
        return 0

    def reconcile(self, grace: timedelta, limit: int) -> int:
        """Publish again pending rows overdue by more than `grace`; return how many."""
        return 0

    def republish_held(self, limit: int, paused: Callable[[], object]) -> int:
        """Publish again, sooner than the reconciler, timeouts the broker holds back; return how many.
        Nothing while `paused()` answers a pause (asked only when something would be published)."""
        return 0


class InRegistry(Outbox):
    """The registry table is the queue: a committed row is the timer."""

    published_on_write = True

    def __init__(self, engine: Engine, clock: Clock, wake: Callable[[Connection, int], None]) -> None:
        super().__init__(engine, clock)
        self._wake = wake

    def written(self, conn: Connection, messages: Sequence[TimerMessage]) -> None:
        if messages:
            self._wake(conn, min(m.due_ms for m in messages))

    def committed(self, connection: Caller, messages: Sequence[TimerMessage]) -> None:
        """Nothing to hand over: the committed row is the timer."""

    def revoked(self, connection: Caller, order_ids: Sequence[str]) -> None:
        """The row's state is the timer: nothing else to remove."""

    def rearmed(self, messages: Sequence[TimerMessage]) -> None:
        """The handler's retry wrote the row's new due time: that is the re-armed timer."""

    def asyncio(self, engine: AsyncEngine) -> AsyncHandOver:
        from scheduler.async_outbox import NothingAfterCommit

        return NothingAfterCommit()


class AfterCommit(Outbox):
    """A broker holds the timers: publish after commit, mark published on confirm, relay the rest."""

    published_on_write = False

    def __init__(self, transport: BrokerTransport, engine: Engine, clock: Clock) -> None:
        super().__init__(engine, clock)
        self.transport = transport
        # While the broker is down, writes leave their timers to the relay without trying it for a
        # while (one log line per outage): an order service's requests do not each wait for a
        # connect timeout.
        self._outage = Outage(log)
        self._outage_lock = threading.Lock()
        self._quiet_until = 0.0

    def written(self, conn: Connection, messages: Sequence[TimerMessage]) -> None:
        """Nothing inside the transaction: the broker must not see a timer before its row commits."""

    def committed(self, connection: Caller, messages: Sequence[TimerMessage]) -> None:
        if messages:
            after_commit(connection, lambda: self.publish(messages))

    def revoked(self, connection: Caller, order_ids: Sequence[str]) -> None:
        if order_ids:
            after_commit(connection, lambda: self._remove_timers(order_ids))

    def rearmed(self, messages: Sequence[TimerMessage]) -> None:
        # The broker holds the re-armed timer now; until this commits the relay would resend it.
        if messages:
            self.mark_published(messages)

    def asyncio(self, engine: AsyncEngine) -> AsyncHandOver:
        from scheduler.async_outbox import AsyncAfterCommit

        return AsyncAfterCommit(self, self.transport.async_publisher(), engine, self.clock)

    def publish(self, messages: Sequence[TimerMessage]) -> None:
        """Publish and mark published; a broker that is down leaves the rows to the relay (logged
        once per outage). During an outage's backoff a write does not try the broker at all."""
        if self.quiet():
            return
        with tracing.span("order-timeouts publish", kind="producer", attributes=self.span_attributes(messages)) as step:
            sent = self._send(messages)
            step.set_attribute(tracing.OUTCOME, "published" if sent else "left for the relay")
        if sent:
            self.mark_published(messages)

    def mark_published(self, messages: Sequence[TimerMessage]) -> None:
        """Record that the broker confirmed these messages (only their current version counts)."""
        with self.engine.begin() as conn:
            registry.mark_published(conn, [(m.order_id, m.version) for m in messages], now=self.clock.now_ms())

    def relay(self, limit: int) -> int:
        """Raises TransportUnavailable while the broker is down.

        A broker that lost its timers (BrokerTransport.lost_timers) gets every pending timeout again,
        at once, instead of after the reconciler's grace: the rows become unpublished in the registry
        first and the broker's marker is written after, so a crash in between only repeats the step."""
        with tracing.span("order-timeouts relay", attributes={tracing.TRANSPORT: self.transport.name}) as step:
            if self.transport.lost_timers():
                with self.engine.begin() as conn:
                    again = registry.unpublish_pending(conn)
                log.warning(
                    "the %s broker lost its timers: publishing all %d pending again", self.transport.name, again
                )
                self.transport.timers_restored()
            with reading(self.engine) as conn:
                rows = registry.unpublished(conn, limit=limit)
            published = self._publish_or_raise([TimerMessage(*row) for row in rows])
            step.set_attribute(tracing.COUNT, published)
            return published

    def reconcile(self, grace: timedelta, limit: int) -> int:
        """Covers a broker that lost its data or a message lost anywhere on the way: the handler's
        conditional claim makes the second copy harmless when the first one was only slow."""
        before = self.clock.now_ms() - int(grace.total_seconds() * 1000)
        with reading(self.engine) as conn:
            rows = registry.stranded(conn, before_ms=before, limit=limit)
        if rows:
            log.warning("republishing %d timeouts overdue by more than %s", len(rows), grace)
        return self._publish_or_raise([TimerMessage(*row) for row in rows])

    def republish_held(self, limit: int, paused: Callable[[], object]) -> int:
        """Timeouts overdue by more than HELD_GRACE while the broker has none ready for a worker.

        Workers keep up when nothing is ready, so a timeout that is overdue then is held where it
        should not be: in a delay queue whose dead-lettering stalled when a cluster node was lost, or
        with a worker that froze before it claimed it. Publishing it again now brings it to a worker
        within seconds instead of the reconciler's grace; the handler's conditional claim makes the
        second copy harmless if the first one comes out too. While a backlog waits on the broker,
        overdue timeouts are expected and only the reconciler's grace applies; so they are while the
        fleet is paused. A transport that cannot tell its backlog (`ready_backlog` None) is left to
        the reconciler."""
        if self.transport.ready_backlog() != 0 or paused() is not None:
            return 0
        return self.reconcile(HELD_GRACE, limit)

    def write_chunks(
        self, chunks: Sequence[DueItems], replace: bool, trace_context: str | None = None
    ) -> dict[str, int]:
        if self._publishes_ahead(chunks, replace):
            return self._write_published_ahead(chunks, trace_context)
        if len(chunks) < 2:
            return super().write_chunks(chunks, replace, trace_context)
        return self._write_overlapped(chunks, replace, trace_context)

    def _publishes_ahead(self, chunks: Sequence[DueItems], replace: bool) -> bool:
        """Whether the timeouts of these chunks may be handed to the broker before their rows commit
        (see `_write_published_ahead`): all new, all due PUBLISH_AHEAD_MS or more from now, and the
        registry on a database whose open transaction does not hold up other writers."""
        return (
            not replace
            and any(chunks)
            and not registry.one_writer_at_a_time(self.engine)
            and min(due for chunk in chunks for _, due in chunk) - self.clock.now_ms() >= PUBLISH_AHEAD_MS
        )

    def _write_published_ahead(self, chunks: Sequence[DueItems], trace_context: str | None) -> dict[str, int]:
        """Each chunk's rows are inserted already stamped published, handed to the broker, and only
        then committed: no second statement per row to record the broker's confirmation (on
        PostgreSQL that UPDATE costs more than the insert). This thread inserts chunk k+1 while the
        publisher publishes and commits chunk k.

        Why it is safe. Every message is of a new row (no `replace`: an existing row is left alone
        and gets no message), and due PUBLISH_AHEAD_MS or more after now, so no broker delivers it
        before the commit. A crash or a failed commit after the publish leaves timers of rows that
        do not exist: they fire into nothing (the claim finds no row and acks them), and scheduling
        the orders again writes them anew. A publish that fails rolls its chunk back and writes it
        the usual way: committed, then published or left to the relay. A chunk that comes due
        sooner by the time its turn comes (a very long bulk) also goes the usual way.
        """
        written: dict[str, int] = {}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="order-timeouts-publish") as publisher:
            publishing: Future[dict[str, int]] | None = None
            for chunk in chunks:
                if not self._publishes_ahead([chunk], replace=False):
                    written.update(self.write(chunk, None, False, trace_context))
                    continue
                conn = self.engine.connect()
                try:
                    conn.begin()
                    versions = registry.insert_many(
                        conn, chunk, now=self.clock.now_ms(), published=True, replace=False, trace_context=trace_context
                    )
                    if publishing is not None:
                        written.update(publishing.result())  # an unexpected error stops the bulk here
                except BaseException:
                    conn.close()  # rolls this chunk back
                    raise
                publishing = publisher.submit(self._publish_then_commit, conn, chunk, versions, trace_context)
            if publishing is not None:
                written.update(publishing.result())
        return written

    def _publish_then_commit(
        self, conn: Connection, chunk: DueItems, versions: dict[str, int], trace_context: str | None
    ) -> dict[str, int]:
        with conn:  # closing it rolls back whatever was not committed
            try:
                if versions:
                    self.transport.publish(_messages(chunk, versions))
            except TransportUnavailable:
                conn.rollback()
                return self.write(chunk, None, False, trace_context)
            conn.commit()
        return versions

    def _write_overlapped(self, chunks: Sequence[DueItems], replace: bool, trace_context: str | None) -> dict[str, int]:
        """Three stages, a thread each and at most one chunk in each: this thread writes chunk k+2
        while the publisher hands chunk k+1 to the broker and the marker records chunk k as published.

        Each chunk is still published only after its own commit and marked published only after
        the broker confirmed it; a publish that fails leaves its rows to the relay, as in `write`.
        Waiting for each stage before handing it the next chunk keeps memory flat.
        """
        written: dict[str, int] = {}
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="order-timeouts-publish") as publisher,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="order-timeouts-mark") as marker,
        ):
            publishing: tuple[Future[bool], list[TimerMessage]] | None = None
            marking: Future[None] | None = None

            def hand_over(next_chunk: list[TimerMessage] | None) -> None:
                nonlocal publishing, marking
                if publishing is not None:
                    sent, messages = publishing
                    confirmed = sent.result()  # an unexpected error stops the bulk here, as it would unthreaded
                    if marking is not None:
                        marking.result()
                    marking = marker.submit(self.mark_published, messages) if confirmed else None
                publishing = (publisher.submit(self._send, next_chunk), next_chunk) if next_chunk else None

            for chunk in chunks:
                if not chunk:
                    continue
                with self.engine.begin() as conn:
                    versions = registry.insert_many(
                        conn,
                        chunk,
                        now=self.clock.now_ms(),
                        published=False,
                        replace=replace,
                        trace_context=trace_context,
                    )
                written.update(versions)
                hand_over(_messages(chunk, versions) or None)
            hand_over(None)
            if marking is not None:
                marking.result()
        return written

    def _send(self, messages: Sequence[TimerMessage]) -> bool:
        """Hand the messages to the broker; False when it is unavailable (logged): their rows stay
        unpublished, and the relay publishes them when the broker is back."""
        try:
            self.transport.publish(messages)
        except TransportUnavailable as exc:
            self.publish_failed(exc)
            return False
        self.publish_succeeded()
        return True

    # The outage bookkeeping of the write paths, shared with the asyncio API's publisher
    # (scheduler/async_outbox.py): one backoff per process, whichever API met the outage.

    def quiet(self) -> bool:
        """Whether writes leave their timers to the relay without trying the broker (an outage's backoff)."""
        return monotonic() < self._quiet_until

    def publish_failed(self, exc: TransportUnavailable) -> None:
        with self._outage_lock:
            self._quiet_until = monotonic() + self._outage.failed(
                self.transport.component, f"{exc}; timeouts are left for the relay"
            )

    def publish_succeeded(self) -> None:
        if self._outage.ongoing:
            with self._outage_lock:
                self._outage.recovered()

    def revoke_failed(self, order_ids: Sequence[str], exc: TransportUnavailable) -> None:
        # Harmless: the registry says revoked, so the timer is acked as stale when it fires.
        log.warning("could not remove the broker timers of %s: %s", ", ".join(order_ids[:5]), exc)

    def _publish_or_raise(self, messages: Sequence[TimerMessage]) -> int:
        if messages:
            attributes = self.span_attributes(messages)
            with tracing.span("order-timeouts publish", kind="producer", attributes=attributes) as step:
                self.transport.publish(messages)
                step.set_attribute(tracing.OUTCOME, "published")
            self.mark_published(messages)
        return len(messages)

    def span_attributes(self, messages: Sequence[TimerMessage]) -> dict[str, object]:
        """The transport, and the order id when there is one, or the count when there are more."""
        attributes: dict[str, object] = {tracing.TRANSPORT: self.transport.name, tracing.COUNT: len(messages)}
        if len(messages) == 1:
            attributes[tracing.ORDER_ID] = messages[0].order_id
        return attributes

    def _remove_timers(self, order_ids: Sequence[str]) -> None:
        if self.quiet():
            return  # harmless, as in revoke_failed
        try:
            self.transport.revoke(order_ids)
        except TransportUnavailable as exc:
            self.revoke_failed(order_ids, exc)


def _messages(items: DueItems, versions: dict[str, int]) -> list[TimerMessage]:
    if not versions:
        return []
    due = dict(items)
    return [TimerMessage(order_id, due[order_id], version) for order_id, version in versions.items()]


@contextmanager
def transaction(engine: Engine, connection: Caller) -> Iterator[Connection]:
    """The caller's transaction, which we neither commit nor close; or one of our own."""
    if connection is None:
        with engine.begin() as conn:
            yield conn
    else:
        yield connection.connection() if isinstance(connection, Session) else connection


def after_commit(connection: Caller, action: Callable[[], None]) -> None:
    """Run `action` once the registry write is committed.

    Our own transaction has committed already. A Session runs it from its after_commit event
    (dropped on rollback). A bare Connection gives no after-commit hook: its rows stay
    unpublished and the relay publishes them.
    """
    if connection is None:
        action()
    elif isinstance(connection, Session):
        if _SESSION_KEY not in connection.info:
            event.listen(connection, "after_commit", _run_session_actions)
            event.listen(connection, "after_rollback", _drop_session_actions)
        actions: list[Callable[[], None]] = connection.info.setdefault(_SESSION_KEY, [])
        actions.append(action)


def _run_session_actions(session: Session) -> None:
    actions = session.info.get(_SESSION_KEY, [])
    session.info[_SESSION_KEY] = []
    for action in actions:
        action()


def _drop_session_actions(session: Session) -> None:
    session.info[_SESSION_KEY] = []
