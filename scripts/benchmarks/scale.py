"""The `scale` profile: each admin command on a registry with a long history against the same
command on a small one, in the same run.

Two registries per database, side by side: `rows` rows (nine tenths finished over a week, one tenth
pending over the next day, a thousandth of those overdue) and `small_rows` rows of the same shape.
They are written in SQL (scheduler.testing.add_history), then vacuumed and analyzed as autovacuum
would have done. Each command runs against one registry and then the other, in turns, so that
the machine's drift shows in both:

- in process: the command's own work (options, engine, connection, statements, printing) without
  the interpreter's start and imports, best of `IN_PROCESS_RUNS`;
- as a process (`python -m scheduler …`): what an operator waits for, best of `PROCESS_RUNS`.

The figure is the ratio large / small of each (DESIGN.md: within 3x).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text

from benchmarks.measure import SystemResult
from benchmarks.plan import Services, Sizes
from benchmarks.sandbox import postgres_schema, sqlite_file
from scheduler import registry
from scheduler.config import ENV_BROKER_URL, ENV_DATABASE_URL
from scheduler.database import make_engine
from scheduler.schema import init_db
from scheduler.testing import History, add_history

IN_PROCESS_RUNS = 5
PROCESS_RUNS = 3

Progress = Callable[[str], None]


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def admin_commands() -> dict[str, list[str]]:
    """The commands timed, by label; the order ids exist in every history (`History` ids)."""
    now = datetime.now(UTC)
    window = ["--due-after", _iso(now + timedelta(hours=2)), "--due-before", _iso(now + timedelta(hours=5))]
    return {
        "pending": ["pending"],
        "pending --overdue": ["pending", "--overdue"],
        "pending --due-within 1h": ["pending", "--due-within", "1h"],
        "pending --due-after/--due-before (3h)": ["pending", *window],
        "pending --histogram": ["pending", "--histogram"],
        "pending --histogram --due-within 1h": ["pending", "--histogram", "--due-within", "1h"],
        "stats": ["stats"],
        "stats --json": ["stats", "--json"],
        "show (finished)": ["show", "hf-0000000007"],
        "show (pending) --json": ["show", "hp-0000000007", "--json"],
        "dead list": ["dead", "list"],
    }


@dataclass(frozen=True)
class Registry:
    url: str
    rows: int


def history_for(rows: int, now_ms: int) -> History:
    pending = rows // 10
    return History(finished=rows - pending, pending=pending, now_ms=now_ms, overdue=max(pending // 1000, 1))


def build(url: str, rows: int, progress: Progress) -> Registry:
    """A registry of `rows` rows at `url`, vacuumed and analyzed."""
    engine = make_engine(url)
    try:
        init_db(engine, None)
        started = time.perf_counter()
        with engine.begin() as conn:
            add_history(conn, history_for(rows, registry.database_now_ms(engine)))
        written = time.perf_counter() - started
        if engine.dialect.name == "postgresql":
            _vacuum(engine, progress)
        else:
            with engine.begin() as conn:
                conn.execute(text("ANALYZE"))
        progress(f"{rows:,} rows written in {written:.1f} s ({rows / written:,.0f}/s), analyzed after "
                 f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    finally:
        engine.dispose()
    return Registry(url, rows)


#: VACUUM runs until this share of the table's pages is marked all-visible, as autovacuum gets it
ALL_VISIBLE = 0.95
VACUUM_ATTEMPTS = 6


def _vacuum(engine: Engine, progress: Progress) -> None:
    """VACUUM ANALYZE the registry until its pages are all-visible, which a VACUUM cannot do for rows
    that a transaction open elsewhere on the server might still not see (the services are shared)."""
    share = 0.0
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for attempt in range(VACUUM_ATTEMPTS):
            conn.execute(text("VACUUM ANALYZE order_timeouts"))
            visible, pages = conn.execute(
                text("SELECT relallvisible, relpages FROM pg_class WHERE oid = to_regclass('order_timeouts')")
            ).one()
            share = visible / pages if pages else 1.0
            if share >= ALL_VISIBLE:
                return
            time.sleep(2 * (attempt + 1))
    progress(f"only {share:.0%} of the pages are all-visible after {VACUUM_ATTEMPTS} VACUUMs: a long transaction?")


def in_process_s(url: str, args: list[str]) -> float:
    """One run of the command in this process, its output thrown away."""
    from typer.main import get_command

    from scheduler.cli import admin as _admin  # noqa: F401  (registers the commands)
    from scheduler.cli import app

    command = get_command(app)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        command.main(args=["--database-url", url, "--broker-url", "sql", *args], standalone_mode=False)
    return time.perf_counter() - started


def process_s(url: str, args: list[str]) -> float:
    """One run of `python -m scheduler …` as an operator starts it."""
    env = {**os.environ, ENV_DATABASE_URL: url, ENV_BROKER_URL: "sql", "COLUMNS": "120"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "scheduler", *args], env=env, capture_output=True, timeout=600)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return elapsed


def time_commands(small: Registry, large: Registry, progress: Progress) -> dict[str, dict[str, float]]:
    """{label: figures} of each command: best times at both sizes, in process and as a process, and
    their ratios; the two registries take turns within each command."""
    figures: dict[str, dict[str, float]] = {}
    for label, args in admin_commands().items():
        best: dict[str, float] = {}
        for way, runs, timer in (("in_process", IN_PROCESS_RUNS, in_process_s), ("process", PROCESS_RUNS, process_s)):
            timer(small.url, args)  # warm both: caches, the first connection
            timer(large.url, args)
            small_s, large_s = [], []
            for _ in range(runs):
                small_s.append(timer(small.url, args))
                large_s.append(timer(large.url, args))
            best[f"{way}_small_s"], best[f"{way}_large_s"] = min(small_s), min(large_s)
            best[f"{way}_ratio"] = min(large_s) / min(small_s)
        figures[label] = best
        progress(
            f"{label}: in process {best['in_process_small_s'] * 1000:.1f} → {best['in_process_large_s'] * 1000:.1f} ms "
            f"({best['in_process_ratio']:.2f}x), as a process {best['process_small_s']:.2f} → "
            f"{best['process_large_s']:.2f} s ({best['process_ratio']:.2f}x)"
        )
    return figures


@contextlib.contextmanager
def _registry_url(system: str, services: Services) -> Iterator[str]:
    if system == "sql-postgresql":
        with postgres_schema(services.postgres_url) as url:
            yield url
    else:
        with sqlite_file() as url:
            yield url


def run_scale(system: str, sizes: Sizes, services: Services, progress: Progress) -> SystemResult:
    """The admin commands of `system` at `sizes.scale_small_rows` and at its large size."""
    rows = sizes.scale_rows if system == "sql-postgresql" else sizes.scale_sqlite_rows
    result = SystemResult(system)
    with _registry_url(system, services) as small_url, _registry_url(system, services) as large_url:
        progress(f"{system}: building the small registry ({sizes.scale_small_rows:,} rows)")
        small = build(small_url, sizes.scale_small_rows, progress)
        progress(f"{system}: building the large registry ({rows:,} rows)")
        large = build(large_url, rows, progress)
        result.figures = {
            "scale_small_rows": small.rows,
            "scale_large_rows": large.rows,
            "admin_commands": time_commands(small, large, progress),
        }
    commands = result.figures["admin_commands"]
    result.figures["admin_worst_process_ratio"] = max(c["process_ratio"] for c in commands.values())
    result.figures["admin_worst_in_process_ratio"] = max(c["in_process_ratio"] for c in commands.values())
    return result
