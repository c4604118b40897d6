"""The batch handler's rules that no transport changes: unknown payment status is never a cancel."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from consumers.handler import Handler
from consumers.orders.sql import SqlOrderStore
from scheduler import TimeoutState
from scheduler.clock import SystemClock
from scheduler.config import OrdersTableNames
from scheduler.transports.sql.adapter import DueRows
from tests.conftest import Stack
from tests.support import add_orders, cancel_counts, order_status


def test_a_database_error_of_the_orders_table_is_an_outage_that_spends_no_attempt(db_stack: Stack) -> None:
    add_orders(db_stack.engine, ["s-1", "s-2"])
    # The orders table is misnamed: every payment query fails inside the batch transaction.
    broken = db_stack.timeouts(orders=replace(OrdersTableNames(), table="no_such_orders"), max_attempts=1)
    broken.schedule_many(["s-1", "s-2"], due_at=datetime.now(UTC))
    store = SqlOrderStore(broken.settings.orders)
    handler = Handler(broken.engine, store, clock=broken.clock, worker_id="t", outbox=broken.outbox)

    for _ in range(3):  # more batches than attempts allowed
        settlement, _ = handler.handle(DueRows(limit=10))
        assert settlement.rolled_back and (settlement.done, settlement.retry, settlement.dead) == ([], [], [])
        assert settlement.unavailable is not None and "order store: orders table unreadable" in settlement.unavailable
    for order_id in ("s-1", "s-2"):
        record = broken.get(order_id)
        assert record is not None and (record.state, record.attempts, record.error) == (TimeoutState.PENDING, 0, None)

    # The table is back (its names fixed): the same rows are due and are decided on their first attempt.
    fixed = SqlOrderStore(OrdersTableNames())
    handler = Handler(broken.engine, fixed, clock=broken.clock, worker_id="t", outbox=broken.outbox)
    settlement, report = handler.handle(DueRows(limit=10))
    assert report.cancelled == 2 and not settlement.rolled_back
    assert order_status(db_stack.engine) == {"s-1": "CANCELLED", "s-2": "CANCELLED"}
    assert cancel_counts(db_stack.engine) == {"s-1": 1, "s-2": 1}


class SteppingClock:
    """A clock that moves on by `step_ms` each time it is read."""

    def __init__(self, start_ms: int, step_ms: int) -> None:
        self._ms, self._step = start_ms, step_ms

    def now_ms(self) -> int:
        self._ms += self._step
        return self._ms


def test_a_timeout_is_finished_when_its_outcome_is_written_not_when_the_batch_began(db_stack: Stack) -> None:
    # Lateness figures read finished_ms: stamped at the batch's start, they would leave out the
    # batch's own time (the payment query and the cancel).
    add_orders(db_stack.engine, ["f-1"])
    client = db_stack.timeouts()
    client.schedule("f-1", due_at=datetime.now(UTC))
    clock = SteppingClock(SystemClock().now_ms() + 1000, step_ms=250)
    handler = Handler(
        client.engine, SqlOrderStore(client.settings.orders), clock=clock, worker_id="t", outbox=client.outbox
    )
    _, report = handler.handle(DueRows(limit=10))
    assert report.cancelled == 1
    record = client.get("f-1")
    assert record is not None and record.fired_ms is not None and record.finished_ms is not None
    assert record.finished_ms - record.fired_ms == 250, "one clock reading later than the claim"
