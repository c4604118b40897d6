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

from scheduler import OrderTimeouts, TimeoutState, api, outbox
from scheduler.database import reading
from scheduler.errors import TransportUnavailable
from scheduler.maintenance import Maintenance, MaintenancePlan
from scheduler.outbox import AfterCommit
from scheduler.registry import count_pending
from scheduler.testing import ManualClock
from scheduler.transports.base import TimerMessage
from tests import rq_support
from tests.conftest import Stack, open_stack
from tests.stacks import STACKS
from tests.support import add_orders, cancel_counts, free_port, registry_records, wait_until

BROKERS = sorted(name for name in STACKS if not name.startswith("sql"))
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=BROKERS)
def broker_stack(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    yield from open_stack(request.param, STACKS, tmp_path)


def unreachable(broker_url: str) -> str:
    """The same broker URL pointing at a closed loopback port."""
    for port in (":6379", ":5672"):
        broker_url = broker_url.replace(port, ":1")
    return broker_url


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
        from scheduler.transports.rabbitmq.adapter import RabbitMQTransport
        from scheduler.transports.rabbitmq.keys import rabbitmq_delay_queue

        transport = stack.timeouts().transport
        assert isinstance(transport, RabbitMQTransport)
        for queue in [transport.names.ready, *(rabbitmq_delay_queue(level) for level in range(64))]:
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
    assert all(r.published_ms is None for r in registry_records(stack.engine).values())

    time.sleep(0.5)
    assert stack.drain().claimed == 0, "the broker never got them: nothing can fire yet"

    runs = Maintenance(stack.timeouts()).run_once()
    assert runs[0].job == "relay" and runs[0].rows == 20 and runs[0].error is None
    assert all(r.published_ms is not None for r in registry_records(stack.engine).values())
    stack.drain_until(lambda: len(cancel_counts(stack.engine)) == 20)
    assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)


def refuse_one_publish(
    client: OrderTimeouts,
    number: int,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception | None = None,
) -> list[list[str]]:
    """The `number`th publish of this client raises `error` (by default, the broker is away);
    returns the order ids of each publish."""
    publish, sent = client.transport.publish, []

    def refusing(messages: Sequence[TimerMessage]) -> None:
        sent.append([m.order_id for m in messages])
        if len(sent) == number:
            raise error or TransportUnavailable("the broker is away for a moment")
        publish(messages)

    monkeypatch.setattr(client.transport, "publish", refusing)
    return sent


def test_a_bulk_of_many_chunks_fires_each_once_when_the_broker_refuses_one_chunk(
    broker_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timeouts due soon: schedule_many writes, publishes and marks chunk after chunk, three chunks in
    flight. A chunk the broker refuses stays unpublished for the relay, and the chunks after it go on."""
    stack = broker_stack
    monkeypatch.setattr(api, "SCHEDULE_CHUNK", 40)
    ids = [f"chunk-{i:03d}" for i in range(150)]  # four chunks, the last one short
    add_orders(stack.engine, ids)
    client = stack.timeouts()
    # A first relay run: a broker that keeps a marker of its timers (redis, rq) gets it written, so
    # that the relay below publishes only what was refused, not every pending timeout.
    assert client.publish_unpublished() == 0
    sent = refuse_one_publish(client, 2, monkeypatch)
    assert client.schedule_many(ids, delay=timedelta(milliseconds=300)).created == 150

    assert sent == [ids[0:40], ids[40:80], ids[80:120], ids[120:150]]
    unpublished = {oid for oid, r in registry_records(stack.engine).items() if r.published_ms is None}
    assert unpublished == set(ids[40:80])
    assert client.publish_unpublished() == 40
    stack.drain_until(lambda: len(cancel_counts(stack.engine)) == 150)
    assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)


def test_a_far_bulk_goes_to_the_broker_before_its_commit_and_a_refused_chunk_the_usual_way(
    broker_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timeouts due far enough ahead are inserted already marked published, handed to the broker, then
    committed: no UPDATE per row afterwards. A chunk the broker refuses is rolled back and written
    the usual way (committed, then published and marked, or left to the relay)."""
    stack = broker_stack
    monkeypatch.setattr(api, "SCHEDULE_CHUNK", 40)
    monkeypatch.setattr(outbox, "PUBLISH_AHEAD_MS", 200)  # a real bulk: 30 s ahead or more
    ids = [f"ahead-{i:03d}" for i in range(150)]
    add_orders(stack.engine, ids)
    client = stack.timeouts()
    sent = refuse_one_publish(client, 2, monkeypatch)
    assert isinstance(client.outbox, AfterCommit)
    mark, marked = client.outbox.mark_published, []

    def recording_marks(messages: Sequence[TimerMessage]) -> None:
        marked.append([m.order_id for m in messages])
        mark(messages)

    monkeypatch.setattr(client.outbox, "mark_published", recording_marks)
    assert client.schedule_many(ids, delay=timedelta(seconds=2)).created == 150

    assert sent == [ids[0:40], ids[40:80], ids[40:80], ids[80:120], ids[120:150]]
    assert marked == [ids[40:80]], "only the chunk written the usual way was marked after its commit"
    assert all(r.published_ms is not None for r in registry_records(stack.engine).values())
    stack.drain_until(lambda: len(cancel_counts(stack.engine)) == 150)
    assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)


def test_an_unexpected_publish_error_stops_a_far_bulk_with_nothing_left_open(
    broker_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not an outage but a bug or a refusal of another kind: the error reaches the caller, the chunks
    committed before it stay, the ones in flight are rolled back, and no connection is left open."""
    stack = broker_stack
    monkeypatch.setattr(api, "SCHEDULE_CHUNK", 40)
    monkeypatch.setattr(outbox, "PUBLISH_AHEAD_MS", 200)
    ids = [f"broken-{i:03d}" for i in range(150)]
    client = stack.timeouts()
    refuse_one_publish(client, 2, monkeypatch, RuntimeError("not an outage"))
    with pytest.raises(RuntimeError, match="not an outage"):
        client.schedule_many(ids, delay=timedelta(seconds=2))
    assert set(registry_records(stack.engine)) == set(ids[:40])
    assert client.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


CRASH_AFTER_PUBLISH = """
import os, signal, sys
from datetime import timedelta
from scheduler import OrderTimeouts, api, outbox

api.SCHEDULE_CHUNK, outbox.PUBLISH_AHEAD_MS = 40, 200
client = OrderTimeouts.from_env()
publish, published = client.transport.publish, []

def publish_then_die(messages):
    publish(messages)
    published.append(len(messages))
    if len(published) == 2:  # the broker has confirmed the second chunk; its rows are not committed
        os.kill(os.getpid(), signal.SIGKILL)

client.transport.publish = publish_then_die
client.schedule_many(sys.argv[1:], delay=timedelta(seconds=1))
"""


def test_a_crash_between_the_publish_and_the_commit_of_a_far_bulk_loses_nothing(broker_stack: Stack) -> None:
    """The process dies after the broker confirmed a chunk whose rows never committed: its timers
    fire into nothing, the user schedules the orders again, and each is cancelled once."""
    stack = broker_stack
    ids = [f"crash-{i:03d}" for i in range(150)]
    add_orders(stack.engine, ids)
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER_PUBLISH, *ids], env=stack.env(), capture_output=True, timeout=60
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-3000:]
    assert set(registry_records(stack.engine)) == set(ids[:40]), (
        "the first chunk committed, the second died with the process"
    )

    again = stack.timeouts().schedule_many(ids, delay=timedelta(seconds=1))
    assert (again.created, again.existing) == (110, 40)
    stack.drain_until(lambda: len(cancel_counts(stack.engine)) == 150)
    time.sleep(1.5)  # the dead chunk's own timers are due by now: they must change nothing
    stack.drain()
    assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)
    assert all(r.state is TimeoutState.DONE for r in registry_records(stack.engine).values())


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
    clock = ManualClock()
    client = OrderTimeouts(settings=db_stack.timeouts().settings, clock=clock)
    db_stack.opened.append(client)
    first, second = Maintenance(client), Maintenance(client)
    assert not first.relay().skipped
    assert second.relay().skipped, "the first holder's lease is still live"
    clock.advance(timedelta(seconds=2))
    assert not first.relay().skipped, "the holder renews its own lease"
    clock.advance(timedelta(seconds=4))  # the first one "died": its lease (3 intervals, at least 2 s) runs out
    assert not second.relay().skipped
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
        wait_until(lambda: all(r.published_ms for r in registry_records(stack.engine).values()), timeout=20)
        stack.drain_until(lambda: len(cancel_counts(stack.engine)) == 200)
    finally:
        for process in pair:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=30) for process in pair]
    assert codes[1] == 0
    assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)
    with reading(stack.engine) as conn:
        assert count_pending(conn) == 0
    assert all(r.state is TimeoutState.DONE for r in registry_records(stack.engine).values())


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
