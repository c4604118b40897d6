"""`python scripts/bench.py`: the transports against RQ and APScheduler in one run, as a small typer app.

Bad input exits with code 2 and one line on stderr, as the product's CLI does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from benchmarks import PROFILES, BenchPlan, Services, available_systems, run_bench
from benchmarks.report import PLOT_SKIPPED, document, plot_lateness, scale_table, table
from scheduler.logs import configure_logging

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
console = Console()

_SIZE = {"min": 1}


@app.command()
def bench(
    profile: Annotated[
        str, typer.Option(help="Sizes: full, quick (about a minute), tiny (tests), scale (admin commands, 10M rows).")
    ] = "full",
    quick: Annotated[bool, typer.Option("--quick", help="Same as --profile quick.")] = False,
    systems: Annotated[
        str | None, typer.Option(help=f"Comma-separated, default all: {', '.join(available_systems())}.")
    ] = None,
    bulk: Annotated[int | None, typer.Option(help="Orders per bulk schedule.", **_SIZE)] = None,
    latency: Annotated[int | None, typer.Option(help="Single schedule() calls timed.", **_SIZE)] = None,
    burst: Annotated[int | None, typer.Option(help="Timeouts due at once.", **_SIZE)] = None,
    steady_rate: Annotated[int | None, typer.Option(help="Steady load: timeouts due per second.", **_SIZE)] = None,
    steady_seconds: Annotated[float | None, typer.Option(help="Steady load: seconds.", min=0.1)] = None,
    pending: Annotated[
        int | None, typer.Option(help="Far-off timeouts pending for the loaded figures; 0 skips them.", min=0)
    ] = None,
    purge: Annotated[
        int | None, typer.Option(help="Finished timeouts purged for the purge rate (sql-* systems); 0 skips it.", min=0)
    ] = None,
    purge_load: Annotated[
        int | None,
        typer.Option(help="Finished timeouts purged during a steady load, against one without (e.g. 1000000).", min=0),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes per system.", min=1, max=16)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Timeouts per worker transaction.", **_SIZE)] = None,
    scale_rows: Annotated[
        int | None, typer.Option(help="Scale profile: rows of the large PostgreSQL registry.", **_SIZE)
    ] = None,
    scale_sqlite_rows: Annotated[
        int | None, typer.Option(help="Scale profile: rows of the large SQLite registry.", **_SIZE)
    ] = None,
    scale_small_rows: Annotated[
        int | None, typer.Option(help="Scale profile: rows of the small registry compared with.", **_SIZE)
    ] = None,
    postgres_url: Annotated[str, typer.Option(help="PostgreSQL for registries and orders (own schemas).")] = (
        Services.postgres_url
    ),
    redis_url: Annotated[str, typer.Option(help="Redis (own key prefixes).")] = Services.redis_url,
    rabbitmq_url: Annotated[str, typer.Option(help="RabbitMQ (own vhosts, through rabbitmqctl).")] = (
        Services.rabbitmq_url
    ),
    output: Annotated[Path, typer.Option(help="Folder for the JSON document and the plot.")] = Path("bench-results"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON document instead of the table.")] = False,
) -> None:
    """Bulk schedule, schedule() latency, burst and steady lateness, Redis bytes, 1M-pending load, purge
    rate: the product's transports against RQ and APScheduler on this machine."""
    configure_logging(verbose=False, json_format=False)
    profile = "quick" if quick else profile
    if profile not in PROFILES:
        raise typer.BadParameter(f"must be one of {', '.join(PROFILES)}, not {profile!r}", param_hint="--profile")
    chosen = [name.strip() for name in systems.split(",") if name.strip()] if systems else None
    unknown = sorted(set(chosen or []) - set(available_systems()))
    if unknown:
        raise typer.BadParameter(
            f"unknown systems {', '.join(unknown)}; choose from {', '.join(available_systems())}",
            param_hint="--systems",
        )
    plan = BenchPlan.build(
        profile,
        chosen,
        Services(postgres_url=postgres_url, redis_url=redis_url, rabbitmq_url=rabbitmq_url),
        bulk=bulk,
        latency=latency,
        burst=burst,
        steady_rate=steady_rate,
        steady_seconds=steady_seconds,
        pending=pending,
        purge=purge,
        purge_load=purge_load,
        workers=workers,
        batch_size=batch_size,
        scale_rows=scale_rows,
        scale_sqlite_rows=scale_sqlite_rows,
        scale_small_rows=scale_small_rows,
    )

    def progress(line: str) -> None:
        sys.stderr.write(f"bench: {line}\n")

    run = run_bench(plan, progress)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    plot = plot_lateness(run.results, output / f"bench-{stamp}-lateness.png")
    if plot is None:
        progress(PLOT_SKIPPED)
    doc = document(run.results, run.meta, plot)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"bench-{stamp}.json").write_text(json.dumps(doc, indent=2) + "\n")
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    machine = run.meta["machine"]
    if plan.sizes.scale_rows:
        Console(width=max(console.width, 150)).print(
            scale_table(run.results, f"order-timeouts admin commands, {run.meta['date']}, {machine['cpus']} cores, "
                        f"load {machine['load_before']['load_1m']} → {machine['load_after']['load_1m']}")
        )  # fmt: skip
        for result in run.results:
            for note in result.notes:
                console.print(f"[yellow]note[/] {note}", highlight=False)
        console.print(f"results in {output / f'bench-{stamp}.json'}")
        return
    # One column per system: wider than a default 80-column pipe, or the cells wrap into mush.
    wide = Console(width=max(console.width, 44 + 24 * len(run.results)))
    wide.print(
        table(run.results, f"order-timeouts bench, {run.meta['date']}, profile {profile}, {machine['cpus']} cores, "
              f"load {machine['load_before']['load_1m']} → {machine['load_after']['load_1m']}, "
              f"CPU speed spread {machine['cpu_before']['spread']}x → {machine['cpu_after']['spread']}x")
    )  # fmt: skip
    for result in run.results:
        for note in result.notes:
            console.print(f"[yellow]note[/] {note}", highlight=False)
    console.print(f"results in {output / f'bench-{stamp}.json'}" + (f", plot {plot}" if plot else ""))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of scripts/bench.py: click's usage errors become one line on stderr and exit 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="bench.py", standalone_mode=False)
    except typer.TyperException as exc:  # typer's own click: usage errors, bad parameters
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        sys.stderr.write(f"error: {' '.join(message.split())}\n")
        sys.exit(2)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
