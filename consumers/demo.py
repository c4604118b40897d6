"""`order-timeouts demo`: the whole loop on the embedded default, checked at the end.

Creates a SQLite file with ~1,000 orders whose timeouts fall due within seconds, pays a random share
of them (some just before their deadline, some too late), runs a consumer group of worker
processes, then checks the orders table against the registry: every unpaid order cancelled exactly
once, no paid order cancelled, nothing left pending.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import Engine, text

from scheduler import registry
from scheduler.api import OrderTimeouts
from scheduler.cli.render import console
from scheduler.config import ENV_BROKER_URL, ENV_DATABASE_URL, Settings
from scheduler.database import reading
from scheduler.schema import init_db
from scheduler.testing import cancel_log_counts, install_cancel_log

DELAY_RANGE_S = (2.0, 8.0)
PAID_SHARE = 0.45
#: of the paid orders, the share paid 20 to 150 ms before the deadline: the race with the worker
LAST_MOMENT_SHARE = 0.1
#: orders whose payment arrives after the deadline: the order service's refund path
LATE_SHARE = 0.03
DEADLINE_S = 90.0


@dataclass
class Payments:
    paid: set[str] = field(default_factory=set)
    late_refused: set[str] = field(default_factory=set)
    late_accepted: set[str] = field(default_factory=set)
    done: threading.Event = field(default_factory=threading.Event)


def run_demo(*, orders: int, workers: int, path: str) -> int:
    for suffix in ("", "-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    timeouts = OrderTimeouts(settings=Settings(database_url=url, broker_url="sql"))
    engine = timeouts.engine
    init_db(engine, timeouts.settings.orders)
    install_cancel_log(engine)

    rng = random.Random()
    ids = [f"demo-{i:05d}" for i in range(orders)]
    delays = {oid: rng.uniform(*DELAY_RANGE_S) for oid in ids}
    # The order rows and their timeouts commit in one transaction: the registry is the outbox.
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO orders (id, status) VALUES (:id, 'PENDING')"), [{"id": oid} for oid in ids])
        timeouts.schedule_many([(oid, timedelta(seconds=delays[oid])) for oid in ids], connection=conn)
    started = time.monotonic()
    console.print(
        f"[bold]{orders} orders[/] created in {path}, timeouts due in "
        f"{DELAY_RANGE_S[0]:.0f} to {DELAY_RANGE_S[1]:.0f}s; starting {workers} worker processes"
    )

    plan = _payment_plan(rng, ids, delays)
    payments = Payments()
    payer = threading.Thread(target=_pay, args=(timeouts, plan, started, payments), daemon=True)
    env = {**os.environ, ENV_DATABASE_URL: url, ENV_BROKER_URL: "sql"}
    argv = [sys.executable, "-m", "scheduler", "worker", "--batch-size", "100"]
    group = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL) for _ in range(workers)]
    payer.start()
    try:
        finished_in_time = _watch(engine, orders, payments)
    finally:
        for member in group:
            member.send_signal(signal.SIGTERM)
        codes = [member.wait(timeout=30) for member in group]
    payer.join(timeout=5)
    ok = _report(engine, ids, payments, codes, finished_in_time)
    timeouts.close()
    return 0 if ok else 1


def _payment_plan(rng: random.Random, ids: list[str], delays: dict[str, float]) -> list[tuple[float, str]]:
    plan: list[tuple[float, str]] = []
    for oid in ids:
        roll = rng.random()
        if roll < PAID_SHARE * LAST_MOMENT_SHARE:
            plan.append((delays[oid] - rng.uniform(0.02, 0.15), oid))
        elif roll < PAID_SHARE:
            plan.append((rng.uniform(0.2, delays[oid] - 0.2), oid))
        elif roll < PAID_SHARE + LATE_SHARE:
            plan.append((delays[oid] + rng.uniform(0.5, 1.5), oid))
    return sorted(plan)


def _pay(timeouts: OrderTimeouts, plan: list[tuple[float, str]], started: float, payments: Payments) -> None:
    """The order service: a payment is a conditional update, and on success revokes the timeout."""
    for at, oid in plan:
        time.sleep(max(0.0, started + at - time.monotonic()))
        with timeouts.engine.begin() as conn:
            paid = conn.execute(
                text("UPDATE orders SET status = 'PAID' WHERE id = :id AND status = 'PENDING'"), {"id": oid}
            ).rowcount
            if paid:
                timeouts.cancel(oid, connection=conn)
        if paid:
            payments.paid.add(oid)
        else:
            payments.late_refused.add(oid)
    payments.done.set()


def _watch(engine: Engine, total: int, payments: Payments) -> bool:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("timeouts finished or revoked", total=total)
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            with reading(engine) as conn:
                left = registry.count_pending(conn)
            progress.update(task, completed=total - left)
            if left == 0 and payments.done.is_set():
                return True
            time.sleep(0.2)
    return False


def _report(engine: Engine, ids: list[str], payments: Payments, exit_codes: list[int], in_time: bool) -> bool:
    with reading(engine) as conn:
        status: dict[str, str] = dict(conn.execute(text("SELECT id, status FROM orders")).all())
        cancels = cancel_log_counts(conn)
        rows = {r.order_id: r for r in registry.all_records(conn)}
    problems: list[str] = []
    if not in_time:
        problems.append(f"timeouts still pending after {DEADLINE_S:.0f}s")
    if any(exit_codes):
        problems.append(f"worker exit codes {exit_codes}")
    twice = [oid for oid, n in cancels.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} orders cancelled more than once, e.g. {twice[0]}")
    for oid in ids:
        row = rows[oid]
        if oid in payments.paid:
            if status[oid] != "PAID" or row.outcome is registry.Outcome.CANCELLED or cancels.get(oid):
                problems.append(f"paid order {oid} was cancelled")
        elif status[oid] != "CANCELLED" or cancels.get(oid) != 1 or row.outcome is not registry.Outcome.CANCELLED:
            problems.append(f"unpaid order {oid} ended {status[oid]} with timeout {row.state.value}/{row.outcome}")
    if payments.late_accepted:
        problems.append(f"{len(payments.late_accepted)} payments accepted after the cancel")

    lateness = sorted(
        r.fired_ms - r.due_ms
        for r in rows.values()
        if r.fired_ms is not None and r.outcome is registry.Outcome.CANCELLED
    )
    states = registry.TimeoutState
    table = Table(title="demo outcome (checked against the orders table)")
    table.add_column("outcome")
    table.add_column("orders", justify="right")
    table.add_column("meaning")
    cancelled = sum(1 for r in rows.values() if r.outcome is registry.Outcome.CANCELLED)
    revoked = sum(1 for r in rows.values() if r.state is states.REVOKED)
    found_paid = sum(1 for r in rows.values() if r.outcome is registry.Outcome.PAID)
    table.add_row("cancelled", str(cancelled), "unpaid at the deadline: cancelled exactly once")
    table.add_row(
        "paid", str(revoked + found_paid), f"{revoked} revoked on payment, {found_paid} found paid by the worker"
    )
    table.add_row("pending", str(sum(1 for r in rows.values() if r.state is states.PENDING)), "should be 0")
    table.add_row("dead", str(sum(1 for r in rows.values() if r.state is states.DEAD)), "should be 0")
    table.add_row("late payments refused", str(len(payments.late_refused)), "arrived after the cancel: refund path")
    console.print(table)
    if lateness:
        p50 = lateness[len(lateness) // 2]
        p99 = lateness[min(len(lateness) - 1, int(len(lateness) * 0.99))]
        console.print(f"cancel lateness after the deadline: p50 {p50} ms, p99 {p99} ms, max {lateness[-1]} ms")
    for problem in problems[:10]:
        console.print(f"[red]✗ {problem}[/]")
    if problems:
        console.print(f"[bold red]FAILED[/]: {len(problems)} problems")
        return False
    console.print("[bold green]OK[/]: every unpaid order cancelled once, no paid order cancelled, nothing pending")
    return True
