"""Unit tests: no server and no sleep. The registry is a SQLite file, the broker `InMemoryTransport`,
time a `ManualClock`; a test moves the clock and drains with a burst worker."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from consumers.handler import Handler, RetryPolicy
from consumers.orders.sql import SqlOrderStore
from consumers.worker import Worker, WorkerTotals
from scheduler import OrderTimeouts, Settings
from scheduler.database import make_engine
from scheduler.schema import init_db
from scheduler.testing import InMemoryTransport, ManualClock


@dataclass
class Shop:
    """An order service's database with the registry beside it, a broker in memory and a clock."""

    timeouts: OrderTimeouts
    transport: InMemoryTransport
    clock: ManualClock

    def add_orders(self, *ids: str, status: str = "PENDING") -> None:
        with self.timeouts.engine.begin() as conn:
            conn.execute(
                text("INSERT INTO orders (id, status) VALUES (:id, :s)"), [{"id": i, "s": status} for i in ids]
            )

    def status(self, order_id: str) -> str:
        with self.timeouts.engine.connect() as conn:
            return str(conn.execute(text("SELECT status FROM orders WHERE id = :id"), {"id": order_id}).scalar_one())

    def drain(self, **worker: object) -> WorkerTotals:
        """One burst worker: handles everything due by the clock, then returns."""
        return Worker(self.timeouts, burst=True, **worker).run()  # type: ignore[arg-type]

    def handler(self) -> Handler:
        """The handler a worker of this shop runs, for tests that drive one batch by hand."""
        return Handler(
            self.timeouts.engine,
            SqlOrderStore(self.timeouts.settings.orders),
            clock=self.clock,
            worker_id="unit",
            outbox=self.timeouts.outbox,
            retry=RetryPolicy.from_settings(self.timeouts.settings),
        )

    def later(self, **delta: float) -> None:
        self.clock.advance(timedelta(**delta))


@pytest.fixture(scope="session")
def migrated_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with its orders table, migrated once; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "registry.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    init_db(engine, Settings().orders)
    engine.dispose()
    return path


@pytest.fixture
def shop(migrated_registry: Path, tmp_path: Path) -> Iterator[Shop]:
    path = tmp_path / "registry.sqlite3"
    shutil.copy(migrated_registry, path)
    clock = ManualClock()
    transport = InMemoryTransport(clock)
    settings = Settings(database_url=f"sqlite:///{path}", broker_url="memory", retry_backoff=timedelta(seconds=2))
    timeouts = OrderTimeouts(settings=settings, clock=clock, transport=transport)
    try:
        yield Shop(timeouts, transport, clock)
    finally:
        timeouts.close()
