"""From schedule() to the cancel, on the in-memory broker and a clock the test moves."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.exc import OperationalError

from consumers.orders.sql import SqlOrderStore
from scheduler import Outcome, TimeoutState
from scheduler.transports.base import FAILED_REDELIVERY_MS
from scheduler.transports.message import TimerMessage
from tests.unit.conftest import Shop


def test_an_unpaid_order_is_cancelled_at_its_due_time_and_not_a_millisecond_before(shop: Shop) -> None:
    shop.add_orders("A-1")
    shop.timeouts.schedule("A-1", delay=timedelta(minutes=30))

    shop.later(minutes=30, milliseconds=-1)
    assert shop.drain().claimed == 0
    assert shop.status("A-1") == "PENDING"

    shop.later(milliseconds=1)
    totals = shop.drain()
    assert (totals.claimed, totals.cancelled) == (1, 1)
    assert shop.status("A-1") == "CANCELLED"
    record = shop.timeouts.get("A-1")
    assert record is not None and record.state is TimeoutState.DONE and record.outcome is Outcome.CANCELLED


def test_a_paid_order_is_recorded_paid_and_left_alone(shop: Shop) -> None:
    shop.add_orders("P-1", status="PAID")
    shop.timeouts.schedule("P-1", delay=timedelta(seconds=5))
    shop.later(seconds=5)
    assert shop.drain().paid == 1
    assert shop.status("P-1") == "PAID"


def test_a_duplicate_delivery_cancels_once_and_is_acked_as_stale(shop: Shop) -> None:
    shop.add_orders("D-1")
    shop.timeouts.schedule("D-1", delay=timedelta(seconds=1))
    message = shop.transport.published[-1]
    shop.transport.publish_raw(message.encode(), message.due_ms)  # the relay's second copy, say
    shop.later(seconds=1)
    totals = shop.drain()
    assert (totals.cancelled, totals.stale) == (1, 1)
    assert shop.transport.figures() == {"armed": 0, "in_flight": 0, "dead": 0}


def test_a_timer_of_a_rescheduled_timeout_is_stale_and_the_new_one_fires(shop: Shop) -> None:
    shop.add_orders("R-1")
    shop.timeouts.schedule("R-1", delay=timedelta(seconds=10))
    old = shop.transport.published[-1]
    shop.timeouts.reschedule("R-1", delay=timedelta(minutes=5))
    shop.transport.publish_raw(old.encode(), old.due_ms)  # a broker that keeps both copies

    shop.later(seconds=10)
    totals = shop.drain()
    assert (totals.claimed, totals.stale) == (0, 1)
    assert shop.status("R-1") == "PENDING"
    shop.later(minutes=5)
    assert shop.drain().cancelled == 1


def test_a_worker_that_dies_before_settling_loses_nothing_and_cancels_once(shop: Shop) -> None:
    shop.add_orders("K-1", "K-2")
    shop.timeouts.schedule_many(["K-1", "K-2"], delay=timedelta(seconds=1))
    shop.later(seconds=1)
    assert len(shop.transport.receive(10, 0).deliveries) == 2  # taken by a worker that then dies
    assert shop.transport.crash() == 2
    totals = shop.drain()
    assert totals.cancelled == 2
    assert {shop.status("K-1"), shop.status("K-2")} == {"CANCELLED"}


def test_a_timer_that_keeps_killing_workers_is_dead_lettered(shop: Shop) -> None:
    shop.add_orders("X-1")
    shop.timeouts.schedule("X-1", delay=timedelta(seconds=1))
    shop.later(seconds=1)
    limit = shop.timeouts.settings.max_deliveries
    for _ in range(limit):
        assert shop.transport.receive(10, 0)
        shop.transport.crash()
    assert shop.drain().dead == 1
    record = shop.timeouts.get("X-1")
    assert record is not None and record.state is TimeoutState.DEAD
    assert record.error is not None and f"limit {limit}" in record.error
    assert [letter.reason for letter in shop.transport.dead_letters] == [record.error]
    assert shop.status("X-1") == "PENDING", "dead-lettered, not cancelled"


def test_unknown_payment_status_is_retried_with_backoff_then_dead_lettered(shop: Shop) -> None:
    shop.timeouts.schedule("ghost", delay=timedelta(seconds=1))  # no such order in the store
    shop.later(seconds=1)
    attempts = shop.timeouts.settings.max_attempts
    for attempt in range(1, attempts):
        assert shop.drain().retried == 1
        record = shop.timeouts.get("ghost")
        assert record is not None and record.state is TimeoutState.PENDING and record.attempts == attempt
        assert record.published_ms is not None, "the re-armed timer is on the broker: nothing for the relay"
        assert shop.transport.armed()["ghost"] == record.due_ms > shop.clock.now_ms()
        shop.clock.advance(timedelta(milliseconds=record.due_ms - shop.clock.now_ms()))
    assert shop.drain().dead == 1
    record = shop.timeouts.get("ghost")
    assert record is not None and record.state is TimeoutState.DEAD
    assert record.error is not None and "payment status unknown" in record.error


def test_a_batch_whose_transaction_fails_comes_back_soon_as_a_fresh_delivery(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop.add_orders("F-1")
    shop.timeouts.schedule("F-1", delay=timedelta(seconds=1))
    shop.later(seconds=1)

    def broken(*_: object) -> None:
        raise OperationalError("SELECT", {}, Exception("the database went away"))

    monkeypatch.setattr(SqlOrderStore, "payment_status", broken)
    batch = shop.transport.receive(10, 0)
    settlement, _ = shop.handler().handle(batch)
    assert settlement.rolled_back and len(settlement.failed) == 1
    shop.transport.settle(settlement)
    assert shop.transport.armed() == {"F-1": shop.clock.now_ms() + FAILED_REDELIVERY_MS}

    monkeypatch.undo()
    shop.later(milliseconds=FAILED_REDELIVERY_MS)
    assert shop.drain().cancelled == 1
    record = shop.timeouts.get("F-1")
    assert record is not None and record.attempts == 1, "the rolled-back attempt left no trace"


def test_a_malformed_message_is_dead_lettered_with_its_reason_and_the_worker_carries_on(shop: Shop) -> None:
    shop.add_orders("M-1")
    shop.timeouts.schedule("M-1", delay=timedelta(seconds=1))
    shop.transport.publish_raw(b"{not json", shop.clock.now_ms())
    shop.transport.publish_raw(TimerMessage("", 1, 1).encode(), shop.clock.now_ms())
    shop.later(seconds=1)
    assert shop.drain().cancelled == 1
    reasons = [letter.reason for letter in shop.transport.dead_letters]
    assert len(reasons) == 2 and all(reason.startswith("malformed message: ") for reason in reasons)
    assert "order_id" in reasons[1]


def test_a_timer_delivered_before_its_due_time_is_armed_again_not_acked_and_lost(shop: Shop) -> None:
    # A peer whose clock runs ahead (an old worker, RQ's own scheduler) moved the timer early.
    shop.add_orders("E-1")
    shop.timeouts.schedule("E-1", delay=timedelta(minutes=2))
    timer = shop.transport.published[-1]
    shop.transport.revoke(["E-1"])
    shop.transport.publish_raw(timer.encode(), shop.clock.now_ms())

    totals = shop.drain()
    assert (totals.claimed, totals.early, totals.stale) == (0, 1, 0)
    assert shop.status("E-1") == "PENDING", "not cancelled before its due time by the registry's clock"
    assert shop.transport.armed() == {"E-1": timer.due_ms}, "handed back, armed for its due time"

    shop.later(minutes=2)
    assert shop.drain().cancelled == 1
