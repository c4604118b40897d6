"""Commands that inspect: pending, show, stats, dead (list, replay)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from scheduler.cli import Context, app
from scheduler.cli.operate import JsonOption
from scheduler.cli.render import (
    console,
    histogram_table,
    human,
    instant_ms,
    iso,
    pause_json,
    pause_line,
    print_json,
    record_json,
    relative,
    timeouts_table,
)
from scheduler.clock import parse_duration
from scheduler.errors import InvalidTimeout, TimeoutNotFound

dead_app = typer.Typer(help="Dead-lettered timeouts: list them, replay them.", no_args_is_help=True)
app.add_typer(dead_app, name="dead")


@app.command()
def pending(
    ctx: typer.Context,
    overdue: Annotated[bool, typer.Option("--overdue", help="Only timeouts already past their due time.")] = False,
    due_within: Annotated[str | None, typer.Option("--due-within", help="Only those due within this duration.")] = None,
    due_after: Annotated[str | None, typer.Option("--due-after", help="ISO time: due at or after.")] = None,
    due_before: Annotated[str | None, typer.Option("--due-before", help="ISO time: due before.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 50,
    histogram: Annotated[bool, typer.Option("--histogram", help="Counts by due time as terminal bars.")] = False,
    buckets: Annotated[int, typer.Option(min=2, max=200, help="Histogram rows.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """List pending timeouts, soonest first; filters for overdue and due windows."""
    from scheduler import registry
    from scheduler.database import reading
    from scheduler.registry import control

    timeouts = ctx.ensure_object(Context).timeouts()
    now = timeouts.clock.now_ms()
    after = instant_ms(due_after, "--due-after")
    before = instant_ms(due_before, "--due-before")
    if overdue:
        before = now if before is None else min(before, now)
    if due_within is not None:
        horizon = now + int(parse_duration(due_within, "--due-within").total_seconds() * 1000)
        before = horizon if before is None else min(before, horizon)
    if after is not None and before is not None and after >= before:
        raise InvalidTimeout("the due window is empty: --due-after is not before --due-before")
    with reading(timeouts.engine) as conn:
        registry.read_by_index(conn)
        total = registry.count_pending(conn, due_after=after, due_before=before)
        records = registry.pending(conn, due_after=after, due_before=before, limit=limit)
        counts: list[int] = []
        start = width = 0
        if histogram and total:
            start = after if after is not None else records[0].due_ms
            end = before if before is not None else registry.last_due_ms(conn) + 1
            width = max((end - start) // buckets + 1, 1)
            counts = registry.histogram(conn, start_ms=start, width_ms=width, buckets=buckets)
        paused = control.read_pause(conn)
    broker = timeouts.transport.figures()
    if as_json:
        data: dict[str, Any] = {
            "total": total,
            "timeouts": [record_json(r) for r in records],
            "broker": broker,
            "paused": pause_json(paused),
        }
        if histogram:
            data["histogram"] = [{"due_from": iso(start + i * width), "count": c} for i, c in enumerate(counts)]
        print_json(data)
        return
    if paused is not None:
        console.print(f"[bold red]{escape(pause_line(paused, now))}[/]", highlight=False, soft_wrap=True)
    if histogram:
        if counts:
            console.print(histogram_table(counts, start, width, now))
        console.print(f"{total} pending")
    else:
        console.print(timeouts_table(f"pending timeouts ({len(records)} of {total})", records, now))
    if broker:
        # The broker's side of the same timeouts: timers not yet moved, stream or queue depths.
        console.print(
            f"{timeouts.transport.name}: " + ", ".join(f"{key} {value}" for key, value in broker.items()),
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def show(ctx: typer.Context, order_id: str, as_json: JsonOption = False) -> None:
    """The trace of one order's timeout: scheduled, published, fired, outcome, attempts, worker, errors."""
    timeouts = ctx.ensure_object(Context).timeouts()
    record = timeouts.get(order_id)
    if record is None:
        raise TimeoutNotFound(f"no timeout is registered for order {order_id!r}")
    if as_json:
        print_json(record_json(record))
        return
    now = timeouts.clock.now_ms()
    table = Table(title=f"timeout of order {order_id}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_column(style="dim")
    for label, ms in (
        ("scheduled", record.created_ms),
        ("due", record.due_ms),
        ("published", record.published_ms),
        ("first fired", record.fired_ms),
        ("finished", record.finished_ms),
    ):
        table.add_row(label, iso(ms) or "-", relative(ms, now) if ms else "")
    table.add_row("state", record.state.value, "")
    table.add_row("outcome", record.outcome.value if record.outcome else "-", "")
    table.add_row("attempts", str(record.attempts), "")
    table.add_row("version", str(record.version), "")
    table.add_row("worker", record.worker or "-", "")
    table.add_row("error", record.error or "-", "")
    console.print(table)


@app.command()
def stats(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Pending, overdue and dead counts, overdue lag, what finished in the last 5 minutes, broker figures."""
    from scheduler import recheck, registry
    from scheduler.cli.health import clock_offset_ms
    from scheduler.database import reading
    from scheduler.registry import Outcome, TimeoutState, control

    timeouts = ctx.ensure_object(Context).timeouts()
    now = timeouts.clock.now_ms()
    # Every figure is read from an index over the rows it counts (pending ones, dead ones, those that
    # finished in the window), so `stats` costs the same however much history the registry keeps.
    # Totals of done and revoked rows would count that history: the table's size is the planner's
    # estimate instead (docs/operations.md, stats).
    with reading(timeouts.engine) as conn:
        registry.read_by_index(conn)
        counts = {"pending": registry.count_pending(conn), "dead": registry.count_dead(conn)}
        overdue = registry.count_pending(conn, due_before=now)
        next_due = registry.next_due_ms(conn)
        last_minute = registry.finished_between(conn, now - 60_000, now)
        last_5_minutes = registry.finished_recently(conn, now - 300_000, now)
        rows = registry.rows_estimate(conn)
        oldest_finished = registry.oldest_finished_ms(conn, registry.PURGED_STATES)
        oldest_dead = registry.oldest_finished_ms(conn, [TimeoutState.DEAD])
        paused = control.read_pause(conn)
        deployment = control.read(conn, control.DEPLOYMENT) or {}
        foreign = control.read(conn, control.FOREIGN) or {}
        found = recheck.figures(conn)
    # Shadow outcomes apart from what was done to orders: nothing was cancelled for them.
    shadow_5m = {"would_cancel": last_5_minutes.pop(f"done:{Outcome.WOULD_CANCEL.value}", 0)}
    retention = timeouts.settings.retention
    handled_5m = last_5_minutes["done"] + last_5_minutes["dead"]
    lag_s = (now - next_due) / 1000 if next_due is not None and next_due <= now else 0.0
    offset_ms = clock_offset_ms(timeouts.clock)
    data: dict[str, Any] = {
        "transport": timeouts.transport.name,
        "paused": pause_json(paused),
        "states": counts,
        "overdue": overdue,
        "oldest_overdue_lag_seconds": round(lag_s, 3),
        "next_due_at": iso(next_due),
        "finished_per_second_1m": round(last_minute / 60, 2),
        "finished_per_second_5m": round(handled_5m / 300, 2),
        "finished_5m": last_5_minutes,
        "shadow_5m": shadow_5m,
        "registry_rows_estimate": rows,
        "broker": timeouts.transport.figures(),
        "clock_offset_seconds": None if offset_ms is None else offset_ms / 1000,
        # What `maintain` purges (done and revoked rows) and how far back the registry goes; null: off
        "retention_seconds": None if retention is None else retention.total_seconds(),
        "oldest_finished_at": iso(oldest_finished),
        "oldest_finished_age_seconds": None if oldest_finished is None else round((now - oldest_finished) / 1000, 3),
        "oldest_dead_at": iso(oldest_dead),
        # This registry's identity, which its broker names and messages carry (docs/operations.md)
        "deployment": deployment.get("id"),
        # Timers of other deployments that reached this one's workers and were dead-lettered
        "foreign_deliveries": {
            "total": int(foreign.get("total", 0)),
            "last_at": iso(foreign.get("updated_ms")),
            "last_from": foreign.get("last_from"),
        },
        # maintain's recheck: finished timeouts asked of the order store again (scheduler/recheck.py)
        "exactly_once": {
            "rechecked": found["checked"],
            "late_payments": found["late_payments"],
            "disagreements": found["disagreements"],
            "unknown": found["unknown"],
            "last_recheck_at": iso(found["last_run_ms"]),
            "late_payment_examples": found["late_payments_examples"],
            "disagreement_examples": found["disagreements_examples"],
        },
    }
    if as_json:
        print_json(data)
        return
    table = Table(title=f"order-timeouts ({timeouts.transport.name} transport)", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("paused", "no" if paused is None else f"[bold red]yes, by {paused.by.value}[/]")
    for key, value in counts.items():
        table.add_row(key, str(value))
    table.add_row("overdue", str(overdue))
    table.add_row("oldest overdue lag", human(lag_s) if overdue else "-")
    table.add_row("next due", relative(next_due, now))
    table.add_row("finished/s (1m, 5m)", f"{data['finished_per_second_1m']}, {data['finished_per_second_5m']}")
    for key, value in last_5_minutes.items():
        table.add_row(f"finished in 5m: {key.replace(':', ' → ')}", str(value))
    table.add_row("shadow in 5m: would cancel (nothing cancelled)", str(shadow_5m["would_cancel"]))
    table.add_row("registry rows (estimate)", "-" if rows is None else f"~{rows}")
    for key, value in data["broker"].items():
        table.add_row(f"broker {key}", str(value))
    table.add_row("retention (done, revoked)", "off" if retention is None else human(retention.total_seconds()))
    table.add_row("oldest finished (done, revoked)", relative(oldest_finished, now))
    table.add_row("oldest dead", relative(oldest_dead, now))
    if offset_ms is not None:
        table.add_row("this clock vs the registry's", f"{offset_ms / 1000:+.3f} s")
    table.add_row("deployment", str(data["deployment"] or "-"))
    table.add_row("foreign deliveries (dead-lettered)", str(data["foreign_deliveries"]["total"]))
    checked = data["exactly_once"]
    table.add_row(
        "late payments (paid after cancel)", f"{checked['late_payments']} of {checked['rechecked']} rechecked"
    )
    table.add_row("outcomes the order store disagrees with", f"{checked['disagreements']} of {checked['rechecked']}")
    if paused is not None:
        console.print(f"[bold red]{escape(pause_line(paused, now))}[/]", highlight=False, soft_wrap=True)
    console.print(table)


@dead_app.command("list")
def dead_list(
    ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=100_000)] = 50, as_json: JsonOption = False
) -> None:
    """Dead-lettered timeouts, most recent first, with their reason."""
    from scheduler import registry
    from scheduler.database import reading

    timeouts = ctx.ensure_object(Context).timeouts()
    with reading(timeouts.engine) as conn:
        registry.read_by_index(conn)
        records = registry.dead(conn, limit=limit)
    if as_json:
        print_json([record_json(r) for r in records])
    else:
        console.print(timeouts_table(f"dead timeouts ({len(records)})", records, timeouts.clock.now_ms(), errors=True))


@dead_app.command("replay")
def dead_replay(
    ctx: typer.Context,
    order_ids: Annotated[list[str] | None, typer.Argument(help="Orders to replay.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead timeout.")] = False,
) -> None:
    """Re-arm dead timeouts to fire now (after fixing what killed them)."""
    if bool(order_ids) == replay_all:
        raise InvalidTimeout("name the orders to replay, or pass --all")
    timeouts = ctx.ensure_object(Context).timeouts()
    replayed = timeouts.replay_dead(None if replay_all else list(order_ids or []))
    console.print(f"replayed {len(replayed)} dead timeouts")
