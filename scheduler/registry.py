"""The registry: one SQL table of timeouts, the source of truth, outbox and audit trail.

Every statement that touches the table lives here, as SQLAlchemy Core close to the SQL it sends
(procrastinate keeps every queue operation in one JobManager for the same reason). Transports and
the handler call these methods inside their own transactions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    cast,
    func,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from scheduler.names import LEASE_TABLE, REGISTRY_TABLE

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
)
_pending = timeouts.c.state == TimeoutState.PENDING.value
# The due scan and the pending listing read only this partial index (due_ms, order_id).
PENDING_DUE_INDEX = "ix_order_timeouts_pending_due"
Index(
    PENDING_DUE_INDEX,
    timeouts.c.due_ms,
    timeouts.c.order_id,
    postgresql_where=_pending,
    sqlite_where=_pending,
)
_unpublished = _pending & timeouts.c.published_ms.is_(None)
Index("ix_order_timeouts_unpublished", timeouts.c.due_ms, postgresql_where=_unpublished, sqlite_where=_unpublished)
# Finished rows only (migration 0003): a pending row would cost every schedule an index insert, and
# its queries (stats, the dead-letter listing) never read pending rows. SQLite uses a partial index
# only for a query that states its WHERE itself, hence `_finished` in those queries.
_finished = timeouts.c.state != TimeoutState.PENDING.value
Index(
    "ix_order_timeouts_state_finished",
    timeouts.c.state,
    timeouts.c.finished_ms,
    postgresql_where=_finished,
    sqlite_where=_finished,
)

#: maintenance leases: one row per job, so that several `maintain` processes never run it at once
leases = Table(
    LEASE_TABLE,
    metadata,
    Column("job", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
)


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


@dataclass(frozen=True)
class Retry:
    order_id: str
    due_ms: int
    error: str


def _insert(conn: Connection) -> Any:
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(timeouts)
    if name == "sqlite":
        return sqlite.insert(timeouts)
    raise NotImplementedError(name)  # database_url() refuses other backends earlier


def insert_many(
    conn: Connection,
    due: Sequence[tuple[str, int]],
    *,
    now: int,
    published: bool,
    replace: bool,
) -> dict[str, int]:
    """Insert timeouts; return {order_id: version} for those created or (with replace) re-armed.

    Rows that exist are left alone unless `replace`: scheduling twice is idempotent.
    `published` is true when the registry itself is the queue (the `sql` transport).
    """
    if not due:
        return {}
    if conn.dialect.name == "postgresql":
        return _insert_many_postgresql(conn, due, now=now, published=published, replace=replace)
    stmt = _insert(conn)
    params = [
        {
            "order_id": order_id,
            "due_ms": due_ms,
            "state": TimeoutState.PENDING.value,
            "version": 1,
            "attempts": 0,
            "created_ms": now,
            "updated_ms": now,
            "published_ms": now if published else None,
        }
        for order_id, due_ms in due
    ]
    if replace:
        stmt = stmt.on_conflict_do_update(
            index_elements=[timeouts.c.order_id],
            set_={
                **_rearm(now),
                "due_ms": stmt.excluded.due_ms,
                "published_ms": stmt.excluded.published_ms,
            },
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=[timeouts.c.order_id])
    result = conn.execute(stmt.returning(timeouts.c.order_id, timeouts.c.version), params)
    return dict(result.all())


# Two parameters instead of eight per row: one short statement per chunk, whatever its size, and no
# per-row work in SQLAlchemy. Each is one string that PostgreSQL splits (string_to_array), because
# psycopg's dumping of a Python list as an array costs more than the insert's whole client side.
# Order ids are printable text (validation.order_id), so a line feed never occurs inside one.
_INSERT_MANY_POSTGRESQL = f"""
INSERT INTO {REGISTRY_TABLE} AS t
    (order_id, due_ms, state, version, attempts, created_ms, updated_ms, published_ms)
SELECT v.order_id, v.due_ms, :pending, 1, 0, CAST(:now AS bigint), CAST(:now AS bigint), CAST(:published AS bigint)
FROM unnest(string_to_array(:ids, E'\\n'), CAST(string_to_array(:dues, ',') AS bigint[])) AS v(order_id, due_ms)
ON CONFLICT (order_id) DO {{conflict}}
RETURNING t.order_id, t.version
"""
# replace=True: the same re-arm as _rearm() below.
_REARM_POSTGRESQL = """UPDATE SET
    state = :pending, outcome = NULL, version = t.version + 1, attempts = 0, fired_ms = NULL,
    finished_ms = NULL, worker = NULL, error = NULL, updated_ms = CAST(:now AS bigint),
    due_ms = EXCLUDED.due_ms, published_ms = EXCLUDED.published_ms"""


def _insert_many_postgresql(
    conn: Connection, due: Sequence[tuple[str, int]], *, now: int, published: bool, replace: bool
) -> dict[str, int]:
    sql = _INSERT_MANY_POSTGRESQL.format(conflict=_REARM_POSTGRESQL if replace else "NOTHING")
    ids = "\n".join(order_id for order_id, _ in due)
    if ids.count("\n") != len(due) - 1:
        raise ValueError("an order id contains a line feed")  # validation.order_id refuses those first
    params = {
        "ids": ids,
        "dues": ",".join(str(due_ms) for _, due_ms in due),
        "pending": TimeoutState.PENDING.value,
        "now": now,
        "published": now if published else None,
    }
    return dict(conn.execute(text(sql), params).all())


def _rearm(now: int) -> dict[str, Any]:
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


def get(conn: Connection, order_id: str) -> TimeoutRecord | None:
    row = conn.execute(select(timeouts).where(timeouts.c.order_id == order_id)).first()
    return TimeoutRecord.from_row(row) if row else None


def revoke(conn: Connection, order_id: str, *, now: int) -> bool:
    """Pending → revoked. False when there is no pending timeout, or a worker is firing it right now.

    SKIP LOCKED matters for the payment path: the order service typically holds its order row
    lock (status → PAID) when it revokes, while a worker firing this timeout holds the registry
    row and waits for that order row to cancel it. Waiting here would deadlock; skipping is
    correct because that worker's conditional cancel will find the order paid and record PAID.
    """
    target = (
        select(timeouts.c.order_id)
        .where(timeouts.c.order_id == order_id, _pending)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = conn.execute(
        update(timeouts)
        .where(timeouts.c.order_id == target, _pending)
        .values(state=TimeoutState.REVOKED.value, finished_ms=now, updated_ms=now)
        .returning(timeouts.c.order_id)
    )
    return result.first() is not None


def move_due(conn: Connection, order_id: str, due_ms: int, *, now: int, published: bool) -> int | None:
    """Reschedule a pending timeout; return its new version, None when nothing is pending."""
    result = conn.execute(
        update(timeouts)
        .where(timeouts.c.order_id == order_id, _pending)
        .values(
            due_ms=due_ms,
            version=timeouts.c.version + 1,
            published_ms=now if published else None,
            updated_ms=now,
        )
        .returning(timeouts.c.version)
    )
    return result.scalar_one_or_none()


def mark_published(conn: Connection, versions: Iterable[tuple[str, int]], *, now: int) -> None:
    """Record the broker's confirmation, only for the version that was published."""
    params = [{"oid": order_id, "ver": version} for order_id, version in versions]
    if params and conn.dialect.name == "postgresql":
        # One statement for the whole batch instead of one UPDATE per row.
        conn.execute(
            text(
                f"UPDATE {REGISTRY_TABLE} AS t SET published_ms = :now "
                "FROM unnest(CAST(:ids AS text[]), CAST(:versions AS integer[])) AS v(order_id, version) "
                "WHERE t.order_id = v.order_id AND t.version = v.version"
            ),
            {"now": now, "ids": [p["oid"] for p in params], "versions": [p["ver"] for p in params]},
        )
    elif params:
        conn.execute(
            update(timeouts)
            .where(timeouts.c.order_id == bindparam("oid"), timeouts.c.version == bindparam("ver"))
            .values(published_ms=now),
            params,
        )


def _among(conn: Connection, order_ids: Sequence[str]) -> Any:
    """`order_id = ANY(:ids)` on PostgreSQL: one array parameter, one cached plan, whatever the
    batch size (an IN list renders and plans anew for every length); IN on SQLite."""
    if conn.dialect.name == "postgresql":
        return timeouts.c.order_id == any_(cast(bindparam("ids", list(order_ids)), postgresql.ARRAY(Text)))
    return timeouts.c.order_id.in_(order_ids)


_claim_columns = (timeouts.c.order_id, timeouts.c.due_ms, timeouts.c.version, timeouts.c.attempts)


def _claim_values(now: int, worker: str) -> dict[str, Any]:
    return {
        "attempts": timeouts.c.attempts + 1,
        "worker": worker,
        "fired_ms": func.coalesce(timeouts.c.fired_ms, now),
        "updated_ms": now,
    }


def claim_due(conn: Connection, *, limit: int, now: int, worker: str) -> list[Claim]:
    """The `sql` transport's delivery: take up to `limit` due rows in due order.

    On PostgreSQL, FOR UPDATE SKIP LOCKED lets every worker take a different slice without
    waiting for the others; the row locks last until the batch commits, so a worker that dies
    simply releases its rows. On SQLite the transaction already holds the write lock
    (BEGIN IMMEDIATE), so the plain select is just as exclusive.
    """
    if conn.dialect.name == "sqlite":
        return _claim_due_sqlite(conn, limit=limit, now=now, worker=worker)
    due = (
        select(timeouts.c.order_id)
        .where(_pending, timeouts.c.due_ms <= now)
        .order_by(timeouts.c.due_ms)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = (
        update(timeouts)
        .where(timeouts.c.order_id.in_(due.scalar_subquery()))
        .values(_claim_values(now, worker))
        .returning(*_claim_columns)
    )
    return [Claim(*row) for row in conn.execute(stmt)]


# Without ANALYZE statistics SQLite's planner may answer `state = 'pending'` from another index than
# the partial one and walk (and sort) every pending row: with a million far-off timeouts that was
# ~100 ms per claim and per look at the next due time. INDEXED BY pins the partial index, which
# reads only the due rows, already in due order.
# The state is a literal, not a parameter: SQLite uses a partial index only when it can see at
# prepare time that the query implies the index's WHERE.
_SQLITE_PENDING_DUE = f"{REGISTRY_TABLE} INDEXED BY {PENDING_DUE_INDEX}"
_SQLITE_IS_PENDING = f"state = '{TimeoutState.PENDING.value}'"


def _claim_due_sqlite(conn: Connection, *, limit: int, now: int, worker: str) -> list[Claim]:
    stmt = text(
        f"UPDATE {REGISTRY_TABLE} SET attempts = attempts + 1, worker = :worker, "
        "fired_ms = coalesce(fired_ms, :now), updated_ms = :now "
        f"WHERE order_id IN (SELECT order_id FROM {_SQLITE_PENDING_DUE} "
        f"WHERE {_SQLITE_IS_PENDING} AND due_ms <= :now ORDER BY due_ms LIMIT :limit) "
        "RETURNING order_id, due_ms, version, attempts"
    )
    params = {"worker": worker, "now": now, "limit": limit}
    return [Claim(*row) for row in conn.execute(stmt, params)]


def claim(conn: Connection, order_ids: Sequence[str], *, now: int, worker: str) -> list[Claim]:
    """Conditionally take delivered timeouts: only rows still pending and due.

    A duplicate delivery (already done), a revoked timeout, or a stale one (rescheduled later)
    matches nothing and is acked without effect. On PostgreSQL a second worker holding a copy of
    the same message waits for the first one's row lock, then re-checks `state` and finds nothing.
    """
    if not order_ids:
        return []
    still_due: Any = and_(_pending, timeouts.c.due_ms <= now)
    if conn.dialect.name == "postgresql":
        # `IS TRUE` hides these two conditions from index matching, so the plan is always the
        # primary key lookup of the ids the batch names. Left visible, stale statistics (a bulk
        # load not analyzed yet) make the planner scan every due row of the partial index and
        # filter them against the ids, for each batch. PostgreSQL still re-checks the whole
        # condition on a row it had to wait for.
        still_due = still_due.is_(true())
    stmt = (
        update(timeouts)
        .where(_among(conn, order_ids), still_due)
        .values(_claim_values(now, worker))
        .returning(*_claim_columns)
    )
    return [Claim(*row) for row in conn.execute(stmt)]


def finish(conn: Connection, outcomes: dict[str, Outcome], *, now: int) -> None:
    """Record the outcome of claimed rows: one UPDATE (per distinct outcome on SQLite)."""
    if not outcomes:
        return
    if conn.dialect.name == "postgresql":
        conn.execute(
            text(
                f"UPDATE {REGISTRY_TABLE} AS t SET state = :done, outcome = v.outcome, finished_ms = :now, "
                "updated_ms = :now, error = NULL "
                "FROM unnest(CAST(:ids AS text[]), CAST(:outcomes AS text[])) AS v(order_id, outcome) "
                "WHERE t.order_id = v.order_id"
            ),
            {
                "done": TimeoutState.DONE.value,
                "now": now,
                "ids": list(outcomes),
                "outcomes": [outcome.value for outcome in outcomes.values()],
            },
        )
        return
    by_outcome: dict[Outcome, list[str]] = {}
    for order_id, outcome in outcomes.items():
        by_outcome.setdefault(outcome, []).append(order_id)
    for outcome, order_ids in by_outcome.items():
        conn.execute(
            update(timeouts)
            .where(timeouts.c.order_id.in_(order_ids))
            .values(state=TimeoutState.DONE.value, outcome=outcome.value, finished_ms=now, updated_ms=now, error=None)
        )


def retry_later(conn: Connection, retries: Sequence[Retry], *, now: int, published: bool) -> None:
    """Keep claimed rows pending with a later due time; the next attempt comes from the transport."""
    if retries:
        conn.execute(
            update(timeouts)
            .where(timeouts.c.order_id == bindparam("oid"))
            .values(
                due_ms=bindparam("due"),
                error=bindparam("err"),
                published_ms=now if published else None,
                updated_ms=now,
            ),
            [{"oid": r.order_id, "due": r.due_ms, "err": r.error} for r in retries],
        )


def bury(conn: Connection, dead: dict[str, str], *, now: int) -> None:
    """Dead-letter claimed rows with their reason."""
    if dead:
        conn.execute(
            update(timeouts)
            .where(timeouts.c.order_id == bindparam("oid"))
            .values(state=TimeoutState.DEAD.value, error=bindparam("err"), finished_ms=now, updated_ms=now),
            [{"oid": order_id, "err": reason} for order_id, reason in dead.items()],
        )


def replay_dead(
    conn: Connection, order_ids: Sequence[str] | None, *, now: int, published: bool
) -> list[tuple[str, int]]:
    """Re-arm dead timeouts (all when `order_ids` is None) to fire now; return (id, version)."""
    where = [timeouts.c.state == TimeoutState.DEAD.value]
    if order_ids is not None:
        where.append(timeouts.c.order_id.in_(order_ids))
    stmt = (
        update(timeouts)
        .where(*where)
        .values(**_rearm(now), due_ms=now, published_ms=now if published else None)
        .returning(timeouts.c.order_id, timeouts.c.version)
    )
    return [(order_id, version) for order_id, version in conn.execute(stmt)]


def next_due_ms(conn: Connection) -> int | None:
    if conn.dialect.name == "sqlite":
        return conn.execute(text(f"SELECT min(due_ms) FROM {_SQLITE_PENDING_DUE} WHERE {_SQLITE_IS_PENDING}")).scalar()
    return conn.execute(select(func.min(timeouts.c.due_ms)).where(_pending)).scalar()


def last_due_ms(conn: Connection) -> int:
    return int(conn.execute(select(func.max(timeouts.c.due_ms)).where(_pending)).scalar() or 0)


def pending(
    conn: Connection,
    *,
    due_after: int | None = None,
    due_before: int | None = None,
    limit: int | None = 100,
) -> list[TimeoutRecord]:
    stmt = select(timeouts).where(_pending).order_by(timeouts.c.due_ms, timeouts.c.order_id)
    if due_after is not None:
        stmt = stmt.where(timeouts.c.due_ms >= due_after)
    if due_before is not None:
        stmt = stmt.where(timeouts.c.due_ms < due_before)
    if limit is not None:
        stmt = stmt.limit(limit)
    return [TimeoutRecord.from_row(row) for row in conn.execute(stmt)]


def pending_due_times(conn: Connection, *, due_after: int | None, due_before: int | None) -> list[int]:
    """Due times of pending rows (index-only), for the histogram."""
    stmt = select(timeouts.c.due_ms).where(_pending)
    if due_after is not None:
        stmt = stmt.where(timeouts.c.due_ms >= due_after)
    if due_before is not None:
        stmt = stmt.where(timeouts.c.due_ms < due_before)
    return list(conn.execute(stmt).scalars())


def histogram(conn: Connection, *, start_ms: int, width_ms: int, buckets: int) -> list[int]:
    """Pending timeouts per due-time bucket [start + i*width, start + (i+1)*width), counted in SQL."""
    index = (timeouts.c.due_ms - start_ms) // width_ms
    stmt = (
        select(index, func.count())
        .where(_pending, timeouts.c.due_ms >= start_ms, timeouts.c.due_ms < start_ms + width_ms * buckets)
        .group_by(index)
    )
    result = [0] * buckets
    for i, count in conn.execute(stmt):
        result[min(int(i), buckets - 1)] += count
    return result


def count_pending(conn: Connection, *, due_after: int | None = None, due_before: int | None = None) -> int:
    stmt = select(func.count()).select_from(timeouts).where(_pending)
    if due_after is not None:
        stmt = stmt.where(timeouts.c.due_ms >= due_after)
    if due_before is not None:
        stmt = stmt.where(timeouts.c.due_ms < due_before)
    return int(conn.execute(stmt).scalar_one())


def counts(conn: Connection) -> dict[str, int]:
    """Rows per state, and per outcome for finished rows (keys like 'done:cancelled')."""
    stmt = select(timeouts.c.state, timeouts.c.outcome, func.count()).group_by(timeouts.c.state, timeouts.c.outcome)
    result: dict[str, int] = {state.value: 0 for state in TimeoutState}
    for state, outcome, count in conn.execute(stmt):
        result[state] = result.get(state, 0) + count
        if outcome:
            result[f"{state}:{outcome}"] = count
    return result


def finished_between(conn: Connection, start_ms: int, end_ms: int) -> int:
    stmt = (
        select(func.count())
        .select_from(timeouts)
        .where(
            _finished,
            timeouts.c.state.in_([TimeoutState.DONE.value, TimeoutState.DEAD.value]),
            timeouts.c.finished_ms >= start_ms,
            timeouts.c.finished_ms < end_ms,
        )
    )
    return int(conn.execute(stmt).scalar_one())


def all_records(conn: Connection) -> list[TimeoutRecord]:
    """Every row; for the demo and chaos checks, not for production-sized tables."""
    return [TimeoutRecord.from_row(row) for row in conn.execute(select(timeouts))]


def dead(conn: Connection, *, limit: int | None = 100) -> list[TimeoutRecord]:
    stmt = (
        select(timeouts)
        .where(_finished, timeouts.c.state == TimeoutState.DEAD.value)
        .order_by(timeouts.c.finished_ms.desc())
        .limit(limit)
    )
    return [TimeoutRecord.from_row(row) for row in conn.execute(stmt)]


def unpublished(conn: Connection, *, limit: int) -> list[tuple[str, int, int]]:
    """(order_id, due_ms, version) of pending rows the broker has not confirmed, in due order."""
    stmt = (
        select(timeouts.c.order_id, timeouts.c.due_ms, timeouts.c.version)
        .where(_unpublished)
        .order_by(timeouts.c.due_ms)
        .limit(limit)
    )
    return [(order_id, due_ms, version) for order_id, due_ms, version in conn.execute(stmt)]


def stranded(conn: Connection, *, before_ms: int, limit: int) -> list[tuple[str, int, int]]:
    """(order_id, due_ms, version) of pending rows due before `before_ms` whose last publish is also
    older than that: the broker had them long enough and they are still not finished. Oldest first.
    Each republish stamps published_ms, so a row comes back at most once per grace period."""
    stmt = (
        select(timeouts.c.order_id, timeouts.c.due_ms, timeouts.c.version)
        .where(
            _pending,
            timeouts.c.due_ms < before_ms,
            timeouts.c.published_ms.is_not(None),
            timeouts.c.published_ms < before_ms,
        )
        .order_by(timeouts.c.due_ms)
        .limit(limit)
    )
    return [(order_id, due_ms, version) for order_id, due_ms, version in conn.execute(stmt)]


def take_lease(conn: Connection, job: str, holder: str, *, now: int, ttl_ms: int) -> bool:
    """Take or renew the job's lease; False while another live holder has it.

    A holder that dies simply stops renewing: its lease expires after `ttl_ms` and the next
    process takes over, so a killed `maintain` leaves nothing stuck.
    """
    # RETURNING rather than rowcount: the driver's rowcount of INSERT … ON CONFLICT is not portable.
    taken = conn.execute(
        update(leases)
        .where(leases.c.job == job, (leases.c.holder == holder) | (leases.c.expires_ms < now))
        .values(holder=holder, expires_ms=now + ttl_ms)
        .returning(leases.c.job)
    ).first()
    if taken is not None:
        return True
    inserted = conn.execute(
        _lease_insert(conn)
        .values(job=job, holder=holder, expires_ms=now + ttl_ms)
        .on_conflict_do_nothing()
        .returning(leases.c.job)
    ).first()
    return inserted is not None


def _lease_insert(conn: Connection) -> Any:
    return postgresql.insert(leases) if conn.dialect.name == "postgresql" else sqlite.insert(leases)


def release_lease(conn: Connection, job: str, holder: str) -> None:
    conn.execute(update(leases).where(leases.c.job == job, leases.c.holder == holder).values(expires_ms=0))
