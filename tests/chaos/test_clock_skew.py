"""One clock for the fleet: a worker whose clock is minutes off never cancels an order early, on
every transport, while payments race the deadline.

The worker runs under libfaketime, its clock five minutes fast or slow. The registry database's clock
decides (scheduler.clock.RegistryClock), so the fast one must not act before the due time and the
slow one must not fall behind.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from scheduler.clock import from_ms
from scheduler.database import reading
from scheduler.registry import database_now_ms
from tests.conftest import Stack, open_stack
from tests.stacks import STACKS
from tests.support import add_orders, cancel_counts, faketime, order_status, pay, wait_until

ORDERS = 40
#: payments land this long before the registry's due time: a worker acting early would win the race
PAID_BEFORE_DUE_MS = 300
FINISHED = "SELECT order_id, finished_ms FROM order_timeouts WHERE state = 'done'"


@pytest.fixture(params=sorted(STACKS))
def skewed_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    yield from open_stack(request.param, STACKS, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("offset", ["+300s", "-300s"])
def test_a_worker_with_a_skewed_clock_never_cancels_before_the_due_time(skewed_stack: Stack, offset: str) -> None:
    late_ms = race_payments_against(
        skewed_stack, lambda: skewed_stack.start_worker("--batch-size", "10", **faketime(offset))
    )
    assert late_ms[-1] < 5000, f"a {offset} clock made the worker {late_ms[-1]} ms late"


def race_payments_against(stack: Stack, start_worker: Callable[[], subprocess.Popen[str]]) -> list[int]:
    """ORDERS timeouts due over two seconds, half of them paid PAID_BEFORE_DUE_MS before their due
    time while the worker runs; returns how late each finished, sorted, once every check passed."""
    ids = [f"skew-{i:02d}" for i in range(ORDERS)]
    add_orders(stack.engine, ids)
    client = stack.timeouts()
    start = database_now_ms(client.engine) + 3000
    due = {oid: start + 50 * i for i, oid in enumerate(ids)}
    client.schedule_many([(oid, from_ms(ms)) for oid, ms in due.items()])
    paying = ids[::2]

    worker = start_worker()
    refused: list[str] = []

    def pay_just_before_the_deadline() -> None:
        for oid in paying:
            wait = (due[oid] - PAID_BEFORE_DUE_MS - client.clock.now_ms()) / 1000
            if wait > 0:
                time.sleep(wait)
            if not pay(stack.engine, oid):
                refused.append(oid)

    payer = threading.Thread(target=pay_just_before_the_deadline)
    payer.start()
    try:
        payer.join(timeout=30)
        wait_until(lambda: len(cancel_counts(stack.engine)) == ORDERS - len(paying), timeout=20)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)

    assert refused == [], "these orders were cancelled before their payment, made before the due time"
    statuses = order_status(stack.engine)
    assert {oid for oid in paying if statuses[oid] != "PAID"} == set()
    assert cancel_counts(stack.engine) == {oid: 1 for oid in ids if oid not in paying}
    with reading(stack.engine) as conn:
        finished = dict(conn.execute(text(FINISHED)).all())
    late_ms = sorted(finished[oid] - due[oid] for oid in finished)
    assert late_ms[0] >= 0, f"finished {-late_ms[0]} ms before its due time by the registry's clock"
    return late_ms
