"""Redis high availability, with real servers and real processes: Redis restarted empty, a Sentinel
failover (primary killed, or demoted while it still answers), a Redis Cluster primary killed, and a
worker frozen with SIGSTOP. Each checks what a user relies on: every order handled, none cancelled
twice, no paid order cancelled, every process still running, and work resumed within a bound.

Servers of our own on the ports set apart for these tests (never the shared Redis on 6379, except
for the frozen-worker tests, which stop a worker and not Redis): a plain redis-server and then a
Sentinel set on 6390/6391 + 26390-26392 (scripts/redis_sentinel.sh), a Redis Cluster with replicas
on 7010-7015 (scripts/redis_cluster.sh). Run with `--log-cli-level=INFO` to see the figures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import redis

from scheduler import Outcome
from scheduler.database import reading
from scheduler.errors import ConfigurationError
from scheduler.registry import count_pending
from scheduler.transports import open_transport
from scheduler.transports.redis.adapter import RedisTransport
from scheduler.transports.redis.keys import redis_timers_key
from scheduler.transports.redis.options import parse_url
from scheduler.transports.redis.sentinel import parse_sentinel_url
from scheduler.transports.rq.adapter import RQTransport
from tests.conftest import Stack, open_stack
from tests.redis_support import broker_url, delete_prefix, redis_prefix
from tests.rq_support import rq_broker_url, rq_namespace
from tests.services import POSTGRES_URL, unique
from tests.slow_store import pausing_after_cancel
from tests.support import add_orders, cancel_counts, order_status, pay, postgres_schema, registry_records, wait_until

pytestmark = pytest.mark.slow
log = logging.getLogger("tests.ha.redis")

ROOT = Path(__file__).resolve().parents[2]
PLAIN_PORT = 6390
SENTINEL_SERVERS = (6390, 6391)
SENTINEL_PORTS = (26390, 26391, 26392)
SENTINEL_SERVICE = "order-timeouts"
SENTINEL_URL = f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in SENTINEL_PORTS)}/{SENTINEL_SERVICE}"
CLUSTER_PORTS = (7010, 7011, 7012, 7013, 7014, 7015)
CLUSTER_ENV = {
    "REDIS_CLUSTER_PORTS": " ".join(map(str, CLUSTER_PORTS)),
    "REDIS_CLUSTER_REPLICAS": "1",
    "REDIS_CLUSTER_DIR": "/tmp/order-timeouts-redis-cluster-ha",
}
#: a frozen worker's timeouts are taken over within this (the default claim_idle_ms / worker_lease bound)
TAKEOVER_BOUND_S = 15.0


def need_redis_server() -> None:
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (scripts/services.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def script(name: str, *args: str, **env: str) -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / name), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def kill_server(pidfile: Path) -> None:
    """SIGKILL: the server gets no chance to hand anything over."""
    os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)


# -- servers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def plain_redis(tmp: Path) -> Iterator[Callable[[], None]]:
    """A redis-server of our own on PLAIN_PORT, without persistence; yields `restart` (comes back empty)."""
    need_redis_server()
    script("redis_sentinel.sh", "stop")  # the Sentinel set shares the port; its fixture starts it again
    process: subprocess.Popen[bytes] | None = None

    def start() -> None:
        nonlocal process
        argv = ["redis-server", "--port", str(PLAIN_PORT), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen(argv, cwd=tmp, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=PLAIN_PORT)
        wait_until(lambda: _answers(client), timeout=10)
        client.close()

    def stop() -> None:
        if process is not None:
            process.kill()
            process.wait()

    def restart() -> None:
        stop()
        start()

    start()
    try:
        yield restart
    finally:
        stop()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[Path]:
    """Primary, replica and 3 sentinels (scripts/redis_sentinel.sh); yields their files' directory."""
    need_redis_server()
    directory = Path("/tmp/order-timeouts-redis-sentinel")
    script("redis_sentinel.sh", "start", REDIS_SENTINEL_DIR=str(directory))
    try:
        yield directory
    finally:
        script("redis_sentinel.sh", "stop", REDIS_SENTINEL_DIR=str(directory))


def sentinel_primary() -> int:
    client = redis.Redis(port=SENTINEL_PORTS[0])
    try:
        return int(client.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)[1])
    finally:
        client.close()


@pytest.fixture(scope="module")
def redis_cluster_with_replicas() -> str:
    """Three primaries with a replica each (left running, like the other services)."""
    need_redis_server()
    script("redis_cluster.sh", **CLUSTER_ENV)
    return f"redis://127.0.0.1:{CLUSTER_PORTS[0]}/0"


# -- a deployment under test ---------------------------------------------------------------------


@dataclass(eq=False)
class Deployment:
    """Worker processes and a maintain process on one stack, and the orders they work on."""

    stack: Stack
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self, workers: int = 2, maintain: bool = True) -> None:
        for _ in range(workers):
            self.processes.append(self.stack.start_worker("--batch-size", "100"))
        if not maintain:
            return
        argv = [sys.executable, "-m", "scheduler", "maintain", "--grace", "60s"]
        # The reconciler's grace stays at 60 s: whatever is republished sooner, the marker found.
        self.processes.append(
            subprocess.Popen(
                argv, env=self.stack.env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
            )
        )

    def schedule(self, count: int, first_due_in: float, every: float, per_due: int = 10, first: int = 0) -> list[str]:
        """`count` orders, `per_due` of them due together every `every` seconds from `first_due_in`."""
        ids = [f"ha-{i:04d}" for i in range(first, first + count)]
        add_orders(self.stack.engine, ids)
        client = self.stack.timeouts()
        start = datetime.now(UTC) + timedelta(seconds=first_due_in)
        for n, at in enumerate(range(0, count, per_due)):
            client.schedule_many(ids[at : at + per_due], due_at=start + timedelta(seconds=n * every))
        return ids

    def pay(self, ids: list[str]) -> set[str]:
        client = self.stack.timeouts()
        for oid in ids:
            assert pay(self.stack.engine, oid) and client.cancel(oid)
        return set(ids)

    def now_ms(self) -> int:
        return self.stack.timeouts().clock.now_ms()

    def pending(self) -> int:
        with reading(self.stack.engine) as conn:
            return count_pending(conn)

    def all_finished(self) -> bool:
        return self.pending() == 0

    def all_published(self) -> bool:
        return all(r.published_ms for r in registry_records(self.stack.engine).values())

    def check(self, ids: list[str], paid: set[str], failed_at_ms: int, within: float) -> dict[str, float]:
        """Wait for every timeout to finish, then check the outcome; returns the figures."""
        wait_until(self.all_finished, timeout=within + 15)
        assert all(p.poll() is None for p in self.processes), "every process survived"
        records = registry_records(self.stack.engine)
        counts = cancel_counts(self.stack.engine)
        status = order_status(self.stack.engine)
        unpaid = [oid for oid in ids if oid not in paid]
        assert counts == dict.fromkeys(unpaid, 1), "each unpaid order cancelled exactly once"
        assert all(status[oid] == "PAID" for oid in paid), "no paid order cancelled"
        cancelled = [records[oid] for oid in unpaid]
        assert all(r.outcome is Outcome.CANCELLED for r in cancelled)
        after = sorted(r.finished_ms for r in cancelled if r.finished_ms and r.finished_ms >= failed_at_ms)
        assert after, "timeouts came due after the failure"
        lateness = sorted((r.finished_ms or 0) - r.due_ms for r in cancelled)
        figures = {
            "first_cancel_after_s": (after[0] - failed_at_ms) / 1000,
            "lateness_p99_s": lateness[int(len(lateness) * 0.99) - 1] / 1000,
            "lateness_max_s": lateness[-1] / 1000,
        }
        assert figures["first_cancel_after_s"] <= within, figures
        return figures

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def deployment(tmp: Path, database_url: str, broker: str) -> Iterator[Deployment]:
    stacks = {"ha": lambda _: contextlib.nullcontext((database_url, broker))}
    for stack in open_stack("ha", stacks, tmp):
        run = Deployment(stack)
        try:
            yield run
        finally:
            run.stop()


@contextlib.contextmanager
def side_by_side(
    tmp: Path, brokers: dict[str, str], database_url: Callable[[], Any] = postgres_schema
) -> Iterator[dict[str, Deployment]]:
    """A deployment per transport (its own registry schema and namespace), all through one failure."""
    with contextlib.ExitStack() as stack:
        runs = {}
        for name, broker in brokers.items():
            url = stack.enter_context(database_url())
            runs[name] = stack.enter_context(deployment(tmp / name, url, broker))
        yield runs


def both(base: str) -> dict[str, str]:
    """A redis and an rq broker URL on `base`, each with a key prefix or queue of its own."""
    name = unique("ha")
    return {"redis": broker_url(name, base), "rq": rq_broker_url(name, base)}


def start_under_load(runs: dict[str, Deployment]) -> dict[Deployment, tuple[list[str], set[str]]]:
    """Start each deployment's processes, then 200 timeouts due one after another from 2.5 s on, every
    tenth order paid: the scheduled ids and the paid ones, by deployment."""
    for run in runs.values():
        run.start()
    orders = {}
    for run in runs.values():
        ids = run.schedule(200, first_due_in=2.5, every=0.2)
        orders[run] = (ids, run.pay(ids[::10]))
    return orders


def report(name: str, figures: dict[str, float]) -> None:
    log.info("%s: %s", name, ", ".join(f"{k}={v:.2f}" for k, v in figures.items()))


# -- Redis restarted empty -----------------------------------------------------------------------


def test_a_redis_restarted_empty_is_refilled_by_the_relay_within_seconds(tmp_path: Path) -> None:
    with (
        plain_redis(tmp_path) as restart,
        side_by_side(tmp_path, both(f"redis://127.0.0.1:{PLAIN_PORT}/0")) as runs,
    ):
        orders = start_under_load(runs)
        for run in runs.values():
            wait_until(run.all_published, timeout=10)
        time.sleep(3.0)  # timeouts are coming due and being cancelled
        failed_at = next(iter(runs.values())).now_ms()
        restart()  # every timer still waiting in Redis is gone
        for name, run in runs.items():
            figures = run.check(*orders[run], failed_at, within=6.0)
            report(f"{name}: Redis restarted empty", figures)
            assert figures["lateness_max_s"] < 10, "refilled through the marker, not after the reconciler's 60 s grace"


# -- Sentinel ------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["demote", "kill"])
def test_workers_maintain_and_the_api_follow_a_sentinel_failover(
    failure: str, sentinel_set: Path, tmp_path: Path
) -> None:
    # A server killed by the test before comes back as a replica, and the sentinels see it again.
    script("redis_sentinel.sh", "start", REDIS_SENTINEL_DIR=str(sentinel_set))
    with side_by_side(tmp_path, both(SENTINEL_URL)) as runs:
        orders = start_under_load(runs)
        time.sleep(3.0)  # timeouts are coming due and being cancelled
        old = sentinel_primary()
        failed_at = next(iter(runs.values())).now_ms()
        if failure == "kill":
            kill_server(sentinel_set / str(old) / "redis.pid")
        else:  # the old primary stays up, as a replica: a write to it fails with READONLY
            redis.Redis(port=SENTINEL_PORTS[0]).sentinel_failover(SENTINEL_SERVICE)
        for run in runs.values():
            ids, paid = orders[run]
            orders[run] = (
                ids + run.schedule(20, first_due_in=1.0, every=0.1, first=len(ids)),
                paid,
            )  # the API, meanwhile
        for name, run in runs.items():
            figures = run.check(*orders[run], failed_at, within=10.0)
            report(f"{name}: Sentinel failover ({failure})", figures)
        assert sentinel_primary() != old


# -- Redis Cluster -------------------------------------------------------------------------------


def test_the_redis_transport_follows_a_cluster_failover(redis_cluster_with_replicas: str, tmp_path: Path) -> None:
    seed = redis.cluster.RedisCluster.from_url(redis_cluster_with_replicas)
    prefix = unique("ha")
    cluster_url = broker_url(prefix, redis_cluster_with_replicas, cluster=1, shards=3)
    try:
        with side_by_side(tmp_path, {"redis": cluster_url}) as runs:
            run = runs["redis"]
            transport = run.stack.timeouts().transport
            assert isinstance(transport, RedisTransport)
            victim = seed.get_node_from_key(redis_timers_key(transport.namespace, 0))
            run.start()
            ids = run.schedule(200, first_due_in=2.0, every=0.2)
            paid = run.pay(ids[::10])
            time.sleep(3.0)
            failed_at = run.now_ms()
            kill_server(Path(CLUSTER_ENV["REDIS_CLUSTER_DIR"]) / str(victim.port) / "redis.pid")
            try:
                figures = run.check(ids, paid, failed_at, within=12.0)
            finally:
                script("redis_cluster.sh", **CLUSTER_ENV)  # the killed node rejoins, as a replica
            report("redis: cluster primary killed", figures)
    finally:
        with contextlib.suppress(redis.RedisError):
            delete_prefix(seed, prefix)
        seed.close()


# -- a frozen worker -----------------------------------------------------------------------------


@contextlib.contextmanager
def frozen_transactions_end() -> Iterator[str]:
    """A registry schema whose sessions PostgreSQL ends when they stay idle in a transaction for 3 s:
    a frozen worker's open batch transaction would otherwise hold its rows' locks, and the worker
    that takes its timeouts over would wait on them (docs/operations.md)."""
    with postgres_schema() as url:
        options = parse_qs(urlsplit(url).query)["options"][0]
        yield f"{POSTGRES_URL}?options={quote(f'{options} -cidle_in_transaction_session_timeout=3000')}"


def test_a_frozen_worker_holds_its_timeouts_for_at_most_15_seconds(tmp_path: Path) -> None:
    with (
        redis_prefix() as prefix,
        rq_namespace() as queue,
        side_by_side(
            tmp_path, {"redis": broker_url(prefix), "rq": rq_broker_url(queue)}, frozen_transactions_end
        ) as runs,
    ):
        frozen: dict[str, tuple[subprocess.Popen[str], float]] = {}
        orders = {}
        for name, run in runs.items():
            run.start(workers=0)
            # The relay's first run finds no marker and publishes every pending timeout again, which
            # would hand the frozen worker's timeouts over at once: let it happen before they exist.
            broker_side = run.stack.timeouts().transport
            assert isinstance(broker_side, RedisTransport | RQTransport)
            wait_until(lambda side=broker_side: not side.lost_timers(), timeout=10)
            orders[name] = run.schedule(40, first_due_in=0.5, every=0.1)
            marker = tmp_path / f"{name}-mid-batch"
            worker = run.stack.start_worker(
                "--batch-size", "100", **pausing_after_cancel(marker), ORDER_TIMEOUTS_TEST_PAUSE_S="1"
            )
            run.processes.append(worker)
            wait_until(marker.exists, timeout=20, interval=0.005)
            worker.send_signal(signal.SIGSTOP)  # inside its batch: cancels made, not committed, nothing acked
            frozen[name] = (worker, time.monotonic())
            assert marker.read_text(), "the frozen worker took timeouts"
        for run in runs.values():
            run.start(workers=1, maintain=False)
        for name, run in runs.items():
            wait_until(run.all_finished, timeout=TAKEOVER_BOUND_S + 10)
            taken_over_s = time.monotonic() - frozen[name][1]
            report(f"{name}: frozen worker", {"taken_over_after_s": taken_over_s})
            assert taken_over_s <= TAKEOVER_BOUND_S, f"{name}: taken over after {taken_over_s:.1f}s"

        for worker, _ in frozen.values():
            worker.send_signal(signal.SIGCONT)  # its commit fails (session ended), its settle comes late
        time.sleep(3.0)
        for name, run in runs.items():
            assert cancel_counts(run.stack.engine) == dict.fromkeys(orders[name], 1), "nothing cancelled twice"
            assert all(p.poll() is None for p in run.processes), "the woken worker carries on"
            assert run.pending() == 0


# -- the sentinel URL ----------------------------------------------------------------------------


def test_the_sentinel_url_names_sentinels_service_database_and_credentials() -> None:
    target = parse_sentinel_url("redis+sentinel://app:s%40cret@h1:26379,h2,[::1]:26380/orders/2?socket_timeout=2.5")
    assert target.sentinels == (("h1", 26379), ("h2", 26379), ("::1", 26380))
    assert (target.service, target.db, target.username, target.password) == ("orders", 2, "app", "s@cret")
    assert target.redis_options == {"socket_timeout": 2.5}
    assert not target.sentinel_auth
    url, options = parse_url("redis+sentinel://:pw@h1/orders?prefix=shop&claim_idle_ms=5000&sentinel_auth=1")
    assert options.prefix == "shop" and options.claim_idle_ms == 5000
    assert parse_sentinel_url(url).sentinel_auth


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:hunter2@h1:26379",  # no service
        "redis+sentinel://:hunter2@h1:26379/",
        "redis+sentinel://:hunter2@h1:port/orders",
        "redis+sentinel://:hunter2@h1:99999/orders",
        "redis+sentinel://:hunter2@h1,,h2/orders",
        "redis+sentinel://:hunter2@[::1/orders",
        "redis+sentinel://:hunter2@h1/orders/db",
        "redis+sentinel://:hunter2@h1/orders/0/more",
        "redis+sentinel://:hunter2@h1/orders?db=1",
        "redis+sentinel://:hunter2@h1/orders?cluster=1",
        "redis+sentinel://:hunter2@h1/orders?sentinel_auth=maybe",
        "redis+sentinel://:hunter2@h1/orders?socket_timeout=soon",
        "redis+sentinel://:hunter2@h1/orders?claim_idle_ms=0",
        "rq+redis+sentinel://:hunter2@h1:26379",
        "rq+redis+sentinel://:hunter2@h1/orders/x",
    ],
)
def test_a_bad_sentinel_url_is_refused_at_start_up_without_showing_its_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        open_transport(url, None, None)  # type: ignore[arg-type]  # refused before either is used
    assert "hunter2" not in str(refused.value)
    assert "sentinel" in str(refused.value) or "option" in str(refused.value)


def test_both_transports_take_the_sentinel_schemes() -> None:
    redis_transport = open_transport("redis+sentinel://h1/orders", None, None)  # type: ignore[arg-type]
    rq_transport = open_transport("rq+redis+sentinel://h1/orders", None, None)  # type: ignore[arg-type]
    assert isinstance(redis_transport, RedisTransport) and isinstance(rq_transport, RQTransport)
