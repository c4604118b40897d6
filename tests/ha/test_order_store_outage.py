"""The order service down for a while, with real worker processes on real transports: an outage
of the order store is an outage, not an answer. Nothing is dead-lettered, no attempt is spent, and
the orders are cancelled once the service is back, within the worker's backoff cap."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from consumers.orders.http import HttpOrderStore
from consumers.worker import Worker
from scheduler import Outcome, TimeoutState
from scheduler.config import ENV_MAX_ATTEMPTS, ENV_ORDER_STORE, ENV_RETRY_BACKOFF
from scheduler.transports.base import FAILED_REDELIVERY_MS
from tests.conftest import Stack, open_stack
from tests.order_service import OrderService, order_service
from tests.stacks import STACKS
from tests.support import add_orders, cancel_counts, free_port, order_status, pay, registry_records, wait_until

#: the figures, for `--log-cli-level=WARNING` (docs/operations.md)
log = logging.getLogger("order_timeouts.tests.ha")
#: how long the order service stays down: many times what two attempts 100 ms apart would last
OUTAGE_S = 4.0
#: the longest a worker backs off from an outage (issue 16: 5 s by default)
WORKER_BACKOFF_CAP_S = 5.0
#: a redelivery of a handed-back batch, and a receive slice, on top of the backoff
SLACK_S = FAILED_REDELIVERY_MS / 1000 + 2.0

#: each transport's worker path is the same for both kinds of outage: one kind each keeps this short
CASES = [("sql-sqlite", "refusing"), ("sql-postgresql", "503"), ("redis", "refusing"), ("rabbitmq", "503")]


@pytest.fixture(params=CASES, ids=[f"{name}-{down}" for name, down in CASES])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Stack, str]]:
    name, down = request.param
    for stack in open_stack(name, STACKS, tmp_path):
        yield stack, down


def go_down(service: OrderService, how: str) -> None:
    if how == "refusing":
        service.stop()
    else:
        service.failing = (503, "deploying")


def come_back(service: OrderService, how: str) -> None:
    if how == "refusing":
        service.start()
    else:
        service.failing = None


@pytest.mark.slow
def test_an_order_service_down_for_a_while_spends_no_attempt_and_dead_letters_nothing(
    outage: tuple[Stack, str], tmp_path: Path
) -> None:
    stack, how = outage
    ids = [f"o-{i:02d}" for i in range(30)]
    paid = set(ids[::5])
    with order_service(tmp_path) as service:
        add_orders(service.engine, ids)
        for order_id in paid:
            pay(service.engine, order_id)
        # Were attempts spent on the outage, two of them 100-200 ms apart would dead-letter every timeout
        # within the first second of it.
        env = {ENV_ORDER_STORE: service.url, ENV_MAX_ATTEMPTS: "2", ENV_RETRY_BACKOFF: "100ms..200ms"}
        worker = stack.start_worker("--batch-size", "10", **env)
        try:
            go_down(service, how)
            down_at = time.monotonic()
            stack.timeouts().schedule_many(ids, due_at=datetime.now(UTC) + timedelta(milliseconds=300))
            time.sleep(max(OUTAGE_S - (time.monotonic() - down_at), 0))

            records = registry_records(stack.engine)
            assert {(r.state, r.attempts, r.error) for r in records.values()} == {(TimeoutState.PENDING, 0, None)}
            assert order_status(service.engine) == {i: "PAID" if i in paid else "PENDING" for i in ids}
            if how == "503":
                assert len(service.of("payment-status")) >= 2, "the worker kept asking through the outage"

            come_back(service, how)
            up_at = time.monotonic()
            wait_until(
                lambda: all(r.state is TimeoutState.DONE for r in registry_records(stack.engine).values()),
                timeout=WORKER_BACKOFF_CAP_S + SLACK_S,
            )
            back_within = time.monotonic() - up_at
            log.warning(
                "%s: order store %s for %.0fs: all handled %.2fs after its return",
                stack.name,
                how,
                OUTAGE_S,
                back_within,
            )
        finally:
            worker.terminate()
            code = worker.wait(timeout=30)
        assert code == 0, "the worker rode out the outage and stopped on SIGTERM"

        records = registry_records(stack.engine)
        assert {oid: r.outcome for oid, r in records.items()} == {
            oid: Outcome.PAID if oid in paid else Outcome.CANCELLED for oid in ids
        }
        assert {r.attempts for r in records.values()} == {1}, "the outage spent no attempt"
        assert cancel_counts(service.engine) == {oid: 1 for oid in ids if oid not in paid}
    assert back_within <= WORKER_BACKOFF_CAP_S + SLACK_S


@pytest.mark.timeout(30)  # a burst that never gives up would otherwise hold the suite for 300 s
def test_a_burst_run_gives_up_on_an_outage_that_lasts_and_leaves_what_is_due_pending(tmp_path: Path) -> None:
    """`worker --burst` (cron, a deploy step) must end: it rides over an outage for a while (here
    1 s instead of the default 30 s), then stops with the reason, having decided nothing."""
    for stack in open_stack("sql-sqlite", STACKS, tmp_path):
        ids = ["b-1", "b-2"]
        add_orders(stack.engine, ids)
        stack.timeouts().schedule_many(ids, due_at=datetime.now(UTC))
        down = HttpOrderStore(f"http://127.0.0.1:{free_port()}/", timeout_s=0.5)

        started = time.monotonic()
        totals = Worker(stack.timeouts(), store=down, burst=True, burst_outage_limit_s=1.0).run()

        assert 1.0 <= time.monotonic() - started < 1.0 + 5.0, "gave up once the outage lasted the limit"
        assert totals.gave_up is not None and "order store unavailable" in totals.gave_up
        assert totals.cancelled == totals.dead == totals.retried == 0
        records = registry_records(stack.engine)
        assert {(r.state, r.attempts) for r in records.values()} == {(TimeoutState.PENDING, 0)}
        assert order_status(stack.engine) == dict.fromkeys(ids, "PENDING")
