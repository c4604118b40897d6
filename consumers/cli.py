"""The consumer side's part of `order-timeouts`: the `worker` and `demo` commands, and the order
store's probe in `check`.

Loaded by the CLI through the `order_timeouts.cli` entry point group (pyproject.toml), so that the
`scheduler` package never imports `consumers`. Heavy modules are imported inside the commands.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any

import typer

from scheduler.cli import Context, add_command
from scheduler.cli.health import EXTRA_CHECKS, Probe
from scheduler.cli.operate import ORDER_STATUS_READERS, MetricsPortOption
from scheduler.cli.render import console
from scheduler.config import ENV_BROKER_URL, ENV_DATABASE_URL, ENV_MODE, Settings, parse_mode, redact

log = logging.getLogger("order_timeouts.worker")
#: how often `worker --processes` looks whether a child died
CHILD_POLL_S = 0.5


def register(app: typer.Typer) -> None:
    """Entry point of the `order_timeouts.cli` group: add this side's commands and checks to `app`."""
    add_command(app, worker, after="fire")
    add_command(app, demo, after="worker")
    EXTRA_CHECKS.append(order_store_probe)
    ORDER_STATUS_READERS.append(order_status_reader)


def order_status_reader(settings: Settings) -> Callable[..., Any]:
    """The recheck's way to the order store (`maintain`): the workers' own store, its payment status."""
    from consumers.orders import load_order_store

    return load_order_store(settings).payment_status


def worker(
    ctx: typer.Context,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=10_000, help="Timeouts per transaction.")] = 500,
    burst: Annotated[
        bool, typer.Option("--burst", help="Exit when nothing is due (exit code 1 after an outage of 30 s).")
    ] = False,
    processes: Annotated[
        int,
        typer.Option(
            "--processes", min=1, max=64, help="Run this many worker processes (metrics on consecutive ports)."
        ),
    ] = 1,
    metrics_port: MetricsPortOption = None,
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            envvar=ENV_MODE,
            show_envvar=True,
            help="live cancels; shadow records would_cancel and cancels nothing.",
            show_default="live",
        ),
    ] = None,
) -> None:
    """Run a member of the consumer group. SIGTERM/SIGINT finish the current batch and exit."""
    context = ctx.ensure_object(Context)
    if mode is not None:
        context.settings = replace(context.settings, mode=parse_mode(mode, "--mode"))
    if processes > 1:
        if metrics_port is not None and metrics_port + processes - 1 > 65535:
            raise typer.BadParameter(f"ports {metrics_port}..{metrics_port + processes - 1} go past 65535")
        raise typer.Exit(_run_processes(processes, batch_size, burst, metrics_port, context))
    from consumers.worker import Worker

    timeouts = context.timeouts()
    member = Worker(timeouts, batch_size=batch_size, burst=burst)
    # Before anything else can be observed from outside (the metrics port): a SIGTERM from then on
    # always means "finish the batch and exit".
    member.install_signal_handlers()
    if metrics_port is not None:
        from scheduler.observability import Health, WorkerMetrics, serve_metrics

        member.health = Health()
        member.metrics = WorkerMetrics(
            serve_metrics(metrics_port, timeouts.engine, timeouts.clock, health=member.health)
        )
    totals = member.run()
    console.print(
        f"worker stopped: {totals.batches} batches, {totals.cancelled} cancelled, {totals.paid} paid, "
        f"{totals.already_cancelled} already cancelled, {totals.would_cancel} would cancel (shadow), "
        f"{totals.retried} retried, {totals.dead} dead, {totals.stale} stale, {totals.paused} handed back while paused",
        highlight=False,
    )
    if totals.gave_up is not None:
        raise typer.Exit(1)  # a burst run that ended in an outage: what is due is left for the next run


def _run_processes(count: int, batch_size: int, burst: bool, metrics_port: int | None, context: Context) -> int:
    """`count` worker processes with this one's options; child i serves its metrics on metrics_port + i."""
    argv = [sys.executable, "-m", "scheduler", *context.logging_argv, "worker", "--batch-size", str(batch_size)]
    argv += ["--mode", context.settings.mode.value]
    if burst:
        argv.append("--burst")
    settings = context.settings
    env = {**os.environ, ENV_DATABASE_URL: settings.database_url, ENV_BROKER_URL: settings.broker_url}
    ports = [[] if metrics_port is None else ["--metrics-port", str(metrics_port + i)] for i in range(count)]
    children = [subprocess.Popen([*argv, *port], env=env) for port in ports]
    stopping: list[int] = []  # a plain flag: an Event set in a signal handler can deadlock its waiter

    def _forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    # A child that dies on its own (killed, out of memory) is started again, unless this is a burst
    # run or a stop was asked: the group keeps its size, as a process manager would keep it.
    while not burst and not stopping:
        for i, child in enumerate(children):
            if child.poll() is not None and not stopping:
                log.error("worker process %d exited with %s; starting it again", child.pid, child.returncode)
                children[i] = subprocess.Popen([*argv, *ports[i]], env=env)
        time.sleep(CHILD_POLL_S)
    return max(child.wait() for child in children)


def demo(
    orders: Annotated[int, typer.Option(min=10, max=100_000, help="Orders to create.")] = 1000,
    workers: Annotated[int, typer.Option(min=1, max=16, help="Worker processes in the consumer group.")] = 3,
    database: Annotated[
        str, typer.Option(help="SQLite file to create (replaced if it exists).")
    ] = "order-timeouts-demo.sqlite3",
) -> None:
    """Orders with short timeouts, random payments, a consumer group, and a checked result."""
    from consumers.demo import run_demo

    raise typer.Exit(run_demo(orders=orders, workers=workers, path=database))


def order_store_probe(settings: Settings) -> Probe | None:
    """`check` asks an HTTP order store for the status of no orders; other stores have nothing to probe."""
    if not settings.order_store.startswith(("http://", "https://")):
        return None

    def run() -> None:
        from consumers.orders import http  # httpx is loaded only by those who use it

        store = http.from_env(settings.order_store)
        try:
            store.probe()
        finally:
            store.close()

    return Probe("orders", redact(settings.order_store), run)
