"""What is specific to the `redis` transport; the shared contract runs in test_transport_contract.py.

Real Redis on 127.0.0.1:6379 with a key prefix per test; the cluster test starts a local Redis
Cluster through scripts/redis_cluster.sh.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from scheduler import Outcome, ScheduleResult, TimeoutState
from scheduler.clock import SystemClock
from scheduler.database import reading
from scheduler.errors import ConfigurationError, MalformedMessage, TransportUnavailable
from scheduler.registry import count_pending
from scheduler.transports.base import FAILED_REDELIVERY_MS, Delivery, Settlement, TimerMessage
from scheduler.transports.redis import adapter as redis_adapter
from scheduler.transports.redis.adapter import RedisTransport
from scheduler.transports.redis.keys import REDIS_GROUP, redis_dead_key, redis_due_key, redis_timers_key
from scheduler.transports.redis.options import RedisOptions, parse_url
from tests.conftest import Stack, open_stack
from tests.redis_support import broker_url, delete_prefix, redis_prefix, redis_stack
from tests.services import REDIS_URL, require, unique
from tests.slow_store import pausing_after_cancel
from tests.stacks import STACKS
from tests.support import add_orders, cancel_counts, free_port, pay, postgres_schema, wait_until

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SEED = "redis://127.0.0.1:7000/0"


class FrozenClock:
    """A producer whose clock stands still: its publishes never find a timer due, so they move nothing."""

    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now


@pytest.fixture
def raw() -> Iterator[Any]:
    require("Redis", 6379)
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    with redis_prefix() as name:
        yield name


@pytest.fixture
def make_transport(prefix: str) -> Iterator[Callable[..., RedisTransport]]:
    """Transports on this test's prefix, each with its own connections and consumer name."""
    opened: list[RedisTransport] = []

    def make(clock: Any = None, **options: object) -> RedisTransport:
        transport = RedisTransport(broker_url(prefix, **options), clock or SystemClock())
        opened.append(transport)
        return transport

    yield make
    for transport in opened:
        transport.close()


@pytest.fixture
def transport(make_transport: Callable[..., RedisTransport]) -> RedisTransport:
    return make_transport()


@pytest.fixture
def rstack(tmp_path: Path) -> Iterator[Stack]:
    """A whole deployment on the redis transport: registry on PostgreSQL, orders, cancel counter."""
    yield from open_stack("redis", {"redis": redis_stack}, tmp_path)


def now_ms() -> int:
    return SystemClock().now_ms()


def state(stack: Stack, order_id: str) -> TimeoutState:
    record = stack.timeouts().get(order_id)
    assert record is not None
    return record.state


def stream_messages(raw: Any, prefix: str, shard: int = 0) -> list[TimerMessage]:
    """The timers in a shard's stream (leaving out wake-up entries)."""
    entries = raw.xrange(redis_due_key(prefix, shard))
    return [TimerMessage.decode(fields[b"m"]) for _, fields in entries if b"m" in fields]


def dead_letters(raw: Any, prefix: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
        for _, fields in raw.xrange(redis_dead_key(prefix))
    ]


def pending_entries(raw: Any, prefix: str, shard: int = 0) -> int:
    return int(raw.xpending(redis_due_key(prefix, shard), REDIS_GROUP)["pending"])


# -- timers, the mover, settle ------------------------------------------------------------------


def test_publish_keeps_one_member_per_order_scored_by_due_time_in_its_shard(
    make_transport: Callable[..., RedisTransport], prefix: str, raw: Any
) -> None:
    far = now_ms() + 3_600_000
    transport = make_transport(shards=4)
    ids = [f"s-{i}" for i in range(40)]
    transport.publish([TimerMessage(oid, far + i, 1) for i, oid in enumerate(ids)])
    transport.publish([TimerMessage("s-0", far + 999, 2)])  # a reschedule moves the score
    transport.revoke(["s-1", "s-2", "never-published"])

    members: dict[str, float] = {}
    for shard in range(4):
        for member, score in raw.zrange(redis_timers_key(prefix, shard), 0, -1, withscores=True):
            assert transport.shard_of(member.decode()) == shard
            members[member.decode()] = score
    assert members == {oid: far + i for i, oid in enumerate(ids) if oid not in ("s-0", "s-1", "s-2")} | {
        "s-0": far + 999
    }
    assert len({transport.shard_of(oid) for oid in ids}) == 4, "the ids spread over every shard"


def test_racing_movers_put_every_timer_into_the_stream_exactly_once(
    make_transport: Callable[..., RedisTransport], prefix: str, raw: Any
) -> None:
    due = now_ms() - 1000
    # Published through a clock that stands still at `due - 1`: nothing is due for it, so only the movers move.
    make_transport(FrozenClock(due - 1)).publish([TimerMessage(f"race-{i}", due + i % 7, 1) for i in range(3000)])
    movers = [make_transport(move_batch=25) for _ in range(4)]
    start = threading.Barrier(len(movers))
    errors: list[BaseException] = []

    def move(transport: RedisTransport) -> None:
        try:
            start.wait()
            while transport.move_due(now_ms=due + 10) is not None:
                pass
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=move, args=(m,)) for m in movers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert raw.zcard(redis_timers_key(prefix, 0)) == 0
    moved = stream_messages(raw, prefix)
    assert Counter(m.order_id for m in moved) == {f"race-{i}": 1 for i in range(3000)}
    assert all(m.due_ms == due + int(m.order_id.split("-")[1]) % 7 and m.version == 0 for m in moved)


def test_received_entries_stay_pending_until_settled_then_leave_the_stream(
    make_transport: Callable[..., RedisTransport], prefix: str, raw: Any
) -> None:
    transport = make_transport()
    transport.publish([TimerMessage(f"a-{i}", now_ms() - 5, 3) for i in range(5)])
    batch = transport.receive(3, timeout=0)
    assert len(batch.deliveries) == 3 and all(d.deliveries == 1 for d in batch.deliveries)
    assert pending_entries(raw, prefix) == 3, "nothing is acked before the database commit"
    transport.settle(Settlement(done=batch.deliveries))
    assert pending_entries(raw, prefix) == 0
    assert raw.xlen(redis_due_key(prefix, 0)) == 2, "acked entries are deleted: memory stays flat"


def test_workers_forget_the_consumer_names_of_workers_long_gone_but_not_of_one_holding_entries(
    make_transport: Callable[..., RedisTransport], prefix: str, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = redis_due_key(prefix, 0)
    holding = make_transport(claim_idle_ms=3_600_000)
    holding.publish([TimerMessage("held", now_ms() - 5, 1)])
    assert len(holding.receive(1, timeout=0).deliveries) == 1  # and then it dies, holding it
    raw.xgroup_createconsumer(stream, REDIS_GROUP, "gone-long-ago")
    time.sleep(0.01)

    monkeypatch.setattr(redis_adapter, "FORGET_CONSUMERS_AFTER_MS", 5)
    survivor = make_transport(claim_idle_ms=3_600_000)
    assert not survivor.receive(10, timeout=0)
    names = {c["name"].decode() for c in raw.xinfo_consumers(stream, REDIS_GROUP)}
    assert "gone-long-ago" not in names, "silent with nothing pending: forgotten"
    assert holding._consumer in names, "an entry still pending keeps its consumer: it is taken over, not lost"


def test_settle_rearms_retries_and_failed_batches_and_dead_letters_with_the_reason(
    make_transport: Callable[..., RedisTransport], prefix: str, raw: Any
) -> None:
    transport = make_transport()
    transport.publish([TimerMessage(oid, now_ms() - 5, 1) for oid in ("retry", "dead", "failed", "moved")])
    by_id = {d.message.order_id: d for d in transport.receive(10, timeout=0).deliveries}
    later = now_ms() + 60_000
    # "moved" was rescheduled while its batch failed: the newer timer must survive the re-arm.
    transport.publish([TimerMessage("moved", later + 5, 2)])
    before = now_ms()
    transport.settle(
        Settlement(
            retry=[(by_id["retry"], TimerMessage("retry", later, 0))],
            dead=[(by_id["dead"], "payment status unknown after 5 attempts")],
            failed=[by_id["failed"], by_id["moved"]],
            rolled_back=True,
        )
    )
    scores = dict(raw.zrange(redis_timers_key(prefix, 0), 0, -1, withscores=True))
    assert scores[b"retry"] == later and scores[b"moved"] == later + 5
    assert before + FAILED_REDELIVERY_MS <= scores[b"failed"] <= now_ms() + FAILED_REDELIVERY_MS
    assert b"dead" not in scores
    assert pending_entries(raw, prefix) == 0 and raw.xlen(redis_due_key(prefix, 0)) == 0
    [letter] = dead_letters(raw, prefix)
    assert letter["order_id"] == "dead" and letter["reason"] == "payment status unknown after 5 attempts"
    assert TimerMessage.decode(letter["body"]).order_id == "dead"


def test_a_pending_timeout_costs_at_most_150_bytes_of_redis(
    make_transport: Callable[..., RedisTransport], prefix: str, raw: Any
) -> None:
    count = 20_000
    far = now_ms() + 3_600_000
    # UUIDs: longer than most order ids, so this is the expensive end.
    make_transport().publish([TimerMessage(str(uuid.uuid4()), far + i, 1) for i in range(count)])
    per_timeout = raw.memory_usage(redis_timers_key(prefix, 0), samples=0) / count
    assert per_timeout <= 150, f"{per_timeout:.1f} B per pending timeout"


# -- waking on time ----------------------------------------------------------------------------


def test_a_waiting_worker_wakes_when_the_earliest_timer_comes_due(
    make_transport: Callable[..., RedisTransport],
) -> None:
    consumer, producer = make_transport(), make_transport()
    consumer.receive(10, timeout=0)  # an idle worker that has already looked once
    due = now_ms() + 400
    producer.publish([TimerMessage("soon", due, 1)])
    start = time.monotonic()
    batch = consumer.receive(10, timeout=5.0)
    assert [d.message.order_id for d in batch.deliveries] == ["soon"]
    assert now_ms() >= due
    # Blocks are capped at 2 s: returning well before that means it woke for the due time itself.
    assert time.monotonic() - start < 1.5


def test_a_blocked_worker_wakes_for_a_nearer_timer_published_meanwhile(
    make_transport: Callable[..., RedisTransport],
) -> None:
    consumer, producer = make_transport(), make_transport()
    producer.publish([TimerMessage("far", now_ms() + 3_600_000, 1)])
    receiving = threading.Event()
    received: list[tuple[list[str], float]] = []

    def receive() -> None:
        start = time.monotonic()
        receiving.set()
        batch = consumer.receive(10, timeout=5.0)
        received.append(([d.message.order_id for d in batch.deliveries], time.monotonic() - start))

    listener = threading.Thread(target=receive)
    listener.start()
    receiving.wait()
    producer.publish([TimerMessage("near", now_ms() + 300, 1)])
    listener.join()
    [(ids, elapsed)] = received
    assert ids == ["near"]
    assert elapsed < 1.5, "woke for the new earliest timer instead of sleeping out its block"


# -- dead workers, poison and malformed entries ------------------------------------------------


def pending_count(stack: Stack) -> int:
    with reading(stack.engine) as conn:
        return count_pending(conn)


@pytest.mark.slow
def test_entries_of_a_killed_worker_are_taken_over_after_the_idle_timeout(rstack: Stack, tmp_path: Path) -> None:
    url = f"{rstack.broker_url}&claim_idle_ms=1000"
    client = rstack.timeouts(broker_url=url)
    ids = [f"k-{i:03d}" for i in range(120)]
    add_orders(rstack.engine, ids)
    client.schedule_many(ids, due_at=datetime.now(UTC))
    marker = tmp_path / "mid-batch"
    victim = rstack.start_worker(
        "--batch-size",
        "50",
        ORDER_TIMEOUTS_BROKER_URL=url,
        **pausing_after_cancel(marker),
    )
    try:
        wait_until(marker.exists, timeout=30)
        in_flight = marker.read_text().split(",")
        assert len(in_flight) == 50
    finally:
        victim.kill()
        victim.wait()
    # The batch rolled back with the process; its 50 entries sit unacked in the dead worker's list.
    assert cancel_counts(rstack.engine) == {}
    assert pending_count(rstack) == 120
    held = client.transport.figures()["pending_by_consumer"]
    assert sorted(held.values()) == [50]

    survivor = rstack.start_worker("--batch-size", "50", ORDER_TIMEOUTS_BROKER_URL=url)
    try:
        wait_until(lambda: pending_count(rstack) == 0, timeout=30)
    finally:
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(timeout=30) == 0
    assert cancel_counts(rstack.engine) == dict.fromkeys(ids, 1)
    for oid in in_flight:
        record = client.get(oid)
        assert record is not None and record.outcome is Outcome.CANCELLED and record.attempts == 1
    figures = client.transport.figures()
    assert (figures["pending"], figures["stream_length"], figures["timers"]) == (0, 0, 0)


def test_an_entry_delivered_too_often_is_dead_lettered_and_the_registry_says_so(rstack: Stack, raw: Any) -> None:
    url = f"{rstack.broker_url}&claim_idle_ms=50"
    client = rstack.timeouts(broker_url=url, max_deliveries=1)
    add_orders(rstack.engine, ["poison"])
    client.schedule("poison", due_at=datetime.now(UTC))
    # A worker takes it and dies without a word (here: never settles).
    crashed = RedisTransport(url, SystemClock(), rstack.engine)
    assert [d.message.order_id for d in crashed.receive(10, timeout=0).deliveries] == ["poison"]

    rstack.drain_until(lambda: state(rstack, "poison") is not TimeoutState.PENDING, client=client)
    record = client.get("poison")
    assert record is not None and record.state is TimeoutState.DEAD
    assert record.error == "delivered 2 times without an ack (limit 1)"
    assert cancel_counts(rstack.engine) == {}
    [letter] = dead_letters(raw, crashed.namespace)
    assert (letter["order_id"], letter["reason"]) == ("poison", record.error)
    crashed.close()
    assert client.transport.figures()["pending"] == 0


def _not_a_timer_message(body: bytes) -> bool:
    try:
        TimerMessage.decode(body)
    except MalformedMessage:
        return True
    return False


malformed_bodies = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
    st.fixed_dictionaries(
        {
            "order_id": st.one_of(st.none(), st.integers(), st.text(max_size=300)),
            "due_ms": st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text()),
            "version": st.one_of(st.integers(), st.text()),
        }
    ).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=malformed_bodies)
def test_a_malformed_entry_goes_to_the_dead_stream_with_its_reason(
    transport: RedisTransport, prefix: str, raw: Any, body: bytes
) -> None:
    assume(_not_a_timer_message(body))
    transport.receive(1, timeout=0)  # the consumer group exists
    raw.xadd(redis_due_key(prefix, 0), {"m": body})
    assert transport.receive(10, timeout=0).deliveries == []
    *_, (_, letter) = raw.xrange(redis_dead_key(prefix))
    assert letter[b"body"] == body
    with pytest.raises(MalformedMessage) as reason:
        TimerMessage.decode(body)
    assert letter[b"reason"].decode() == str(reason.value)
    assert pending_entries(raw, prefix) == 0 and raw.xlen(redis_due_key(prefix, 0)) == 0


def test_a_worker_dead_letters_malformed_entries_and_carries_on(rstack: Stack, raw: Any) -> None:
    transport = rstack.timeouts().transport
    assert isinstance(transport, RedisTransport)
    prefix = transport.namespace
    add_orders(rstack.engine, ["good"])
    client = rstack.timeouts()
    client.transport.receive(1, timeout=0)  # the consumer group exists
    raw.xadd(redis_due_key(prefix, 0), {"m": b"\xff not json"})
    raw.xadd(redis_due_key(prefix, 0), {"something": "else"})
    client.schedule("good", delay=timedelta(milliseconds=200))

    rstack.drain_until(lambda: state(rstack, "good") is TimeoutState.DONE)
    assert cancel_counts(rstack.engine) == {"good": 1}
    reasons = [letter["reason"] for letter in dead_letters(raw, prefix)]
    assert len(reasons) == 2
    assert reasons[0].startswith("body is not JSON") and reasons[1] == "entry has no 'm' field"
    assert pending_entries(raw, prefix) == 0


# -- an unreachable Redis, figures, options ---------------------------------------------------


def test_an_unreachable_redis_raises_transport_unavailable_and_scheduling_still_commits(rstack: Stack) -> None:
    down = rstack.timeouts(broker_url=f"redis://127.0.0.1:{free_port()}/0?prefix=nowhere")
    add_orders(rstack.engine, ["offline"])
    start = time.monotonic()
    assert down.schedule("offline", delay=timedelta(minutes=5)) is ScheduleResult.CREATED
    assert time.monotonic() - start < 3, "a dead broker fails fast"
    record = down.get("offline")
    assert record is not None and record.state is TimeoutState.PENDING and record.published_ms is None
    transport = down.transport
    message = TimerMessage("offline", record.due_ms, record.version)
    for call in (
        lambda: transport.publish([message]),
        lambda: transport.revoke(["offline"]),
        lambda: transport.receive(10, timeout=0.1),
        lambda: transport.settle(Settlement(done=[Delivery(message, receipt=(0, b"1-0"))])),
        transport.figures,
    ):
        with pytest.raises(TransportUnavailable):
            call()

    # Redis is reachable again (here: the stack's own): the relay publishes what was left behind.
    client = rstack.timeouts()
    assert client.publish_unpublished() == 1
    record = client.get("offline")
    assert record is not None and record.published_ms is not None
    assert client.transport.figures()["timers"] == 1


def test_figures_show_timers_streams_pending_dead_letters_and_mover_lag(
    make_transport: Callable[..., RedisTransport], prefix: str, raw: Any
) -> None:
    now = now_ms()
    worker = make_transport(shards=2)
    worker.publish([TimerMessage(f"due-{i}", now - 10, 1) for i in range(6)])  # moved at once
    batch = worker.receive(4, timeout=0)
    far = [TimerMessage(f"far-{i}", now + 3_600_000, 1) for i in range(10)]
    make_transport(shards=2).publish(far)
    # Overdue but not moved yet: no worker has run the mover since (a producer with a stopped clock).
    make_transport(FrozenClock(now - 10_000), shards=2).publish([TimerMessage("late", now - 5000, 1)])
    raw.xadd(redis_due_key(prefix, 1), {"junk": "1"})
    worker.settle(Settlement(dead=[(batch.deliveries[0], "given up")], done=batch.deliveries[1:2]))

    figures = make_transport(shards=2).figures()
    assert figures["shards"] == 2
    assert figures["timers"] == 11 and sum(figures["timers_by_shard"]) == 11
    assert figures["pending_by_consumer"] == {worker._consumer: 2}
    assert figures["pending"] == 2
    assert figures["stream_length"] == 6 - 2 + 1, "four delivered, two of them settled; plus the junk entry"
    assert figures["dead_letters"] == 1
    assert 5.0 <= figures["unmoved_lag_seconds"] < 60


def test_url_options_are_read_and_the_rest_is_passed_to_redis_py() -> None:
    url, options = parse_url("redis://:secret@127.0.0.1:6379/2?prefix=shop&shards=8&claim_idle_ms=500&socket_timeout=3")
    assert options == RedisOptions(prefix="shop", shards=8, claim_idle_ms=500)
    assert url == "redis://:secret@127.0.0.1:6379/2?socket_timeout=3"
    assert parse_url("rediss://h/0?cluster=1&move_batch=10&dead_maxlen=5")[1] == RedisOptions(
        cluster=True, move_batch=10, dead_maxlen=5
    )
    for bad in ("shards=0", "shards=x", "prefix=a{b}", "prefix=", "cluster=yes", "claim_idle_ms=-1", "move_batch=9999"):
        with pytest.raises(ConfigurationError):
            parse_url(f"redis://127.0.0.1/0?{bad}")

    transport = RedisTransport("rediss://127.0.0.1:6390/0?ssl_cert_reqs=none&socket_timeout=3", SystemClock())
    client = transport._redis()
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 3.0
    transport.close()


# -- Redis Cluster -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_cluster() -> str:
    """A local three-node Redis Cluster (left running, like the other services; `stop` ends it)."""
    if shutil.which("redis-server") is None:
        require("Redis Cluster", 7000)  # without redis-server: skips here, fails when CI=true
    else:
        script = ROOT / "scripts" / "redis_cluster.sh"
        subprocess.run(["bash", str(script)], check=True, timeout=60, capture_output=True)
    return CLUSTER_SEED


@pytest.fixture
def cluster_stack(redis_cluster: str, tmp_path: Path) -> Iterator[Stack]:
    seed = redis.cluster.RedisCluster.from_url(redis_cluster)
    nodes = {node.name for node in seed.get_primaries()}
    # A prefix whose six shards land on every node, so the test shows them spread over the cluster.
    while True:
        prefix = unique("ot")
        if {seed.get_node_from_key(redis_timers_key(prefix, n)).name for n in range(6)} == nodes:
            break

    try:
        yield from open_stack("redis-cluster", {"redis-cluster": lambda _: cluster_registry(prefix)}, tmp_path)
    finally:
        delete_prefix(seed, prefix)
        seed.close()


@contextlib.contextmanager
def cluster_registry(prefix: str) -> Iterator[tuple[str, str]]:
    with postgres_schema() as database_url:
        yield database_url, broker_url(prefix, CLUSTER_SEED, cluster=1, shards=6)


def test_schedule_fire_and_cancel_across_shards_on_a_redis_cluster(cluster_stack: Stack) -> None:
    client = cluster_stack.timeouts()
    transport = client.transport
    assert isinstance(transport, RedisTransport) and transport.options.cluster
    ids = [f"c-{i:02d}" for i in range(36)]
    add_orders(cluster_stack.engine, ids)
    client.schedule_many(ids, delay=timedelta(hours=1))
    figures = transport.figures()
    assert figures["timers"] == 36 and all(n > 0 for n in figures["timers_by_shard"])

    paid, fired, left = ids[:12], ids[12:30], ids[30:]
    for oid in paid:
        assert pay(cluster_stack.engine, oid) and client.cancel(oid)
    for oid in fired:
        client.fire(oid)
    cluster_stack.drain_until(lambda: pending_count(cluster_stack) == len(left))

    assert cancel_counts(cluster_stack.engine) == dict.fromkeys(fired, 1)
    assert {oid: state(cluster_stack, oid) for oid in ids} == (
        dict.fromkeys(paid, TimeoutState.REVOKED)
        | dict.fromkeys(fired, TimeoutState.DONE)
        | dict.fromkeys(left, TimeoutState.PENDING)
    )
    figures = transport.figures()
    assert (figures["timers"], figures["stream_length"], figures["pending"]) == (len(left), 0, 0)


def test_check_reports_redis_time_against_the_registrys_clock(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        deployment = stack.enter_context(contextlib.contextmanager(open_stack)("redis", STACKS, tmp_path))
        argv = [sys.executable, "-m", "scheduler", "check", "--json"]
        done = subprocess.run(argv, env=deployment.env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    (broker_clock,) = [c for c in json.loads(done.stdout)["checks"] if c["component"] == "broker clock"]
    assert broker_clock["ok"] is True and abs(float(broker_clock["target"].split()[0])) < 1
