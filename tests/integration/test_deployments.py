"""Several deployments on one broker never take each other's timers, and exactly-once is watched in
production (docs/operations.md, "Several deployments on one broker" and "Exactly-once in production")."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, delete, text

from consumers.worker import Worker
from scheduler.database import make_engine
from scheduler.errors import ForeignNames
from scheduler.maintenance import Maintenance
from scheduler.observability import RegistryCollector, WorkerMetrics
from scheduler.registry import TimeoutState, control, mark_published
from scheduler.registry.schema import control as control_table
from scheduler.schema import init_db
from scheduler.transports import TimerMessage
from scheduler.transports.rabbitmq.adapter import RabbitMQTransport
from scheduler.transports.rabbitmq.keys import RABBITMQ_REASON_HEADER, RABBITMQ_TIMERS_EXCHANGE
from scheduler.transports.rabbitmq.topology import routing_key
from scheduler.transports.redis.adapter import RedisTransport
from scheduler.transports.redis.keys import redis_dead_key, redis_due_key
from tests.conftest import ROOT, Stack, deployed
from tests.rabbitmq_support import channel, rabbitmq_vhost
from tests.redis_support import broker_url, redis_prefix
from tests.rq_support import rq_broker_url, rq_namespace
from tests.services import REDIS_URL
from tests.support import add_orders, cancel_counts, postgres_schema, registry_records, wait_until

#: the lateness a timer may have here, on 2 cores running 4 workers and the test: far below the
#: reconciler's 60 s grace, which is what a timer taken by the other deployment would wait for
LATE_BOUND_MS = 5000


@contextlib.contextmanager
def shared_broker(kind: str) -> Iterator[str]:
    """One Redis key prefix, or one RabbitMQ vhost with the default queue names, for both deployments."""
    if kind == "redis":
        with redis_prefix() as prefix:
            yield broker_url(prefix)
    else:
        with rabbitmq_vhost() as url:
            yield url


@pytest.fixture(params=["redis", "rabbitmq"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Stack, Stack]]:
    """Two deployments, each with its own registry (a PostgreSQL schema each), on the same broker URL."""
    with contextlib.ExitStack() as stacks:
        url = stacks.enter_context(shared_broker(request.param))
        deploy = contextlib.contextmanager(deployed)
        a, b = (
            stacks.enter_context(deploy(Stack(name, stacks.enter_context(postgres_schema()), url)))
            for name in ("blue", "green")
        )
        yield a, b


def stop(workers: list[subprocess.Popen[str]]) -> None:
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        assert worker.wait(timeout=30) == 0


def done(stack: Stack, ids: list[str]) -> bool:
    records = registry_records(stack.engine)
    return all(records[oid].state is TimeoutState.DONE for oid in ids)


@pytest.mark.slow
def test_two_deployments_on_one_broker_under_load_neither_lose_a_timer_nor_fire_one_late(
    pair: tuple[Stack, Stack],
) -> None:
    blue, green = pair
    # The same order ids in both registries (the worst case for shared names), and some of each's own.
    shared = [f"o-{n:04d}" for n in range(300)]
    ids = [
        (blue, [*shared, *(f"b-{n:03d}" for n in range(100))]),
        (green, [*shared, *(f"g-{n:03d}" for n in range(100))]),
    ]
    for stack, orders in ids:
        add_orders(stack.engine, orders)
    workers = [stack.start_worker("--batch-size", "50") for stack in (blue, green) for _ in range(2)]
    try:
        start = datetime.now(UTC) + timedelta(seconds=1)
        # 100 timeouts due every 0.25 s in each deployment, 800 in all over 1 s: both workers' groups
        # are busy at once.
        for stack, orders in ids:
            client = stack.timeouts()
            for n, at in enumerate(range(0, len(orders), 100)):
                client.schedule_many(orders[at : at + 100], due_at=start + timedelta(seconds=n * 0.25))
        for stack, orders in ids:
            wait_until(lambda stack=stack, orders=orders: done(stack, orders), timeout=60, interval=0.2)
    finally:
        stop(workers)

    for stack, orders in ids:
        assert cancel_counts(stack.engine) == dict.fromkeys(orders, 1), f"{stack.name}: every order cancelled once"
        records = registry_records(stack.engine)
        late = {oid: r.fired_ms - r.due_ms for oid, r in records.items() if r.fired_ms - r.due_ms > LATE_BOUND_MS}  # type: ignore[operator]
        assert not late, f"{stack.name}: fired late: {sorted(late.items())[:5]}"
        assert stats(stack)["foreign_deliveries"]["total"] == 0, "names apart: nothing of the other reaches it"
    assert stats(blue)["deployment"] != stats(green)["deployment"]


def stats(stack: Stack) -> dict[str, Any]:
    argv = [sys.executable, "-m", "scheduler", "stats", "--json"]
    finished = subprocess.run(argv, env=stack.env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr
    result: dict[str, Any] = json.loads(finished.stdout)
    return result


def check(stack: Stack) -> tuple[int, dict[str, Any]]:
    argv = [sys.executable, "-m", "scheduler", "check", "--json"]
    finished = subprocess.run(argv, env=stack.env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    (deployment,) = [c for c in json.loads(finished.stdout)["checks"] if c["component"] == "deployment"]
    return finished.returncode, deployment


@pytest.fixture(params=["redis", "rabbitmq"])
def lone(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with shared_broker(request.param) as url, postgres_schema() as database_url:
        yield from deployed(Stack(request.param, database_url, url))


def deliver_as_another_deployment(stack: Stack, messages: list[TimerMessage]) -> None:
    """What a second registry's messages look like where this deployment's workers read: straight
    into its names (another deployment cannot get there by itself, since its names carry its identity)."""
    transport = stack.timeouts().transport
    if isinstance(transport, RedisTransport):
        client = redis.Redis.from_url(REDIS_URL)
        try:
            for message in messages:
                client.xadd(redis_due_key(transport.namespace, 0), {"m": message.encode()})
        finally:
            client.close()
    else:
        assert isinstance(transport, RabbitMQTransport)
        with channel(stack.broker_url) as ch:
            ch.confirm_delivery()
            for message in messages:
                key = routing_key(0, transport.names)
                ch.basic_publish(RABBITMQ_TIMERS_EXCHANGE, key, message.encode(), mandatory=True)


def dead_letter_reasons(stack: Stack) -> dict[str, str]:
    """Order id → reason of the broker's dead letters."""
    transport = stack.timeouts().transport
    if isinstance(transport, RedisTransport):
        client = redis.Redis.from_url(REDIS_URL)
        try:
            entries = client.xrange(redis_dead_key(transport.namespace))
        finally:
            client.close()
        return {fields[b"order_id"].decode(): fields[b"reason"].decode() for _, fields in entries}
    assert isinstance(transport, RabbitMQTransport)
    reasons = {}
    with channel(stack.broker_url) as ch:
        while True:
            method, properties, body = ch.basic_get(transport.names.dead, auto_ack=True)
            if method is None:
                return reasons
            reasons[json.loads(body)["order_id"]] = properties.headers[RABBITMQ_REASON_HEADER]


def test_a_foreign_delivery_is_dead_lettered_counted_and_reported_by_check_and_an_old_one_is_handled(
    lone: Stack,
) -> None:
    add_orders(lone.engine, ["mine", "legacy", "theirs"])
    client = lone.timeouts()
    due = client.clock.now_ms()
    client.schedule_many(["mine", "legacy", "theirs"], due_at=datetime.now(UTC))
    assert check(lone)[0] == 0
    client.transport.figures()  # connected: the queues exist
    deliver_as_another_deployment(
        lone,
        [
            TimerMessage("theirs", due, 0, "0123456789ab"),  # another registry's order of the same id
            TimerMessage("legacy", due, 0),  # published by a release before identities: ours
        ],
    )
    prometheus = CollectorRegistry()
    metrics = WorkerMetrics(prometheus)
    foreign = 0
    for _ in range(50):
        foreign += Worker(client, burst=True, metrics=metrics).run().foreign
        if foreign and done(lone, ["mine", "legacy", "theirs"]):
            break
    assert foreign == 1
    assert prometheus.get_sample_value("order_timeouts_foreign_deliveries_total") == 1
    assert cancel_counts(lone.engine) == {"mine": 1, "legacy": 1, "theirs": 1}, "its own timer of that id still fires"
    reason = dead_letter_reasons(lone)["theirs"]
    assert reason.startswith("foreign: timer of deployment 0123456789ab, delivered to deployment ")

    code, deployment = check(lone)
    assert code == 1 and "1 foreign deliveries" in deployment["problem"]
    assert "from deployment 0123456789ab" in deployment["problem"]
    figures = stats(lone)["foreign_deliveries"]
    assert (figures["total"], figures["last_from"]) == (1, "0123456789ab")


def set_status(engine: Engine, statuses: dict[str, str]) -> None:
    with engine.begin() as conn:
        for oid, status in statuses.items():
            conn.execute(text("UPDATE orders SET status = :s WHERE id = :id"), {"s": status, "id": oid})


def maintain_once(stack: Stack) -> list[dict[str, Any]]:
    argv = [sys.executable, "-m", "scheduler", "maintain", "--once", "--recheck-interval", "1ms", "--json"]
    finished = subprocess.run(argv, env=stack.env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    runs: list[dict[str, Any]] = json.loads(finished.stdout)
    return runs


def test_orders_paid_behind_the_products_back_show_in_stats_and_metrics_after_the_recheck(db_stack: Stack) -> None:
    ids = ["late", "reverted", "fine", "paid-in-time"]
    add_orders(db_stack.engine, ids)
    client = db_stack.timeouts()
    client.schedule_many(ids, due_at=datetime.now(UTC))
    set_status(db_stack.engine, {"paid-in-time": "PAID"})
    db_stack.drain()
    assert cancel_counts(db_stack.engine) == {"late": 1, "reverted": 1, "fine": 1}
    # Behind the product's back: a payment that came after the cancel, and an order set back to pending.
    set_status(db_stack.engine, {"late": "PAID", "reverted": "PENDING"})

    [recheck] = [run for run in maintain_once(db_stack) if run["job"] == "recheck"]
    assert (recheck["rows"], recheck["error"]) == (4, None)
    found = stats(db_stack)["exactly_once"]
    assert (found["rechecked"], found["late_payments"], found["disagreements"]) == (4, 1, 1)
    assert (found["late_payment_examples"], found["disagreement_examples"]) == (["late"], ["reverted"])

    prometheus = CollectorRegistry()
    prometheus.register(RegistryCollector(client.engine, client.clock))
    assert prometheus.get_sample_value("order_timeouts_late_payments_total") == 1
    assert prometheus.get_sample_value("order_timeouts_recheck_disagreements_total") == 1
    assert prometheus.get_sample_value("order_timeouts_rechecked_total") == 4

    [again] = [run for run in maintain_once(db_stack) if run["job"] == "recheck"]
    assert again["rows"] == 0, "each finished timeout is asked about once"
    assert stats(db_stack)["exactly_once"]["late_payments"] == 1


def test_a_recheck_interval_that_is_not_positive_exits_2(db_stack: Stack) -> None:
    argv = [sys.executable, "-m", "scheduler", "maintain", "--once", "--recheck-interval", "0s"]
    finished = subprocess.run(argv, env=db_stack.env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert finished.returncode == 2
    assert "--recheck-interval must be positive" in finished.stderr


def test_two_init_db_at_once_write_one_identity_and_a_process_creates_a_missing_one() -> None:
    with postgres_schema() as database_url:
        argv = [sys.executable, "-m", "scheduler", "init-db"]
        env = {**os.environ, "ORDER_TIMEOUTS_DATABASE_URL": database_url}
        runs = [subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        for run in runs:
            run.communicate(timeout=60)
        assert [run.returncode for run in runs] == [0, 0]
        engine = make_engine(database_url)
        try:
            with engine.connect() as conn:
                written = control.read(conn, control.DEPLOYMENT)
                assert written is not None and len(written["id"]) == 12
            init_db(engine, None)
            with engine.begin() as conn:
                assert control.read(conn, control.DEPLOYMENT) == written, "init-db again keeps it"
                # A registry migrated without init-db: no identity yet.
                conn.execute(delete(control_table).where(control_table.c.name == control.DEPLOYMENT))
            created = control.deployment_id(engine, now=0)
            assert created != written["id"] and control.deployment_id(engine, now=0) == created
        finally:
            engine.dispose()


def test_a_second_deployment_on_the_same_rq_queue_is_refused_and_the_first_keeps_its_timers() -> None:
    with rq_namespace() as name, postgres_schema() as first_db, postgres_schema() as second_db:
        url = rq_broker_url(name)
        deploy = contextlib.contextmanager(deployed)
        with deploy(Stack("first", first_db, url)) as first, deploy(Stack("second", second_db, url)) as second:
            add_orders(first.engine, ["o-1"])
            add_orders(second.engine, ["o-1"])
            first.timeouts().schedule("o-1", due_at=datetime.now(UTC))  # the first to connect: the names are its
            second.timeouts().schedule("o-1", due_at=datetime.now(UTC))  # committed; left to its relay
            record = second.timeouts().get("o-1")
            assert record is not None and record.published_ms is None, "nothing reached the other's queue"
            with pytest.raises(ForeignNames, match="belongs to deployment"):
                second.timeouts().transport.receive(10, timeout=0)  # its workers back off, logging this

            code, _ = check(second)
            assert code == 1
            first.drain_until(lambda: cancel_counts(first.engine) == {"o-1": 1})
            assert cancel_counts(second.engine) == {}


def old_release_transport(stack: Stack) -> RedisTransport | RabbitMQTransport:
    """The stack's broker as a release before identities used it: the same URL, no identity."""
    if stack.name == "redis":
        return RedisTransport(stack.broker_url, stack.timeouts().clock)
    return RabbitMQTransport(stack.broker_url, stack.timeouts().clock)


def test_an_upgrade_republishes_the_timers_of_the_old_names_into_the_new_ones_at_once(lone: Stack) -> None:
    ids = [f"u-{n}" for n in range(20)]
    add_orders(lone.engine, ids)
    client = lone.timeouts()
    old = old_release_transport(lone)
    try:
        # What a running deployment holds before the upgrade: its timers in the old names, published.
        with lone.engine.connect() as conn:  # a bare Connection: nothing is published after commit
            client.schedule_many(ids, due_at=datetime.now(UTC) + timedelta(seconds=2), connection=conn)
            conn.commit()
        due = {oid: record.due_ms for oid, record in registry_records(lone.engine).items()}
        old.publish([TimerMessage(oid, due[oid], 1) for oid in ids])
        with lone.engine.begin() as conn:
            mark_published(conn, [(oid, 1) for oid in ids], now=client.clock.now_ms())
        if isinstance(old, RedisTransport):
            old.receive(1, timeout=0)  # an old-release worker in the old group
        else:
            old.receive(1, timeout=0.1)  # an old-release worker consuming the old ready queue
        assert client.transport.foreign_consumers() is not None, "check names the old release's consumers"

        # The upgraded relay finds no marker in the new names: every pending timeout goes there now.
        [relay] = [run for run in Maintenance(client).run_once() if run.job == "relay"]
        assert relay.rows == len(ids)
        lone.drain_until(lambda: done(lone, ids), timeout=30)
    finally:
        old.close()
    assert cancel_counts(lone.engine) == dict.fromkeys(ids, 1)
    records = registry_records(lone.engine)
    assert max(r.fired_ms - r.due_ms for r in records.values()) < LATE_BOUND_MS  # type: ignore[operator]


def test_a_plain_rq_worker_of_another_deployment_runs_none_of_the_owners_jobs() -> None:
    with rq_namespace() as name, postgres_schema() as owner_db, postgres_schema() as other_db:
        url = rq_broker_url(name)
        deploy = contextlib.contextmanager(deployed)
        with deploy(Stack("owner", owner_db, url)) as owner, deploy(Stack("other", other_db, url)) as other:
            add_orders(owner.engine, ["o-1"])
            add_orders(other.engine, ["o-1"])
            # Due 2 s ago: RQ's scheduler moves a job once its whole-second clock has passed the due time.
            owner.timeouts().schedule("o-1", due_at=datetime.now(UTC) - timedelta(seconds=2))
            rq_cli = str(Path(sys.executable).with_name("rq"))
            command = [rq_cli, "worker", "--with-scheduler", "--burst", "-S", "json", "-n", f"{name}-other", name]
            ran = subprocess.run(command, env=other.env(), capture_output=True, text=True, timeout=60, check=False)
            output = ran.stdout + ran.stderr
            assert "belongs to deployment" in output, output[-2000:]
            assert cancel_counts(other.engine) == {} and cancel_counts(owner.engine) == {}
            record = owner.timeouts().get("o-1")
            assert record is not None and record.state is TimeoutState.PENDING, "the owner's row waits, untouched"
            # The owner's reconciler publishes it again; its own workers handle it.
            assert owner.timeouts().republish_stranded(timedelta(0)) == 1
            owner.drain_until(lambda: cancel_counts(owner.engine) == {"o-1": 1})
