"""Every registry statement, as SQLAlchemy Core close to the SQL it sends.

The statements here are the same on every database. Where a database has a faster way (or needs
its index named), the statement lives in that database's module, `postgresql` or `sqlite`, behind
the same function name; `fast_paths` picks the module, and it is the only place that asks which
database this is. Transports and the handler call these functions inside their own transactions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Connection, Engine, Select, Table, bindparam, func, select, update

from scheduler.registry import postgresql, sqlite
from scheduler.registry.schema import (
    CLAIM_COLUMNS,
    Claim,
    Outcome,
    Retry,
    TimeoutRecord,
    TimeoutState,
    claim_values,
    is_finished,
    is_pending,
    is_unpublished,
    rearm,
    timeouts,
)


class FastPaths(Protocol):
    """The statements each database writes its own way; `postgresql` and `sqlite` implement all of them.

    The caller has already returned early on an empty batch, so every batch here holds something.
    """

    #: an open write transaction holds up every other writer (SQLite's one write lock)
    ONE_WRITER_AT_A_TIME: bool

    def database_now_ms(self, bind: Engine | Connection) -> int:
        """The database's clock in epoch ms, rounded down: the one clock of the deployment."""
        ...

    def insert_many(
        self,
        conn: Connection,
        due: Sequence[tuple[str, int]],
        *,
        now: int,
        published: bool,
        replace: bool,
        trace_context: str | None,
    ) -> dict[str, int]:
        """Insert pending rows, version 1; leave existing ones alone, or re-arm them with `replace`
        (schema.rearm, plus the new due time, published_ms and trace_context). Return {order_id:
        version} of the rows inserted or re-armed. One statement, whatever the number of rows."""
        ...

    def mark_published(self, conn: Connection, versions: Sequence[tuple[str, int]], *, now: int) -> None:
        """Set published_ms of each (order_id, version) whose version is still that one."""
        ...

    def claim_due(self, conn: Connection, *, limit: int, now: int, worker: str) -> list[Claim]:
        """Claim (schema.claim_values) up to `limit` pending rows due by `now`, earliest first; no two
        concurrent transactions may claim the same row."""
        ...

    def claim_where(self, order_ids: Sequence[str], *, now: int) -> tuple[ColumnElement[bool], ...]:
        """The WHERE of `claim`: the rows among `order_ids` still pending and due by `now`."""
        ...

    def purge_where(
        self, chosen: Select[tuple[str]], still_purgeable: ColumnElement[bool]
    ) -> tuple[ColumnElement[bool], ...]:
        """The WHERE of the retention purge's DELETE: the rows whose order ids `chosen` selects, each
        looked up by primary key, that are `still_purgeable` when the DELETE reaches them."""
        ...

    def finish(self, conn: Connection, outcomes: dict[str, Outcome], *, now: int) -> None:
        """Mark each row done with its outcome, finished at `now`, its error cleared."""
        ...

    def next_due_ms(self, conn: Connection) -> int | None:
        """The earliest due time of a pending row, from the pending index only."""
        ...

    def rows_estimate(self, conn: Connection) -> int | None:
        """The row count of the registry table in the planner's statistics; None without statistics."""
        ...

    def read_by_index(self, conn: Connection) -> None:
        """Make the rest of the transaction's reads take an index wherever one serves."""
        ...

    def insert_absent(self, conn: Connection, table: Table, values: dict[str, Any]) -> bool:
        """Insert the row unless one with its primary key exists (INSERT … ON CONFLICT DO NOTHING,
        RETURNING: the driver's rowcount of it is not portable); True when this call inserted it."""
        ...


_DIALECTS: dict[str, FastPaths] = {"postgresql": postgresql, "sqlite": sqlite}


def fast_paths(conn: Connection | Engine) -> FastPaths:
    """The module of `conn`'s database. Others raise NotImplementedError (database_url() refuses
    them earlier)."""
    name = conn.dialect.name
    try:
        return _DIALECTS[name]
    except KeyError:
        raise NotImplementedError(f"the registry supports PostgreSQL and SQLite, not {name}") from None


def database_now_ms(bind: Engine | Connection) -> int:
    """The registry database's clock, which decides when a timeout is due (scheduler.clock.RegistryClock)."""
    return fast_paths(bind).database_now_ms(bind)


def one_writer_at_a_time(engine: Engine) -> bool:
    """Whether a transaction kept open (while a broker confirms, say) holds up every other writer."""
    return fast_paths(engine).ONE_WRITER_AT_A_TIME


def insert_many(
    conn: Connection,
    due: Sequence[tuple[str, int]],
    *,
    now: int,
    published: bool,
    replace: bool,
    trace_context: str | None = None,
) -> dict[str, int]:
    """Insert timeouts; return {order_id: version} for those created or (with replace) re-armed.

    Rows that exist are left alone unless `replace`: scheduling twice is idempotent.
    `published` is true when the registry itself is the queue (the `sql` transport).
    `trace_context`: the scheduling request's W3C traceparent, stored with every row written.
    """
    if not due:
        return {}
    return fast_paths(conn).insert_many(
        conn, due, now=now, published=published, replace=replace, trace_context=trace_context
    )


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
        .where(timeouts.c.order_id == order_id, is_pending)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = conn.execute(
        update(timeouts)
        .where(timeouts.c.order_id == target, is_pending)
        .values(state=TimeoutState.REVOKED.value, finished_ms=now, updated_ms=now)
        .returning(timeouts.c.order_id)
    )
    return result.first() is not None


def move_due(conn: Connection, order_id: str, due_ms: int, *, now: int, published: bool) -> int | None:
    """Reschedule a pending timeout; return its new version, None when nothing is pending."""
    result = conn.execute(
        update(timeouts)
        .where(timeouts.c.order_id == order_id, is_pending)
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
    batch = list(versions)
    if batch:
        fast_paths(conn).mark_published(conn, batch, now=now)


def claim_due(conn: Connection, *, limit: int, now: int, worker: str) -> list[Claim]:
    """The `sql` transport's delivery: take up to `limit` due rows in due order.

    Concurrent workers each take different rows, without waiting for one another: on PostgreSQL
    through row locks held until the batch commits (a worker that dies simply releases its rows),
    on SQLite through the write lock its transaction already holds.
    """
    return fast_paths(conn).claim_due(conn, limit=limit, now=now, worker=worker)


def claim(conn: Connection, order_ids: Sequence[str], *, now: int, worker: str) -> list[Claim]:
    """Conditionally take delivered timeouts: only rows still pending and due.

    A duplicate delivery (already done), a revoked timeout, or a stale one (rescheduled later)
    matches nothing and is acked without effect. On PostgreSQL a second worker holding a copy of
    the same message waits for the first one's row lock, then re-checks `state` and finds nothing.
    """
    if not order_ids:
        return []
    stmt = (
        update(timeouts)
        .where(*fast_paths(conn).claim_where(order_ids, now=now))
        .values(claim_values(now, worker))
        .returning(*CLAIM_COLUMNS)
    )
    return [Claim(*row) for row in conn.execute(stmt)]


def pending_after(conn: Connection, order_ids: Sequence[str], *, now: int) -> dict[str, tuple[int, int]]:
    """(due_ms, version) of the rows among `order_ids` that are pending and not due by `now`."""
    stmt = select(timeouts.c.order_id, timeouts.c.due_ms, timeouts.c.version).where(
        timeouts.c.order_id.in_(order_ids), is_pending, timeouts.c.due_ms > now
    )
    return {order_id: (due_ms, version) for order_id, due_ms, version in conn.execute(stmt)}


def finish(conn: Connection, outcomes: dict[str, Outcome], *, now: int) -> None:
    """Record the outcome of claimed rows."""
    if outcomes:
        fast_paths(conn).finish(conn, outcomes, now=now)


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
        .values(**rearm(now), due_ms=now, published_ms=now if published else None)
        .returning(timeouts.c.order_id, timeouts.c.version)
    )
    return [(order_id, version) for order_id, version in conn.execute(stmt)]


def next_due_ms(conn: Connection) -> int | None:
    return fast_paths(conn).next_due_ms(conn)


def last_due_ms(conn: Connection) -> int:
    return int(conn.execute(select(func.max(timeouts.c.due_ms)).where(is_pending)).scalar() or 0)


def pending(
    conn: Connection,
    *,
    due_after: int | None = None,
    due_before: int | None = None,
    limit: int | None = 100,
) -> list[TimeoutRecord]:
    stmt = select(timeouts).where(is_pending).order_by(timeouts.c.due_ms, timeouts.c.order_id)
    if due_after is not None:
        stmt = stmt.where(timeouts.c.due_ms >= due_after)
    if due_before is not None:
        stmt = stmt.where(timeouts.c.due_ms < due_before)
    if limit is not None:
        stmt = stmt.limit(limit)
    return [TimeoutRecord.from_row(row) for row in conn.execute(stmt)]


def histogram(conn: Connection, *, start_ms: int, width_ms: int, buckets: int) -> list[int]:
    """Pending timeouts per due-time bucket [start + i*width, start + (i+1)*width), counted in SQL."""
    index = (timeouts.c.due_ms - start_ms) // width_ms
    stmt = (
        select(index, func.count())
        .where(is_pending, timeouts.c.due_ms >= start_ms, timeouts.c.due_ms < start_ms + width_ms * buckets)
        .group_by(index)
    )
    result = [0] * buckets
    for i, count in conn.execute(stmt):
        result[min(int(i), buckets - 1)] += count
    return result


def count_pending(conn: Connection, *, due_after: int | None = None, due_before: int | None = None) -> int:
    stmt = select(func.count()).select_from(timeouts).where(is_pending)
    if due_after is not None:
        stmt = stmt.where(timeouts.c.due_ms >= due_after)
    if due_before is not None:
        stmt = stmt.where(timeouts.c.due_ms < due_before)
    return int(conn.execute(stmt).scalar_one())


def read_by_index(conn: Connection) -> None:
    """For the admin commands' and the gauges' reads: the rest of this transaction plans each
    statement on an index wherever one serves, whatever the planner estimates of the history.

    Call it first in the reading transaction."""
    fast_paths(conn).read_by_index(conn)


def count_dead(conn: Connection) -> int:
    """Dead timeouts, counted in the finished-rows index: the dead entries only, whatever the history."""
    stmt = select(func.count()).select_from(timeouts).where(is_finished, timeouts.c.state == TimeoutState.DEAD.value)
    return int(conn.execute(stmt).scalar_one())


def count_unpublished(conn: Connection) -> int:
    """Pending rows the broker has not confirmed, counted in the unpublished-rows index: the relay's backlog."""
    return int(conn.execute(select(func.count()).select_from(timeouts).where(is_unpublished)).scalar_one())


#: the states a finished row can be in, named so that the finished-rows index is read per state
FINISHED_STATES = tuple(state.value for state in TimeoutState if state is not TimeoutState.PENDING)


def finished_recently(conn: Connection, start_ms: int, end_ms: int) -> dict[str, int]:
    """Timeouts that finished in [start_ms, end_ms), per state and, for done ones, per outcome
    ('done:cancelled'); every state and outcome is a key, 0 when none finished.

    The finished-rows index (state, finished_ms) is read over the window only, once per state (the
    states are named for that): the cost follows the throughput of the window, not the history
    the table keeps. The outcome is read from the rows of the window."""
    stmt = (
        select(timeouts.c.state, timeouts.c.outcome, func.count())
        .where(
            is_finished,
            timeouts.c.state.in_(FINISHED_STATES),
            timeouts.c.finished_ms >= start_ms,
            timeouts.c.finished_ms < end_ms,
        )
        .group_by(timeouts.c.state, timeouts.c.outcome)
    )
    done = TimeoutState.DONE.value
    # done first, then its outcomes, then the other states: the order `stats` prints
    result = {done: 0, **{f"{done}:{outcome.value}": 0 for outcome in Outcome}}
    result.update({state: 0 for state in FINISHED_STATES if state != done})
    for state, outcome, count in conn.execute(stmt):
        result[state] = result.get(state, 0) + count
        if outcome:
            result[f"{state}:{outcome}"] = result.get(f"{state}:{outcome}", 0) + count
    return result


def outcomes_between(conn: Connection, start_ms: int, end_ms: int) -> dict[Outcome, int]:
    """Done timeouts per outcome that finished in [start_ms, end_ms), fleet-wide: the circuit breaker's
    window. Read from the finished-rows index over the window only (state named for it)."""
    stmt = (
        select(timeouts.c.outcome, func.count())
        .where(
            is_finished,
            timeouts.c.state == TimeoutState.DONE.value,
            timeouts.c.finished_ms >= start_ms,
            timeouts.c.finished_ms < end_ms,
        )
        .group_by(timeouts.c.outcome)
    )
    result = dict.fromkeys(Outcome, 0)
    known = {outcome.value for outcome in Outcome}
    for outcome, count in conn.execute(stmt):
        if outcome in known:
            result[Outcome(outcome)] += count
    return result


def finished_sample(conn: Connection, *, start_ms: int, end_ms: int, limit: int) -> list[tuple[str, str]]:
    """(order id, outcome) of the newest `limit` done timeouts that finished in [start_ms, end_ms),
    read backwards on the finished-rows index over the window only (the recheck's sample)."""
    stmt = (
        select(timeouts.c.order_id, timeouts.c.outcome)
        .where(
            is_finished,
            timeouts.c.state == TimeoutState.DONE.value,
            timeouts.c.finished_ms >= start_ms,
            timeouts.c.finished_ms < end_ms,
        )
        .order_by(timeouts.c.finished_ms.desc())
        .limit(limit)
    )
    return [(order_id, outcome) for order_id, outcome in conn.execute(stmt)]


def rows_estimate(conn: Connection) -> int | None:
    """The database's own estimate of the registry's rows, from its planner statistics (no count is
    run); None when it has none yet."""
    return fast_paths(conn).rows_estimate(conn)


def finished_between(conn: Connection, start_ms: int, end_ms: int) -> int:
    stmt = (
        select(func.count())
        .select_from(timeouts)
        .where(
            is_finished,
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
        .where(is_finished, timeouts.c.state == TimeoutState.DEAD.value)
        .order_by(timeouts.c.finished_ms.desc())
        .limit(limit)
    )
    return [TimeoutRecord.from_row(row) for row in conn.execute(stmt)]


def unpublished(conn: Connection, *, limit: int) -> list[tuple[str, int, int]]:
    """(order_id, due_ms, version) of pending rows the broker has not confirmed, in due order."""
    stmt = (
        select(timeouts.c.order_id, timeouts.c.due_ms, timeouts.c.version)
        .where(is_unpublished)
        .order_by(timeouts.c.due_ms)
        .limit(limit)
    )
    return [(order_id, due_ms, version) for order_id, due_ms, version in conn.execute(stmt)]


def unpublish_pending(conn: Connection) -> int:
    """Mark every pending row unpublished, so that the relay publishes it again; returns how many.

    For a broker that lost its timers. Rows still unpublished are left as they are, so a repeat after
    a crash costs only what is left."""
    stmt = update(timeouts).where(is_pending, timeouts.c.published_ms.is_not(None)).values(published_ms=None)
    return int(conn.execute(stmt).rowcount)


def stranded(conn: Connection, *, before_ms: int, limit: int) -> list[tuple[str, int, int]]:
    """(order_id, due_ms, version) of pending rows due before `before_ms` whose last publish is also
    older than that: the broker had them long enough and they are still not finished. Oldest first.
    Each republish stamps published_ms, so a row comes back at most once per grace period."""
    stmt = (
        select(timeouts.c.order_id, timeouts.c.due_ms, timeouts.c.version)
        .where(
            is_pending,
            timeouts.c.due_ms < before_ms,
            timeouts.c.published_ms.is_not(None),
            timeouts.c.published_ms < before_ms,
        )
        .order_by(timeouts.c.due_ms)
        .limit(limit)
    )
    return [(order_id, due_ms, version) for order_id, due_ms, version in conn.execute(stmt)]
