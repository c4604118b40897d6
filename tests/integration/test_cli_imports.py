"""What the CLI loads: `--help` neither SQLAlchemy nor a broker client, `pending` and `show` on
SQLite no broker client. Start-up time follows from the imports; it is measured in benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from scheduler import OrderTimeouts, Settings
from scheduler.config import ENV_BROKER_URL, ENV_DATABASE_URL
from scheduler.schema import init_db
from tests.conftest import ROOT

BROKER_CLIENTS = ("redis", "pika", "rq", "apscheduler", "prometheus_client", "httpx")

# Runs the CLI as the console script does, then writes the top-level packages it loaded to the
# file named by the first argument (at exit: the CLI ends with sys.exit).
_WRAPPER = """
import atexit, json, sys

def _write_loaded(path=sys.argv[1]):
    with open(path, "w") as out:
        json.dump(sorted({name.partition(".")[0] for name in sys.modules}), out)

atexit.register(_write_loaded)
sys.argv = ["order-timeouts", *sys.argv[2:]]
from scheduler.cli import main
main()
"""


def loaded_by(tmp_path: Path, *args: str, database_url: str | None = None) -> set[str]:
    """The top-level packages loaded by `order-timeouts *args` run in a fresh interpreter."""
    report = tmp_path / "modules.json"
    env = {**os.environ, ENV_BROKER_URL: "sql"}
    if database_url is not None:
        env[ENV_DATABASE_URL] = database_url
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(report), *args], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout
    return set(json.loads(report.read_text()))


def test_help_loads_no_broker_client(tmp_path: Path) -> None:
    assert not loaded_by(tmp_path, "--help") & {*BROKER_CLIENTS, "psycopg", "alembic"}


def test_help_does_not_load_sqlalchemy(tmp_path: Path) -> None:
    assert "sqlalchemy" not in loaded_by(tmp_path, "--help")


def test_pending_and_show_on_sqlite_load_no_broker_client(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    timeouts = OrderTimeouts(settings=Settings(database_url=url, broker_url="sql"))
    try:
        init_db(timeouts.engine, None)
        timeouts.schedule("A-1")
    finally:
        timeouts.close()
    for args in (["pending"], ["pending", "--json"], ["show", "A-1"]):
        loaded = loaded_by(tmp_path, *args, database_url=url)
        assert "sqlalchemy" in loaded, "the command did not run"
        assert not loaded & set(BROKER_CLIENTS), args
