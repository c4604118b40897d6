"""The admin commands read indexes, never the registry's history end to end: their statements,
captured while each command runs, are explained on a registry with ten times more finished rows
than pending ones and fresh planner statistics, on PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from scheduler import registry
from scheduler.observability import RegistryCollector
from scheduler.schema import init_db
from scheduler.testing import History, add_history
from tests.conftest import Stack, open_stack
from tests.integration.test_cli import Cli
from tests.plans import captured_statements, explained
from tests.stacks import DATABASES

FINISHED = 40_000
PENDING = 4_000
OVERDUE = 30


@pytest.fixture(scope="module", params=sorted(DATABASES))
def history_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One registry per database for the whole module: a week of finished timeouts, pending ones over
    the next days, a few overdue; analyzed, not vacuumed (PostgreSQL's state right after a bulk load,
    the harder one for its planner: no page is marked all-visible yet)."""
    tmp: Path = tmp_path_factory.mktemp(request.param)
    with DATABASES[request.param](tmp) as (database_url, broker_url):
        stack = Stack(request.param, database_url, broker_url)
        init_db(stack.engine, stack.opened[0].settings.orders)
        now = registry.database_now_ms(stack.engine)
        with stack.engine.begin() as conn:
            # one pending timeout due a minute after another: none comes due while the module runs
            history = History(FINISHED, PENDING, now, pending_span_ms=PENDING * 60_000, overdue=OVERDUE)
            add_history(conn, history)
        if stack.name == "postgresql":
            with stack.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("ANALYZE order_timeouts"))
        else:
            with stack.engine.begin() as conn:
                conn.execute(text("ANALYZE"))
        try:
            yield stack
        finally:
            for client in stack.opened:
                client.close()


del open_stack  # the module's registry is built once, above

WINDOW_START = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
WINDOW_END = (datetime.now(UTC) + timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
COMMANDS = [
    ["pending"],
    ["pending", "--overdue"],
    ["pending", "--due-within", "1h"],
    ["pending", "--due-after", WINDOW_START],
    ["pending", "--due-before", WINDOW_END],
    ["pending", "--due-after", WINDOW_START, "--due-before", WINDOW_END, "--limit", "500"],
    ["pending", "--histogram"],
    ["pending", "--histogram", "--overdue"],
    ["pending", "--histogram", "--due-after", WINDOW_START, "--due-before", WINDOW_END],
    ["stats"],
    ["stats", "--json"],
    ["show", "hf-0000000007"],
    ["show", "hp-0000000007", "--json"],
    ["dead", "list"],
    ["dead", "list", "--json", "--limit", "1000"],
]


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_each_admin_command_reads_indexes_only_never_the_finished_rows(
    history_stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    cli = Cli(history_stack, capsys, monkeypatch)
    with captured_statements() as statements:
        code, _, err = cli(*args)
    assert code == 0, err

    plans = explained(history_stack.engine, statements, analyze=True)

    assert plans, "the command read the registry"
    for plan in plans:
        assert not plan.full_scans, f"{plan.full_scans} in {plan.statement.sql}\n{plan.plan}"
        # A command may read every pending row (a count, a histogram), or the dead ones, or those
        # finished in the last minutes; never a share of the finished history beyond that.
        assert plan.rows_read is None or plan.rows_read <= PENDING + FINISHED // 100, plan


def test_the_registry_gauges_read_indexes_only(history_stack: Stack) -> None:
    client = history_stack.timeouts()
    with captured_statements() as statements:
        gauges = {
            family.name: family.samples[0].value for family in RegistryCollector(client.engine, client.clock).collect()
        }
    assert gauges["order_timeouts_pending"] == PENDING and gauges["order_timeouts_overdue"] == OVERDUE
    assert gauges["order_timeouts_dead"] == FINISHED // 1000

    for plan in explained(history_stack.engine, statements, analyze=True):
        assert not plan.full_scans, f"{plan.full_scans} in {plan.statement.sql}"
        assert plan.rows_read is None or plan.rows_read <= PENDING + FINISHED // 100, plan


def test_stats_answers_pending_dead_recent_outcomes_and_the_table_size(
    history_stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = Cli(history_stack, capsys, monkeypatch).json("stats")

    assert isinstance(stats, dict)
    assert stats["states"] == {"pending": PENDING, "dead": FINISHED // 1000}
    assert stats["overdue"] == OVERDUE
    # a week of 40,000 finished rows: one every 15.12 s, so 19 or 20 in the last five minutes (the
    # clock moved on since the history was written), each state and outcome named
    recent = stats["finished_5m"]
    assert set(recent) == {"done", "revoked", "dead", "done:cancelled", "done:paid", "done:already_cancelled"}
    assert 15 <= recent["done"] + recent["revoked"] + recent["dead"] <= 20
    assert recent["done"] == recent["done:cancelled"] + recent["done:paid"] + recent["done:already_cancelled"]
    assert stats["registry_rows_estimate"] == pytest.approx(FINISHED + PENDING, rel=0.1)


def test_the_plan_check_finds_a_scan_of_the_history(history_stack: Stack) -> None:
    """What the checks above would say of the whole-table count that `stats` used to run."""
    with captured_statements() as statements, history_stack.engine.connect() as conn:
        conn.execute(text("SELECT state, outcome, count(*) FROM order_timeouts GROUP BY state, outcome")).all()
        conn.execute(text("SELECT count(*) FROM order_timeouts WHERE state IN ('done', 'revoked')")).all()

    plans = explained(history_stack.engine, statements, analyze=True)

    assert len(plans) == 2 and all(plan.full_scans for plan in plans), [plan.plan for plan in plans]
    if history_stack.name == "postgresql":
        assert all(plan.rows_read is not None and plan.rows_read > FINISHED // 2 for plan in plans)
