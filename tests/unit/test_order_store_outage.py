"""An order store that cannot answer is an outage, not an answer: the batch is handed back whole.

Only an answer about an order (`unknown` for it) spends one of its attempts; their backoff is
ORDER_TIMEOUTS_RETRY_BACKOFF, cap included.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Connection

from consumers.handler import Handler, RetryPolicy
from consumers.orders import PaymentStatus
from consumers.orders.http import ENV_ORDER_STORE_TIMEOUT, TIMEOUT_S, timeout_from_env
from consumers.orders.sql import SqlOrderStore
from scheduler import Outcome, Settings, TimeoutState
from scheduler.config import ENV_RETRY_BACKOFF
from scheduler.errors import ConfigurationError, OrderStoreUnavailable
from scheduler.transports.base import FAILED_REDELIVERY_MS
from tests.unit.conftest import Shop


class FlakyStore(SqlOrderStore):
    """The shop's orders table behind a store that can fail as a whole, at either step."""

    def __init__(self, shop: Shop) -> None:
        super().__init__(shop.timeouts.settings.orders)
        self.status_down = False
        self.cancel_down = False

    def payment_status(self, conn: Connection, order_ids: Sequence[str]) -> dict[str, PaymentStatus]:
        if self.status_down:
            raise OrderStoreUnavailable("order service payment-status: ConnectError: connection refused")
        return super().payment_status(conn, order_ids)

    def cancel_unpaid(self, conn: Connection, order_ids: Sequence[str], now: datetime) -> set[str]:
        if self.cancel_down:
            raise OrderStoreUnavailable("order service cancel: ReadTimeout: timed out")
        return super().cancel_unpaid(conn, order_ids, now)


def handler(shop: Shop, store: SqlOrderStore) -> Handler:
    return Handler(
        shop.timeouts.engine,
        store,
        clock=shop.clock,
        worker_id="unit",
        outbox=shop.timeouts.outbox,
        retry=RetryPolicy.from_settings(shop.timeouts.settings),
    )


def test_an_unreachable_store_hands_the_batch_back_whole_however_long_it_lasts(shop: Shop) -> None:
    shop.add_orders("U-1", "U-2")
    shop.add_orders("P-1", status="PAID")
    shop.timeouts.schedule_many(["U-1", "U-2", "P-1", "ghost"], delay=timedelta(seconds=1))
    store = FlakyStore(shop)
    store.status_down = True
    batches = max(shop.timeouts.settings.max_attempts, shop.timeouts.settings.max_deliveries) + 2

    shop.later(seconds=1)
    for _ in range(batches):  # more than any limit: an outage counts towards none
        batch = shop.transport.receive(10, 0)
        assert len(batch.deliveries) == 4
        settlement, _ = handler(shop, store).handle(batch)
        assert settlement.rolled_back and settlement.unavailable == (
            "order store: order service payment-status: ConnectError: connection refused"
        )
        assert len(settlement.failed) == 4 and (settlement.done, settlement.retry, settlement.dead) == ([], [], [])
        shop.transport.settle(settlement)
        assert shop.transport.armed() == dict.fromkeys(["U-1", "U-2", "P-1", "ghost"], shop.clock.now_ms() + 1000)
        shop.later(milliseconds=FAILED_REDELIVERY_MS)

    assert shop.transport.dead_letters == []
    for order_id in ("U-1", "U-2", "P-1", "ghost"):
        record = shop.timeouts.get(order_id)
        assert record is not None and (record.state, record.attempts, record.error) == (TimeoutState.PENDING, 0, None)
    assert shop.status("U-1") == "PENDING"

    store.status_down = False
    totals = shop.drain(store=store)
    assert (totals.cancelled, totals.paid, totals.retried, totals.dead) == (2, 1, 1, 0)
    ghost = shop.timeouts.get("ghost")
    assert ghost is not None and ghost.attempts == 1, "only the store's answer about it spent an attempt"
    assert ghost.error is not None and "not found" in ghost.error


def test_a_cancel_that_fails_as_a_whole_decides_nothing_not_even_the_paid_orders(shop: Shop) -> None:
    # The HTTP store's cancel committed before its answer was lost: tests/integration/test_orders_http.py.
    shop.add_orders("C-1", "C-2")
    shop.add_orders("P-1", status="PAID")
    shop.timeouts.schedule_many(["C-1", "C-2", "P-1"], delay=timedelta(seconds=1))
    store = FlakyStore(shop)
    store.cancel_down = True
    shop.later(seconds=1)

    settlement, _ = handler(shop, store).handle(shop.transport.receive(10, 0))

    assert settlement.rolled_back and settlement.unavailable is not None and "cancel" in settlement.unavailable
    assert len(settlement.failed) == 3
    shop.transport.settle(settlement)
    for order_id in ("C-1", "C-2", "P-1"):
        record = shop.timeouts.get(order_id)
        assert record is not None and (record.state, record.attempts) == (TimeoutState.PENDING, 0), order_id
    assert shop.transport.dead_letters == []

    store.cancel_down = False
    shop.later(milliseconds=FAILED_REDELIVERY_MS)
    totals = shop.drain(store=store)
    assert (totals.cancelled, totals.paid, totals.retried) == (2, 1, 0)
    record = shop.timeouts.get("C-1")
    assert record is not None and record.outcome is Outcome.CANCELLED and record.attempts == 1


def test_retries_of_unknown_orders_back_off_from_the_first_delay_up_to_the_cap() -> None:
    policy = RetryPolicy.from_settings(
        Settings(retry_backoff=timedelta(seconds=2), retry_backoff_cap=timedelta(seconds=10))
    )
    assert (policy.base_s, policy.cap_s) == (2.0, 10.0)
    for attempts, nominal_s in [(1, 2), (2, 4), (3, 8), (4, 10), (30, 10)]:
        delays = [policy.delay_ms(attempts) for _ in range(50)]
        assert all(0.8 * nominal_s * 1000 <= d <= 1.2 * nominal_s * 1000 for d in delays), (attempts, delays)


@pytest.mark.parametrize(
    ("raw", "first", "longest"),
    [
        ("", timedelta(seconds=2), timedelta(minutes=5)),
        ("2s", timedelta(seconds=2), timedelta(minutes=5)),
        ("500ms..10s", timedelta(milliseconds=500), timedelta(seconds=10)),
        ("2s..10m", timedelta(seconds=2), timedelta(minutes=10)),
        (" 1m .. 1h ", timedelta(minutes=1), timedelta(hours=1)),
        ("1.5", timedelta(seconds=1.5), timedelta(minutes=5)),
        ("1d..1d", timedelta(days=1), timedelta(days=1)),
    ],
)
def test_the_retry_backoff_is_a_first_delay_with_an_optional_cap_in_the_clis_duration_forms(
    monkeypatch: pytest.MonkeyPatch, raw: str, first: timedelta, longest: timedelta
) -> None:
    monkeypatch.setenv(ENV_RETRY_BACKOFF, raw)
    settings = Settings.from_env()
    assert (settings.retry_backoff, settings.retry_backoff_cap) == (first, longest)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("soon", "must be a duration like 2s"),
        ("0s", "above 0"),
        ("2s..", "first..longest"),
        ("..10m", "first..longest"),
        ("2s..10m..1h", "first..longest"),
        ("2d", "at most a day"),
        ("10m..2s", "the first retry delay 10m is longer than the longest, 2s"),
        ("10m", "the first retry delay 10m is longer than the longest, 300s (the default)"),
    ],
)
def test_a_bad_retry_backoff_is_a_configuration_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, raw: str, problem: str
) -> None:
    monkeypatch.setenv(ENV_RETRY_BACKOFF, raw)
    with pytest.raises(ConfigurationError, match=ENV_RETRY_BACKOFF) as refused:
        Settings.from_env()
    assert problem in str(refused.value)


def test_the_http_stores_timeout_comes_from_the_environment_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_ORDER_STORE_TIMEOUT, raising=False)
    assert timeout_from_env() == TIMEOUT_S == 4.0
    monkeypatch.setenv(ENV_ORDER_STORE_TIMEOUT, "1500ms")
    assert timeout_from_env() == 1.5
    monkeypatch.setenv(ENV_ORDER_STORE_TIMEOUT, "2")
    assert timeout_from_env() == 2.0
    for bad in ("fast", "0", "2m"):
        monkeypatch.setenv(ENV_ORDER_STORE_TIMEOUT, bad)
        with pytest.raises(ConfigurationError, match=f"{ENV_ORDER_STORE_TIMEOUT} must be a duration"):
            timeout_from_env()
