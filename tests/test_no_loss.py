"""Nothing lost: the registry is the outbox and the source of truth when brokers and workers fail."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pika
import pytest
import redis

from scheduler import TimeoutState, api
from scheduler.database import reading
from scheduler.errors import TransportUnavailable
from scheduler.maintenance import Maintenance, MaintenancePlan
from scheduler.registry import all_records, count_pending
from scheduler.transports.base import TimerMessage
from tests import rq_support
from tests.conftest import Stack, open_stack
from tests.stacks import STACKS
from tests.support import add_orders, cancel_counts, free_port, wait_until

BROKERS = sorted(name for name in STACKS if not name.startswith("sql"))
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=BROKERS)
def broker_stack(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    yield from open_stack(request.param, STACKS, tmp_path)


def unreachable(broker_url: str) -> str:
    """The same broker URL pointing at a closed loopback port."""
    for port in (":6379", ":5672"):
        broker_url = broker_url.replace(port, ":1")
    return broker_url


def records(stack: Stack) -> dict[str, object]:
    with reading(stack.engine) as conn:
        return {r.order_id: r for r in all_records(conn)}


def lose_everything(stack: Stack) -> None:
    """What a broker restart without persistence, a FLUSHALL or deleted queues do to our timers."""
    if stack.name == "redis":
        prefix = parse_qs(urlsplit(stack.broker_url).query)["prefix"][0]
        client = redis.Redis.from_url(stack.broker_url.split("?")[0])
        for pattern in (f"{{{prefix}:*", f"{{{prefix}}}:*"):
            for key in client.scan_iter(match=pattern):
                client.delete(key)
        client.close()
    elif stack.name == "rabbitmq":
        connection = pika.BlockingConnection(pika.URLParameters(stack.broker_url))
        channel = connection.channel()
        from scheduler.names import RABBITMQ_READY_QUEUE, rabbitmq_delay_queue

        for queue in [RABBITMQ_READY_QUEUE, *(rabbitmq_delay_queue(level) for level in range(64))]:
            try:
                channel.queue_purge(queue)
            except pika.exceptions.ChannelClosedByBroker:
                channel = connection.channel()  # that level does not exist
        connection.close()
    elif stack.name == "rq":
        rq_support.lose_everything(stack.broker_url)
    else:  # pragma: no cover - a new broker must say how it loses its data
        raise NotImplementedError(stack.name)


def test_schedule_succeeds_while_the_broker_is_down_and_fires_after_it_returns(broker_stack: Stack) -> None:
    stack = broker_stack
    ids = [f"down-{i}" for i in range(20)]
    add_orders(stack.engine, ids)
    offline = stack.timeouts(broker_url=unreachable(stack.broker_url))
    summary = offline.schedule_many(ids, delay=timedelta(milliseconds=300))
    assert summary.created == 20, "the registry rows commit although the broker is unreachable"
    assert all(r.published_ms is None for r in records(stack).values())  # type: ignore[attr-defined]

    time.sleep(0.5)
    assert stack.drain().claimed == 0, "the broker never got them: nothing can fire yet"

    runs = Maintenance(stack.timeouts()).run_once()
    assert runs[0].job == "relay" and runs[0].rows == 20 and runs[0].error is None
    assert all(r.published_ms is not None for r in records(stack).values())  # type: ignore[attr-defined]
    stack.drain_until(lambda: len(cancel_counts(stack.engine)) == 20)
    assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)


def test_a_bulk_of_many_chunks_fires_each_once_when_the_broker_refuses_one_chunk(
    broker_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """schedule_many writes, publishes and marks chunk after chunk, three chunks in flight: a chunk
    the broker refuses stays unpublished for the relay, and the chunks after it go on."""
    stack = broker_stack
    monkeypatch.setattr(api, "SCHEDULE_CHUNK", 40)
    ids = [f"chunk-{i:03d}" for i in range(150)]  # four chunks, the last one short
    add_orders(stack.engine, ids)
    client = stack.timeouts()
    publish, sent = client.transport.publish, []

    def refusing_the_second(messages: Sequence[TimerMessage]) -> None:
        sent.append([m.order_id for m in messages])
        if len(sent) == 2:
            raise TransportUnavailable("the broker is away for a moment")
        publish(messages)

    monkeypatch.setattr(client.transport, "publish", refusing_the_second)
    assert client.schedule_many(ids, delay=timedelta(milliseconds=300)).created == 150

    assert sent == [ids[0:40], ids[40:80], ids[80:120], ids[120:150]]
    unpublished = {oid for oid, r in records(stack).items() if r.published_ms is None}  # type: ignore[attr-defined]
    assert unpublished == set(ids[40:80])
    assert client.publish_unpublished() == 40
    stack.drain_until(lambda: len(cancel_counts(stack.engine)) == 150)
    assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)


def test_a_relay_that_finds_the_broker_down_backs_off_and_reports_it(broker_stack: Stack) -> None:
    offline = broker_stack.timeouts(broker_url=unreachable(broker_stack.broker_url))
    offline.schedule("o-1", delay=timedelta(seconds=1))
    jobs = Maintenance(offline)
    first = jobs.relay()
    assert first.error and first.rows == 0
    assert jobs.relay().skipped, "the next run inside the backoff does not hammer the broker"


def test_a_broker_that_lost_everything_still_ends_with_every_timeout_handled(broker_stack: Stack) -> None:
    stack = broker_stack
    ids = [f"lost-{i}" for i in range(30)]
    add_orders(stack.engine, ids)
    client = stack.timeouts()
    client.schedule_many(ids, delay=timedelta(milliseconds=300))
    lose_everything(stack)

    grace = timedelta(milliseconds=500)
    time.sleep(1.0)
    assert stack.drain().claimed == 0, "the timers are gone from the broker"
    jobs = Maintenance(client, MaintenancePlan(grace=grace))
    swept = jobs.reconcile()
    assert swept.rows == 30 and swept.error is None
    assert jobs.reconcile().rows == 0, "a republished row waits a grace period before it counts as stranded again"
    stack.drain_until(lambda: len(cancel_counts(stack.engine)) == 30)
    assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)


def test_two_maintainers_share_the_work_through_leases(db_stack: Stack) -> None:
    plan = MaintenancePlan(relay_interval=timedelta(milliseconds=200))
    first, second = Maintenance(db_stack.timeouts(), plan), Maintenance(db_stack.timeouts(), plan)
    assert not first.relay().skipped
    assert second.relay().skipped, "the first holder's lease is still live"
    assert not first.relay().skipped, "the holder renews its own lease"
    time.sleep(0.7)  # the first one "died": its lease (3 intervals, at least 2 s) runs out
    wait_until(lambda: not second.relay().skipped, timeout=5)
    assert first.relay().skipped, "the lease moved to the second one"


def test_two_maintain_processes_publish_everything_once_the_broker_is_back(broker_stack: Stack) -> None:
    stack = broker_stack
    ids = [f"pair-{i}" for i in range(200)]
    add_orders(stack.engine, ids)
    stack.timeouts(broker_url=unreachable(stack.broker_url)).schedule_many(ids, delay=timedelta(milliseconds=200))
    argv = [sys.executable, "-m", "scheduler", "maintain", "--relay-interval", "0.2s", "--grace", "30s"]
    pair = [subprocess.Popen(argv, env=stack.env(), stdout=subprocess.DEVNULL) for _ in range(2)]
    try:
        pair[0].kill()  # one of them dies at once: the other carries on after its lease expires
        wait_until(lambda: all(r.published_ms for r in records(stack).values()), timeout=20)  # type: ignore[attr-defined]
        stack.drain_until(lambda: len(cancel_counts(stack.engine)) == 200)
    finally:
        for process in pair:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=30) for process in pair]
    assert codes[1] == 0
    assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)
    with reading(stack.engine) as conn:
        assert count_pending(conn) == 0
    assert all(r.state is TimeoutState.DONE for r in records(stack).values())  # type: ignore[attr-defined]


def test_maintain_stops_cleanly_on_sigterm_as_soon_as_its_metrics_are_up(db_stack: Stack) -> None:
    """A supervisor that sees the metrics port up and stops the process at once gets a clean stop,
    its first pass perhaps still running: exit 0, and the leases free for the next maintainer."""
    port = free_port()
    argv = [sys.executable, "-m", "scheduler", "maintain", "--metrics-port", str(port)]
    process = subprocess.Popen(argv, env=db_stack.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: listening(port), timeout=20, interval=0.01)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    jobs = Maintenance(db_stack.timeouts())
    assert not jobs.relay().skipped and not jobs.reconcile().skipped, "the stopped process let its leases go"


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["sql", "redis", "rabbitmq"])
def test_short_chaos_run(transport: str, tmp_path: Path) -> None:
    from tests.services import POSTGRES_URL, require

    require("PostgreSQL", 5432)
    if transport == "redis":
        require("Redis", 6379)
    if transport == "rabbitmq":
        require("RabbitMQ", 5672)
    # The script makes (and drops) a schema of its own in the test database.
    argv = [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--transport", transport, "--orders", "400"]
    argv += ["--duration", "6", "--database-url", POSTGRES_URL]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "violations=0" in done.stdout and "pending=0" in done.stdout
