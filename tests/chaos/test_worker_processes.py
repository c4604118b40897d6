"""Real worker processes on the `sql` transport: SIGKILL mid-batch, SIGTERM, payments racing timeouts."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from scheduler import Outcome, TimeoutState
from scheduler.database import reading
from scheduler.registry import count_pending
from scheduler.transports.sql.adapter import SqlTransport
from tests.conftest import Stack
from tests.slow_store import pausing_after_cancel
from tests.support import add_orders, cancel_counts, order_status, pay, registry_records, wait_until

pytestmark = pytest.mark.slow


def pending_count(stack: Stack) -> int:
    with reading(stack.engine) as conn:
        return count_pending(conn)


def test_sigkill_in_the_middle_of_a_batch_loses_nothing_and_cancels_nothing_twice(
    db_stack: Stack, tmp_path: Path
) -> None:
    ids = [f"k-{i:03d}" for i in range(200)]
    add_orders(db_stack.engine, ids)
    db_stack.timeouts().schedule_many(ids, due_at=datetime.now(UTC))
    marker = tmp_path / "mid-batch"
    victim = db_stack.start_worker(
        "--batch-size",
        "50",
        **pausing_after_cancel(marker),
    )
    try:
        wait_until(marker.exists, timeout=30)
        assert len(marker.read_text().split(",")) == 50, "the worker is inside its first batch, cancels not committed"
    finally:
        victim.kill()
        victim.wait()

    # The killed batch rolled back as a whole: no order cancelled, every timeout still pending.
    assert cancel_counts(db_stack.engine) == {}
    assert pending_count(db_stack) == 200

    survivor = db_stack.start_worker("--batch-size", "50", "--burst")
    assert survivor.wait(timeout=60) == 0
    assert cancel_counts(db_stack.engine) == dict.fromkeys(ids, 1)
    assert all(
        r.state is TimeoutState.DONE and r.outcome is Outcome.CANCELLED
        for r in registry_records(db_stack.engine).values()
    )


def test_sigterm_finishes_the_current_batch_then_exits_cleanly(db_stack: Stack, tmp_path: Path) -> None:
    ids = [f"t-{i:03d}" for i in range(30)]
    add_orders(db_stack.engine, ids)
    db_stack.timeouts().schedule_many(ids, due_at=datetime.now(UTC))
    marker = tmp_path / "mid-batch"
    worker = db_stack.start_worker(
        "--batch-size",
        "10",
        **pausing_after_cancel(marker),
        ORDER_TIMEOUTS_TEST_PAUSE_S="1",
        capture=True,
    )
    wait_until(marker.exists, timeout=30)
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0
    assert "worker stopped: 1 batches, 10 cancelled" in out
    # The batch in flight committed; the rest waits for the next worker.
    assert sum(cancel_counts(db_stack.engine).values()) == 10
    assert pending_count(db_stack) == 20


def test_an_idle_worker_wakes_when_a_nearer_timeout_is_scheduled(db_stack: Stack) -> None:
    client = db_stack.timeouts()
    client.schedule("far", delay=timedelta(hours=1))
    transport = SqlTransport(db_stack.engine, client.clock)
    received: list[float] = []

    def receive() -> None:
        start = time.monotonic()
        batch = transport.receive(100, timeout=8.0)
        if batch:
            received.append(time.monotonic() - start)

    listener = threading.Thread(target=receive)
    listener.start()
    time.sleep(0.3)  # let it settle into its sleep until the far due time
    client.schedule("near", due_at=datetime.now(UTC))
    listener.join()
    transport.close()
    assert received and received[0] < 3.0, "woke on the new schedule instead of sleeping out its timeout"


@pytest.mark.parametrize("round_", range(3))
def test_payments_racing_the_timeout_never_cancel_a_paid_order(db_stack: Stack, round_: int) -> None:
    ids = [f"race-{round_}-{i:03d}" for i in range(150)]
    add_orders(db_stack.engine, ids)
    client = db_stack.timeouts()
    group = [db_stack.start_worker("--batch-size", "25") for _ in range(2)]
    # Due once both workers are running: the race is between payment and a live consumer group.
    due = datetime.now(UTC) + timedelta(milliseconds=800)
    client.schedule_many(ids, due_at=due)
    paid: set[str] = set()
    refused: set[str] = set()

    def payer(share: list[str]) -> None:
        for oid in share:
            # Aim at the deadline itself, a few ms either side.
            target = due.timestamp() + random.uniform(-0.05, 0.05)
            time.sleep(max(0.0, target - time.time()))
            with db_stack.engine.begin() as conn:
                ok = conn.execute(
                    text("UPDATE orders SET status = 'PAID' WHERE id = :id AND status = 'PENDING'"), {"id": oid}
                ).rowcount
                if ok:
                    client.cancel(oid, connection=conn)
            (paid if ok else refused).add(oid)

    shares = [ids[i::4] for i in range(4)]
    payers = [threading.Thread(target=payer, args=(sorted(share, key=lambda _: random.random()),)) for share in shares]
    try:
        for t in payers:
            t.start()
        for t in payers:
            t.join()
        wait_until(lambda: pending_count(db_stack) == 0, timeout=30)
    finally:
        for member in group:
            member.send_signal(signal.SIGTERM)
        codes = [member.wait(timeout=30) for member in group]
    assert codes == [0, 0], "SIGTERM lets each worker finish and exit cleanly"

    status = order_status(db_stack.engine)
    counts = cancel_counts(db_stack.engine)
    final = registry_records(db_stack.engine)
    assert paid | refused == set(ids)
    for oid in paid:
        assert status[oid] == "PAID" and oid not in counts, f"paid order {oid} was cancelled"
        assert final[oid].outcome is not Outcome.CANCELLED
    for oid in refused:
        assert status[oid] == "CANCELLED" and counts[oid] == 1
        assert final[oid].outcome is Outcome.CANCELLED
    assert pay(db_stack.engine, ids[0]) is False, "a payment after the outcome changes nothing"


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_worker_processes_start_a_child_again_when_it_dies_and_stop_together(db_stack: Stack) -> None:
    argv = [sys.executable, "-m", "scheduler", "worker", "--processes", "2"]
    group = subprocess.Popen(argv, env=db_stack.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(children_of(group.pid)) == 2, timeout=30)
        victim = children_of(group.pid)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(children_of(group.pid)) == 2 and victim not in children_of(group.pid), timeout=30)

        ids = [f"again-{i}" for i in range(20)]
        add_orders(db_stack.engine, ids)
        db_stack.timeouts().schedule_many(ids, due_at=datetime.now(UTC))
        wait_until(lambda: pending_count(db_stack) == 0, timeout=30)
        assert cancel_counts(db_stack.engine) == dict.fromkeys(ids, 1)
    finally:
        group.send_signal(signal.SIGTERM)
        _, err = group.communicate(timeout=60)
    assert group.returncode == 0, err[-2000:]
    assert "exited with -9; starting it again" in err
