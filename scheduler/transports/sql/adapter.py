"""The `sql` transport: the registry table is the queue (SQLite by default, PostgreSQL for many workers).

Workers sleep until the next due time (capped) instead of polling, and wake early when a nearer
timeout is scheduled: PostgreSQL through LISTEN/NOTIFY, SQLite through `PRAGMA data_version`,
which changes whenever another connection commits and costs no disk read.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Self

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from scheduler import registry
from scheduler.clock import Clock
from scheduler.database import postgresql_connect_args, reading
from scheduler.errors import TransportUnavailable
from scheduler.names import PG_WAKE_CHANNEL
from scheduler.outage import first_line
from scheduler.outbox import InRegistry, Outbox
from scheduler.registry import Claim
from scheduler.transports.base import Batch, Settlement, Transport

#: longest sleep without re-reading the next due time (covers clock jumps and lost wake-ups)
MAX_SLEEP_S = 10.0
#: a scheduled timeout nearer than this wakes the workers; farther ones are found by the next re-read
WAKE_HORIZON_MS = int(MAX_SLEEP_S * 1000)
#: how often an idle SQLite worker looks at data_version
SQLITE_WATCH_INTERVAL_S = 0.05
#: pause after a claim that found nothing although rows were due (other workers hold them)
CONTENDED_PAUSE_S = 0.02


@dataclass
class DueRows(Batch):
    """A batch of the `sql` transport: no deliveries, the handler claims up to `limit` due rows."""

    limit: int = 0

    def claim(self, conn: Connection, *, now: int, worker: str) -> list[Claim]:
        """FOR UPDATE SKIP LOCKED on PostgreSQL: each worker takes a different slice (registry.claim_due)."""
        return registry.claim_due(conn, limit=self.limit, now=now, worker=worker)

    def __bool__(self) -> bool:
        return self.limit > 0


class SqlTransport(Transport):
    name = "sql"
    component = "the registry database"

    @classmethod
    def from_url(cls, broker_url: str, engine: Engine, clock: Clock) -> Self:
        return cls(engine, clock)

    def __init__(self, engine: Engine, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock
        self._postgres = engine.dialect.name == "postgresql"
        self._listener: Any = None  # a psycopg connection in autocommit that LISTENs
        self._sqlite_watch: Any = None  # raw DBAPI connection, autocommit: outside any snapshot
        self._contended = False
        #: never set: waiting on it is the pause (unlike time.sleep, it keeps working in a process whose
        #: wall clock libfaketime moves, as the clock-skew tests do)
        self._pause = threading.Event()
        #: the last batch came back full: more rows are probably due, claim again without looking first
        self._full = False
        self._last_limit = 0

    def outbox(self, engine: Engine, clock: Clock) -> Outbox:
        return InRegistry(engine, clock, wake=self._wake)

    def _wake(self, conn: Connection, earliest_due_ms: int) -> None:
        """Inside the scheduling transaction: wake sleeping workers if this is sooner than they expect.

        Delivered at commit, dropped on rollback; far-off timeouts need no wake-up. SQLite needs no
        message: idle workers watch its data_version, which every commit changes."""
        if self._postgres and earliest_due_ms - self._clock.now_ms() < WAKE_HORIZON_MS:
            conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": PG_WAKE_CHANNEL})

    def receive(self, limit: int, timeout: float) -> Batch:
        self._last_limit = limit
        deadline = time.monotonic() + timeout
        if self._full:
            # Skips a round trip per batch while draining a backlog; a claim that finds fewer
            # rows than asked clears the flag and the next receive looks (and sleeps) as usual.
            self._full = False
            return DueRows(limit=limit)
        if self._contended:
            # Due rows exist but other workers hold them all: give them a moment.
            self._contended = False
            self._pause.wait(min(CONTENDED_PAUSE_S, timeout))
        try:
            return self._wait_for_due(limit, deadline)
        except (SQLAlchemyError, sqlite3.Error) as exc:
            # The watching connection is dropped too: it is opened again on the next receive.
            self.close()
            raise TransportUnavailable(f"{type(exc).__name__}: {first_line(exc)}") from exc

    def _wait_for_due(self, limit: int, deadline: float) -> Batch:
        self._start_watching()
        while True:
            with reading(self._engine) as conn:
                next_due = registry.next_due_ms(conn)
            now = self._clock.now_ms()
            if next_due is not None and next_due <= now:
                return DueRows(limit=limit)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Batch()
            sleep = min(remaining, MAX_SLEEP_S)
            if next_due is not None:
                sleep = min(sleep, (next_due - now) / 1000)
            self._sleep_until_change(sleep)

    def settle(self, settlement: Settlement) -> None:
        # Outcomes, retries and dead letters are registry states written in the batch transaction.
        self._contended = settlement.claimed == 0
        self._full = not settlement.rolled_back and settlement.claimed >= self._last_limit

    def probe(self, registry_problem: str | None) -> None:
        if registry_problem is not None:
            raise TransportUnavailable("the sql transport is the registry database: see above")

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._sqlite_watch is not None:
            self._sqlite_watch.close()
            self._sqlite_watch = None

    def _start_watching(self) -> None:
        if self._postgres and self._listener is None:
            import psycopg  # only a PostgreSQL registry needs it

            # The engine's own connect arguments: the same hosts (a multi-host URL finds the primary),
            # timeouts and keepalives as every other registry connection.
            args, kwargs = self._engine.dialect.create_connect_args(self._engine.url)
            kwargs.update(postgresql_connect_args(dict(self._engine.url.query)))
            try:
                self._listener = psycopg.connect(*args, **kwargs, autocommit=True)
                self._listener.execute(f"LISTEN {PG_WAKE_CHANNEL}")
            except psycopg.Error as exc:
                self.close()
                raise TransportUnavailable(f"{type(exc).__name__}: {first_line(exc)}") from exc
        elif not self._postgres and self._sqlite_watch is None:
            self._sqlite_watch = self._engine.raw_connection()

    def _sleep_until_change(self, seconds: float) -> None:
        if self._listener is not None:
            import psycopg

            # Wakes on the first NOTIFY or at the deadline; several notifies at once drain together.
            try:
                for _ in self._listener.notifies(timeout=seconds, stop_after=1):
                    pass
            except psycopg.Error:
                # A listening connection that broke while the worker was busy elsewhere (the server
                # restarted and the batch connections have already reconnected) is not an outage:
                # it is opened again at once, and the caller looks for due rows, since notifies
                # may have been missed meanwhile. Only a failure to reopen it is an outage.
                self.close()
                self._start_watching()
            return
        assert self._sqlite_watch is not None
        version = self._data_version()
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._pause.wait(min(SQLITE_WATCH_INTERVAL_S, left))
            if self._data_version() != version:
                return

    def _data_version(self) -> int:
        assert self._sqlite_watch is not None
        cursor = self._sqlite_watch.cursor()
        try:
            return int(cursor.execute("PRAGMA data_version").fetchone()[0])
        finally:
            cursor.close()
