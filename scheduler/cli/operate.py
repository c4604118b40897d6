"""Commands that change things: init-db, schedule, cancel, reschedule, fire, purge, maintain.

`worker` and `demo` come from the consumer side's plug-in (consumers/cli.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from scheduler.registry import TimeoutState

from scheduler.cli import Context, app
from scheduler.cli.render import console, iso, parse_instant, print_json, record_json
from scheduler.clock import parse_duration
from scheduler.config import Settings, redact
from scheduler.errors import InvalidTimeout

DelayOption = Annotated[str | None, typer.Option("--delay", help="From now: 90s, 30m, 2h, 1d.")]
DueAtOption = Annotated[
    str | None, typer.Option("--due-at", help="ISO 8601 time with offset, e.g. 2026-11-21T10:00:00Z.")
]
MetricsPortOption = Annotated[
    int | None, typer.Option("--metrics-port", min=1, max=65535, help="Serve Prometheus /metrics on this port.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

#: how `maintain`'s recheck asks the order store for payment statuses (scheduler/recheck.py
#: StatusReader): factories the consumers side registers (consumers/cli.py), since `scheduler`
#: never imports `consumers`
ORDER_STATUS_READERS: list[Callable[[Settings], Callable[..., Any]]] = []


@app.command("init-db")
def init_db_command(
    ctx: typer.Context,
    orders: Annotated[bool, typer.Option(help="Also create the orders table when it is absent.")] = True,
    print_sql: Annotated[
        bool, typer.Option("--print-sql", help="Print the SQL for the database URL's dialect; connect to nothing.")
    ] = False,
    since: Annotated[
        str | None, typer.Option("--since", help="With --print-sql: only the migrations after this revision.")
    ] = None,
) -> None:
    """Create the registry tables (and the orders table when absent). Safe to run again."""
    from scheduler.config import database_url
    from scheduler.database import make_engine
    from scheduler.schema import init_db, migration_sql

    settings = ctx.ensure_object(Context).settings
    if since is not None and not print_sql:
        raise InvalidTimeout("--since goes with --print-sql")
    if print_sql:
        dialect = database_url(settings.database_url).get_backend_name()
        sys.stdout.write(migration_sql(dialect, settings.orders if orders else None, since))
        return
    engine = make_engine(settings.database_url)
    try:
        created = init_db(engine, settings.orders if orders else None)
    finally:
        engine.dispose()
    where = redact(settings.database_url)
    console.print(f"created {', '.join(created)} in {where}" if created else f"schema already present in {where}")


def _due_args(delay: str | None, due_at: str | None) -> dict[str, object]:
    if delay is not None and due_at is not None:
        raise InvalidTimeout("give either --delay or --due-at, not both")
    if delay is not None:
        return {"delay": parse_duration(delay, "--delay")}
    if due_at is not None:
        return {"due_at": parse_instant(due_at, "--due-at")}
    return {}


@app.command()
def schedule(
    ctx: typer.Context,
    order_id: str,
    delay: DelayOption = None,
    due_at: DueAtOption = None,
    replace: Annotated[bool, typer.Option(help="Re-arm an existing timeout with the new due time.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Schedule an order's payment timeout (30 minutes by default)."""
    timeouts = ctx.ensure_object(Context).timeouts()
    result = timeouts.schedule(order_id, replace=replace, **_due_args(delay, due_at))  # type: ignore[arg-type]
    record = timeouts.get(order_id)
    assert record is not None
    if as_json:
        print_json({"result": result.value, "timeout": record_json(record)})
    else:
        console.print(f"{order_id}: {result.value}, due {record_json(record)['due_at']}")


@app.command()
def cancel(ctx: typer.Context, order_id: str) -> None:
    """Revoke an order's pending timeout (its payment arrived)."""
    revoked = ctx.ensure_object(Context).timeouts().cancel(order_id)
    console.print(f"{order_id}: {'revoked' if revoked else 'not pending, nothing to revoke'}")


@app.command()
def reschedule(
    ctx: typer.Context,
    order_id: str,
    delay: DelayOption = None,
    due_at: DueAtOption = None,
    as_json: JsonOption = False,
) -> None:
    """Move a pending timeout to a new due time."""
    if delay is None and due_at is None:
        raise InvalidTimeout("reschedule needs --delay or --due-at")
    record = ctx.ensure_object(Context).timeouts().reschedule(order_id, **_due_args(delay, due_at))  # type: ignore[arg-type]
    if as_json:
        print_json(record_json(record))
    else:
        console.print(f"{order_id}: due {record_json(record)['due_at']}")


@app.command()
def fire(ctx: typer.Context, order_id: str) -> None:
    """Make a pending timeout due now; a worker handles it at once."""
    ctx.ensure_object(Context).timeouts().fire(order_id)
    console.print(f"{order_id}: due now")


@app.command()
def pause(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option("--reason", help="Why: shown by stats, check, pending, logs, metrics.")] = (
        "paused by an operator"
    ),
) -> None:
    """Stop every worker from cancelling, within one batch; timers stay pending until `resume`."""
    from scheduler.registry.control import clean_reason

    clean_reason(reason)  # bad input exits 2 before the database is opened
    current, started = ctx.ensure_object(Context).timeouts().pause(reason)
    what = "paused" if started else "already paused, kept as it is"
    line = f"{what}: by {current.by.value} since {iso(current.since_ms)}: {current.reason}"
    console.print(line, highlight=False, soft_wrap=True, markup=False)


@app.command()
def resume(ctx: typer.Context) -> None:
    """Lift the pause (the operator's or the circuit breaker's): workers cancel again; the backlog drains."""
    lifted = ctx.ensure_object(Context).timeouts().resume()
    if lifted is None:
        console.print("not paused; nothing to resume")
    else:
        console.print(
            f"resumed: the pause by {lifted.by.value} since {iso(lifted.since_ms)} ({lifted.reason}) is lifted",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )


@app.command()
def purge(
    ctx: typer.Context,
    older_than: Annotated[
        str, typer.Option("--older-than", help="Finished longer ago than this: 12h, 7d, 90d.", show_default=False)
    ],
    include_dead: Annotated[bool, typer.Option("--include-dead", help="Dead-lettered timeouts too.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would go; delete nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete finished timeouts (done, revoked) older than --older-than, a few thousand rows per
    transaction while everything else runs. Pending timeouts are never touched; dead ones stay
    unless --include-dead."""
    age = parse_duration(older_than, "--older-than")
    if age <= timedelta(0):
        raise InvalidTimeout(f"--older-than must be above 0, got {older_than!r}")
    from scheduler import retention
    from scheduler.registry import purged_states

    timeouts = ctx.ensure_object(Context).timeouts()
    states = purged_states(include_dead=include_dead)
    before = retention.cutoff_ms(timeouts.clock.now_ms(), age)
    started = time.perf_counter()
    if dry_run:
        count = retention.count(timeouts.engine, before_ms=before, states=states)
    elif console.is_terminal and not as_json:
        count = _purge_with_progress(timeouts.engine, before, states)
    else:
        count = retention.purge(timeouts.engine, before_ms=before, states=states)
    seconds = time.perf_counter() - started
    names = [state.value for state in states]
    if as_json:
        data = {"dry_run": dry_run, "count": count, "finished_before": iso(before), "states": names}
        print_json({**data, "seconds": round(seconds, 3)})
        return
    verb = "would delete" if dry_run else "deleted"
    console.print(
        f"{verb} {count} timeouts ({', '.join(names)}) finished before {iso(before)} in {seconds:.1f}s",
        highlight=False,
        soft_wrap=True,
    )


def _purge_with_progress(engine: Engine, before: int, states: Sequence[TimeoutState]) -> int:
    """The purge with a progress bar for a person at a terminal; its total is counted first."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from scheduler import retention

    total = retention.count(engine, before_ms=before, states=states)
    columns = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("purge", total=total)
        return retention.purge(
            engine, before_ms=before, states=states, deleted=lambda count: progress.advance(task, count)
        )


@app.command()
def maintain(
    ctx: typer.Context,
    relay_interval: Annotated[str, typer.Option(help="How often unpublished timeouts go to the broker.")] = "1s",
    sweep_interval: Annotated[str, typer.Option(help="How often the reconciler looks for stranded ones.")] = "15s",
    grace: Annotated[str, typer.Option(help="Overdue by more than this and unfinished: publish again.")] = "60s",
    purge_interval: Annotated[
        str, typer.Option(help="How often finished timeouts older than ORDER_TIMEOUTS_RETENTION are purged.")
    ] = "1m",
    recheck_interval: Annotated[
        str,
        typer.Option(help="How often a sample of finished timeouts is compared with the order store (late payments)."),
    ] = "5m",
    once: Annotated[bool, typer.Option("--once", help="Run each job once and exit (cron, tests).")] = False,
    metrics_port: MetricsPortOption = None,
    gauge_lease: Annotated[
        str,
        typer.Option(
            help="How long the registry gauges stay with the maintain process scraped last (above the scrape interval)."
        ),
    ] = "45s",
    as_json: JsonOption = False,
) -> None:
    """Run the relay, the reconciler, the purge and the recheck (several processes may run; leases keep them apart)."""
    from scheduler.maintenance import JOB_VERBS, Maintenance, MaintenancePlan

    plan = MaintenancePlan(
        relay_interval=parse_duration(relay_interval, "--relay-interval"),
        sweep_interval=parse_duration(sweep_interval, "--sweep-interval"),
        grace=parse_duration(grace, "--grace"),
        purge_interval=parse_duration(purge_interval, "--purge-interval"),
        recheck_interval=parse_duration(recheck_interval, "--recheck-interval"),
    )
    gauge_lease_ttl = parse_duration(gauge_lease, "--gauge-lease")
    intervals = {
        "--relay-interval": plan.relay_interval,
        "--sweep-interval": plan.sweep_interval,
        "--purge-interval": plan.purge_interval,
        "--gauge-lease": gauge_lease_ttl,
        "--recheck-interval": plan.recheck_interval,
    }
    for name, value in intervals.items():
        if value.total_seconds() <= 0:
            raise InvalidTimeout(f"{name} must be positive")
    timeouts = ctx.ensure_object(Context).timeouts()
    readers = [factory(timeouts.settings) for factory in ORDER_STATUS_READERS]
    jobs = Maintenance(timeouts, plan, order_status=readers[0] if readers else None)
    if not once:
        jobs.install_signal_handlers()  # before the metrics port: a process seen up stops cleanly
    if metrics_port is not None:
        from scheduler.observability import GaugeLease, MaintenanceMetrics, serve_metrics

        lease = GaugeLease(jobs.holder, gauge_lease_ttl)
        prometheus = serve_metrics(metrics_port, timeouts.engine, timeouts.clock, lease)
        jobs.metrics = MaintenanceMetrics(prometheus, timeouts.settings.retention)
    if not once:
        jobs.serve()
        return
    runs = jobs.run_once()
    if as_json:
        print_json([run.__dict__ for run in runs])
    else:
        for run in runs:
            state = "skipped" if run.skipped else (f"error: {run.error}" if run.error else "ok")
            console.print(f"{run.job}: {run.rows} {JOB_VERBS[run.job]} ({state})", highlight=False)
    if any(run.error for run in runs):
        raise typer.Exit(1)
