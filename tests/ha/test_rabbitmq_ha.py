"""The rabbitmq transport on a 3-node cluster (scripts/rabbitmq_cluster.sh): nodes killed, frozen and
emptied under real worker and maintain processes.

One cluster serves the module; a node one test kills is started again before the next test. Each
test has its own vhost on the cluster and its own registry schema. The figures the tests measure
are logged (`pytest -o log_cli=true` shows them) and recorded as test properties (JUnit XML);
docs/operations.md quotes them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from scheduler import OrderTimeouts, Outcome, TimeoutState
from scheduler.errors import ConfigurationError, TransportUnavailable
from scheduler.maintenance import Maintenance
from scheduler.transports.base import TimerMessage
from scheduler.transports.rabbitmq.adapter import RabbitMQTransport
from scheduler.transports.rabbitmq.options import rabbitmq_options
from scheduler.transports.rabbitmq.topology import Queue, declarations
from tests.conftest import ROOT, Stack, open_stack
from tests.rabbitmq_support import (
    CLUSTER_PORTS,
    add_cluster_vhost,
    cluster_url,
    declare_topology,
    delete_cluster_vhost,
    rabbitmq_cluster,
)
from tests.support import add_orders, cancel_counts, order_status, postgres_schema, registry_records, wait_until

SECRET = "s3cr3t-pw"
log = logging.getLogger("order_timeouts.tests.ha")
Record = Callable[[str, object], None]


# -- the URL: no broker needed -----------------------------------------------------------------------


def test_a_url_with_several_hosts_gives_each_host_every_option() -> None:
    options = rabbitmq_options(
        f"amqps://app:{SECRET}@r1.example:5671,r2.example,[::1]:5699/orders?heartbeat=9&quorum_group_size=5"
    )
    assert [(h.host, h.port) for h in options.hosts] == [("r1.example", 5671), ("r2.example", 5671), ("::1", 5699)]
    assert {h.virtual_host for h in options.hosts} == {"orders"}
    assert {h.heartbeat for h in options.hosts} == {9}
    assert all(h.ssl_options is not None and h.credentials.password == SECRET for h in options.hosts)
    assert options.quorum_group_size == 5
    queues = [step for step in declarations(5) if isinstance(step, Queue)]
    assert {queue.arguments.get("x-quorum-initial-group-size") for queue in queues} == {5}


def test_without_options_the_transport_defaults_apply_and_the_broker_sizes_the_quorum_groups() -> None:
    options = rabbitmq_options("amqp://guest:guest@127.0.0.1:5681,127.0.0.1:5682/%2F")
    assert [h.heartbeat for h in options.hosts] == [4, 4], "a frozen worker's deliveries move within 3 heartbeats"
    assert options.quorum_group_size is None
    queues = [step for step in declarations() if isinstance(step, Queue)]
    assert all("x-quorum-initial-group-size" not in queue.arguments for queue in queues)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"amqp://u:{SECRET}@h1:5672,,h3:5672/v", "an empty host"),
        (f"amqp://u:{SECRET}@h1:5672,h2:5672,/v", "an empty host"),
        (f"amqp://u:{SECRET}@h1:5672,h2:notaport/v", "port 'notaport' of h2"),
        (f"amqp://u:{SECRET}@h1:5672,h2:70000/v", "port '70000' of h2"),
        (f"amqp://u:{SECRET}@h1:1:2/v", "is not host or host:port"),
        (f"amqp://u:{SECRET}@/v", "no host"),
        (f"http://u:{SECRET}@h1/v", "scheme must be amqp or amqps"),
        (f"amqp://u:{SECRET}@h1,h2/v?quorum_group_size=0", "quorum_group_size='0'"),
        (f"amqp://u:{SECRET}@h1,h2/v?no_such_option=1", "Unknown URL parameter"),
    ],
)
def test_a_bad_url_names_the_problem_and_never_the_password(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        rabbitmq_options(url)
    assert problem in str(caught.value)
    assert SECRET not in str(caught.value)


# -- the cluster -----------------------------------------------------------------------------------------


class Cluster:
    """The module's cluster; a node killed by one test is started again before the next one needs it."""

    def __init__(self) -> None:
        self.killed: set[int] = set()
        self.leftover_vhosts: list[str] = []  # of tests that ended with a node down

    def kill(self, node: int) -> None:
        self.killed.add(node)
        rabbitmq_cluster("kill", str(node))

    def whole(self) -> None:
        if self.killed:
            rabbitmq_cluster("start")
            self.killed.clear()


@pytest.fixture(scope="module")
def whole_cluster() -> Iterator[Cluster]:
    """The local cluster, started for this module unless it was running already (then left running)."""
    try:
        rabbitmq_cluster("status")
        started_here = False
    except AssertionError:
        started_here = True
    began = time.monotonic()
    rabbitmq_cluster("start")
    if started_here:
        log.warning("cluster started in %.1fs", time.monotonic() - began)
    nodes = Cluster()
    yield nodes
    if started_here:
        rabbitmq_cluster("stop")
    else:
        nodes.whole()
        for vhost in nodes.leftover_vhosts:
            delete_cluster_vhost(vhost)


@pytest.fixture
def cluster(whole_cluster: Cluster) -> Cluster:
    """All three nodes up."""
    whole_cluster.whole()
    return whole_cluster


@contextlib.contextmanager
def ha_stack(cluster: Cluster, tmp_path: Path, first: int = 1) -> Iterator[Stack]:
    """Registry on a fresh PostgreSQL schema, topology in a fresh vhost of the cluster; every client
    connects to node `first` while it is up."""

    @contextlib.contextmanager
    def factory(_tmp: Path) -> Iterator[tuple[str, str]]:
        with postgres_schema() as database_url:
            vhost = add_cluster_vhost(first)
            try:
                broker_url = cluster_url(vhost, first)
                declare_topology(broker_url, database_url)
                yield database_url, broker_url
            finally:
                if cluster.killed:
                    cluster.leftover_vhosts.append(vhost)
                else:
                    delete_cluster_vhost(vhost)

    with contextlib.contextmanager(open_stack)("rabbitmq-cluster", {"rabbitmq-cluster": factory}, tmp_path) as stack:
        yield stack


def start_maintain(stack: Stack, log_file: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "scheduler", "-v", "maintain", "--relay-interval", "0.2s", "--grace", "60s"]
    with log_file.open("wb") as stderr:
        return subprocess.Popen(argv, env=stack.env(), stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT)


def stop_all(processes: list[subprocess.Popen[str]] | list[subprocess.Popen[bytes]]) -> list[int]:
    for process in processes:
        process.send_signal(signal.SIGCONT)  # a frozen process cannot handle SIGTERM
        process.send_signal(signal.SIGTERM)
    return [process.wait(timeout=60) for process in processes]


def pending(stack: Stack) -> list[str]:
    return [oid for oid, r in registry_records(stack.engine).items() if r.state is TimeoutState.PENDING]


def lateness_ms(stack: Stack, ids: list[str]) -> list[int]:
    records = registry_records(stack.engine)
    return sorted(r.finished_ms - r.due_ms for oid in ids if (r := records[oid]).finished_ms is not None)


def p99(values: list[int]) -> int:
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def now_ms(client: OrderTimeouts) -> int:
    return client.clock.now_ms()


def test_a_worker_frozen_holding_deliveries_loses_them_to_another_within_15_s_and_wakes_harmlessly(
    cluster: Cluster, tmp_path: Path, record_property: Record
) -> None:
    with ha_stack(cluster, tmp_path) as stack:
        ids = [f"f-{i:02d}" for i in range(40)]
        add_orders(stack.engine, [*ids, "after-wake"])
        frozen = stack.start_worker("--batch-size", "100")
        other = stack.start_worker("--batch-size", "100")
        processes = [frozen, other]
        try:
            client = stack.timeouts()
            client.schedule_many(ids, delay=timedelta(seconds=3))
            due_ms = registry_records(stack.engine)[ids[0]].due_ms
            # Both consumers hold their share, unacked, from 0.5-1.5 s before the due time.
            time.sleep(max(0.0, (due_ms - now_ms(client)) / 1000 - 0.3))
            frozen.send_signal(signal.SIGSTOP)
            wait_until(lambda: not pending(stack), timeout=25, interval=0.1)
            late = lateness_ms(stack, ids)
            handled_by = {r.worker for r in registry_records(stack.engine).values() if r.finished_ms}
            record_property("frozen_worker_takeover_s", late[-1] / 1000)
            log.warning("frozen worker: its timers handled %.1fs after due", late[-1] / 1000)
            assert late[-1] <= 15_000, "the frozen worker held its timers longer than 15 s"
            assert len(handled_by) == 1 and late[-1] > 3000, "the frozen worker held a share until the broker gave up"

            frozen.send_signal(signal.SIGCONT)
            time.sleep(2)  # it wakes on a dead connection and its late acks
            assert stop_all([other]) == [0]
            client.schedule("after-wake", delay=timedelta(milliseconds=200))
            wait_until(lambda: not pending(stack), timeout=20, interval=0.1)
            assert frozen.poll() is None, "the woken worker carries on"
            assert registry_records(stack.engine)["after-wake"].worker not in handled_by, "it reconnected"
        finally:
            codes = stop_all(processes)
        assert codes[0] == 0
        assert cancel_counts(stack.engine) == dict.fromkeys([*ids, "after-wake"], 1)


def rebuild_vhost(vhost: str) -> None:
    """What a cluster rebuilt from scratch leaves of the transport's queues: nothing. The vhost goes
    (closing every connection to it) and comes back empty."""
    rabbitmq_cluster("ctl", "2", "-q", "delete_vhost", vhost)
    rabbitmq_cluster("ctl", "2", "-q", "add_vhost", vhost)
    rabbitmq_cluster("ctl", "2", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")


def test_queues_lost_with_their_timers_are_refilled_by_the_relay_at_once(
    cluster: Cluster, tmp_path: Path, record_property: Record
) -> None:
    with ha_stack(cluster, tmp_path) as stack:
        ids = [f"l-{i:02d}" for i in range(60)]
        add_orders(stack.engine, ids)
        worker = stack.start_worker("--batch-size", "100")
        maintain = start_maintain(stack, tmp_path / "maintain.log")
        try:
            client = stack.timeouts()
            transport = client.transport
            assert isinstance(transport, RabbitMQTransport)
            client.schedule_many(ids, delay=timedelta(seconds=4))
            # The relay has published everything and left its marker: the broker holds it all.
            wait_until(
                lambda: (
                    all(r.published_ms for r in registry_records(stack.engine).values()) and not transport.lost_timers()
                ),
                timeout=20,
                interval=0.1,
            )
            rebuild_vhost(rabbitmq_options(stack.broker_url).hosts[0].virtual_host)
            back_ms = now_ms(client)
            wait_until(lambda: not pending(stack), timeout=40, interval=0.1)
            refilled_s = (max(r.finished_ms or 0 for r in registry_records(stack.engine).values()) - back_ms) / 1000
            record_property("queues_lost_all_handled_after_return_s", refilled_s)
            log.warning("queues lost: all handled %.1fs after the broker's return", refilled_s)
            # The relay's backoff, then declaring the transport's quorum queues anew (seconds on a
            # busy 3-node cluster), then the timers: well within the reconciler's 60 s grace.
            assert refilled_s < 20, "republished at once, not after the reconciler's 60 s grace"
            assert worker.poll() is None and maintain.poll() is None
        finally:
            codes = stop_all([worker, maintain])
        assert codes == [0, 0]
        assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)


def test_a_nacked_publish_is_not_counted_as_sent_and_the_relay_sends_it_again(cluster: Cluster, tmp_path: Path) -> None:
    with ha_stack(cluster, tmp_path) as stack:
        ids = [f"n-{i:02d}" for i in range(20)]
        add_orders(stack.engine, ids)
        vhost = rabbitmq_options(stack.broker_url).hosts[0].virtual_host
        # A full queue that rejects publishes (x-overflow reject-publish) makes the broker nack them.
        policy = ["full", "^order_timeouts\\.(delay|[0-9a-f]{12}\\.ready)", '{"max-length": 0}']
        rabbitmq_cluster("ctl", "1", "-q", "set_policy", "-p", vhost, "--apply-to", "queues", *policy)
        client = stack.timeouts()
        client.transport.publish([TimerMessage("filler", 0, 1)])  # a queue at max-length 0 takes one, then is full
        client.schedule_many(ids, delay=timedelta(milliseconds=500))
        assert all(r.published_ms is None for r in registry_records(stack.engine).values()), "nacked: not sent"
        rabbitmq_cluster("ctl", "1", "-q", "clear_policy", "-p", vhost, "full")
        assert Maintenance(client).relay().rows == len(ids)
        stack.drain_until(lambda: not pending(stack))
        assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)


def relayed_everything(client: OrderTimeouts) -> bool:
    try:
        client.publish_unpublished()
    except TransportUnavailable:
        return False
    return all(r.published_ms is not None for r in registry_records(client.engine).values())


def test_a_publish_cut_off_before_its_confirms_is_not_counted_as_sent_and_the_relay_sends_it_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    with ha_stack(cluster, tmp_path) as stack:
        ids = [f"c-{i:02d}" for i in range(50)]
        add_orders(stack.engine, ids)
        client = stack.timeouts()
        transport = client.transport
        assert isinstance(transport, RabbitMQTransport)
        transport.figures()  # connected
        assert transport._link is not None and transport._link.host is not None
        node = CLUSTER_PORTS.index(transport._link.host.port) + 1
        try:
            rabbitmq_cluster("freeze", str(node))  # it takes the messages and confirms nothing
            scheduling = threading.Thread(
                target=client.schedule_many, args=(ids,), kwargs={"delay": timedelta(seconds=1)}
            )
            scheduling.start()
            time.sleep(1)
            assert scheduling.is_alive(), "the publish waits for its confirms"
            cluster.kill(node)
            scheduling.join(timeout=20)
            assert not scheduling.is_alive()
            assert all(r.published_ms is None for r in registry_records(stack.engine).values()), "none counted as sent"

            # The relay publishes them through another node, once the queues that had their leader on
            # the lost node have elected another (until then the broker nacks, and the rows stay).
            wait_until(lambda: relayed_everything(client), timeout=20, interval=0.2)
            stack.drain_until(lambda: not pending(stack))
            assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)
        finally:
            if node not in cluster.killed:
                rabbitmq_cluster("thaw", str(node))


def test_workers_maintain_and_the_api_carry_on_when_the_node_they_use_is_killed(
    cluster: Cluster, tmp_path: Path, record_property: Record
) -> None:
    with ha_stack(cluster, tmp_path, first=1) as stack:
        ids = [f"k-{i:03d}" for i in range(300)]
        during = [f"d-{i:02d}" for i in range(30)]
        paid = set(ids[::4])
        add_orders(stack.engine, [oid for oid in [*ids, *during] if oid not in paid])
        add_orders(stack.engine, paid, status="PAID")  # paid before their deadline
        workers = [stack.start_worker("--batch-size", "50") for _ in range(2)]
        maintain = start_maintain(stack, tmp_path / "maintain.log")
        processes = [*workers, maintain]
        try:
            client = stack.timeouts()
            client.schedule_many([(oid, timedelta(milliseconds=1500 + 20 * i)) for i, oid in enumerate(ids)])
            time.sleep(3.5)  # orders are coming due all along
            killed_ms = now_ms(client)
            cluster.kill(1)
            for oid in during:  # the order service schedules on through the failover
                client.schedule(oid, delay=timedelta(milliseconds=500))
            try:
                wait_until(lambda: not pending(stack), timeout=40, interval=0.1)
            except AssertionError:
                left = {oid: registry_records(stack.engine)[oid] for oid in pending(stack)}
                figures = {k: v for k, v in client.transport.figures().items() if v}
                raise AssertionError(f"{len(left)} left pending, queues {figures}: {list(left.values())[:2]}") from None

            records = registry_records(stack.engine)
            after = [r.finished_ms for r in records.values() if r.finished_ms and r.finished_ms > killed_ms]
            first_after_s = (min(after) - killed_ms) / 1000
            due_after = [oid for oid, r in records.items() if r.due_ms > killed_ms]
            resumed_s = max(lateness_ms(stack, due_after)) / 1000
            late = lateness_ms(stack, [*ids, *during])
            record_property("node_kill_to_first_cancel_s", first_after_s)
            record_property("node_kill_lateness_p99_s", p99(late) / 1000)
            record_property("node_kill_latest_due_after_s", resumed_s)
            log.warning(
                "node killed: first cancel %.1fs after; lateness p99 %.1fs; due after it: at most %.1fs late",
                first_after_s,
                p99(late) / 1000,
                resumed_s,
            )
            assert resumed_s <= 5, "work resumes within 5 s of the node's loss"
            assert all(process.poll() is None for process in processes), "no process exits"
        finally:
            codes = stop_all(processes)
        assert codes == [0, 0, 0]
        unpaid = [oid for oid in [*ids, *during] if oid not in paid]
        assert cancel_counts(stack.engine) == dict.fromkeys(unpaid, 1), "each unpaid order cancelled once"
        statuses = order_status(stack.engine)
        assert all(statuses[oid] == "PAID" for oid in paid), "no paid order cancelled"
        assert all(records[oid].outcome is Outcome.PAID for oid in paid)
