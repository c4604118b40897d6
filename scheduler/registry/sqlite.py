"""SQLite's fast paths: the statements written for SQLite where the portable ones in `queries`
would cost more or read the wrong index. Every function here has its namesake in `postgresql`,
except `insert_one`, which serves the asyncio API on aiosqlite."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Connection, Engine, Select, Table, and_, bindparam, text, update
from sqlalchemy.dialects import sqlite as sqlite_dialects
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.exc import DBAPIError

from scheduler.names import REGISTRY_TABLE
from scheduler.registry.schema import (
    PENDING_DUE_INDEX,
    Claim,
    Outcome,
    TimeoutState,
    is_pending,
    rearm,
    timeouts,
)

if TYPE_CHECKING:
    import aiosqlite
    from sqlalchemy.sql.dml import ReturningInsert

#: one write lock for the whole database, held from BEGIN IMMEDIATE to the commit
ONE_WRITER_AT_A_TIME = True


def database_now_ms(bind: Engine | Connection) -> int:
    """The host's clock as its kernel keeps it, read from the time it stamps on a file it writes.

    SQLite runs inside each process, so its own `now` is the process's clock, which a process-level
    offset (a fake time, a clock namespace) moves with it. The kernel's file timestamps are the
    host's, and every process on the host shares the database file. The file is written beside
    the database (whose folder SQLite's journal needs writable anyway), or in the temporary folder
    for a database in memory. The kernel stamps files with a coarse clock, behind its own by at
    most a tick: never ahead.
    """
    database = bind.engine.url.database
    folder = Path(database).resolve().parent if database not in (None, "", ":memory:") else None
    with tempfile.TemporaryFile(dir=folder if folder is not None and folder.is_dir() else None) as probe:
        probe.write(b"t")
        probe.flush()
        return os.fstat(probe.fileno()).st_mtime_ns // 1_000_000


# Without ANALYZE statistics SQLite's planner may answer `state = 'pending'` from another index than
# the partial one and walk (and sort) every pending row, however far off their due times, for each
# claim and each look at the next due time. INDEXED BY pins the partial index, which reads only the
# due rows, already in due order.
# The state is a literal, not a parameter: SQLite uses a partial index only when it can see at
# prepare time that the query implies the index's WHERE.
_PENDING_DUE = f"{REGISTRY_TABLE} INDEXED BY {PENDING_DUE_INDEX}"
_IS_PENDING = f"state = '{TimeoutState.PENDING.value}'"


def insert_many(
    conn: Connection,
    due: Sequence[tuple[str, int]],
    *,
    now: int,
    published: bool,
    replace: bool,
    trace_context: str | None,
) -> dict[str, int]:
    params = [_new_row(order_id, due_ms, now, published, trace_context) for order_id, due_ms in due]
    return dict(conn.execute(_insert_statement(replace, now), params).all())


async def insert_one(
    driver: aiosqlite.Connection,
    order_id: str,
    due_ms: int,
    *,
    now: int,
    published: bool,
    trace_context: str | None,
) -> dict[str, int]:
    """`insert_many` of one row without `replace`, run on an aiosqlite connection in one trip to its
    thread. SQLAlchemy's adapter makes four for a statement with RETURNING (cursor, execute, fetch,
    close), each a hand-over between the event loop and the thread that costs more than the
    statement. The caller has begun the transaction through SQLAlchemy: the statement joins it."""
    sql, names = _insert_one_sql()
    row = _new_row(order_id, due_ms, now, published, trace_context)
    params = [row[name] for name in names]
    try:
        rows = await driver.execute_fetchall(sql, params)
    except sqlite3.Error as exc:  # raised as SQLAlchemy raises the same error on the other paths
        raise DBAPIError.instance(sql, params, exc, sqlite3.Error) from exc
    return {row[0]: row[1] for row in rows}


def _new_row(order_id: str, due_ms: int, now: int, published: bool, trace_context: str | None) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "due_ms": due_ms,
        "state": TimeoutState.PENDING.value,
        "version": 1,
        "attempts": 0,
        "created_ms": now,
        "updated_ms": now,
        "published_ms": now if published else None,
        "trace_context": trace_context,
    }


def _insert_statement(replace: bool, now: int) -> ReturningInsert[Any]:
    """Insert new rows; an existing one is left alone, or re-armed with `replace`."""
    stmt = insert(timeouts)
    if replace:
        stmt = stmt.on_conflict_do_update(
            index_elements=[timeouts.c.order_id],
            set_={
                **rearm(now),
                "due_ms": stmt.excluded.due_ms,
                "published_ms": stmt.excluded.published_ms,
                "trace_context": stmt.excluded.trace_context,
            },
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=[timeouts.c.order_id])
    return stmt.returning(timeouts.c.order_id, timeouts.c.version)


@cache
def _insert_one_sql() -> tuple[str, tuple[str, ...]]:
    """`_insert_statement` for one new row, compiled once: its SQL and the names of its parameters
    in their order."""
    compiled = _insert_statement(False, 0).compile(
        dialect=sqlite_dialects.dialect(), column_keys=list(_new_row("", 0, 0, False, None))
    )
    return compiled.string, tuple(compiled.positiontup or ())


def mark_published(conn: Connection, versions: Sequence[tuple[str, int]], *, now: int) -> None:
    conn.execute(
        update(timeouts)
        .where(timeouts.c.order_id == bindparam("oid"), timeouts.c.version == bindparam("ver"))
        .values(published_ms=now),
        [{"oid": order_id, "ver": version} for order_id, version in versions],
    )


def claim_due(conn: Connection, *, limit: int, now: int, worker: str) -> list[Claim]:
    # The transaction already holds the write lock (BEGIN IMMEDIATE), so the plain select is as
    # exclusive as PostgreSQL's FOR UPDATE SKIP LOCKED.
    stmt = text(
        f"UPDATE {REGISTRY_TABLE} SET attempts = attempts + 1, worker = :worker, "
        "fired_ms = coalesce(fired_ms, :now), updated_ms = :now "
        f"WHERE order_id IN (SELECT order_id FROM {_PENDING_DUE} "
        f"WHERE {_IS_PENDING} AND due_ms <= :now ORDER BY due_ms LIMIT :limit) "
        "RETURNING order_id, due_ms, version, attempts"
    )
    params = {"worker": worker, "now": now, "limit": limit}
    return [Claim(*row) for row in conn.execute(stmt, params)]


def claim_where(order_ids: Sequence[str], *, now: int) -> tuple[ColumnElement[bool], ...]:
    return timeouts.c.order_id.in_(order_ids), and_(is_pending, timeouts.c.due_ms <= now)


def purge_where(chosen: Select[tuple[str]], still_purgeable: ColumnElement[bool]) -> tuple[ColumnElement[bool], ...]:
    # SQLite runs an IN subquery once into a list and looks each id up in the primary key. No
    # re-check: nothing changes a row between the subquery and the delete, as the transaction holds
    # the write lock. Stated, the planner may answer it from the finished index instead, and walk
    # all the purgeable rows for each batch.
    return (timeouts.c.order_id.in_(chosen.scalar_subquery()),)


def finish(conn: Connection, outcomes: dict[str, Outcome], *, now: int) -> None:
    # No arrays to join the batch against (PostgreSQL's unnest): one UPDATE per distinct outcome,
    # each over the ids that share it.
    by_outcome: dict[Outcome, list[str]] = {}
    for order_id, outcome in outcomes.items():
        by_outcome.setdefault(outcome, []).append(order_id)
    for outcome, order_ids in by_outcome.items():
        conn.execute(
            update(timeouts)
            .where(timeouts.c.order_id.in_(order_ids))
            .values(state=TimeoutState.DONE.value, outcome=outcome.value, finished_ms=now, updated_ms=now, error=None)
        )


def next_due_ms(conn: Connection) -> int | None:
    return conn.execute(text(f"SELECT min(due_ms) FROM {_PENDING_DUE} WHERE {_IS_PENDING}")).scalar()


def rows_estimate(conn: Connection) -> int | None:
    # ANALYZE writes the row count of each index into sqlite_stat1, the table's as its primary key's
    # (the first number of `stat`); there is nothing to read before the first ANALYZE.
    if conn.execute(text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_stat1'")).first() is None:
        return None
    stat = conn.execute(
        text("SELECT stat FROM sqlite_stat1 WHERE tbl = :table AND idx = :index"),
        {"table": REGISTRY_TABLE, "index": f"sqlite_autoindex_{REGISTRY_TABLE}_1"},
    ).scalar()
    return None if stat is None else int(str(stat).split()[0])


def read_by_index(conn: Connection) -> None:
    # SQLite's planner takes the partial indexes for the admin commands' statements as they are
    # written (tests/integration/test_admin_plans.py), statistics or not.
    return None


def insert_absent(conn: Connection, table: Table, values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING on the table's primary key; True when this call inserted."""
    key = next(iter(table.primary_key.columns))
    return conn.execute(insert(table).values(values).on_conflict_do_nothing().returning(key)).first() is not None
