"""The registry's tables: a documented contract (docs/registry.md).

Services in other languages read these tables, and later insert rows the relay publishes, so a
change to a column, a state, an outcome or an index here is a change to that contract, and comes
with a migration (scheduler/migrations/).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text, func

from scheduler.names import CONTROL_TABLE, LEASE_TABLE, REGISTRY_TABLE

#: longest order id we accept; ids are primary keys and broker message fields
MAX_ORDER_ID_LENGTH = 255


class TimeoutState(StrEnum):
    PENDING = "pending"  #: waiting for its due time, or due and not handled yet
    DONE = "done"  #: handled once; `outcome` says what happened to the order
    REVOKED = "revoked"  #: cancelled through the API (the order was paid) before it fired
    DEAD = "dead"  #: given up after repeated failures; `error` says why; `dead replay` re-arms it


class Outcome(StrEnum):
    CANCELLED = "cancelled"  #: the order was unpaid at its deadline and this timeout cancelled it
    PAID = "paid"  #: the order was paid (or moved past payment) before the cancel could commit
    ALREADY_CANCELLED = "already_cancelled"  #: someone else had cancelled the order already
    #: shadow mode (ORDER_TIMEOUTS_MODE=shadow): the order store answered unpaid, and nothing was cancelled
    WOULD_CANCEL = "would_cancel"


metadata = MetaData()

timeouts = Table(
    REGISTRY_TABLE,
    metadata,
    Column("order_id", String(MAX_ORDER_ID_LENGTH), primary_key=True),
    Column("due_ms", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),
    Column("outcome", String(24)),
    # Bumped by every (re)schedule; broker messages carry it so that a trace can tell copies apart.
    Column("version", Integer, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    # NULL while the broker has not confirmed the current version: the relay's work list.
    Column("published_ms", BigInteger),
    Column("fired_ms", BigInteger),
    Column("finished_ms", BigInteger),
    Column("worker", String(64)),
    Column("error", Text),
    # The W3C traceparent of the request that scheduled it (OpenTelemetry, scheduler/tracing.py);
    # NULL without tracing. Migration 0005.
    Column("trace_context", Text),
)
is_pending = timeouts.c.state == TimeoutState.PENDING.value
# The due scan and the pending listing read only this partial index (due_ms, order_id).
PENDING_DUE_INDEX = "ix_order_timeouts_pending_due"
Index(
    PENDING_DUE_INDEX,
    timeouts.c.due_ms,
    timeouts.c.order_id,
    postgresql_where=is_pending,
    sqlite_where=is_pending,
)
is_unpublished = is_pending & timeouts.c.published_ms.is_(None)
Index("ix_order_timeouts_unpublished", timeouts.c.due_ms, postgresql_where=is_unpublished, sqlite_where=is_unpublished)
# Finished rows only (migration 0003): a pending row would cost every schedule an index insert, and
# its queries (stats, the dead-letter listing) never read pending rows. SQLite uses a partial index
# only for a query that states its WHERE itself, hence `is_finished` in those queries.
is_finished = timeouts.c.state != TimeoutState.PENDING.value
Index(
    "ix_order_timeouts_state_finished",
    timeouts.c.state,
    timeouts.c.finished_ms,
    postgresql_where=is_finished,
    sqlite_where=is_finished,
)

#: maintenance leases: one row per job, so that several `maintain` processes never run it at once
leases = Table(
    LEASE_TABLE,
    metadata,
    Column("job", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
)

#: fleet-wide settings kept in the registry database, one row per name (its value is JSON text), so
#: that every worker and admin command of one deployment reads the same, and a restart forgets nothing
control = Table(
    CONTROL_TABLE,
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)


def rearm(now: int) -> dict[str, Any]:
    """What re-arming a row writes (reschedule with replace, dead-letter replay): pending again,
    a new version, and nothing left of the previous attempts."""
    return {
        "state": TimeoutState.PENDING.value,
        "outcome": None,
        "version": timeouts.c.version + 1,
        "attempts": 0,
        "fired_ms": None,
        "finished_ms": None,
        "worker": None,
        "error": None,
        "updated_ms": now,
    }


#: what a claim returns
CLAIM_COLUMNS = (
    timeouts.c.order_id,
    timeouts.c.due_ms,
    timeouts.c.version,
    timeouts.c.attempts,
    timeouts.c.trace_context,
)


def claim_values(now: int, worker: str) -> dict[str, Any]:
    """What a claim writes: one more attempt, by this worker; `fired_ms` keeps the first one's time."""
    return {
        "attempts": timeouts.c.attempts + 1,
        "worker": worker,
        "fired_ms": func.coalesce(timeouts.c.fired_ms, now),
        "updated_ms": now,
    }


@dataclass(frozen=True)
class TimeoutRecord:
    """One registry row, as `get`, `show` and the listings return it."""

    order_id: str
    due_ms: int
    state: TimeoutState
    outcome: Outcome | None
    version: int
    attempts: int
    created_ms: int
    updated_ms: int
    published_ms: int | None
    fired_ms: int | None
    finished_ms: int | None
    worker: str | None
    error: str | None
    trace_context: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> TimeoutRecord:
        values = dict(row._mapping)
        values["state"] = TimeoutState(values["state"])
        values["outcome"] = Outcome(values["outcome"]) if values["outcome"] else None
        return cls(**values)


@dataclass(frozen=True)
class Claim:
    """A registry row a worker has taken inside its batch transaction."""

    order_id: str
    due_ms: int
    version: int
    attempts: int  #: including this attempt
    trace_context: str | None = None  #: the scheduling request's W3C traceparent, if it was traced


@dataclass(frozen=True)
class Retry:
    order_id: str
    due_ms: int
    error: str
