"""A registry with a long history, written in SQL: for tests and benchmarks of what reads the
registry (admin commands, purges) at millions of rows.

`add_history` inserts rows that look like a registry after weeks of traffic, with one
`INSERT … SELECT` over a series generated inside the database (PostgreSQL's generate_series, a
recursive CTE on SQLite), so ten million rows take minutes, not the hours of the API. The rows keep
the registry's contract (docs/registry.md): a finished row has its state, outcome and times in the
order a worker writes them; a pending row is published (the `sql` transport's way) and unclaimed.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text

from scheduler.names import REGISTRY_TABLE
from scheduler.registry.schema import Outcome, TimeoutState

_DAY_MS = 86_400_000


@dataclass(frozen=True)
class History:
    """What `add_history` writes. Ids are `<prefix>f-<n>` (finished) and `<prefix>p-<n>` (pending)."""

    #: rows that left `pending`: every 1000th dead, every 10th otherwise revoked, the rest done
    finished: int
    #: rows still pending, due one after another over `pending_span_ms` after `now_ms`, the first
    #: one step after it; the `overdue` ones before them are due before `now_ms`
    pending: int
    #: the epoch ms the history ends at
    now_ms: int
    #: finished rows are spread evenly over this span before `now_ms` (a week by default: the
    #: default retention of finished timeouts)
    finished_span_ms: int = 7 * _DAY_MS
    pending_span_ms: int = _DAY_MS
    overdue: int = 0
    prefix: str = "h"


def add_history(conn: Connection, history: History) -> None:
    """Insert the rows of `history` in the caller's transaction (ids must not exist yet)."""
    finished_step = max(history.finished_span_ms // max(history.finished, 1), 1)
    pending_step = max(history.pending_span_ms // max(history.pending, 1), 1)
    params = {
        "now": history.now_ms,
        "finished_step": finished_step,
        "pending_step": pending_step,
        "overdue": history.overdue,
        "done": TimeoutState.DONE.value,
        "revoked": TimeoutState.REVOKED.value,
        "dead": TimeoutState.DEAD.value,
        "pending": TimeoutState.PENDING.value,
        "paid": Outcome.PAID.value,
        "cancelled": Outcome.CANCELLED.value,
        "already_cancelled": Outcome.ALREADY_CANCELLED.value,
    }
    for kind, count, select in (("f", history.finished, _FINISHED), ("p", history.pending, _PENDING)):
        if count == 0:
            continue
        with_series, source, order_id = _series(conn.dialect.name)
        sql = f"INSERT INTO {REGISTRY_TABLE} {_COLUMNS} {with_series} {select.format(order_id=order_id, source=source)}"
        conn.execute(text(sql), {**params, "count": count, "prefix": f"{history.prefix}{kind}-", "start": 1})


def add_finished(
    engine: Engine,
    count: int,
    *,
    prefix: str,
    finished_ms: int,
    state: TimeoutState = TimeoutState.DONE,
    spread_ms: int = 0,
) -> None:
    """`count` rows `{prefix}{n:010d}` (n from 1) in the finished `state`, the first finished at
    `finished_ms` and one every `spread_ms / count` ms after it (all at once when `spread_ms` is 0),
    in transactions of FINISHED_CHUNK rows: for the purge's tests and measurements."""
    with_series, source, order_id = _series(engine.dialect.name)
    outcome = Outcome.CANCELLED.value if state is TimeoutState.DONE else None
    select = f"""
SELECT {order_id}, f - 1000, :state, :outcome, 1, 1, f - 1801000, f, f - 1801000, f - 1000, f, 'history:1', NULL
FROM (SELECT i, CAST(:finished AS bigint) + ((i - 1) * :spread) / :total AS f FROM {source}) AS r
"""
    insert = text(f"INSERT INTO {REGISTRY_TABLE} {_COLUMNS} {with_series} {select}")
    for start in range(1, count + 1, FINISHED_CHUNK):
        params = {
            "prefix": prefix,
            "state": state.value,
            "outcome": outcome,
            "finished": finished_ms,
            "spread": spread_ms,
            "total": count,
            "start": start,
            "count": min(start + FINISHED_CHUNK - 1, count),
        }
        with engine.begin() as conn:
            conn.execute(insert, params)


#: rows per transaction of add_finished, so that the database never holds a million-row one
FINISHED_CHUNK = 200_000


def _series(dialect: str) -> tuple[str, str, str]:
    """(WITH clause, FROM source, order id expression) numbering rows i = :start .. :count inside the
    database: PostgreSQL's generate_series, a recursive CTE on SQLite."""
    if dialect == "postgresql":
        source = "generate_series(CAST(:start AS bigint), CAST(:count AS bigint)) AS s(i)"
        return "", source, "CAST(:prefix AS text) || lpad(CAST(i AS text), 10, '0')"
    with_series = "WITH RECURSIVE s(i) AS (SELECT :start UNION ALL SELECT i + 1 FROM s WHERE i < :count)"
    return with_series, "s", ":prefix || printf('%010d', i)"


_COLUMNS = (
    "(order_id, due_ms, state, outcome, version, attempts, created_ms, updated_ms, "
    "published_ms, fired_ms, finished_ms, worker, error)"
)
# i = 1 is the most recent: finished `finished_step` ms before now, due a second before it finished,
# scheduled 30 minutes before its due time. Done rows take the three outcomes in turn.
_FINISHED = """
SELECT {order_id},
    :now - i * :finished_step - 1000,
    CASE WHEN i % 1000 = 0 THEN :dead WHEN i % 10 = 0 THEN :revoked ELSE :done END,
    CASE WHEN i % 10 = 0 THEN NULL WHEN i % 3 = 0 THEN :paid WHEN i % 3 = 1 THEN :cancelled
        ELSE :already_cancelled END,
    1,
    CASE WHEN i % 10 = 0 AND i % 1000 <> 0 THEN 0 ELSE 1 END,
    :now - i * :finished_step - 1000 - 1800000,
    :now - i * :finished_step,
    :now - i * :finished_step - 1000 - 1800000,
    CASE WHEN i % 10 = 0 AND i % 1000 <> 0 THEN NULL ELSE :now - i * :finished_step - 1000 END,
    :now - i * :finished_step,
    CASE WHEN i % 10 = 0 AND i % 1000 <> 0 THEN NULL ELSE 'history:1' END,
    CASE WHEN i % 1000 = 0 THEN 'payment status unknown: history' END
FROM {source}
"""
_PENDING = """
SELECT {order_id},
    :now + (i - :overdue) * :pending_step - CASE WHEN i <= :overdue THEN :pending_step ELSE 0 END,
    :pending, NULL, 1, 0,
    :now - 1800000, :now - 1800000, :now - 1800000,
    NULL, NULL, NULL, NULL
FROM {source}
"""
