"""A pause under load, with real worker processes killed (SIGKILL) and started again while it holds:
nothing more is cancelled, nothing is dead-lettered or lost, and `resume` drains every timer once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from scheduler import Outcome, TimeoutState
from scheduler.database import reading
from scheduler.registry import count_pending
from tests.conftest import ROOT, Stack, open_stack
from tests.stacks import STACKS
from tests.support import add_orders, cancel_counts, registry_records, wait_until

pytestmark = pytest.mark.slow

#: timeouts, coming due in steps over LOAD_S seconds
ORDERS = 1200
STEPS = 8
LOAD_S = 4.0


#: the registry as the queue, and the broker whose failed deliveries are published again (redis hands
#: them back the same way as the order-store outage does: tests/ha/test_order_store_outage.py)
@pytest.fixture(params=["sql-postgresql", "rabbitmq"])
def loaded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    yield from open_stack(request.param, STACKS, tmp_path)


def cli(stack: Stack, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "scheduler", *args],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def finished(stack: Stack) -> int:
    with reading(stack.engine) as conn:
        return ORDERS - count_pending(conn)


def test_a_pause_under_load_outlives_killed_workers_and_resume_drains_every_timer_once(loaded: Stack) -> None:
    ids = [f"L-{i:04d}" for i in range(ORDERS)]
    paid = set(ids[::3])
    add_orders(loaded.engine, sorted(paid), status="PAID")
    add_orders(loaded.engine, [oid for oid in ids if oid not in paid])
    workers = [loaded.start_worker("--batch-size", "50") for _ in range(2)]
    try:
        start = datetime.now(UTC) + timedelta(milliseconds=200)
        step = len(ids) // STEPS
        for i in range(STEPS):
            due = start + timedelta(seconds=LOAD_S * i / STEPS)
            loaded.timeouts().schedule_many(ids[i * step : (i + 1) * step], due_at=due)
        all_due_at = time.monotonic() + 0.2 + LOAD_S
        wait_until(lambda: finished(loaded) >= 100, timeout=30)
        # Through the API, at once (the command is `order-timeouts pause`, tests/integration/test_valves.py).
        pause, _ = loaded.timeouts().pause("provider incident")
        # One worker killed mid-work and started again: the pause is in the registry, not in a process.
        workers[0].kill()
        workers[0].wait()
        workers[0] = loaded.start_worker("--batch-size", "50")
        time.sleep(1.0)  # batches in flight when the pause was written finish
        frozen = cancel_counts(loaded.engine)
        time.sleep(max(all_due_at - time.monotonic(), 0) + 1.5)
        workers[1].kill()
        workers[1].wait()
        workers[1] = loaded.start_worker("--batch-size", "50")
        time.sleep(1.0)

        assert cancel_counts(loaded.engine) == frozen, "nothing was cancelled while paused"
        records = registry_records(loaded.engine).values()
        pending = [r for r in records if r.state is TimeoutState.PENDING]
        assert len(pending) >= ORDERS // 4, "the pause came in the middle of the load"
        assert {r.attempts for r in pending} == {0}, "the pause spent no attempt"
        assert not [r for r in records if r.state is TimeoutState.DEAD]
        stats = json.loads(cli(loaded, "stats", "--json"))
        assert stats["paused"]["reason"] == pause.reason and stats["overdue"] == len(pending)

        assert "resumed" in cli(loaded, "resume")
        wait_until(lambda: finished(loaded) == ORDERS, timeout=60)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()

    records = registry_records(loaded.engine)
    assert {oid: r.outcome for oid, r in records.items()} == {
        oid: Outcome.PAID if oid in paid else Outcome.CANCELLED for oid in ids
    }
    assert cancel_counts(loaded.engine) == {oid: 1 for oid in ids if oid not in paid}
