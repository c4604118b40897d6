"""`order-timeouts purge` and the retention lines of `stats`, on SQLite and PostgreSQL, as an admin runs
them: what goes, what stays, what a purged order looks like afterwards, and the plans of the purge's
statements (the finished index, never the table)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select, text

from scheduler import TimeoutState, registry, retention
from scheduler.database import reading
from scheduler.names import REGISTRY_TABLE
from scheduler.registry import PURGED_STATES, timeouts
from scheduler.testing import add_finished
from tests.conftest import Stack
from tests.integration.test_cli import Cli
from tests.support import add_orders, cancel_counts, registry_records

HOUR_MS = 3_600_000


@pytest.fixture
def cli(db_stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(db_stack, capsys, monkeypatch)


def database_now(stack: Stack) -> int:
    return registry.database_now_ms(stack.engine)


def states(engine: Engine) -> dict[str, int]:
    with reading(engine) as conn:
        rows = conn.execute(select(timeouts.c.state, func.count()).group_by(timeouts.c.state)).all()
    return {state: int(count) for state, count in rows}


def history(stack: Stack) -> int:
    """Finished rows 2 hours old and 30 minutes old, of each finished state, and pending ones; returns now."""
    now = database_now(stack)
    for state in (TimeoutState.DONE, TimeoutState.REVOKED, TimeoutState.DEAD):
        add_finished(stack.engine, 30, prefix=f"old-{state}", finished_ms=now - 2 * HOUR_MS, state=state)
        add_finished(stack.engine, 20, prefix=f"new-{state}", finished_ms=now - HOUR_MS // 2, state=state)
    stack.timeouts().schedule_many([f"pending-{i}" for i in range(10)], delay=timedelta(minutes=1))
    stack.timeouts().schedule("overdue", delay=timedelta(milliseconds=1))  # pending and due: not finished
    return now


def test_the_cutoff_is_exact_to_the_millisecond(db_stack: Stack) -> None:
    cutoff = database_now(db_stack) - HOUR_MS
    add_finished(db_stack.engine, 3, prefix="before", finished_ms=cutoff - 1)
    add_finished(db_stack.engine, 3, prefix="at", finished_ms=cutoff)

    assert retention.count(db_stack.engine, before_ms=cutoff, states=PURGED_STATES) == 3
    assert retention.purge(db_stack.engine, before_ms=cutoff, states=PURGED_STATES, batch=2) == 3

    assert sorted(registry_records(db_stack.engine)) == [f"at{i:010d}" for i in range(1, 4)]


def test_purge_deletes_done_and_revoked_rows_older_than_the_cutoff_and_nothing_else(cli: Cli, db_stack: Stack) -> None:
    history(db_stack)
    before = states(db_stack.engine)

    dry = cli.json("purge", "--older-than", "1h", "--dry-run")
    assert isinstance(dry, dict) and dry["count"] == 60 and dry["dry_run"] is True
    assert dry["states"] == ["done", "revoked"]
    assert states(db_stack.engine) == before, "a dry run deletes nothing"

    code, out, _ = cli("purge", "--older-than", "1h")
    assert code == 0 and out.startswith("deleted 60 timeouts (done, revoked) finished before ")
    assert states(db_stack.engine) == {"pending": 11, "done": 20, "revoked": 20, "dead": 50}
    assert not [oid for oid in registry_records(db_stack.engine) if oid.startswith(("old-done", "old-revoked"))]

    dead = cli.json("purge", "--older-than", "1h", "--include-dead")
    assert isinstance(dead, dict) and dead["count"] == 30 and dead["states"] == ["done", "revoked", "dead"]
    assert states(db_stack.engine) == {"pending": 11, "done": 20, "revoked": 20, "dead": 20}

    again = cli.json("purge", "--older-than", "1h", "--include-dead")
    assert isinstance(again, dict) and again["count"] == 0


def test_a_purged_order_shows_as_never_scheduled_and_can_be_scheduled_again(cli: Cli, db_stack: Stack) -> None:
    add_orders(db_stack.engine, ["P-1"])
    client = db_stack.timeouts()
    client.schedule("P-1", delay=timedelta(minutes=30))
    client.cancel("P-1")  # paid: revoked
    assert cli.json("purge", "--older-than", "1ms")["count"] == 1  # type: ignore[index]

    purged = cli("show", "P-1")
    never = cli("show", "never-scheduled")
    assert purged[0] == never[0] == 2
    assert purged[2] == never[2].replace("never-scheduled", "P-1")

    code, out, _ = cli("schedule", "P-1", "--delay", "1ms")
    assert code == 0 and "P-1: created" in out
    shown = cli.json("show", "P-1")
    assert isinstance(shown, dict) and shown["state"] == "pending" and shown["version"] == 1
    db_stack.drain_until(lambda: cancel_counts(db_stack.engine) == {"P-1": 1})
    record = client.get("P-1")
    assert record is not None and record.state is TimeoutState.DONE


@pytest.mark.parametrize("duration", ["soon", "0s", "0", "-1h", "", "7 days", "1w"])
def test_a_bad_duration_exits_2_with_one_line_and_deletes_nothing(cli: Cli, db_stack: Stack, duration: str) -> None:
    history(db_stack)
    before = states(db_stack.engine)

    code, out, err = cli("purge", "--older-than", duration)

    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "--older-than" in err
    assert states(db_stack.engine) == before


def test_stats_shows_the_retention_and_the_oldest_finished_row(
    cli: Cli, db_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    history(db_stack)
    stats = cli.json("stats")
    assert isinstance(stats, dict) and stats["retention_seconds"] == 7 * 86400
    assert 2 * 3600 <= stats["oldest_finished_age_seconds"] < 2 * 3600 + 60
    assert stats["oldest_dead_at"] is not None
    code, out, _ = cli("stats")
    assert code == 0 and "retention (done, revoked)" in out and "7.0d" in out and "2.0h ago" in out

    cli("purge", "--older-than", "1h")
    after = cli.json("stats")
    assert isinstance(after, dict)
    assert 1800 <= after["oldest_finished_age_seconds"] < 1800 + 60

    monkeypatch.setenv("ORDER_TIMEOUTS_RETENTION", "off")
    off = cli.json("stats")
    assert isinstance(off, dict) and off["retention_seconds"] is None
    assert "off" in cli("stats")[1]


def executed(engine: Engine, work: Callable[[], object]) -> list[tuple[str, Any]]:
    """The statements on the registry table that `work` sends, with their parameters."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: object, _cursor: object, statement: str, params: Any, _context: object, _many: bool) -> None:
        if REGISTRY_TABLE in statement:
            seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        work()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return seen


def plan(engine: Engine, statement: str, params: Any) -> str:
    """The plan the database chooses for `statement` with `params`, its lines joined by " / "."""
    explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with reading(engine) as conn:
        rows = conn.exec_driver_sql(explain + statement, params).all()
    return " / ".join(str(row[-1]) for row in rows)


def oldest_done(engine: Engine) -> int | None:
    with reading(engine) as conn:
        return registry.oldest_finished_ms(conn, [TimeoutState.DONE])


def test_the_purge_reads_finished_rows_through_the_finished_index_only(db_stack: Stack) -> None:
    """In a table mostly pending, the dry run's count, a purge batch and the oldest finished row read
    ranges of the finished index; no statement scans the table, and the DELETE finds the rows it chose
    by primary key."""
    engine = db_stack.engine
    now = history(db_stack)
    add_finished(engine, 2000, prefix="bulk", finished_ms=now - 3 * HOUR_MS)
    db_stack.timeouts().schedule_many([f"far-{i}" for i in range(20_000)], delay=timedelta(days=10))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE order_timeouts" if engine.dialect.name == "postgresql" else "ANALYZE"))
    before = now - HOUR_MS

    def one_batch() -> None:
        with engine.connect() as conn, conn.begin() as transaction:
            registry.purge_finished(conn, before_ms=before, state=TimeoutState.DONE, limit=100)
            transaction.rollback()

    statements = [
        *executed(engine, lambda: retention.count(engine, before_ms=before, states=PURGED_STATES)),
        *executed(engine, one_batch),
        *executed(engine, lambda: oldest_done(engine)),
    ]
    assert len(statements) == 3
    for statement, params in statements:
        chosen = plan(engine, statement, params)
        assert "ix_order_timeouts_state_finished" in chosen, chosen
        # SQLite says SCAN for a walk of a whole table or index, SEARCH for a range of an index.
        assert "Seq Scan" not in chosen and "SCAN order_timeouts" not in chosen, chosen
        if statement.startswith("DELETE"):  # the rows it chose, each deleted through the primary key
            assert "order_timeouts_pkey" in chosen or "sqlite_autoindex_order_timeouts_1" in chosen, chosen
