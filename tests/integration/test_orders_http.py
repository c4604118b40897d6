"""The HTTP order store: workers ask a real order service over loopback HTTP (tests/order_service.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from consumers.handler import Handler
from consumers.orders import PaymentStatus, load_order_store
from consumers.orders.http import ENV_ORDER_STORE_TOKEN, HttpOrderStore, idempotency_key
from scheduler import OrderTimeouts, Outcome, Settings, TimeoutState
from scheduler.config import ENV_ORDER_STORE
from scheduler.errors import ConfigurationError, OrderStoreUnavailable
from scheduler.transports.sql.adapter import DueRows
from tests.conftest import ROOT, Stack, open_stack
from tests.order_service import OrderService, order_service
from tests.stacks import DATABASES
from tests.support import add_orders, cancel_counts, free_port, order_status, pay, registry_records, wait_until


@pytest.fixture(params=sorted(DATABASES))
def sql(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    yield from open_stack(request.param, DATABASES, tmp_path)


def handler_of(client: OrderTimeouts, store: HttpOrderStore) -> Handler:
    """The handler a worker of `client` runs, for a test that drives one batch by hand."""
    return Handler(client.engine, store, clock=client.clock, worker_id="test", outbox=client.outbox)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[OrderService]:
    with order_service(tmp_path) as running:
        yield running


def test_a_worker_asks_the_order_service_once_per_batch_and_cancels_the_unpaid_orders_through_it(
    sql: Stack, service: OrderService
) -> None:
    add_orders(service.engine, ["u-1", "u-2", "p-1"])
    pay(service.engine, "p-1")
    client = sql.timeouts(order_store=service.url)
    client.schedule_many(["u-1", "u-2", "p-1"], due_at=datetime.now(UTC))

    totals = sql.drain(client)

    assert (totals.cancelled, totals.paid) == (2, 1)
    assert order_status(service.engine) == {"u-1": "CANCELLED", "u-2": "CANCELLED", "p-1": "PAID"}
    assert cancel_counts(service.engine) == {"u-1": 1, "u-2": 1}
    assert {k: r.outcome for k, r in registry_records(sql.engine).items()} == {
        "u-1": Outcome.CANCELLED, "u-2": Outcome.CANCELLED, "p-1": Outcome.PAID
    }  # fmt: skip
    status, cancel = service.of("payment-status"), service.of("cancel")
    assert [sorted(r.body["order_ids"]) for r in status] == [["p-1", "u-1", "u-2"]], "one status request per batch"
    assert [sorted(r.body["order_ids"]) for r in cancel] == [["u-1", "u-2"]], "one cancel request, unpaid orders only"
    assert cancel[0].headers["Idempotency-Key"] == idempotency_key(["u-2", "u-1"])
    assert datetime.fromisoformat(cancel[0].body["cancelled_at"]).tzinfo is not None
    assert cancel[0].body["reason"] == "payment timeout"


def test_a_payment_that_wins_the_race_at_the_service_is_recorded_as_paid(sql: Stack, service: OrderService) -> None:
    add_orders(service.engine, ["racer"])
    client = sql.timeouts(order_store=service.url)
    client.schedule("racer", due_at=datetime.now(UTC))
    service.before_cancel = lambda ids: [pay(service.engine, order_id) for order_id in ids]  # type: ignore[func-returns-value]

    sql.drain(client)

    assert order_status(service.engine) == {"racer": "PAID"}
    assert cancel_counts(service.engine) == {}
    assert registry_records(sql.engine)["racer"].outcome is Outcome.PAID


@pytest.mark.parametrize(
    ("failing", "reason"),
    [
        ((503, "upstream overloaded"), "HTTP 503: upstream overloaded"),
        ((401, '{"error": "bad token"}'), 'HTTP 401: {"error": "bad token"}'),
        ((404, "no such route"), "HTTP 404: no such route"),
        ((200, "<html>a proxy's page</html>"), "the answer has no 'orders' dict"),
    ],
    ids=["5xx", "401", "404", "not-json"],
)
def test_an_order_service_that_cannot_answer_is_an_outage_that_decides_nothing_and_spends_no_attempt(
    sql: Stack, service: OrderService, failing: tuple[int, str], reason: str
) -> None:
    add_orders(service.engine, ["o-1", "p-1"])
    pay(service.engine, "p-1")
    client = sql.timeouts(order_store=service.url, max_attempts=1)
    client.schedule_many(["o-1", "p-1"], due_at=datetime.now(UTC))
    service.failing = failing
    handler = handler_of(client, HttpOrderStore(service.url))

    for _ in range(3):  # more batches than attempts allowed: an outage spends none
        settlement, _ = handler.handle(DueRows(limit=10))
        assert settlement.rolled_back and settlement.unavailable is not None
        assert settlement.unavailable.startswith("order store: ") and reason in settlement.unavailable
        assert (settlement.done, settlement.retry, settlement.dead) == ([], [], [])
    records = registry_records(sql.engine)
    assert {(r.state, r.attempts, r.outcome) for r in records.values()} == {(TimeoutState.PENDING, 0, None)}
    assert order_status(service.engine) == {"o-1": "PENDING", "p-1": "PAID"}

    service.failing = None
    totals = sql.drain(client)
    assert (totals.cancelled, totals.paid, totals.retried, totals.dead) == (1, 1, 0, 0)
    assert cancel_counts(service.engine) == {"o-1": 1}
    assert registry_records(sql.engine)["o-1"].attempts == 1


def test_a_cancel_that_fails_as_a_whole_decides_nothing_and_the_repeat_finds_the_order_cancelled(
    sql: Stack, service: OrderService
) -> None:
    add_orders(service.engine, ["c-1", "c-2", "p-1"])
    pay(service.engine, "p-1")
    client = sql.timeouts(order_store=service.url, max_attempts=1)
    client.schedule_many(["c-1", "c-2", "p-1"], due_at=datetime.now(UTC))
    service.hold_s = 1.0  # the service cancels, then answers too late for the worker
    handler = handler_of(client, HttpOrderStore(service.url, timeout_s=0.3))

    settlement, _ = handler.handle(DueRows(limit=10))

    assert settlement.rolled_back and settlement.unavailable is not None and "cancel" in settlement.unavailable
    assert cancel_counts(service.engine) == {"c-1": 1, "c-2": 1}, "the service did cancel"
    records = registry_records(sql.engine)
    assert {(r.state, r.attempts) for r in records.values()} == {(TimeoutState.PENDING, 0)}, "even p-1 is undecided"

    service.hold_s = 0.0
    totals = sql.drain(client)
    assert (totals.already_cancelled, totals.paid, totals.cancelled) == (2, 1, 0)
    assert cancel_counts(service.engine) == {"c-1": 1, "c-2": 1}
    assert len(service.of("cancel")) == 1, "the repeat asks for the status and needs no cancel"


def test_an_order_the_service_answers_unknown_spends_an_attempt_and_the_others_are_decided(
    sql: Stack, service: OrderService
) -> None:
    add_orders(service.engine, ["known"])
    client = sql.timeouts(order_store=service.url, max_attempts=2)
    client.schedule_many(["known", "missing"], due_at=datetime.now(UTC))

    totals = sql.drain(client)

    assert (totals.cancelled, totals.retried, totals.dead) == (1, 1, 0)
    record = registry_records(sql.engine)["missing"]
    assert record.state is TimeoutState.PENDING and record.attempts == 1
    assert record.error is not None and "payment status unknown" in record.error


def test_statuses_the_service_does_not_know_are_unknown_never_a_cancel(tmp_path: Path) -> None:
    with order_service(tmp_path) as service:
        store = HttpOrderStore(service.url)
        add_orders(service.engine, ["known"])
        assert store.payment_status(None, ["known", "missing"]) == {  # type: ignore[arg-type]
            "known": PaymentStatus.UNPAID,
            "missing": PaymentStatus.UNKNOWN,
        }
        service.answer = lambda path, body: (200, {"orders": {"known": "on-hold", "missing": None}})  # type: ignore[method-assign]
        assert set(store.payment_status(None, ["known", "missing"]).values()) == {PaymentStatus.UNKNOWN}  # type: ignore[arg-type]
        # a cancel answer naming orders it was not asked about counts only those it was
        service.answer = lambda path, body: (200, {"cancelled": ["known", "someone-else"]})  # type: ignore[method-assign]
        assert store.cancel_unpaid(None, ["known"], datetime.now(UTC)) == {"known"}  # type: ignore[arg-type]
        store.close()


def test_a_refused_connection_is_unavailable_not_a_crash() -> None:
    store = HttpOrderStore(f"http://127.0.0.1:{free_port()}/api")
    with pytest.raises(OrderStoreUnavailable, match="order service payment-status: ConnectError"):
        store.payment_status(None, ["o-1"])  # type: ignore[arg-type]
    store.close()


def test_the_token_and_url_credentials_are_sent_and_never_shown(sql: Stack, service: OrderService) -> None:
    with_password = service.url.replace("http://", "http://shop:s3cret@")
    store = load_order_store(Settings(order_store=with_password))
    assert isinstance(store, HttpOrderStore) and "s3cret" not in store.url
    store.payment_status(None, ["o-1"])  # type: ignore[arg-type]
    assert service.requests[-1].headers["Authorization"].startswith("Basic ")

    token_store = HttpOrderStore(service.url, token="tok-123")
    token_store.payment_status(None, ["o-1"])  # type: ignore[arg-type]
    assert service.requests[-1].headers["Authorization"] == "Bearer tok-123"

    for broken in ("ftp://orders/api", "http://", "https:///path", "http://[::1", "http://orders:99999/api"):
        with pytest.raises(ConfigurationError, match="give http://host/") as refused:
            HttpOrderStore(broken.replace("orders", "shop:s3cret@orders"))
        assert "s3cret" not in str(refused.value)


def test_check_reports_the_order_service_and_never_its_secrets(sql: Stack, service: OrderService) -> None:
    def check(store_url: str) -> subprocess.CompletedProcess[str]:
        env = sql.env(**{ENV_ORDER_STORE: store_url, ENV_ORDER_STORE_TOKEN: "tok-secret"})
        argv = [sys.executable, "-m", "scheduler", "check", "--json"]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)

    up = check(service.url.replace("http://", "http://shop:s3cret@"))
    assert up.returncode == 0, up.stdout + up.stderr
    orders = json.loads(up.stdout)["checks"][-1]
    assert orders["component"] == "orders" and orders["ok"] is True
    assert orders["target"] == service.url.replace("http://", "http://shop:***@")
    assert service.requests[-1].headers["Authorization"].startswith("Basic ")

    down = check(f"http://shop:s3cret@127.0.0.1:{free_port()}/api")
    assert down.returncode == 1
    orders = json.loads(down.stdout)["checks"][-1]
    assert orders["ok"] is False and "ConnectError" in orders["problem"]
    for output in (up.stdout, up.stderr, down.stdout, down.stderr):
        assert "s3cret" not in output and "tok-secret" not in output


@pytest.mark.slow
def test_a_worker_killed_after_the_service_cancelled_loses_nothing_and_cancels_nothing_twice(
    sql: Stack, service: OrderService
) -> None:
    ids = [f"k-{i:02d}" for i in range(20)]
    add_orders(service.engine, ids)
    sql.timeouts().schedule_many(ids, due_at=datetime.now(UTC))
    service.hold_s = 30.0  # the service has committed its cancels; the worker waits for the answer
    victim = sql.start_worker("--batch-size", "50", **{ENV_ORDER_STORE: service.url})
    try:
        assert service.cancelled.wait(timeout=30)
        assert cancel_counts(service.engine) == dict.fromkeys(ids, 1)
    finally:
        victim.kill()
        victim.wait()
    # The registry never committed the batch: every timeout is still pending.
    assert {r.state for r in registry_records(sql.engine).values()} == {TimeoutState.PENDING}

    service.hold_s = 0.0
    survivor = sql.start_worker("--batch-size", "50", "--burst", **{ENV_ORDER_STORE: service.url})
    assert survivor.wait(timeout=60) == 0
    wait_until(lambda: all(r.state is TimeoutState.DONE for r in registry_records(sql.engine).values()))
    assert cancel_counts(service.engine) == dict.fromkeys(ids, 1), "each order cancelled once"
    # The survivor finds them cancelled at the service: no second cancel is even asked for.
    assert {r.outcome for r in registry_records(sql.engine).values()} == {Outcome.ALREADY_CANCELLED}
    assert len(service.of("cancel")) == 1


def test_only_an_http_order_store_loads_httpx() -> None:
    program = (
        "import sys\n"
        "from consumers.orders import load_order_store\n"
        "from consumers.worker import Worker\n"
        "from scheduler import Settings\n"
        "load_order_store(Settings())\n"
        "print('httpx' in sys.modules)\n"
        "load_order_store(Settings(order_store='https://orders.example/api'))\n"
        "print('httpx' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
