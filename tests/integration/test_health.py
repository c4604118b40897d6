"""A worker's /healthz and /readyz, as Kubernetes' probes read them (docker/k8s): ready only once it
has reached its broker and database, alive as long as its loop comes round, outages included."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.observability import Health
from tests.conftest import ROOT, Stack, deployed
from tests.support import free_port, wait_until


def status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@pytest.fixture
def sqlite_stack(tmp_path: Path) -> Iterator[Stack]:
    yield from deployed(Stack("sql-sqlite", f"sqlite:///{tmp_path / 'registry.sqlite3'}", "sql"))


def worker(stack: Stack, port: int, **env: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "scheduler", "worker", "--metrics-port", str(port)]
    return subprocess.Popen(argv, env=stack.env(**env), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_connected_worker_is_ready_and_alive(sqlite_stack: Stack) -> None:
    port = free_port()
    process = worker(sqlite_stack, port)
    try:
        wait_until(lambda: status(port, "/readyz") == 200, timeout=30, interval=0.05)
        assert status(port, "/healthz") == 200
        assert status(port, "/metrics") == 200
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def test_a_worker_that_cannot_reach_its_broker_is_alive_but_never_ready(sqlite_stack: Stack) -> None:
    port = free_port()
    # Nothing listens on this port: every receive fails and the worker backs off, as in an outage.
    process = worker(sqlite_stack, port, ORDER_TIMEOUTS_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    try:
        wait_until(lambda: status(port, "/healthz") == 200, timeout=30, interval=0.05)
        deadline = time.monotonic() + 3  # a few failed receives and back-offs
        while time.monotonic() < deadline:
            assert status(port, "/readyz") == 503
            assert status(port, "/healthz") == 200, "an outage is no reason to restart the worker"
            time.sleep(0.2)
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_loop_that_stops_coming_round_is_reported_dead() -> None:
    health = Health(stuck_after_s=0.2)
    assert health.alive and not health.ready, "not ready before the first receive"
    health.connected(True)
    assert health.ready
    time.sleep(0.3)  # a batch stuck well past the bound
    assert not health.alive and not health.ready
    health.beat()
    assert health.alive and health.ready
