"""A registry's history made in SQL: finished rows by the hundred thousand in a second or two, for the
purge's measurements (and its tests), where going through the API and the workers would take minutes."""

from __future__ import annotations

from sqlalchemy import Engine, text

from scheduler.names import REGISTRY_TABLE
from scheduler.registry import Outcome, TimeoutState

#: rows per INSERT … SELECT: one transaction each, so the database never holds a million-row one
HISTORY_CHUNK = 200_000

_ROWS = {
    # generate_series on PostgreSQL; a recursive CTE counts on SQLite
    "postgresql": "SELECT i FROM generate_series(CAST(:start AS bigint), CAST(:stop AS bigint) - 1) AS s(i)",
    "sqlite": "WITH RECURSIVE s(i) AS (SELECT :start UNION ALL SELECT i + 1 FROM s WHERE i + 1 < :stop) "
    "SELECT i FROM s",
}
#: the row number as 9 digits
_DIGITS = {"postgresql": "lpad(CAST(i AS text), 9, '0')", "sqlite": "substr('00000000' || i, -9, 9)"}


def add_finished(
    engine: Engine,
    count: int,
    *,
    prefix: str,
    finished_ms: int,
    state: TimeoutState = TimeoutState.DONE,
    spread_ms: int = 0,
) -> None:
    """`count` rows `{prefix}-{i:09d}` in a finished `state`, finished from `finished_ms` onwards, one
    every `spread_ms / count` ms (all at `finished_ms` when `spread_ms` is 0), as a worker leaves them."""
    dialect = engine.dialect.name
    outcome = Outcome.CANCELLED.value if state is TimeoutState.DONE else None
    insert = text(
        f"INSERT INTO {REGISTRY_TABLE} (order_id, due_ms, state, outcome, version, attempts, created_ms, "
        "updated_ms, published_ms, fired_ms, finished_ms, worker) "
        f"SELECT :prefix || '-' || {_DIGITS[dialect]}, f - 1000, :state, :outcome, 1, 1, f - 60000, "
        "f, f - 60000, f - 500, f, 'bench' "
        f"FROM (SELECT i, CAST(:finished AS bigint) + (i * :spread) / :count AS f FROM ({_ROWS[dialect]}) AS n) AS r"
    )
    for start in range(0, count, HISTORY_CHUNK):
        params = {
            "prefix": prefix,
            "state": state.value,
            "outcome": outcome,
            "finished": finished_ms,
            "spread": spread_ms,
            "count": count,
            "start": start,
            "stop": min(start + HISTORY_CHUNK, count),
        }
        with engine.begin() as conn:
            conn.execute(insert, params)
