"""What is AsyncOrderTimeouts's own: the caller's AsyncSession or AsyncConnection on each asyncio driver,
the publish after an AsyncSession's commit, a broker outage, an event loop that is never blocked.

Everything the two producer APIs share is held to one contract by the `client` fixtures of
tests/contract and tests/integration/test_api.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from scheduler import AsyncOrderTimeouts, InvalidTimeout, OrderTimeouts, ScheduleResult, Settings, TimeoutState
from scheduler.clock import SystemClock
from scheduler.config import database_url
from scheduler.database import make_async_engine
from scheduler.schema import init_db
from scheduler.testing import InMemoryTransport
from scheduler.transports import TimerMessage
from tests.conftest import ROOT, Stack, open_stack
from tests.redis_support import broker_url
from tests.stacks import DATABASES, STACKS
from tests.support import cancel_counts, order_status

#: the asyncio drivers of the registry, each on its database
DRIVERS = {"sqlite+aiosqlite": "sqlite", "postgresql+psycopg": "postgresql", "postgresql+asyncpg": "postgresql"}
#: nothing listens here (the ports given to this project's tests): a broker that is down
DOWN_REDIS = "redis://127.0.0.1:8701/0"


@pytest.fixture(params=sorted(DRIVERS))
def driver_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Stack, str]]:
    """A registry (sql transport) and its URL spelt with one asyncio driver."""
    for stack in open_stack(DRIVERS[request.param], DATABASES, tmp_path):
        url = make_url(stack.database_url).set(drivername=request.param)
        yield stack, url.render_as_string(hide_password=False)


@pytest.fixture(params=["redis", "rabbitmq", "rq"])
def broker_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    yield from open_stack(request.param, STACKS, tmp_path)


async def insert_order(session: AsyncSession, order_id: str) -> None:
    await session.execute(text("INSERT INTO orders (id, status) VALUES (:id, 'PENDING')"), {"id": order_id})


def test_the_timeout_commits_and_rolls_back_with_the_order_on_each_asyncio_driver(
    driver_stack: tuple[Stack, str],
) -> None:
    stack, url = driver_stack

    async def order_service(orders: AsyncEngine, timeouts: AsyncOrderTimeouts) -> None:
        with pytest.raises(RuntimeError):
            async with AsyncSession(orders) as session, session.begin():
                await insert_order(session, "rolled-back")
                await timeouts.schedule("rolled-back", delay=timedelta(minutes=5), connection=session)
                raise RuntimeError("the order service fails after scheduling")
        assert await timeouts.get("rolled-back") is None

        async with AsyncSession(orders) as session, session.begin():
            await insert_order(session, "kept")
            assert await timeouts.schedule("kept", connection=session) is ScheduleResult.CREATED
            summary = await timeouts.schedule_many(["kept-2", "kept-3"], connection=session)
            assert summary.created == 2
        assert [await timeouts.get(oid) is not None for oid in ("kept", "kept-2", "kept-3")] == [True] * 3

        # The payment and the revoke in one AsyncConnection transaction: rolled back, then committed.
        pay = text("UPDATE orders SET status = 'PAID' WHERE id = 'kept' AND status = 'PENDING'")
        async with orders.connect() as conn:
            await conn.execute(pay)
            assert await timeouts.cancel("kept", connection=conn) is True
            await conn.rollback()
        record = await timeouts.get("kept")
        assert record is not None and record.state is TimeoutState.PENDING, "the revoke rolled back with the payment"
        async with orders.begin() as conn:
            await conn.execute(pay)
            assert await timeouts.cancel("kept", connection=conn) is True
        record = await timeouts.get("kept")
        assert record is not None and record.state is TimeoutState.REVOKED

    async def main() -> None:
        orders = make_async_engine(url)
        try:
            async with AsyncOrderTimeouts(url) as timeouts:
                await order_service(orders, timeouts)
        finally:
            await orders.dispose()

    asyncio.run(main())
    assert order_status(stack.engine)["kept"] == "PAID"


def test_on_an_aiosqlite_engine_of_its_own_the_timeout_goes_with_the_callers_transaction(tmp_path: Path) -> None:
    """An order service's own aiosqlite engine, with pysqlite's transaction handling left as it is:
    `schedule()` writes the same row as the synchronous API, inside the caller's transaction
    (rolled back, committed, or begun by the schedule itself on an AsyncConnection), and a
    database error surfaces as SQLAlchemy's, whichever way the row was sent."""
    path = tmp_path / "registry.sqlite3"
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    with OrderTimeouts(f"sqlite:///{path}") as sync:
        init_db(sync.engine, sync.settings.orders)
        sync.schedule("sync", due_at=due)

    async def main() -> None:
        orders = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 0.2})
        try:
            async with AsyncOrderTimeouts(f"sqlite:///{path}") as timeouts:
                with pytest.raises(RuntimeError):
                    async with AsyncSession(orders) as session, session.begin():
                        await insert_order(session, "rolled-back")
                        await timeouts.schedule("rolled-back", due_at=due, connection=session)
                        raise RuntimeError("the order service fails after scheduling")
                async with AsyncSession(orders) as session, session.begin():
                    await insert_order(session, "async")
                    assert await timeouts.schedule("async", due_at=due, connection=session) is ScheduleResult.CREATED
                    assert await timeouts.schedule("async", due_at=due, connection=session) is ScheduleResult.EXISTS
                async with orders.connect() as conn:  # not begun: the schedule begins it
                    await timeouts.schedule("on-a-connection", due_at=due, connection=conn)
                    await conn.rollback()
                async with orders.connect() as conn:
                    await timeouts.schedule("on-a-connection", due_at=due, connection=conn)
                    await conn.commit()

                with sync.engine.connect() as holder:
                    holder.begin()  # BEGIN IMMEDIATE (scheduler.database): the write lock held elsewhere
                    with pytest.raises(OperationalError, match="locked"):
                        async with AsyncSession(orders) as session, session.begin():
                            await timeouts.schedule("locked-out", due_at=due, connection=session)
                    holder.rollback()
        finally:
            await orders.dispose()

    asyncio.run(main())
    with sync.engine.connect() as conn:
        rows = {row.order_id: row._asdict() for row in conn.execute(text("SELECT * FROM order_timeouts"))}
    assert sorted(rows) == ["async", "on-a-connection", "sync"]
    assert order_status(sync.engine) == {"async": "PENDING"}
    written_at = ("created_ms", "updated_ms", "published_ms")
    expected = {key: value for key, value in rows["sync"].items() if key not in ("order_id", *written_at)}
    for order_id in ("async", "on-a-connection"):
        assert {key: value for key, value in rows[order_id].items() if key not in ("order_id", *written_at)} == expected
        assert rows[order_id]["published_ms"] == rows[order_id]["created_ms"], "the sql transport: the row is the timer"


def test_an_async_session_publishes_after_its_commit_and_not_after_a_rollback(broker_stack: Stack) -> None:
    stack = broker_stack
    settings = Settings(database_url=stack.database_url, broker_url=stack.broker_url)

    async def main() -> None:
        async with AsyncOrderTimeouts(settings=settings) as timeouts:
            orders = timeouts.engine
            with pytest.raises(RuntimeError):
                async with AsyncSession(orders) as session, session.begin():
                    await insert_order(session, "never")
                    await timeouts.schedule("never", delay=timedelta(milliseconds=200), connection=session)
                    raise RuntimeError("the order is not placed")
            async with AsyncSession(orders) as session, session.begin():
                await insert_order(session, "placed")
                await timeouts.schedule("placed", delay=timedelta(milliseconds=200), connection=session)
            await timeouts.flush()
            record = await timeouts.get("placed")
            assert record is not None and record.published_ms is not None, "the broker confirmed it after the commit"

    asyncio.run(main())
    stack.drain_until(lambda: order_status(stack.engine).get("placed") == "CANCELLED")
    assert stack.timeouts().get("never") is None
    assert stack.timeouts().publish_unpublished() == 0, "nothing was left for the relay"


@pytest.fixture
def redis_only(tmp_path: Path) -> Iterator[Stack]:
    yield from open_stack("redis", STACKS, tmp_path)


def test_a_broker_outage_never_fails_the_order_and_the_relay_publishes_later(redis_only: Stack) -> None:
    stack = redis_only
    down = broker_url(parse_qs(urlsplit(stack.broker_url).query)["prefix"][0], base=DOWN_REDIS)
    settings = Settings(database_url=stack.database_url, broker_url=down)

    async def main() -> None:
        async with AsyncOrderTimeouts(settings=settings) as timeouts:
            async with AsyncSession(timeouts.engine) as session, session.begin():
                await insert_order(session, "during-outage")
                await timeouts.schedule("during-outage", delay=timedelta(milliseconds=100), connection=session)
            await timeouts.flush()
            assert await timeouts.schedule("own-transaction", delay=timedelta(hours=1)) is ScheduleResult.CREATED
            record = await timeouts.get("during-outage")
            assert record is not None and record.published_ms is None, "left for the relay"

    asyncio.run(main())
    assert stack.timeouts().publish_unpublished() == 2, "the relay publishes both once the broker is there"
    stack.drain_until(lambda: order_status(stack.engine).get("during-outage") == "CANCELLED")


#: a listener on this port accepts and never answers: a broker that hangs (one of this project's test ports)
SILENT_PORT = 8702


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """redis:// of a server that accepts connections and never replies: every publish hangs."""
    server = socket.create_server(("127.0.0.1", SILENT_PORT))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{SILENT_PORT}/0"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


@pytest.mark.slow
def test_an_order_service_killed_between_its_commit_and_the_publish_loses_nothing(
    redis_only: Stack, silent_broker: str
) -> None:
    """The AsyncSession's publish runs after the commit: a process killed in between leaves the row
    unpublished, and the relay publishes it."""
    stack = redis_only
    hanging = broker_url(parse_qs(urlsplit(stack.broker_url).query)["prefix"][0], base=silent_broker)
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from datetime import UTC, datetime, timedelta
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import AsyncSession
        from scheduler import AsyncOrderTimeouts

        async def main():
            timeouts = AsyncOrderTimeouts({stack.database_url!r}, {hanging!r})
            async with AsyncSession(timeouts.engine) as session, session.begin():
                await session.execute(text("INSERT INTO orders (id, status) VALUES ('killed', 'PENDING')"))
                await timeouts.schedule("killed", delay=timedelta(milliseconds=200), connection=session)
            print("committed", flush=True)
            await timeouts.flush()  # the publish hangs on the silent broker: the test kills us here

        asyncio.run(main())
        """
    )
    with subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "committed"
        finally:
            process.kill()
    record = stack.timeouts().get("killed")
    assert record is not None and record.published_ms is None, "committed with the order, never published"
    assert stack.timeouts().publish_unpublished() >= 1
    stack.drain_until(lambda: order_status(stack.engine).get("killed") == "CANCELLED")
    assert cancel_counts(stack.engine) == {"killed": 1}


class BlockingBroker(InMemoryTransport):
    """A broker whose confirm takes as long as the test says: `publish` waits for `release`."""

    def __init__(self) -> None:
        super().__init__(SystemClock())
        self.entered = threading.Event()
        self.release = threading.Event()

    def publish(self, messages: Sequence[TimerMessage]) -> None:
        self.entered.set()
        assert self.release.wait(30), "the test never released the broker"
        super().publish(messages)


def test_a_slow_broker_does_not_block_the_event_loop(tmp_path: Path) -> None:
    broker = BlockingBroker()
    url = f"sqlite:///{tmp_path / 'registry.sqlite3'}"

    async def main() -> None:
        async with AsyncOrderTimeouts(url, transport=broker) as timeouts:
            scheduling = asyncio.create_task(timeouts.schedule("slow", delay=timedelta(minutes=1)))
            await asyncio.to_thread(broker.entered.wait, 30)
            ticks = 0
            for _ in range(100):  # the loop runs other work while the broker has not confirmed
                await asyncio.sleep(0)
                ticks += 1
            assert not scheduling.done() and ticks == 100
            broker.release.set()
            assert await scheduling is ScheduleResult.CREATED
            record = await timeouts.get("slow")
            assert record is not None and record.published_ms is not None

    with OrderTimeouts(url, transport=InMemoryTransport(SystemClock())) as sync:
        init_db(sync.engine, sync.settings.orders)
    asyncio.run(main())
    assert [m.order_id for m in broker.published] == ["slow"]


def test_a_synchronous_session_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.sqlite3'}"

    async def main() -> None:
        async with AsyncOrderTimeouts(url) as timeouts:
            with pytest.raises(InvalidTimeout, match="AsyncSession or an AsyncConnection"):
                await timeouts.schedule("o-1", connection=Session())  # type: ignore[arg-type]

    asyncio.run(main())


def test_one_database_url_serves_the_asyncio_api_and_the_synchronous_workers() -> None:
    assert database_url("sqlite+aiosqlite:///r.db").drivername == "sqlite"
    assert database_url("sqlite:///r.db", asyncio=True).drivername == "sqlite+aiosqlite"
    assert database_url("postgresql+asyncpg://u@h/db").drivername == "postgresql+psycopg"
    assert database_url("postgresql://u@h/db", asyncio=True).drivername == "postgresql+psycopg"
    assert database_url("postgresql+asyncpg://u@h/db", asyncio=True).drivername == "postgresql+asyncpg"
