"""The batch handler's rules that no transport changes: unknown payment status is never a cancel."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from consumers.handler import Handler
from consumers.orders.sql import SqlOrderStore
from scheduler import TimeoutState
from scheduler.clock import SystemClock
from scheduler.config import OrdersTableNames
from scheduler.transports.sql.adapter import DueRows
from tests.conftest import Stack
from tests.support import add_orders, cancel_counts, order_status


def test_a_broken_order_store_retries_then_dead_letters_and_cancels_nothing(db_stack: Stack) -> None:
    add_orders(db_stack.engine, ["s-1", "s-2"])
    base = db_stack.timeouts().settings
    # The orders table is misnamed: every payment query fails inside the batch transaction.
    broken = db_stack.timeouts(
        orders=replace(OrdersTableNames(), table="no_such_orders"),
        max_attempts=2,
        retry_backoff=timedelta(milliseconds=100),
    )
    assert base.orders.table == "orders"
    broken.schedule_many(["s-1", "s-2"], due_at=datetime.now(UTC))

    first = db_stack.drain(broken)
    assert (first.claimed, first.retried, first.cancelled) == (2, 2, 0)
    record = broken.get("s-1")
    assert record is not None and record.state is TimeoutState.PENDING and record.attempts == 1
    assert record.error and "orders table unreadable" in record.error

    def both_dead() -> bool:
        return all(broken.get(oid).state is TimeoutState.DEAD for oid in ("s-1", "s-2"))  # type: ignore[union-attr]

    db_stack.drain_until(both_dead, client=broken)
    record = broken.get("s-1")
    assert record is not None and record.attempts == 2
    assert order_status(db_stack.engine) == {"s-1": "PENDING", "s-2": "PENDING"}
    assert cancel_counts(db_stack.engine) == {}


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
