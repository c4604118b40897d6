"""`order-timeouts check`: can this process reach its database, broker and order service? (health checks)"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from scheduler.cli import Context, app
from scheduler.cli.operate import JsonOption
from scheduler.cli.render import console, print_json
from scheduler.config import Settings, database_url, redact
from scheduler.errors import OrderTimeoutsError
from scheduler.names import REGISTRY_TABLE

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from scheduler.api import OrderTimeouts


@dataclass(frozen=True)
class Probe:
    """One more component that `check` reports on, after the database and the broker."""

    component: str
    #: what is probed, as printed (credentials redacted)
    target: str
    #: tries the component once; raises OrderTimeoutsError with the problem when it is not usable
    run: Callable[[], None]


#: checks that plug-ins add (the `order_timeouts.cli` entry points): each returns the probe for these
#: settings, or None when there is nothing of its kind to check
EXTRA_CHECKS: list[Callable[[Settings], Probe | None]] = []


@app.command()
def check(
    ctx: typer.Context,
    as_json: JsonOption = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; the exit code says it.")] = False,
) -> None:
    """Check the database (and registry schema), the broker and an HTTP order store; exit 1 when one is not usable."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from scheduler.database import reading

    settings = ctx.ensure_object(Context).settings
    results: list[dict[str, object]] = []

    started = time.perf_counter()
    timeouts = ctx.ensure_object(Context).timeouts()
    missing = _missing_sqlite_file(settings.database_url)
    try:
        if missing is not None:
            # Connecting would create an empty file: a health check must not change anything.
            database_problem: str | None = f"no SQLite file at {missing}: run `order-timeouts init-db`"
        else:
            with reading(timeouts.engine) as conn:
                ready = inspect(conn).has_table(REGISTRY_TABLE)
            database_problem = None if ready else "registry tables missing: run `order-timeouts init-db`"
    except SQLAlchemyError as exc:
        database_problem = f"unreachable: {type(exc).__name__}"
    results.append(_result("database", redact(settings.database_url), database_problem, started))

    if database_problem is None:
        started = time.perf_counter()
        results.append(_clock_result("clock", clock_offset_ms(timeouts.clock) or 0, settings, started))
        results.append(_pause_result(timeouts.engine, timeouts.clock.now_ms()))

    started = time.perf_counter()
    problem: str | None = None
    try:
        timeouts.transport.probe(database_problem)
    except OrderTimeoutsError as exc:
        problem = str(exc)
    results.append(_result("broker", redact(settings.broker_url), problem, started))
    if problem is None:
        started = time.perf_counter()
        broker_offset_ms = timeouts.transport.clock_offset_ms()
        if broker_offset_ms is not None:
            results.append(_clock_result("broker clock", broker_offset_ms, settings, started))

    if database_problem is None:
        started = time.perf_counter()
        results.append(_deployment_result(timeouts, problem, started))

    for extra in EXTRA_CHECKS:
        probe = extra(settings)
        if probe is None:
            continue
        started = time.perf_counter()
        try:
            probe.run()
            problem = None
        except OrderTimeoutsError as exc:
            problem = str(exc)
        results.append(_result(probe.component, probe.target, problem, started))

    healthy = all(r["ok"] for r in results)
    if as_json:
        print_json({"ok": healthy, "checks": results})
    elif not quiet:
        for r in results:
            mark = "[green]ok[/]" if r["ok"] else f"[red]{r['problem']}[/]"
            line = f"{r['component']:<9} {escape(str(r['target']))}  {mark}  ({r['seconds']}s)"
            console.print(line, highlight=False, soft_wrap=True)
    if not healthy:
        raise typer.Exit(1)


def _pause_result(engine: Engine, now_ms: int) -> dict[str, object]:
    """The fleet's pause: reported, and healthy all the same (a paused worker is working as asked; a
    health check that failed on it would have its containers restarted)."""
    from sqlalchemy.exc import SQLAlchemyError

    from scheduler.cli.render import pause_json, pause_line
    from scheduler.database import reading
    from scheduler.registry import control

    started = time.perf_counter()
    try:
        with reading(engine) as conn:
            paused = control.read_pause(conn)
    except SQLAlchemyError as exc:  # a registry of an earlier release, before `init-db` added the table
        return _result("pause", "unknown", f"the control table cannot be read: {type(exc).__name__}", started)
    result = _result("pause", "not paused" if paused is None else pause_line(paused, now_ms), None, started)
    return {**result, "paused": pause_json(paused)}


#: `check` fails while the latest foreign delivery is younger than this
FOREIGN_RECENT_MS = 3_600_000


def _deployment_result(timeouts: OrderTimeouts, broker_problem: str | None, started: float) -> dict[str, object]:
    """This registry's identity, and anything of another deployment seen on its broker: timers its
    workers dead-lettered as foreign in the last hour, consumers on names another deployment reads."""
    from sqlalchemy.exc import SQLAlchemyError

    from scheduler.database import reading
    from scheduler.registry import control

    try:
        with reading(timeouts.engine) as conn:
            deployment = control.read(conn, control.DEPLOYMENT) or {}
            foreign = control.read(conn, control.FOREIGN) or {}
    except SQLAlchemyError as exc:
        problem = f"control table unreadable ({type(exc).__name__}): run `order-timeouts init-db`"
        return _result("deployment", "unknown", problem, started)
    problems = []
    latest = foreign.get("updated_ms")
    if latest is not None and timeouts.clock.now_ms() - int(latest) < FOREIGN_RECENT_MS:
        problems.append(
            f"{foreign.get('total', 0)} foreign deliveries dead-lettered so far, the latest "
            f"{(timeouts.clock.now_ms() - int(latest)) / 1000:.0f} s ago from deployment {foreign.get('last_from')}"
        )
    if broker_problem is None:
        try:
            consumers = timeouts.transport.foreign_consumers()
        except OrderTimeoutsError as exc:
            consumers = f"cannot list consumers: {exc}"
        if consumers is not None:
            problems.append(consumers)
    if problems:
        problems.append("another deployment shares this broker's names (docs/operations.md)")
    target = str(deployment.get("id") or "no identity yet (init-db, or the first worker, writes it)")
    return _result("deployment", target, "; ".join(problems) or None, started)


def _clock_result(component: str, offset_ms: int, settings: Settings, started: float) -> dict[str, object]:
    """A clock's offset to the registry's, as a check that fails beyond ORDER_TIMEOUTS_MAX_CLOCK_SKEW."""
    tolerance_ms = settings.max_clock_skew / timedelta(milliseconds=1)
    problem = None
    if abs(offset_ms) > tolerance_ms:
        problem = f"{offset_ms / 1000:+.3f} s off the registry's clock, beyond {tolerance_ms / 1000:g} s"
    return _result(component, f"{offset_ms / 1000:+.3f} s", problem, started)


def clock_offset_ms(clock: object) -> int | None:
    """This process's clock minus the registry's (positive: this one is ahead), as last read."""
    from scheduler.clock import RegistryClock

    if not isinstance(clock, RegistryClock):
        return None
    clock.now_ms()  # reads the registry's clock if it has not yet
    return None if clock.offset_ms is None else -clock.offset_ms


def _missing_sqlite_file(url: str) -> Path | None:
    """The path of a SQLite database file that does not exist (None for other databases)."""
    parsed = database_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


def _result(component: str, target: str, problem: str | None, started: float) -> dict[str, object]:
    return {
        "component": component,
        "target": target,
        "ok": problem is None,
        "problem": problem,
        "seconds": round(time.perf_counter() - started, 3),
    }
