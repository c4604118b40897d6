"""How the registry's statements are planned: captured while real code runs, explained on the same
database, checked for scans of the registry's history.

    with captured_statements() as statements:
        cli("stats", "--json")                     # or any code that talks to the registry
    for plan in explained(engine, statements, analyze=True):
        assert not plan.full_scans, plan
        assert plan.rows_read is None or plan.rows_read <= limit, plan

A full scan is a sequential scan of `order_timeouts`, or a walk of one of its indexes from end to
end (PostgreSQL: an index scan without an index condition; SQLite: `SCAN order_timeouts` with no
index, or with an index other than a pending-only one). Walking a pending-only partial index is
allowed: it reads pending rows only, however long the history is. A search of an index by a
condition is allowed too; `rows_read` (PostgreSQL with `analyze`) tells whether that condition
kept the read small.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, event

from scheduler.names import REGISTRY_TABLE
from scheduler.registry import PENDING_DUE_INDEX

#: partial indexes that hold pending rows only: walking one costs the pending rows, not the history
PENDING_ONLY_INDEXES = frozenset({PENDING_DUE_INDEX, "ix_order_timeouts_unpublished"})


@dataclass(frozen=True)
class Statement:
    sql: str
    parameters: Any


@dataclass
class Plan:
    statement: Statement
    #: PostgreSQL: the JSON plan; SQLite: the lines of EXPLAIN QUERY PLAN
    plan: Any
    #: what reads the registry end to end, one line each; empty when every read is an index search
    full_scans: list[str] = field(default_factory=list)
    #: PostgreSQL with analyze: rows the scans of the registry returned or filtered out
    rows_read: int | None = None


@contextlib.contextmanager
def captured_statements(*kinds: str) -> Iterator[list[Statement]]:
    """Every statement any engine of this process sends meanwhile whose first word is one of `kinds`
    (default SELECT and WITH), with its parameters, as the driver receives them; and the SET
    statements among them (planner settings), which `explained` applies in turn."""
    first_words = (*(kind.upper() for kind in kinds), "SET") if kinds else ("SELECT", "WITH", "SET")
    captured: list[Statement] = []

    def capture(
        conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        if not executemany and statement.lstrip().split(None, 1)[0].upper() in first_words:
            captured.append(Statement(statement, parameters))

    event.listen(Engine, "before_cursor_execute", capture)
    try:
        yield captured
    finally:
        event.remove(Engine, "before_cursor_execute", capture)


def explained(engine: Engine, statements: Iterable[Statement], *, analyze: bool = False) -> list[Plan]:
    """The plan of each statement that names the registry table, on `engine`'s database.

    `analyze` runs each statement (PostgreSQL's EXPLAIN ANALYZE) to count the rows it read: only
    for statements without side effects. SQLite plans have no row counts."""
    plans = []
    with engine.connect() as conn:
        for statement in statements:
            if statement.sql.lstrip().upper().startswith("SET "):
                # the command's planner settings, for the statements after it (until the end, not of
                # the command's transaction: all of them are explained in one)
                conn.exec_driver_sql(statement.sql, statement.parameters)
                continue
            if not re.search(rf"\b{REGISTRY_TABLE}\b", statement.sql):
                continue
            if conn.dialect.name == "postgresql":
                plans.append(_postgresql(conn, statement, analyze=analyze))
            else:
                plans.append(_sqlite(conn, statement))
        conn.rollback()
    return plans


def _postgresql(conn: Connection, statement: Statement, *, analyze: bool) -> Plan:
    options = "ANALYZE, FORMAT JSON" if analyze else "FORMAT JSON"
    result = conn.exec_driver_sql(f"EXPLAIN ({options}) {statement.sql}", statement.parameters).scalar_one()
    document = json.loads(result) if isinstance(result, str) else result
    plan = Plan(statement, document, rows_read=0 if analyze else None)
    for node in _nodes(document[0]["Plan"]):
        relation = node.get("Relation Name")
        index = node.get("Index Name")
        if relation == REGISTRY_TABLE and node["Node Type"] == "Seq Scan":
            plan.full_scans.append(f"Seq Scan on {relation}")
        if index is not None and index not in PENDING_ONLY_INDEXES and "Index Cond" not in node:
            plan.full_scans.append(f"{node['Node Type']} on {index} without an index condition")
        if analyze and relation == REGISTRY_TABLE:
            assert plan.rows_read is not None
            plan.rows_read += node["Actual Rows"] * node["Actual Loops"]
            plan.rows_read += node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
    return plan


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


# "SCAN order_timeouts", "SCAN order_timeouts USING COVERING INDEX ix_…", "SEARCH order_timeouts USING INDEX ix_… (…)"
_SQLITE_SCAN = re.compile(rf"^SCAN {REGISTRY_TABLE}\b(?: USING (?:COVERING )?INDEX (\S+))?")


def _sqlite(conn: Connection, statement: Statement) -> Plan:
    rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement.sql}", statement.parameters).all()
    lines = [str(row[-1]) for row in rows]
    plan = Plan(statement, lines)
    for line in lines:
        scan = _SQLITE_SCAN.match(line)
        if scan is not None and scan.group(1) not in PENDING_ONLY_INDEXES:
            plan.full_scans.append(line)
    return plan
