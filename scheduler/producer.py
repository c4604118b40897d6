"""What `OrderTimeouts` and `AsyncOrderTimeouts` share: the checks of their input and the work each
method does inside the registry transaction.

The steps inside the transaction take a synchronous `Connection`: the synchronous API calls them in
its transaction, the asyncio API through `AsyncConnection.run_sync` (SQLAlchemy runs them in a
greenlet whose statements go through the asyncio driver). Either way they send the same statements;
only the outbox's after-commit step differs between the two APIs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection

from scheduler import registry, tracing, validation
from scheduler.clock import Clock
from scheduler.config import Settings
from scheduler.errors import InvalidTimeout, TimeoutNotFound
from scheduler.outbox import Outbox
from scheduler.registry import TimeoutRecord
from scheduler.transports import TimerMessage, Transport


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


def configured(settings: Settings | None, database_url: str | None, broker_url: str | None) -> Settings:
    """The settings given (or the defaults), with the URLs given as arguments put in."""
    chosen = settings or Settings()
    if database_url is not None:
        chosen = replace(chosen, database_url=database_url)
    if broker_url is not None:
        chosen = replace(chosen, broker_url=broker_url)
    return chosen


class Producer:
    """Input checks of the producer API: ids, due times, bulk items. Both APIs derive from it."""

    settings: Settings
    clock: Clock
    transport: Transport

    def _traced(self, oid: str | None) -> dict[str, Any]:
        """The attributes of a producer span (scheduler/tracing.py)."""
        return {tracing.TRANSPORT: self.transport.name, tracing.ORDER_ID: oid}

    def _due(self, delay: timedelta | None, due_at: datetime | None, now: int) -> int:
        return validation.due_ms(
            now_ms=now,
            delay=delay,
            due_at=due_at,
            default_delay=self.settings.default_delay,
            max_delay=self.settings.max_delay,
        )

    def _due_items(
        self,
        orders: Iterable[str | tuple[str, DueSpec]],
        delay: timedelta | None,
        due_at: datetime | None,
        now: int,
    ) -> list[tuple[str, int]]:
        """Bulk items as (order id, due ms): plain ids take `delay`/`due_at`; (id, timedelta | datetime)
        pairs carry their own. Every item is checked before anything is written: one bad item
        changes nothing."""
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
        return list(due.items())


def schedule_result(oid: str, versions: dict[str, int]) -> ScheduleResult:
    if oid not in versions:
        return ScheduleResult.EXISTS
    return ScheduleResult.CREATED if versions[oid] == 1 else ScheduleResult.REPLACED


def schedule_summary(items: int, written: dict[str, int]) -> ScheduleSummary:
    created = sum(1 for version in written.values() if version == 1)
    return ScheduleSummary(created=created, existing=items - len(written), replaced=len(written) - created)


# -- the steps inside the registry transaction -----------------------------------------------------


def revoke(conn: Connection, oid: str, *, now: int) -> bool:
    revoked = registry.revoke(conn, oid, now=now)
    if not revoked and registry.get(conn, oid) is None:
        raise TimeoutNotFound(f"no timeout is registered for order {oid!r}")
    return revoked


def move(conn: Connection, outbox: Outbox, oid: str, due: int, *, now: int) -> tuple[TimerMessage, TimeoutRecord]:
    """Reschedule (or fire, with `due` = now) a pending timeout; raise when it is not pending."""
    version = registry.move_due(conn, oid, due, now=now, published=outbox.published_on_write)
    if version is None:
        record = registry.get(conn, oid)
        if record is None:
            raise TimeoutNotFound(f"no timeout is registered for order {oid!r}")
        raise InvalidTimeout(f"the timeout of order {oid!r} is {record.state.value}, not pending")
    message = TimerMessage(oid, due, version)
    outbox.written(conn, [message])
    moved = registry.get(conn, oid)
    assert moved is not None
    return message, moved


def replay_dead(conn: Connection, outbox: Outbox, ids: Sequence[str] | None, *, now: int) -> list[TimerMessage]:
    """Re-arm dead timeouts to fire now: the given orders (all of them must be dead), or all."""
    replayed = registry.replay_dead(conn, ids, now=now, published=outbox.published_on_write)
    if ids is not None and len(replayed) != len(set(ids)):
        missing = sorted(set(ids) - {oid for oid, _ in replayed})
        # Raising rolls the whole replay back: all or nothing.
        raise InvalidTimeout(f"not dead-lettered: {', '.join(missing[:5])}")
    messages = [TimerMessage(oid, now, version) for oid, version in replayed]
    outbox.written(conn, messages)
    return messages
