"""The admin CLI as a person or a script runs it: tables, --json, exit code 2 and one line on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from scheduler import TimeoutState
from scheduler.cli import main
from tests.conftest import Stack
from tests.support import add_orders, cancel_counts, free_port_run


class Cli:
    def __init__(self, stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        self._capsys = capsys
        monkeypatch.setenv("ORDER_TIMEOUTS_DATABASE_URL", stack.database_url)
        monkeypatch.setenv("ORDER_TIMEOUTS_BROKER_URL", stack.broker_url)
        monkeypatch.setenv("COLUMNS", "200")
        self._monkeypatch = monkeypatch

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self._capsys.readouterr()
        self._monkeypatch.setattr(sys, "argv", ["order-timeouts", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = self._capsys.readouterr()
        return int(exit_info.value.code or 0), out, err

    def json(self, *args: str) -> object:
        code, out, err = self(*args, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(db_stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(db_stack, capsys, monkeypatch)


def test_schedule_show_reschedule_cancel(cli: Cli, db_stack: Stack) -> None:
    code, out, _ = cli("schedule", "A-1", "--delay", "30m")
    assert code == 0 and "A-1: created" in out
    code, out, _ = cli("schedule", "A-1", "--delay", "5m")
    assert code == 0 and "A-1: exists" in out

    shown = cli.json("show", "A-1")
    assert isinstance(shown, dict)
    assert shown["state"] == "pending" and shown["version"] == 1

    due = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    moved = cli.json("reschedule", "A-1", "--due-at", due.isoformat().replace("+00:00", "Z"))
    assert (
        isinstance(moved, dict)
        and moved["version"] == 2
        and moved["due_at"].startswith(due.strftime("%Y-%m-%dT%H:%M:%S"))
    )

    code, out, _ = cli("show", "A-1")
    assert code == 0 and "timeout of order A-1" in out and "pending" in out

    code, out, _ = cli("cancel", "A-1")
    assert code == 0 and "revoked" in out
    record = db_stack.timeouts().get("A-1")
    assert record is not None and record.state is TimeoutState.REVOKED


def test_pending_filters_histogram_and_stats(cli: Cli, db_stack: Stack) -> None:
    client = db_stack.timeouts()
    client.schedule_many([f"soon-{i}" for i in range(5)], delay=timedelta(minutes=5))
    client.schedule_many([f"later-{i}" for i in range(3)], delay=timedelta(hours=5))
    client.schedule("overdue-1", due_at=datetime.now(UTC) - timedelta(minutes=1))

    listing = cli.json("pending")
    assert isinstance(listing, dict) and listing["total"] == 9
    assert listing["timeouts"][0]["order_id"] == "overdue-1", "soonest first"
    assert cli.json("pending", "--overdue")["total"] == 1  # type: ignore[index]
    assert cli.json("pending", "--due-within", "1h")["total"] == 6  # type: ignore[index]
    after = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert cli.json("pending", "--due-after", after)["total"] == 3  # type: ignore[index]

    histogram = cli.json("pending", "--histogram", "--buckets", "4")
    assert isinstance(histogram, dict)
    counts = [row["count"] for row in histogram["histogram"]]
    assert sum(counts) == 9 and counts[0] == 6 and counts[-1] == 3
    code, out, _ = cli("pending", "--histogram")
    assert code == 0 and "█" in out and "9 pending" in out

    stats = cli.json("stats")
    assert isinstance(stats, dict)
    assert stats["states"]["pending"] == 9 and stats["overdue"] == 1
    assert stats["oldest_overdue_lag_seconds"] >= 60
    code, out, _ = cli("stats")
    assert code == 0 and "overdue" in out


def test_fire_then_worker_burst_cancels(cli: Cli, db_stack: Stack) -> None:
    add_orders(db_stack.engine, ["F-1"])
    assert cli("schedule", "F-1", "--delay", "1d")[0] == 0
    assert cli("fire", "F-1")[0] == 0
    code, out, _ = cli("worker", "--burst")
    assert code == 0 and "1 cancelled" in out
    assert cancel_counts(db_stack.engine) == {"F-1": 1}


def test_worker_processes_take_the_logging_options_and_a_metrics_port_each(db_stack: Stack) -> None:
    add_orders(db_stack.engine, ["P-1", "P-2"])
    db_stack.timeouts().schedule_many(["P-1", "P-2"], due_at=datetime.now(UTC))
    port = free_port_run(2)
    argv = [sys.executable, "-m", "scheduler", "-v", "--log-format", "json", "worker", "--processes", "2", "--burst"]
    done = subprocess.run(
        [*argv, "--metrics-port", str(port)], env=db_stack.env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    ready = [entry["message"] for entry in logged if " ready: " in entry["message"]]
    assert len(ready) == 2, "each process logs, as JSON, at the verbose level"
    assert sorted(entry["order_id"] for entry in logged if entry.get("outcome") == "cancelled") == ["P-1", "P-2"]
    assert cancel_counts(db_stack.engine) == {"P-1": 1, "P-2": 1}


def test_dead_list_and_replay(cli: Cli, db_stack: Stack) -> None:
    client = db_stack.timeouts(max_attempts=1)
    client.schedule("no-such-order", due_at=datetime.now(UTC))
    db_stack.drain(client)
    dead = cli.json("dead", "list")
    assert isinstance(dead, list) and [d["order_id"] for d in dead] == ["no-such-order"]
    assert "not found" in dead[0]["error"]

    assert cli("dead", "replay", "other-order")[0] == 2, "replaying a timeout that is not dead is refused"
    code, out, _ = cli("dead", "replay", "--all")
    assert code == 0 and "replayed 1" in out
    record = client.get("no-such-order")
    assert record is not None and record.state is TimeoutState.PENDING and record.attempts == 0


@pytest.mark.parametrize(
    "args",
    [
        ["schedule", "X", "--delay", "soon"],
        ["schedule", "X", "--delay", "0s"],
        ["schedule", "X", "--delay", "400d"],
        ["schedule", "X", "--due-at", "2030-01-01T10:00:00"],
        ["schedule", "X", "--due-at", "tomorrow"],
        ["schedule", "X", "--delay", "1m", "--due-at", "2030-01-01T10:00:00Z"],
        ["schedule", " X"],
        ["schedule", "x" * 300],
        ["schedule"],
        ["reschedule", "X"],
        ["show", "never-scheduled"],
        ["cancel", "never-scheduled"],
        ["fire", "never-scheduled"],
        ["pending", "--due-within", "forever"],
        ["pending", "--due-after", "2030-01-02T00:00:00Z", "--due-before", "2030-01-01T00:00:00Z"],
        ["worker", "--batch-size", "0"],
        ["worker", "--processes", "3", "--metrics-port", "65534"],
        ["dead", "replay"],
        ["no-such-command"],
    ],
)
def test_bad_input_exits_2_with_one_line_and_changes_nothing(cli: Cli, db_stack: Stack, args: list[str]) -> None:
    code, out, err = cli(*args)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    with db_stack.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM order_timeouts")).scalar_one() == 0


def test_a_bad_database_url_is_one_line_without_the_password(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDER_TIMEOUTS_DATABASE_URL", "mysql://admin:hunter2@127.0.0.1/shop")
    code, _, err = cli("stats")
    assert code == 2 and "hunter2" not in err and "***" in err


def test_init_db_is_idempotent_and_never_alters_an_existing_orders_table(
    tmp_path: object, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/shop.sqlite3"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT, cancelled_at TEXT, total INTEGER)"))
    monkeypatch.setenv("ORDER_TIMEOUTS_DATABASE_URL", url)
    code, out, _ = cli("init-db")
    assert code == 0 and "order_timeouts" in out
    code, out, _ = cli("init-db")
    assert code == 0 and "already present" in out
    columns = [c["name"] for c in inspect(engine).get_columns("orders")]
    assert columns == ["id", "status", "cancelled_at", "total"]
    engine.dispose()


def test_a_registry_without_its_tables_is_one_line_naming_init_db_not_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "ORDER_TIMEOUTS_DATABASE_URL": f"sqlite:///{tmp_path / 'new.sqlite3'}"}
    for command in (["show", "o-1"], ["schedule", "o-1", "--delay", "30m"], ["pending"]):
        done = subprocess.run(
            [sys.executable, "-m", "scheduler", *command], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr == "error: the registry database: registry tables missing: run `order-timeouts init-db`\n"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ORDER_TIMEOUTS_RETRY_BACKOFF", "10m..2s"),
        ("ORDER_TIMEOUTS_RETRY_BACKOFF", "soon"),
        ("ORDER_TIMEOUTS_ORDER_STORE_TIMEOUT", "2m"),
    ],
)
def test_a_worker_with_a_bad_retry_or_order_store_setting_exits_2_with_one_line_naming_it(
    tmp_path: Path, variable: str, value: str
) -> None:
    env = {
        **os.environ,
        "ORDER_TIMEOUTS_DATABASE_URL": f"sqlite:///{tmp_path / 'registry.sqlite3'}",
        "ORDER_TIMEOUTS_BROKER_URL": "sql",
        "ORDER_TIMEOUTS_ORDER_STORE": "http://127.0.0.1:9/api",
        variable: value,
    }
    argv = [sys.executable, "-m", "scheduler", "worker", "--burst"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith(f"error: {variable}") and len(done.stderr.strip().splitlines()) == 1
