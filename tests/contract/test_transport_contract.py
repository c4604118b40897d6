"""The contract every transport keeps, run against each of them (tests/stacks.py), through each
producer API (`client`: OrderTimeouts and AsyncOrderTimeouts)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from scheduler import InvalidTimeout, OrderTimeouts, Outcome, ScheduleResult, TimeoutNotFound, TimeoutState
from tests.conftest import Stack
from tests.support import add_orders, cancel_counts, order_status, pay

SOON = timedelta(milliseconds=300)


@pytest.fixture
def client(stack: Stack, api: str) -> OrderTimeouts:
    """The producer API under test on this stack; the workers are always the synchronous ones."""
    client = stack.client(api)
    if api != "sync":
        # Connected before the first order, as a running order service is (the synchronous client
        # is, from the stack's set-up): connecting inside the first schedule() can take longer than
        # SOON on a busy machine, and the first drain would then find the timer due already.
        client.get("warm-up")
        client.transport.figures()
    return client


def states(stack: Stack, *ids: str) -> list[tuple[TimeoutState, Outcome | None]]:
    client = stack.timeouts()
    result = []
    for oid in ids:
        record = client.get(oid)
        assert record is not None
        result.append((record.state, record.outcome))
    return result


def finished(stack: Stack, *ids: str) -> bool:
    return all(state is not TimeoutState.PENDING for state, _ in states(stack, *ids))


def test_an_unpaid_order_is_cancelled_once_when_due(stack: Stack, client: OrderTimeouts) -> None:
    add_orders(stack.engine, ["o-1"])
    assert client.schedule("o-1", delay=SOON) is ScheduleResult.CREATED

    assert stack.drain().claimed == 0, "nothing is due yet"
    assert order_status(stack.engine)["o-1"] == "PENDING"

    stack.drain_until(lambda: finished(stack, "o-1"))
    assert order_status(stack.engine)["o-1"] == "CANCELLED"
    assert cancel_counts(stack.engine) == {"o-1": 1}
    record = client.get("o-1")
    assert record is not None
    assert (record.state, record.outcome, record.attempts) == (TimeoutState.DONE, Outcome.CANCELLED, 1)
    assert record.fired_ms is not None and record.fired_ms >= record.due_ms
    assert record.worker


def test_a_paid_order_is_left_alone(stack: Stack, client: OrderTimeouts) -> None:
    add_orders(stack.engine, ["paid-late-revoke", "paid-no-revoke"])
    client.schedule_many(["paid-late-revoke", "paid-no-revoke"], delay=SOON)
    assert pay(stack.engine, "paid-no-revoke")  # paid, but the order service forgot to cancel the timeout
    assert pay(stack.engine, "paid-late-revoke")
    assert client.cancel("paid-late-revoke") is True

    stack.drain_until(lambda: finished(stack, "paid-no-revoke"))
    assert states(stack, "paid-late-revoke", "paid-no-revoke") == [
        (TimeoutState.REVOKED, None),
        (TimeoutState.DONE, Outcome.PAID),
    ]
    assert order_status(stack.engine) == {"paid-late-revoke": "PAID", "paid-no-revoke": "PAID"}
    assert cancel_counts(stack.engine) == {}


def test_an_order_cancelled_elsewhere_is_recorded_not_cancelled_again(stack: Stack, client: OrderTimeouts) -> None:
    add_orders(stack.engine, ["c-1"], status="CANCELLED")
    client.schedule("c-1", delay=SOON)
    stack.drain_until(lambda: finished(stack, "c-1"))
    assert states(stack, "c-1") == [(TimeoutState.DONE, Outcome.ALREADY_CANCELLED)]
    assert cancel_counts(stack.engine) == {}


def test_scheduling_twice_is_idempotent_unless_replaced(stack: Stack, client: OrderTimeouts) -> None:
    add_orders(stack.engine, ["dup"])
    assert client.schedule("dup", delay=timedelta(hours=1)) is ScheduleResult.CREATED
    first = client.get("dup")
    assert client.schedule("dup", delay=SOON) is ScheduleResult.EXISTS
    assert client.get("dup") == first, "a duplicate schedule changes nothing"

    assert client.schedule("dup", delay=SOON, replace=True) is ScheduleResult.REPLACED
    stack.drain_until(lambda: finished(stack, "dup"))
    assert cancel_counts(stack.engine) == {"dup": 1}


def test_reschedule_later_makes_the_old_timer_stale(stack: Stack, client: OrderTimeouts) -> None:
    add_orders(stack.engine, ["r-1"])
    client.schedule("r-1", delay=SOON)
    moved = client.reschedule("r-1", delay=timedelta(seconds=2))
    assert moved.version == 2

    time.sleep(SOON.total_seconds() + 0.5)
    stack.drain()
    assert states(stack, "r-1") == [(TimeoutState.PENDING, None)], "the first due time no longer counts"
    assert order_status(stack.engine)["r-1"] == "PENDING"

    stack.drain_until(lambda: finished(stack, "r-1"))
    assert cancel_counts(stack.engine) == {"r-1": 1}


def test_fire_makes_a_far_timeout_due_now(stack: Stack, client: OrderTimeouts) -> None:
    add_orders(stack.engine, ["f-1"])
    client.schedule("f-1", delay=timedelta(days=1))
    client.fire("f-1")
    stack.drain_until(lambda: finished(stack, "f-1"))
    assert order_status(stack.engine)["f-1"] == "CANCELLED"


def test_unknown_payment_status_is_retried_then_dead_lettered_never_cancelled(
    stack: Stack, client: OrderTimeouts
) -> None:
    # No order row: the store cannot tell whether it was paid.
    worker = stack.timeouts(max_attempts=2, retry_backoff=timedelta(milliseconds=200))
    client.schedule("ghost", delay=SOON)
    stack.drain_until(lambda: finished(stack, "ghost"), client=worker)
    record = client.get("ghost")
    assert record is not None
    assert record.state is TimeoutState.DEAD
    assert record.attempts == 2
    assert record.error and "unknown" in record.error and "not found" in record.error

    # The order shows up (the order service restored it); replaying the dead timeout cancels it.
    add_orders(stack.engine, ["ghost"])
    assert client.replay_dead(["ghost"]) == ["ghost"]
    stack.drain_until(lambda: finished(stack, "ghost"), client=worker)
    assert cancel_counts(stack.engine) == {"ghost": 1}


def test_a_batch_of_many_is_handled_exactly_once(stack: Stack, client: OrderTimeouts) -> None:
    ids = [f"bulk-{i:04d}" for i in range(600)]
    add_orders(stack.engine, ids)
    summary = client.schedule_many(ids, delay=SOON)
    assert (summary.created, summary.existing, summary.replaced) == (600, 0, 0)
    paid = set(ids[::3])
    for oid in paid:
        assert pay(stack.engine, oid)

    stack.drain_until(lambda: finished(stack, *ids), batch_size=64)
    status = order_status(stack.engine)
    assert {oid for oid, s in status.items() if s == "PAID"} == paid
    assert cancel_counts(stack.engine) == {oid: 1 for oid in ids if oid not in paid}


def test_cancel_and_reschedule_of_unknown_orders_are_errors(stack: Stack, client: OrderTimeouts) -> None:
    with pytest.raises(TimeoutNotFound):
        client.cancel("never-scheduled")
    with pytest.raises(TimeoutNotFound):
        client.reschedule("never-scheduled", delay=SOON)
    add_orders(stack.engine, ["done"])
    client.schedule("done", due_at=datetime.now(UTC))
    stack.drain_until(lambda: finished(stack, "done"))
    assert client.cancel("done") is False, "a fired timeout cannot be revoked"
    with pytest.raises(InvalidTimeout):
        client.reschedule("done", delay=SOON)
