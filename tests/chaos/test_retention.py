"""Retention while everything else runs: purges beside a worker process that fires timeouts and a
producer that schedules them, two `maintain` processes sharing the purge through its lease, and a
purge killed mid-way then run again."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select, text

from scheduler import TimeoutState, registry, retention
from scheduler.database import reading
from scheduler.registry import PURGED_STATES, timeouts
from scheduler.testing import add_finished
from tests.conftest import ROOT, Stack
from tests.support import add_orders, cancel_counts, order_status, pay, registry_records, wait_until

HOUR_MS = 3_600_000


def count(stack: Stack, *, prefix: str = "", state: TimeoutState | None = None) -> int:
    stmt = select(func.count()).select_from(timeouts).where(timeouts.c.order_id.like(f"{prefix}%"))
    if state is not None:
        stmt = stmt.where(timeouts.c.state == state.value)
    with reading(stack.engine) as conn:
        return int(conn.execute(stmt).scalar_one())


def test_purges_never_touch_a_pending_timeout_while_timeouts_are_scheduled_and_fired(db_stack: Stack) -> None:
    """Every unpaid order is cancelled once and every paid one never, although everything finished
    is purged as soon as it finishes: a pending row purged before it fired would leave its order
    unpaid and uncancelled. The far-off pending rows are all still there afterwards."""
    ids = [f"live-{i:04d}" for i in range(600)]
    add_orders(db_stack.engine, ids)
    paid = set(ids[1::3])
    for order_id in paid:
        pay(db_stack.engine, order_id)
    client = db_stack.timeouts()
    client.schedule_many([f"far-{i}" for i in range(300)], delay=timedelta(days=10))
    worker = db_stack.start_worker("--batch-size", "50")
    scheduled = threading.Event()

    def produce() -> None:
        producer = db_stack.timeouts()
        for start in range(0, len(ids), 30):
            producer.schedule_many(ids[start : start + 30], delay=timedelta(milliseconds=50))
            time.sleep(0.05)
        scheduled.set()

    producer = threading.Thread(target=produce)
    producer.start()
    purged = 0
    try:
        while not scheduled.is_set() or count(db_stack, prefix="live-", state=TimeoutState.PENDING):
            before = registry.database_now_ms(db_stack.engine) + 1  # everything finished so far
            purged += retention.purge(db_stack.engine, before_ms=before, states=PURGED_STATES, batch=20)
            time.sleep(0.01)
        purged += retention.purge(
            db_stack.engine, before_ms=registry.database_now_ms(db_stack.engine) + 1, states=PURGED_STATES
        )
    finally:
        producer.join()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)

    assert purged == len(ids)
    assert cancel_counts(db_stack.engine) == {order_id: 1 for order_id in ids if order_id not in paid}
    statuses = order_status(db_stack.engine)
    assert all(statuses[order_id] == "PAID" for order_id in paid)
    assert sorted(registry_records(db_stack.engine)) == sorted(f"far-{i}" for i in range(300))
    assert count(db_stack, state=TimeoutState.PENDING) == 300


def start_maintain(stack: Stack, log: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "scheduler", "-v", "maintain", "--purge-interval", "0.2s"]
    with log.open("w") as out:
        return subprocess.Popen(argv, env=stack.env(ORDER_TIMEOUTS_RETENTION="1h"), stderr=out, cwd=ROOT, text=True)


def purged_by(log: Path) -> int:
    """Rows a maintain process says it purged."""
    return sum(int(n) for n in re.findall(r"purge: purged (\d+) timeouts", log.read_text()))


def test_two_maintain_processes_purge_one_at_a_time_and_the_second_takes_over_from_a_killed_first(
    db_stack: Stack, tmp_path: Path
) -> None:
    now = registry.database_now_ms(db_stack.engine)
    add_finished(db_stack.engine, 500, prefix="old-a", finished_ms=now - 2 * HOUR_MS)
    add_finished(db_stack.engine, 50, prefix="recent", finished_ms=now - HOUR_MS // 2)
    logs = [tmp_path / "maintain-1.log", tmp_path / "maintain-2.log"]
    pair = [start_maintain(db_stack, logs[0])]
    try:
        # The rows are gone when their batch commits; the log line comes at the end of the run.
        wait_until(lambda: count(db_stack, prefix="old-a") == 0 and purged_by(logs[0]) == 500, timeout=60)
        pair.append(start_maintain(db_stack, logs[1]))
        wait_until(lambda: "maintenance ready" in logs[1].read_text(), timeout=60)
        for round_number in range(3):  # more history comes due while both run: the lease holder purges it
            add_finished(db_stack.engine, 100, prefix=f"old-b{round_number}", finished_ms=now - 2 * HOUR_MS)
            purged = 500 + 100 * (round_number + 1)
            wait_until(lambda: count(db_stack, prefix="old-b") == 0 and purged_by(logs[0]) == purged, timeout=30)  # noqa: B023
        assert purged_by(logs[1]) == 0, "the second never purged while the first lived"

        pair[0].kill()
        pair[0].wait(timeout=30)
        add_finished(db_stack.engine, 200, prefix="old-c", finished_ms=now - 2 * HOUR_MS)
        # once the first one's lease (3 intervals, at least 2 s) has run out
        wait_until(lambda: count(db_stack, prefix="old-c") == 0 and purged_by(logs[1]) == 200, timeout=30)
    finally:
        for process in pair:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=30) for process in pair]
    assert codes[1] == 0, logs[1].read_text()[-2000:]
    assert count(db_stack, prefix="recent") == 50, "rows younger than the retention stay"


def test_a_purge_killed_mid_way_leaves_whole_batches_done_and_a_second_run_finishes(db_stack: Stack) -> None:
    now = registry.database_now_ms(db_stack.engine)
    history = 150_000
    add_finished(db_stack.engine, history, prefix="old", finished_ms=now - 2 * HOUR_MS, spread_ms=HOUR_MS // 2)
    add_finished(db_stack.engine, 100, prefix="dead", finished_ms=now - 2 * HOUR_MS, state=TimeoutState.DEAD)
    db_stack.timeouts().schedule_many([f"pending-{i}" for i in range(1000)], delay=timedelta(hours=1))
    argv = [sys.executable, "-m", "scheduler", "purge", "--older-than", "1h", "--json"]

    first = subprocess.Popen(argv, env=db_stack.env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: count(db_stack, prefix="old") < history, timeout=60, interval=0.005)
    finally:
        first.kill()
        first.communicate(timeout=30)
    left = count(db_stack, prefix="old")
    assert 0 < left < history, "killed mid-way (the purge was faster than this test: make the history longer)"
    assert (history - left) % retention.batch_size(db_stack.engine) == 0, "only whole batches committed"
    with reading(db_stack.engine) as conn:  # the oldest went first: what is left is the most recent
        oldest_left = registry.oldest_finished_ms(conn, [TimeoutState.DONE])
        assert oldest_left is not None
        assert conn.execute(text("SELECT count(*) FROM order_timeouts WHERE state = 'done'")).scalar_one() == left

    second = subprocess.run(argv, env=db_stack.env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["count"] == left
    assert count(db_stack, prefix="old") == 0
    assert count(db_stack, prefix="dead") == 100
    assert count(db_stack, prefix="pending-", state=TimeoutState.PENDING) == 1000
