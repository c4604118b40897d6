"""The registry: one SQL table of timeouts, the source of truth, outbox and audit trail.

Every statement that touches the table lives in this package, as SQLAlchemy Core close to the SQL
it sends: `schema` is the tables (a documented contract, docs/registry.md), `queries` the statements
that are the same on every database, `postgresql` and `sqlite` each database's own ways of the
others, `leases` the maintenance leases. Callers use the names below:
`from scheduler import registry; registry.claim(conn, ...)`.
"""

from scheduler.registry.leases import release_lease, take_lease
from scheduler.registry.queries import (
    all_records,
    bury,
    claim,
    claim_due,
    count_pending,
    counts,
    database_now_ms,
    dead,
    finish,
    finished_between,
    get,
    histogram,
    insert_many,
    last_due_ms,
    mark_published,
    move_due,
    next_due_ms,
    one_writer_at_a_time,
    pending,
    pending_after,
    replay_dead,
    retry_later,
    revoke,
    stranded,
    unpublish_pending,
    unpublished,
)
from scheduler.registry.schema import (
    MAX_ORDER_ID_LENGTH,
    PENDING_DUE_INDEX,
    Claim,
    Outcome,
    Retry,
    TimeoutRecord,
    TimeoutState,
    metadata,
    timeouts,
)

__all__ = [
    "MAX_ORDER_ID_LENGTH",
    "PENDING_DUE_INDEX",
    "Claim",
    "Outcome",
    "Retry",
    "TimeoutRecord",
    "TimeoutState",
    "all_records",
    "bury",
    "claim",
    "claim_due",
    "count_pending",
    "counts",
    "database_now_ms",
    "dead",
    "finish",
    "finished_between",
    "get",
    "histogram",
    "insert_many",
    "last_due_ms",
    "mark_published",
    "metadata",
    "move_due",
    "next_due_ms",
    "one_writer_at_a_time",
    "pending",
    "pending_after",
    "release_lease",
    "replay_dead",
    "retry_later",
    "revoke",
    "stranded",
    "take_lease",
    "timeouts",
    "unpublish_pending",
    "unpublished",
]
