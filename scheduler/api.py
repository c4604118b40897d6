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

import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import Session

from scheduler import registry, validation
from scheduler.clock import Clock, SystemClock
from scheduler.config import Settings
from scheduler.database import make_engine, reading
from scheduler.errors import InvalidTimeout, TimeoutNotFound, TransportUnavailable
from scheduler.registry import TimeoutRecord
from scheduler.transports import TimerMessage, Transport, open_transport

log = logging.getLogger("order_timeouts.api")

#: rows per INSERT round trip in schedule_many
SCHEDULE_CHUNK = 5000
#: schedule_many hands a chunk to the broker before its commit when every timeout in it is due at
#: least this far ahead (see OrderTimeouts._write_published_ahead)
PUBLISH_AHEAD_MS = 30_000
_SESSION_KEY = "order_timeouts_unpublished"


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
    def __init__(
        self,
        database_url: str | None = None,
        broker_url: str | None = None,
        *,
        settings: Settings | None = None,
        engine: Engine | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings or Settings()
        if database_url is not None:
            self.settings = replace(self.settings, database_url=database_url)
        if broker_url is not None:
            self.settings = replace(self.settings, broker_url=broker_url)
        self.clock: Clock = clock or SystemClock()
        self.engine = engine or make_engine(self.settings.database_url)
        self.transport: Transport = open_transport(self.settings.broker_url, self.engine, self.clock)

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
        versions = self._write([(oid, due)], connection, replace)
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
            if not self.transport.registry_is_queue and self._publishes_ahead(items, replace):
                written = self._write_published_ahead(chunks)
            elif self.transport.registry_is_queue or len(chunks) < 2:
                for chunk in chunks:
                    written.update(self._write(chunk, None, replace))
            else:
                written = self._write_overlapped(chunks, replace)
        else:
            written = self._write(items, connection, replace)
        created = sum(1 for version in written.values() if version == 1)
        return ScheduleSummary(created=created, existing=len(items) - len(written), replaced=len(written) - created)

    def cancel(self, order_id: str, *, connection: Connection | Session | None = None) -> bool:
        """Revoke the order's timeout (payment arrived).

        False when it had already fired or been revoked, or a worker is firing it at this moment (that
        worker's conditional cancel then finds the order paid: the payment wins).
        """
        oid = validation.order_id(order_id)
        now = self.clock.now_ms()
        with self._transaction(connection) as conn:
            if registry.revoke(conn, oid, now=now):
                revoked = True
            elif registry.get(conn, oid) is None:
                raise TimeoutNotFound(f"no timeout is registered for order {oid!r}")
            else:
                revoked = False
        if revoked and not self.transport.registry_is_queue:
            self._after_commit(connection, lambda: self._revoke_timer(oid))
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
        queue = self.transport.registry_is_queue
        now = self.clock.now_ms()
        with self.engine.begin() as conn:
            replayed = registry.replay_dead(conn, ids, now=now, published=queue)
            if ids is not None and len(replayed) != len(set(ids)):
                missing = sorted(set(ids) - {oid for oid, _ in replayed})
                # Raising rolls the whole replay back: all or nothing.
                raise InvalidTimeout(f"not dead-lettered: {', '.join(missing[:5])}")
            if replayed:
                self.transport.notify_scheduled(conn, now)
        if not queue:
            self._publish([TimerMessage(oid, now, version) for oid, version in replayed])
        return [oid for oid, _ in replayed]

    def publish_unpublished(self, limit: int = 1000) -> int:
        """Publish registry rows the broker has not confirmed, in due order (the relay's step).

        Returns how many were published; raises TransportUnavailable while the broker is down.
        """
        if self.transport.registry_is_queue:
            return 0
        with reading(self.engine) as conn:
            rows = registry.unpublished(conn, limit=limit)
        return self._publish_or_raise([TimerMessage(*row) for row in rows])

    def republish_stranded(self, grace: timedelta, limit: int = 1000) -> int:
        """Publish again pending rows overdue by more than `grace` (the reconciler's step).

        Covers a broker that lost its data or a message lost anywhere on the way: the handler's
        conditional claim makes the second copy harmless when the first one was only slow.
        """
        if self.transport.registry_is_queue:
            return 0  # the registry is the queue: nothing can be stranded outside it
        before = self.clock.now_ms() - int(grace.total_seconds() * 1000)
        with reading(self.engine) as conn:
            rows = registry.stranded(conn, before_ms=before, limit=limit)
        if rows:
            log.warning("republishing %d timeouts overdue by more than %s", len(rows), grace)
        return self._publish_or_raise([TimerMessage(*row) for row in rows])

    # -- internals ----------------------------------------------------------------------------

    def _due(self, delay: timedelta | None, due_at: datetime | None, now: int | None = None) -> int:
        return validation.due_ms(
            now_ms=self.clock.now_ms() if now is None else now,
            delay=delay,
            due_at=due_at,
            default_delay=self.settings.default_delay,
            max_delay=self.settings.max_delay,
        )

    def _publishes_ahead(self, items: Sequence[tuple[str, int]], replace: bool) -> bool:
        """Whether these timeouts may be handed to the broker before their rows commit (see
        `_write_published_ahead`): all new, all due PUBLISH_AHEAD_MS or more from now, and the registry
        on a database whose open transaction does not hold up other writers (not SQLite)."""
        return (
            not replace
            and bool(items)
            and self.engine.dialect.name != "sqlite"
            and min(due for _, due in items) - self.clock.now_ms() >= PUBLISH_AHEAD_MS
        )

    def _write_published_ahead(self, chunks: Sequence[Sequence[tuple[str, int]]]) -> dict[str, int]:
        """Each chunk's rows are inserted already stamped published, handed to the broker, and only
        then committed: no second statement per row to record the broker's confirmation (that
        UPDATE costs PostgreSQL twice the insert). This thread inserts chunk k+1 while the publisher
        publishes and commits chunk k.

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
                if not self._publishes_ahead(chunk, replace=False):
                    written.update(self._write(chunk, None, replace=False))
                    continue
                conn = self.engine.connect()
                try:
                    conn.begin()
                    versions = registry.insert_many(conn, chunk, now=self.clock.now_ms(), published=True, replace=False)
                    if versions:
                        self.transport.notify_scheduled(conn, min(due for oid, due in chunk if oid in versions))
                    if publishing is not None:
                        written.update(publishing.result())  # an unexpected error stops the bulk here
                except BaseException:
                    conn.close()  # rolls this chunk back
                    raise
                publishing = publisher.submit(self._publish_then_commit, conn, chunk, versions)
            if publishing is not None:
                written.update(publishing.result())
        return written

    def _publish_then_commit(
        self, conn: Connection, chunk: Sequence[tuple[str, int]], versions: dict[str, int]
    ) -> dict[str, int]:
        with conn:  # closing it rolls back whatever was not committed
            due = dict(chunk)
            try:
                if versions:
                    self.transport.publish([TimerMessage(oid, due[oid], version) for oid, version in versions.items()])
            except TransportUnavailable:
                conn.rollback()
                return self._write(chunk, None, replace=False)
            conn.commit()
        return versions

    def _write_overlapped(self, chunks: Sequence[Sequence[tuple[str, int]]], replace: bool) -> dict[str, int]:
        """Three stages, a thread each and at most one chunk in each: this thread writes chunk k+2
        while the publisher hands chunk k+1 to the broker and the marker records chunk k as published.

        Each chunk is still published only after its own commit and marked published only after
        the broker confirmed it; a publish that fails leaves its rows to the relay, as in `_write`.
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
                committed: list[list[TimerMessage]] = []
                written.update(self._write(chunk, None, replace, defer=committed.append))
                hand_over(committed[0] if committed else None)
            hand_over(None)
            if marking is not None:
                marking.result()
        return written

    def _write(
        self,
        items: Sequence[tuple[str, int]],
        connection: Connection | Session | None,
        replace: bool,
        defer: Callable[[list[TimerMessage]], None] | None = None,
    ) -> dict[str, int]:
        if not items:
            return {}
        queue = self.transport.registry_is_queue
        now = self.clock.now_ms()
        with self._transaction(connection) as conn:
            versions = registry.insert_many(conn, items, now=now, published=queue, replace=replace)
            if versions:
                self.transport.notify_scheduled(conn, min(due for oid, due in items if oid in versions))
        if versions and not queue:
            due = dict(items)
            messages = [TimerMessage(oid, due[oid], version) for oid, version in versions.items()]
            if defer is not None and connection is None:
                defer(messages)  # committed already: the caller publishes them
            else:
                self._after_commit(connection, lambda: self._publish(messages))
        return versions

    def _move(self, oid: str, due: int, connection: Connection | Session | None) -> TimeoutRecord:
        queue = self.transport.registry_is_queue
        now = self.clock.now_ms()
        with self._transaction(connection) as conn:
            version = registry.move_due(conn, oid, due, now=now, published=queue)
            if version is None:
                record = registry.get(conn, oid)
                if record is None:
                    raise TimeoutNotFound(f"no timeout is registered for order {oid!r}")
                raise InvalidTimeout(f"the timeout of order {oid!r} is {record.state.value}, not pending")
            self.transport.notify_scheduled(conn, due)
            record = registry.get(conn, oid)
            assert record is not None
        if not queue:
            message = TimerMessage(oid, due, version)
            self._after_commit(connection, lambda: self._publish([message]))
        return record

    def _transaction(self, connection: Connection | Session | None) -> Any:
        if connection is None:
            return self.engine.begin()
        conn = connection.connection() if isinstance(connection, Session) else connection
        return _Borrowed(conn)

    def _after_commit(self, connection: Connection | Session | None, action: Any) -> None:
        """Run a broker action once the registry write is committed.

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
            actions: list[Any] = connection.info.setdefault(_SESSION_KEY, [])
            actions.append(action)

    def _publish(self, messages: Sequence[TimerMessage]) -> None:
        if self._send(messages):
            self.mark_published(messages)

    def _send(self, messages: Sequence[TimerMessage]) -> bool:
        """Hand the messages to the broker; False when it is unavailable (logged): their rows stay
        unpublished, and the relay publishes them when the broker is back."""
        try:
            self.transport.publish(messages)
        except TransportUnavailable as exc:
            log.warning("broker unavailable, %d timeouts left for the relay: %s", len(messages), exc)
            return False
        return True

    def _publish_or_raise(self, messages: Sequence[TimerMessage]) -> int:
        if messages:
            self.transport.publish(messages)
            self.mark_published(messages)
        return len(messages)

    def mark_published(self, messages: Sequence[TimerMessage]) -> None:
        """Record that the broker confirmed these messages (only their current version counts)."""
        with self.engine.begin() as conn:
            registry.mark_published(conn, [(m.order_id, m.version) for m in messages], now=self.clock.now_ms())

    def _revoke_timer(self, oid: str) -> None:
        try:
            self.transport.revoke([oid])
        except TransportUnavailable as exc:
            # Harmless: the registry says revoked, so the timer is acked as stale when it fires.
            log.warning("could not remove the broker timer of %s: %s", oid, exc)


class _Borrowed:
    """The caller's connection as a context manager that neither commits nor closes it."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __enter__(self) -> Connection:
        return self._conn

    def __exit__(self, *_: object) -> None:
        return None


def _run_session_actions(session: Session) -> None:
    actions = session.info.get(_SESSION_KEY, [])
    session.info[_SESSION_KEY] = []
    for action in actions:
        action()


def _drop_session_actions(session: Session) -> None:
    session.info[_SESSION_KEY] = []
