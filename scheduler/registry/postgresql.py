"""PostgreSQL's fast paths: the statements written for PostgreSQL where the portable ones in
`queries` would cost more per batch. Every function here has its namesake in `sqlite`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
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
from sqlalchemy.dialects.postgresql import ARRAY, insert

from scheduler.names import REGISTRY_TABLE
from scheduler.registry.schema import (
    CLAIM_COLUMNS,
    Claim,
    Outcome,
    TimeoutState,
    claim_values,
    is_pending,
    timeouts,
)

#: row locks: writers of other rows go on while a transaction is open
ONE_WRITER_AT_A_TIME = False


def database_now_ms(bind: Engine | Connection) -> int:
    """The server's clock: clock_timestamp() is the time of the call, not of the transaction's start."""
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return database_now_ms(conn)
    return int(bind.execute(text("SELECT floor(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)")).scalar_one())


# Two parameters instead of eight per row: one short statement per chunk, whatever its size, and no
# per-row work in SQLAlchemy. Each is one string that PostgreSQL splits (string_to_array), because
# psycopg's dumping of a Python list as an array costs more than the insert's whole client side.
# Order ids are printable text (validation.order_id), so a line feed never occurs inside one.
_INSERT_MANY = f"""
INSERT INTO {REGISTRY_TABLE} AS t
    (order_id, due_ms, state, version, attempts, created_ms, updated_ms, published_ms, trace_context)
SELECT v.order_id, v.due_ms, :pending, 1, 0, CAST(:now AS bigint), CAST(:now AS bigint), CAST(:published AS bigint),
    CAST(:trace AS text)
FROM unnest(string_to_array(:ids, E'\\n'), CAST(string_to_array(:dues, ',') AS bigint[])) AS v(order_id, due_ms)
ON CONFLICT (order_id) DO {{conflict}}
RETURNING t.order_id, t.version
"""
# replace=True: the same re-arm as schema.rearm().
_REARM = """UPDATE SET
    state = :pending, outcome = NULL, version = t.version + 1, attempts = 0, fired_ms = NULL,
    finished_ms = NULL, worker = NULL, error = NULL, updated_ms = CAST(:now AS bigint),
    due_ms = EXCLUDED.due_ms, published_ms = EXCLUDED.published_ms, trace_context = EXCLUDED.trace_context"""


def insert_many(
    conn: Connection,
    due: Sequence[tuple[str, int]],
    *,
    now: int,
    published: bool,
    replace: bool,
    trace_context: str | None,
) -> dict[str, int]:
    sql = _INSERT_MANY.format(conflict=_REARM if replace else "NOTHING")
    ids = "\n".join(order_id for order_id, _ in due)
    if ids.count("\n") != len(due) - 1:
        raise ValueError("an order id contains a line feed")  # validation.order_id refuses those first
    params = {
        "ids": ids,
        "dues": ",".join(str(due_ms) for _, due_ms in due),
        "pending": TimeoutState.PENDING.value,
        "now": now,
        "published": now if published else None,
        "trace": trace_context,
    }
    return dict(conn.execute(text(sql), params).all())


def mark_published(conn: Connection, versions: Sequence[tuple[str, int]], *, now: int) -> None:
    # One statement for the whole batch instead of one UPDATE per row.
    conn.execute(
        text(
            f"UPDATE {REGISTRY_TABLE} AS t SET published_ms = :now "
            "FROM unnest(CAST(:ids AS text[]), CAST(:versions AS integer[])) AS v(order_id, version) "
            "WHERE t.order_id = v.order_id AND t.version = v.version"
        ),
        {"now": now, "ids": [order_id for order_id, _ in versions], "versions": [version for _, version in versions]},
    )


def claim_due(conn: Connection, *, limit: int, now: int, worker: str) -> list[Claim]:
    # FOR UPDATE SKIP LOCKED lets every worker take a different slice without waiting for the
    # others; the row locks last until the batch commits, so a worker that dies simply releases
    # its rows.
    due = (
        select(timeouts.c.order_id)
        .where(is_pending, timeouts.c.due_ms <= now)
        .order_by(timeouts.c.due_ms)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = (
        update(timeouts)
        .where(timeouts.c.order_id.in_(due.scalar_subquery()))
        .values(claim_values(now, worker))
        .returning(*CLAIM_COLUMNS)
    )
    return [Claim(*row) for row in conn.execute(stmt)]


def claim_where(order_ids: Sequence[str], *, now: int) -> tuple[ColumnElement[bool], ...]:
    # `order_id = ANY(:ids)`: one array parameter, one cached plan, whatever the batch size (an IN
    # list renders and plans anew for every length).
    among = timeouts.c.order_id == any_(cast(bindparam("ids", list(order_ids)), ARRAY(Text)))
    # `IS TRUE` hides these two conditions from index matching, so the plan is always the primary
    # key lookup of the ids the batch names. Left visible, stale statistics (a bulk load not
    # analyzed yet) make the planner scan every due row of the partial index and filter them
    # against the ids, for each batch. PostgreSQL still re-checks the whole condition on a row it
    # had to wait for.
    still_due = and_(is_pending, timeouts.c.due_ms <= now)
    return among, still_due.is_(true())


def purge_where(chosen: Select[tuple[str]], still_purgeable: ColumnElement[bool]) -> tuple[ColumnElement[bool], ...]:
    # `order_id = ANY(ARRAY(subquery))`: the subquery runs once, and its ids are looked up in the
    # primary key. Written as `IN (subquery)` the planner may hash-join it against a scan of the
    # whole table when it expects many rows to match. `IS TRUE` keeps the re-check out of index
    # matching (as in claim_where), so that no plan walks the finished index's whole range again
    # for each batch; PostgreSQL still re-checks it on a row changed since the subquery read it.
    return timeouts.c.order_id == any_(func.array(chosen.scalar_subquery())), still_purgeable.is_(true())


def finish(conn: Connection, outcomes: dict[str, Outcome], *, now: int) -> None:
    # One statement for the whole batch, whatever mix of outcomes it holds.
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


def next_due_ms(conn: Connection) -> int | None:
    # The portable statement: only SQLite needs the index named (see sqlite.next_due_ms).
    return conn.execute(select(func.min(timeouts.c.due_ms)).where(is_pending)).scalar()


# The planner's own arithmetic: the rows per page of the last VACUUM or ANALYZE, times the pages the
# table has now, so the figure follows growth and purges between two autovacuum runs.
# reltuples is -1 until the table was first vacuumed or analyzed.
_ROWS_ESTIMATE = """
SELECT CASE
    WHEN c.reltuples < 0 THEN NULL
    WHEN c.relpages = 0 THEN c.reltuples
    ELSE c.reltuples / c.relpages * (pg_relation_size(c.oid) / current_setting('block_size')::integer)
END
FROM pg_class AS c WHERE c.oid = to_regclass(:table)
"""


def rows_estimate(conn: Connection) -> int | None:
    estimate = conn.execute(text(_ROWS_ESTIMATE), {"table": REGISTRY_TABLE}).scalar()
    return None if estimate is None else round(estimate)


def read_by_index(conn: Connection) -> None:
    # The planner takes `state = 'pending'` and `due_ms < now` as independent: with nine finished rows
    # in ten, most of them due in the past, it expects a tenth of the history to be overdue and picks
    # a (parallel) scan of the whole table, all the more before autovacuum has marked the pages
    # all-visible (which makes an index-only scan look costly). The cost it then sees also crosses
    # the JIT thresholds, and compiling takes longer than the count. Both settings last until the
    # transaction ends; enable_seqscan = off still scans where no index serves.
    conn.execute(text("SET LOCAL enable_seqscan = off"))
    conn.execute(text("SET LOCAL jit = off"))


def insert_absent(conn: Connection, table: Table, values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING on the table's primary key; True when this call inserted."""
    key = next(iter(table.primary_key.columns))
    return conn.execute(insert(table).values(values).on_conflict_do_nothing().returning(key)).first() is not None
