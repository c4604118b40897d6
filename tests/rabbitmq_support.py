"""The `rabbitmq` stack for the contract suite, and RabbitMQ helpers for tests/integration/test_rabbitmq.py.

Each test gets its own vhost on the shared broker (rabbitmqctl add_vhost / delete_vhost): queues,
exchanges and messages of one test are invisible to every other test and vanish with the vhost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pytest

from scheduler.clock import SystemClock
from scheduler.database import make_engine
from scheduler.schema import init_db
from scheduler.transports.rabbitmq.adapter import RabbitMQTransport
from tests.services import RABBITMQ_URL, require, unique
from tests.support import postgres_schema


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed: cannot make a vhost per test")
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def vhost_url(vhost: str, base: str = RABBITMQ_URL) -> str:
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), parts.query, ""))


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A fresh vhost that guest may use; yields its broker URL and deletes it afterwards."""
    require("RabbitMQ", 5672)
    vhost = unique("ot")
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost_url(vhost)
    finally:
        rabbitmqctl("delete_vhost", vhost)


def declare_topology(broker_url: str, database_url: str | None = None) -> None:
    """What a deployment's first worker does: create the quorum queues (about half a second here);
    and what its relay's first run leaves: the marker saying the broker holds its timers.

    Done before the test starts, so that the test's first schedule() publishes in milliseconds, and
    its first relay run publishes only what is unpublished, as on a broker already in service. With
    the registry's database, the registry is created first and the queues are its deployment's.
    """
    engine = None
    if database_url is not None:
        engine = make_engine(database_url)
        init_db(engine, None)
    transport = RabbitMQTransport(broker_url, SystemClock(), engine)
    try:
        transport.timers_restored()
    finally:
        transport.close()
        if engine is not None:
            engine.dispose()


@contextlib.contextmanager
def rabbitmq_stack(tmp: Path, **options: object) -> Iterator[tuple[str, str]]:
    """Registry on a fresh PostgreSQL schema, broker topology in a fresh vhost; `options` go into the URL."""
    with postgres_schema() as database_url, rabbitmq_vhost() as broker_url:
        if options:
            broker_url += "?" + "&".join(f"{key}={value}" for key, value in options.items())
        declare_topology(broker_url, database_url)
        yield database_url, broker_url


@contextlib.contextmanager
def channel(broker_url: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A plain pika channel on the test's vhost, for poking at queues from the outside."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        yield connection.channel()
    finally:
        connection.close()


# -- the local 3-node cluster of scripts/rabbitmq_cluster.sh (tests/ha) ------------------------------

CLUSTER_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rabbitmq_cluster.sh"
#: AMQP ports of the cluster's nodes 1, 2 and 3, as the script's defaults
CLUSTER_PORTS = (5681, 5682, 5683)


def rabbitmq_cluster(*args: str, timeout: float = 180.0) -> str:
    """scripts/rabbitmq_cluster.sh with these arguments; its output. A machine without RabbitMQ
    skips the test, and fails it when CI=true."""
    if shutil.which("rabbitmq-server") is None and not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists():
        message = "rabbitmq-server is not installed: no local cluster (scripts/rabbitmq_cluster.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run([str(CLUSTER_SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"rabbitmq_cluster.sh {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def cluster_url(vhost: str, first: int = 1) -> str:
    """The multi-host URL of the cluster, node `first` listed first (the one clients connect to)."""
    ports = [*CLUSTER_PORTS[first - 1 :], *CLUSTER_PORTS[: first - 1]]
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    return f"amqp://guest:guest@{hosts}/{quote(vhost, safe='')}"


def add_cluster_vhost(node: int = 1) -> str:
    """A fresh vhost on the cluster (asked through node `node`, which must be up) that guest may use."""
    vhost = unique("ha")
    rabbitmq_cluster("ctl", str(node), "-q", "add_vhost", vhost)
    rabbitmq_cluster("ctl", str(node), "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return vhost


def delete_cluster_vhost(vhost: str) -> None:
    """Delete a vhost of the cluster. Do it with every node up: deleting a quorum queue waits for the
    replicas of a node that is down (seconds per queue)."""
    rabbitmq_cluster("ctl", "1", "-q", "delete_vhost", vhost)
