from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from consumers.worker import Worker, WorkerTotals
from scheduler import AsyncOrderTimeouts, OrderTimeouts, Settings
from scheduler.config import ENV_BROKER_URL, ENV_DATABASE_URL
from scheduler.schema import init_db
from scheduler.testing import install_cancel_log
from tests.async_client import APIS, BlockingAsyncClient
from tests.stacks import DATABASES, STACKS
from tests.support import wait_until

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stack:
    """One isolated deployment for a test: registry database, broker, orders table with cancel counter."""

    name: str
    database_url: str
    broker_url: str
    opened: list[OrderTimeouts] = field(default_factory=list)
    #: clients of the producer API under test (`client`), closed with the stack
    clients: dict[str, Any] = field(default_factory=dict)

    def timeouts(self, **settings: Any) -> OrderTimeouts:
        """The stack's client; with settings, a new client configured with them."""
        if not settings and self.opened:
            return self.opened[0]
        base = Settings(database_url=self.database_url, broker_url=self.broker_url)
        client = OrderTimeouts(settings=replace(base, **settings))
        self.opened.append(client)
        return client

    def client(self, api: str) -> OrderTimeouts:
        """The stack's client of the producer API `api` (tests/async_client.py: "sync" or "async"),
        typed as the synchronous one: the asyncio one is driven through BlockingAsyncClient."""
        if api == "sync":
            return self.timeouts()
        if api not in self.clients:
            settings = Settings(database_url=self.database_url, broker_url=self.broker_url)
            self.clients[api] = BlockingAsyncClient(AsyncOrderTimeouts(settings=settings))
        return self.clients[api]  # type: ignore[no-any-return]

    @property
    def engine(self) -> Engine:
        if not self.opened:
            self.timeouts()
        return self.opened[0].engine

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, ENV_DATABASE_URL: self.database_url, ENV_BROKER_URL: self.broker_url, **extra}

    def start_worker(
        self, *args: str, capture: bool = False, log_to: Path | None = None, module: str = "scheduler", **env: str
    ) -> subprocess.Popen[str]:
        """A worker process, returned once it is ready (signal handlers installed, loop started), so
        that a SIGTERM sent from now on means "finish the batch and exit", never a kill at start-up.
        Its log (stderr) goes to `log_to` when given, for the test to read."""
        if log_to is None:
            fd, name = tempfile.mkstemp(prefix="worker-", suffix=".log")
            path = Path(name)
        else:
            fd, path = os.open(log_to, os.O_WRONLY | os.O_CREAT | os.O_APPEND), log_to
        argv = [sys.executable, "-m", module, "-v", "worker", *args]
        out = subprocess.PIPE if capture else subprocess.DEVNULL
        process = subprocess.Popen(argv, env=self.env(**env), stdout=out, stderr=fd, text=True, cwd=ROOT)
        os.close(fd)
        try:
            wait_until(lambda: " ready: " in path.read_text() or process.poll() is not None, timeout=60)
        finally:
            log = path.read_text()
            if log_to is None:
                path.unlink()
        assert process.poll() is None or "--burst" in args, log
        return process

    def drain(self, timeouts: OrderTimeouts | None = None, **worker: Any) -> WorkerTotals:
        """Run an in-process worker in burst mode: everything due now gets handled."""
        member = Worker(timeouts or self.timeouts(), burst=True, **worker)
        return member.run()

    def drain_until(
        self,
        condition: Callable[[], bool],
        timeout: float = 20.0,
        client: OrderTimeouts | None = None,
        **worker: Any,
    ) -> WorkerTotals:
        """Drain repeatedly until `condition` holds: brokers deliver due timers on their own clock."""
        client = client or self.timeouts()
        totals = WorkerTotals()
        deadline = time.monotonic() + timeout
        while True:
            run = self.drain(client, **worker)
            for name in ("batches", "claimed", "cancelled", "paid", "already_cancelled", "retried", "dead", "stale"):
                setattr(totals, name, getattr(totals, name) + getattr(run, name))
            if condition():
                return totals
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s; worker totals {totals}")
            time.sleep(0.05)


def open_stack(factory_name: str, table: dict[str, Any], tmp_path: Path) -> Iterator[Stack]:
    with table[factory_name](tmp_path) as (database_url, broker_url):
        yield from deployed(Stack(factory_name, database_url, broker_url))


def deployed(stack: Stack) -> Iterator[Stack]:
    """The stack with its registry and orders tables and the cancel counter; its clients closed after."""
    init_db(stack.engine, stack.opened[0].settings.orders)
    install_cancel_log(stack.engine)
    try:
        yield stack
    finally:
        for blocking in stack.clients.values():
            blocking.close()
        for client in stack.opened:
            client.close()


@pytest.fixture(params=sorted(STACKS))
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """Every transport, each on its own isolated registry and broker namespace."""
    yield from open_stack(request.param, STACKS, tmp_path)


@pytest.fixture(params=sorted(DATABASES))
def db_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """The `sql` transport on each registry database (SQLite file, PostgreSQL schema)."""
    yield from open_stack(request.param, DATABASES, tmp_path)


@pytest.fixture(params=APIS)
def api(request: pytest.FixtureRequest) -> str:
    """The producer API a test drives: OrderTimeouts, or AsyncOrderTimeouts through BlockingAsyncClient."""
    return str(request.param)
