"""Test fixtures' building blocks: databases per test, the orders table, a cancel counter."""

from __future__ import annotations

import contextlib
import glob
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import quote

import psycopg
import pytest
from sqlalchemy import Engine, text

from scheduler.config import database_url
from scheduler.database import reading
from scheduler.registry import TimeoutRecord, all_records
from scheduler.testing import cancel_log_counts
from tests.services import POSTGRES_URL, require, unique


@contextlib.contextmanager
def postgres_schema(server: str = POSTGRES_URL, query: str = "") -> Iterator[str]:
    """A fresh schema on `server` (by default the `test` database on 5432), selected through
    search_path; dropped afterwards when the server is still there. `query` adds URL options."""
    if server == POSTGRES_URL:
        require("PostgreSQL", 5432)
    schema = unique("ot")
    with psycopg.connect(psycopg_url(server), autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{server}{'&' if '?' in server else '?'}options={quote(f'-csearch_path={schema}')}{query}"
    finally:
        with (
            contextlib.suppress(psycopg.OperationalError),
            psycopg.connect(psycopg_url(server), autocommit=True) as admin,
        ):
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def psycopg_url(url: str) -> str:
    return database_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def cancel_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return cancel_log_counts(conn)


def add_orders(engine: Engine, ids: Iterable[str], status: str = "PENDING") -> None:
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO orders (id, status) VALUES (:id, :status)"), [{"id": i, "status": status} for i in ids]
        )


def registry_records(engine: Engine) -> dict[str, TimeoutRecord]:
    """Every registry row, by order id."""
    with reading(engine) as conn:
        return {r.order_id: r for r in all_records(conn)}


def order_status(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT id, status FROM orders")).all())


def pay(engine: Engine, order_id: str) -> bool:
    """The order service's payment: a conditional update. False when the order was no longer pending."""
    with engine.begin() as conn:
        result = conn.execute(
            text("UPDATE orders SET status = 'PAID' WHERE id = :id AND status = 'PENDING'"), {"id": order_id}
        )
        return result.rowcount == 1


def wait_until(condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.02) -> None:
    """Poll a condition until it holds; fail with a clear message when it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def free_port_run(count: int) -> int:
    """The first of `count` consecutive loopback ports nobody listens on (`worker --processes N
    --metrics-port P` serves P to P+N-1). Taken below Linux's ephemeral range (32768 and up), where
    no outgoing connection of a busy machine can be holding one of them meanwhile."""
    for _ in range(200):
        first = random.randrange(20000, 32768 - count)
        try:
            with contextlib.ExitStack() as probes:
                for port in range(first, first + count):
                    probe = probes.enter_context(socket.socket())
                    probe.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise AssertionError(f"no {count} consecutive free ports below 32768")


def free_port() -> int:
    """A loopback TCP port nobody listens on (for a metrics server, or a service that is down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def faketime(offset: str) -> dict[str, str]:
    """The environment that runs a process on a clock `offset` off (libfaketime, as `faketime -f` does).

    Only the wall clock is moved. A monotonic clock moved as well would break every timed wait in
    the process (Python's locks wait on the kernel's monotonic clock), which no real skew does; and
    the library is preloaded directly because the `faketime` command runs its program as a child,
    which a SIGTERM to it would not reach."""
    libraries = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    if not libraries:
        message = "libfaketime is not installed (scripts/services.sh installs faketime)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return {"LD_PRELOAD": libraries[0], "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
