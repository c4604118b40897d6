"""What is specific to the `rabbitmq` transport: the TTL cascade, crashes, broker outages, dead letters.

Each test runs on its own vhost (tests/rabbitmq_support.py) and its own PostgreSQL schema.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler import Outcome, TimeoutState, registry
from scheduler.clock import SystemClock
from scheduler.errors import TransportUnavailable
from scheduler.maintenance import Maintenance
from scheduler.outbox import HELD_GRACE
from scheduler.transports.base import FAILED_REDELIVERY_MS, Delivery, Settlement, TimerMessage
from scheduler.transports.rabbitmq.adapter import (
    ARRIVE_EARLIEST_MS,
    ARRIVE_LATEST_MS,
    ENVELOPE_MAX,
    HOLD_MS,
    RabbitMQTransport,
)
from scheduler.transports.rabbitmq.keys import (
    RABBITMQ_DEAD_QUEUE,
    RABBITMQ_READY_QUEUE,
    RABBITMQ_REASON_HEADER,
    RABBITMQ_TIMERS_EXCHANGE,
    RabbitMQNames,
    rabbitmq_delay_queue,
    rabbitmq_expired_exchange,
)
from scheduler.transports.rabbitmq.topology import (
    LEVELS,
    MAX_TICKS,
    TICK_MS,
    bindings,
    delay_ms,
    fewest_hops,
    routing_key,
)
from tests.conftest import Stack, open_stack
from tests.rabbitmq_support import channel, rabbitmq_stack, rabbitmq_vhost, rabbitmqctl
from tests.slow_store import pausing_after_cancel
from tests.support import add_orders, cancel_counts, wait_until

SOON = timedelta(milliseconds=300)


@pytest.fixture
def rabbit(tmp_path: Path) -> Iterator[Stack]:
    yield from open_stack("rabbitmq", {"rabbitmq": rabbitmq_stack}, tmp_path)


def names(stack: Stack) -> RabbitMQNames:
    """The deployment's queue names (they carry its registry's identity)."""
    transport = stack.timeouts().transport
    assert isinstance(transport, RabbitMQTransport)
    return transport.names


def finished(stack: Stack, *ids: str) -> bool:
    client = stack.timeouts()
    return all((record := client.get(oid)) is not None and record.state is not TimeoutState.PENDING for oid in ids)


def stop_worker(worker: subprocess.Popen[str]) -> int:
    worker.send_signal(signal.SIGTERM)
    return worker.wait(timeout=30)


# -- the cascade as data: no broker needed ---------------------------------------------------------


def topic_match(pattern: list[str], key: list[str]) -> bool:
    if not pattern:
        return not key
    if pattern[0] == "#":
        return any(topic_match(pattern[1:], key[skip:]) for skip in range(len(key) + 1))
    return bool(key) and pattern[0] in ("*", key[0]) and topic_match(pattern[1:], key[1:])


def route(key: str) -> list[str]:
    """The queues a timer with this key passes, following the declared bindings like the broker would."""
    table: dict[str, list[tuple[list[str], str]]] = {}
    for binding in bindings():
        table.setdefault(binding.exchange, []).append((binding.pattern.split("."), binding.queue))
    path, exchange, words = [], RABBITMQ_TIMERS_EXCHANGE, key.split(".")
    while True:
        targets = [queue for pattern, queue in table[exchange] if topic_match(pattern, words)]
        assert len(targets) == 1, f"{key!r} routes to {targets} at {exchange}"
        path.append(targets[0])
        if targets[0] == RABBITMQ_READY_QUEUE:
            return path
        exchange = rabbitmq_expired_exchange(int(targets[0].rsplit(".", 1)[1]))


def arrival_window(remaining_ms: int) -> tuple[int, int]:
    return remaining_ms - ARRIVE_EARLIEST_MS, remaining_ms - ARRIVE_LATEST_MS


@given(st.integers(min_value=0, max_value=MAX_TICKS))
def test_a_timer_waits_its_ticks_visiting_the_level_of_each_set_bit_once(ticks: int) -> None:
    path = route(routing_key(ticks))
    levels = [int(queue.rsplit(".", 1)[1]) for queue in path[:-1]]
    assert path[:-1] == [rabbitmq_delay_queue(level) for level in levels]
    assert sorted(levels) == [level for level in range(LEVELS) if ticks >> level & 1]
    assert sum(delay_ms(level) for level in levels) == ticks * TICK_MS


@given(st.integers(min_value=-86_400_000, max_value=TICK_MS * MAX_TICKS - 1))
def test_a_timer_arrives_within_its_window_before_the_due_time(remaining_ms: int) -> None:
    # Early enough to absorb the cascade's backlog, never so early that the consumer re-arms it;
    # never after the due time (the handler would ack a timer that is not due yet as stale).
    earliest, latest = arrival_window(remaining_ms)
    waited = RabbitMQTransport._delay_ticks(remaining_ms) * TICK_MS
    if latest >= TICK_MS:
        assert earliest <= waited <= latest
    else:
        assert waited == 0, "due within the window already: straight to the ready queue"
    assert remaining_ms - waited < HOLD_MS


@given(st.integers(min_value=0, max_value=10**7), st.integers(min_value=0, max_value=2000))
def test_the_window_is_spent_on_fewer_hops(latest: int, width: int) -> None:
    ticks = fewest_hops(latest - width, latest)
    candidates = range(max(-(-(latest - width) // TICK_MS), 0), latest // TICK_MS + 1)
    if latest < TICK_MS:
        assert ticks == 0
    elif not candidates:
        assert ticks == latest // TICK_MS, "no whole tick in the window: the latest that is not late"
    else:
        assert ticks in candidates
        assert ticks.bit_count() == min(candidate.bit_count() for candidate in candidates)


def test_round_delays_take_few_hops() -> None:
    hops = {seconds: RabbitMQTransport._delay_ticks(seconds * 1000).bit_count() for seconds in (1, 2, 10, 60, 1800)}
    assert hops == {1: 0, 2: 1, 10: 3, 60: 3, 1800: 5}


# -- against the broker -----------------------------------------------------------------------------


def test_a_long_timer_published_first_does_not_hold_back_a_short_one(rabbit: Stack) -> None:
    add_orders(rabbit.engine, ["slow", "fast"])
    client = rabbit.timeouts()
    client.schedule("slow", delay=timedelta(seconds=90))
    client.schedule("fast", delay=timedelta(seconds=2))

    rabbit.drain_until(lambda: finished(rabbit, "fast"), timeout=10)
    fast, slow = client.get("fast"), client.get("slow")
    assert fast is not None and slow is not None
    assert fast.outcome is Outcome.CANCELLED
    assert fast.fired_ms is not None and 0 <= fast.fired_ms - fast.due_ms < 1000, "fired at its own due time"
    assert slow.state is TimeoutState.PENDING
    figures = client.transport.figures()
    assert (figures["delayed"], figures["ready"], figures["consumers"]) == (1, 0, 1), "the 90 s timer still waits"


def test_a_worker_killed_holding_unacked_deliveries_loses_nothing_and_cancels_nothing_twice(
    rabbit: Stack, tmp_path: Path
) -> None:
    ids = [f"k-{i:02d}" for i in range(20)]
    add_orders(rabbit.engine, ids)
    rabbit.timeouts().schedule_many(ids, delay=SOON)
    marker = tmp_path / "mid-batch"
    victim = rabbit.start_worker(
        "--batch-size",
        "50",
        **pausing_after_cancel(marker),
    )
    try:
        wait_until(marker.exists, timeout=30)
        assert marker.read_text(), "the victim cancelled orders in a transaction it has not committed"
    finally:
        victim.kill()
        victim.wait()
    assert cancel_counts(rabbit.engine) == {}

    # Its connection died with it: the broker hands the unacked deliveries to the next consumer.
    survivor = rabbit.start_worker("--batch-size", "50")
    try:
        wait_until(lambda: finished(rabbit, *ids), timeout=30)
    finally:
        assert stop_worker(survivor) == 0
    assert cancel_counts(rabbit.engine) == dict.fromkeys(ids, 1)


def test_the_worker_and_the_client_reconnect_after_the_broker_drops_their_connections(rabbit: Stack) -> None:
    ids = [f"b-{i:02d}" for i in range(40)]
    add_orders(rabbit.engine, [*ids, "after-drop"])
    client = rabbit.timeouts()
    client.schedule_many([(oid, timedelta(milliseconds=300 + 100 * i)) for i, oid in enumerate(ids)])
    worker = rabbit.start_worker("--batch-size", "10")
    try:
        wait_until(lambda: finished(rabbit, ids[0]), timeout=30)
        # Every connection of this test's vhost is closed by the broker, as a node restart does to
        # its clients (tests/ha restarts real cluster nodes; the shared broker stays up for the others).
        vhost = unquote(urlsplit(rabbit.broker_url).path[1:])
        rabbitmqctl("close_all_connections", "-p", vhost, "test: the broker drops its clients")
        # The client's connection died; its next publish connects again.
        client.schedule("after-drop", delay=SOON)
        record = client.get("after-drop")
        assert record is not None and record.published_ms is not None
        wait_until(lambda: finished(rabbit, *ids, "after-drop"), timeout=60)
    finally:
        assert stop_worker(worker) == 0
    assert cancel_counts(rabbit.engine) == dict.fromkeys([*ids, "after-drop"], 1)


def test_a_publish_while_the_broker_is_unreachable_leaves_the_row_for_the_relay(rabbit: Stack) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    add_orders(rabbit.engine, ["o-1"])
    cut_off = rabbit.timeouts(broker_url=f"amqp://guest:guest@127.0.0.1:{closed_port}/%2F")
    cut_off.schedule("o-1", delay=SOON)  # raises nothing: the registry row is the outbox
    record = cut_off.get("o-1")
    assert record is not None and record.state is TimeoutState.PENDING and record.published_ms is None

    client = rabbit.timeouts()
    assert client.publish_unpublished() == 1
    rabbit.drain_until(lambda: finished(rabbit, "o-1"))
    assert cancel_counts(rabbit.engine) == {"o-1": 1}


def test_a_queue_declared_with_other_arguments_is_a_clear_transport_error() -> None:
    with rabbitmq_vhost() as broker_url:
        with channel(broker_url) as ch:
            ch.queue_declare(RABBITMQ_READY_QUEUE, durable=True)  # a classic queue where a quorum one belongs
        transport = RabbitMQTransport(broker_url, SystemClock())
        try:
            with pytest.raises(TransportUnavailable, match="PRECONDITION_FAILED"):
                transport.publish([TimerMessage("o-1", 0, 1)])
        finally:
            transport.close()


def test_a_dead_letter_queue_declared_without_a_bound_by_an_earlier_release_is_used_as_it_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with rabbitmq_vhost() as broker_url:
        with channel(broker_url) as ch:
            ch.queue_declare(RABBITMQ_DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        transport = RabbitMQTransport(f"{broker_url}?dead_maxlen=2", SystemClock())
        try:
            transport.publish([TimerMessage("o-1", 0, 1)])
            [delivery] = take(transport, 1)
            transport.settle(Settlement(dead=[(delivery, "given up")]))
            assert transport.figures()["dead_letters"] == 1, "dead letters still go to the existing queue"
        finally:
            transport.close()
        assert "exists with other arguments" in caplog.text
        with channel(broker_url) as ch:
            ch.queue_declare(RABBITMQ_DEAD_QUEUE, passive=True)  # still there, arguments untouched


def test_the_dead_letter_queue_keeps_its_newest_dead_maxlen_messages() -> None:
    with rabbitmq_vhost() as broker_url:
        transport = RabbitMQTransport(f"{broker_url}?dead_maxlen=2", SystemClock())
        try:
            transport.publish([TimerMessage(f"o-{n}", 0, 1) for n in range(3)])
            deliveries = take(transport, 3)
            transport.settle(Settlement(dead=[(delivery, "given up") for delivery in deliveries]))
            wait_until(lambda: transport.figures()["dead_letters"] == 2)
        finally:
            transport.close()
        kept = [json.loads(body)["order_id"] for body, _ in dead_letters(broker_url)]
        assert kept == [d.message.order_id for d in deliveries][1:], "the oldest dead letter is dropped"


def test_an_unroutable_timer_is_an_error_and_the_next_connection_declares_the_topology_again(rabbit: Stack) -> None:
    transport = rabbit.timeouts().transport
    transport.publish([TimerMessage("first", 0, 1)])
    with channel(rabbit.broker_url) as ch:
        ch.queue_delete(names(rabbit).ready)  # an operator's mistake: timers due now route nowhere
    with pytest.raises(TransportUnavailable, match="unroutable"):
        transport.publish([TimerMessage("lost", 0, 1)])
    transport.publish([TimerMessage("healed", 0, 1)])
    assert [d.message.order_id for d in transport.receive(10, 10).deliveries] == ["healed"]


def dead_letters(broker_url: str, queue: str = RABBITMQ_DEAD_QUEUE) -> list[tuple[bytes, dict[str, Any]]]:
    found = []
    with channel(broker_url) as ch:
        while True:
            method, properties, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((body, properties.headers or {}))


def test_malformed_messages_are_dead_lettered_with_their_reason_and_the_worker_carries_on(rabbit: Stack) -> None:
    add_orders(rabbit.engine, ["good"])
    client = rabbit.timeouts()
    client.transport.figures()  # connected: the topology is declared
    with channel(rabbit.broker_url) as ch:
        ch.confirm_delivery()
        for body in MALFORMED:
            ch.basic_publish(RABBITMQ_TIMERS_EXCHANGE, routing_key(0, names(rabbit)), body, mandatory=True)
    client.schedule("good", delay=SOON)

    rabbit.drain_until(lambda: finished(rabbit, "good"))
    assert cancel_counts(rabbit.engine) == {"good": 1}
    figures = client.transport.figures()
    assert (figures["dead_letters"], figures["ready"]) == (len(MALFORMED), 0)
    letters = dead_letters(rabbit.broker_url, names(rabbit).dead)
    reasons = {body: headers[RABBITMQ_REASON_HEADER] for body, headers in letters}
    assert reasons.keys() == set(MALFORMED)
    for body, reason in zip(MALFORMED, ("not JSON", "order_id", "non-empty JSON array", "order_id"), strict=True):
        assert reason in reasons[body]


MALFORMED = (
    b"not json at all",
    b'{"order_id": 7, "due_ms": 0, "version": 1}',
    b"[]",
    b'[{"order_id": "fine", "due_ms": 0, "version": 1}, {"order_id": "", "due_ms": 0, "version": 1}]',
)


def take(transport: Any, count: int) -> list[Delivery]:
    """Receive until `count` deliveries have come (they may come over several batches)."""
    taken: list[Delivery] = []
    deadline = time.monotonic() + 20
    while len(taken) < count and time.monotonic() < deadline:
        taken += transport.receive(1000, 1.0).deliveries
    return taken


def test_timers_published_together_share_a_message_acked_once_every_timer_in_it_is_settled(rabbit: Stack) -> None:
    transport = rabbit.timeouts().transport
    now = rabbit.timeouts().clock.now_ms()
    ids = [f"t-{i}" for i in range(ENVELOPE_MAX + 5)]
    transport.publish([TimerMessage(oid, now, 1) for oid in ids])
    assert transport.figures()["ready"] == 2, "one full message and one of 5"

    first = transport.receive(ENVELOPE_MAX - 2, 10).deliveries
    transport.settle(Settlement(done=first))
    assert transport.figures()["ready"] == 0, "both delivered: the first is not acked with 2 timers unsettled"
    transport.close()  # as if the worker died: the broker requeues both messages, whole
    again = take(transport, len(ids))
    assert sorted(d.message.order_id for d in again) == sorted(ids)
    assert {d.deliveries for d in again} == {2}

    # They came back split, one timer per message: settled over two batches, nothing comes back.
    transport.settle(Settlement(done=again[:50]))
    transport.settle(Settlement(done=again[50:]))
    transport.close()
    assert not transport.receive(1000, 1.0).deliveries


def test_a_shared_message_that_comes_back_is_split_so_that_a_poison_timer_is_counted_alone(rabbit: Stack) -> None:
    transport = rabbit.timeouts().transport
    now = rabbit.timeouts().clock.now_ms()
    transport.publish([TimerMessage(oid, now, 1) for oid in ("a", "b", "poison")])
    first = take(transport, 3)
    assert [(d.message.order_id, d.deliveries) for d in first] == [("a", 1), ("b", 1), ("poison", 1)]
    transport.close()  # the worker dies holding the shared message: it comes back whole, and is split

    second = sorted(take(transport, 3), key=lambda d: d.message.order_id)
    assert [(d.message.order_id, d.deliveries) for d in second] == [("a", 2), ("b", 2), ("poison", 2)]
    transport.settle(Settlement(done=second[:2]))
    transport.close()  # the worker dies on the poison timer: only it comes back, still counted
    third = take(transport, 1)
    assert [(d.message.order_id, d.deliveries) for d in third] == [("poison", 3)]
    assert not transport.receive(10, 0.5).deliveries


def test_a_delivery_of_a_failed_batch_comes_back_uncounted_and_can_be_dead_lettered(rabbit: Stack) -> None:
    transport = rabbit.timeouts().transport
    transport.publish([TimerMessage("poison", 0, 1)])
    first = transport.receive(10, 10).deliveries
    assert [(d.message.order_id, d.deliveries) for d in first] == [("poison", 1)]

    # The batch transaction failed (or the fleet is paused): it comes back after FAILED_REDELIVERY_MS,
    # and that says nothing against it: no delivery counted on the broker's or the worker's side.
    failed_at = time.monotonic()
    transport.settle(Settlement(failed=first))
    for _ in range(3):
        again = transport.receive(10, 10).deliveries
        assert [(d.message.order_id, d.deliveries) for d in again] == [("poison", 1)]
        transport.settle(Settlement(failed=again))
    assert time.monotonic() - failed_at >= 2 * FAILED_REDELIVERY_MS / 1000, "not requeued at once"
    again = transport.receive(10, 10).deliveries

    transport.settle(Settlement(dead=[(again[0], "kills every worker")]))
    assert not transport.receive(10, 0.5).deliveries, "acked after dead-lettering"
    [(body, headers)] = dead_letters(rabbit.broker_url, names(rabbit).dead)
    dead = TimerMessage.decode(body)
    # Due when it was handed back last; stamped with this deployment's identity when published.
    assert (dead.order_id, dead.version, dead.deployment) == ("poison", 1, names(rabbit).deployment)
    assert headers[RABBITMQ_REASON_HEADER] == "kills every worker"


def test_an_early_timer_is_held_until_due_and_a_far_too_early_one_re_armed(rabbit: Stack) -> None:
    # Timers are routed to arrive EARLY_MS ahead and wait in the consumer; one that comes far earlier
    # (a delay beyond the cascade's reach, a publisher whose clock runs ahead) goes back to the cascade.
    transport = rabbit.timeouts().transport
    assert not transport.receive(10, 0).deliveries  # connected and consuming
    now = rabbit.timeouts().clock.now_ms()
    due = {"held": now + 1500, "re-armed": now + HOLD_MS + 2000}
    with channel(rabbit.broker_url) as ch:
        ch.confirm_delivery()
        for oid, at in due.items():
            key = routing_key(0, names(rabbit))
            ch.basic_publish(RABBITMQ_TIMERS_EXCHANGE, key, TimerMessage(oid, at, 1).encode())
    assert not transport.receive(10, 0.5).deliveries
    figures = transport.figures()
    assert (figures["delayed"], figures["ready"]) == (1, 0), "one back in the cascade, one held unacked"

    arrived: dict[str, float] = {}
    while len(arrived) < 2:
        batch = transport.receive(10, 10)
        assert batch.deliveries, "both arrive"
        arrived |= {d.message.order_id: time.time() * 1000 for d in batch.deliveries}
        transport.settle(Settlement(done=batch.deliveries))
    for oid, at in due.items():
        assert at <= arrived[oid] < at + 1000, f"{oid} handed over at its due time"


def test_heartbeats_keep_the_connection_while_a_batch_takes_long(rabbit: Stack) -> None:
    # heartbeat=1: the broker drops a connection that is silent for about 2 s.
    transport = RabbitMQTransport(f"{rabbit.broker_url}?heartbeat=1", rabbit.timeouts().clock)
    try:
        transport.publish([TimerMessage("slow-batch", 0, 1)])
        batch = transport.receive(10, 10)
        link = transport._link
        time.sleep(4)  # the worker is in the database; nobody calls the transport
        assert link is not None and link.alive and transport._link is link
        transport.settle(Settlement(done=batch.deliveries))
        assert not transport.receive(10, 0.5).deliveries, "acked on the same connection, not redelivered"
        with channel(rabbit.broker_url) as ch:
            assert ch.queue_declare(RABBITMQ_READY_QUEUE, passive=True).method.message_count == 0
    finally:
        transport.close()


def test_an_overdue_timer_the_broker_holds_with_nothing_ready_is_published_again_by_the_relay(rabbit: Stack) -> None:
    """A timer the registry says was published but that no worker got (a delay queue whose
    dead-lettering stalled when a cluster node was lost): the relay publishes it again once it is
    HELD_GRACE overdue and nothing waits in the ready queue; while a backlog waits, or while the
    fleet is paused, it leaves it to the reconciler."""
    add_orders(rabbit.engine, ["held"])
    client = rabbit.timeouts()
    now = client.clock.now_ms()
    long_ago = now - 2 * int(HELD_GRACE.total_seconds() * 1000)
    with rabbit.engine.begin() as conn:  # confirmed once, then never delivered
        registry.insert_many(conn, [("held", long_ago)], now=long_ago, published=True, replace=False)
    maintenance = Maintenance(client)

    client.transport.publish([TimerMessage("backlog", now, 1)])  # no worker yet: it waits, ready
    wait_until(lambda: client.transport.ready_backlog() == 1, timeout=10)
    assert maintenance.relay().rows == 0, "a backlog waits on the broker: overdue timers are expected"
    client.pause("checking the payments")
    rabbit.drain_until(lambda: client.transport.ready_backlog() == 0)  # the backlog handed back, and its copy
    assert maintenance.relay().rows == 0, "paused: nothing is published again"
    client.resume()
    wait_until(lambda: client.transport.ready_backlog() == 0, timeout=10)
    rabbit.drain_until(lambda: client.transport.ready_backlog() == 0)

    assert maintenance.relay().rows == 1
    rabbit.drain_until(lambda: finished(rabbit, "held"))
    assert cancel_counts(rabbit.engine) == {"held": 1}
    assert maintenance.relay().rows == 0, "a finished timer is not published again"
