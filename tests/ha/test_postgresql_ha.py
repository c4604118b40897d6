"""The `sql` transport and the API through the loss of PostgreSQL: a restart, a failover to the
standby, and a worker frozen in the middle of its batch.

The primary and its standby are our own servers on 127.0.0.1:5440/5441 (scripts/postgresql_standby.sh),
never the shared one on 5432.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from scheduler import OrderTimeouts, Settings, TimeoutState
from scheduler.transports.sql.adapter import SqlTransport
from tests.conftest import ROOT, Stack, deployed
from tests.services import POSTGRES_URL
from tests.slow_store import pausing_after_cancel
from tests.support import add_orders, cancel_counts, postgres_schema, psycopg_url, registry_records, wait_until

#: the figures, for `--log-cli-level=WARNING` (docs/operations.md)
report = logging.getLogger("order_timeouts.tests.ha")

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "scripts" / "postgresql_standby.sh"
PRIMARY = "postgresql://postgres@127.0.0.1:5440/postgres"
STANDBY = "postgresql://postgres@127.0.0.1:5441/postgres"
#: both hosts: libpq connects to the one that takes writes, before and after a promotion
EITHER = "postgresql://postgres@127.0.0.1:5440,127.0.0.1:5441/postgres?target_session_attrs=read-write"


def pair(command: str) -> None:
    subprocess.run(["bash", str(SCRIPT), command], check=True, capture_output=True, timeout=120)


@pytest.fixture
def fresh_pair() -> Iterator[None]:
    """A new primary and standby for one test (a failover leaves them swapped), stopped afterwards."""
    pair("stop")
    pair("start")
    try:
        yield
    finally:
        pair("stop")


@contextlib.contextmanager
def open_stack(server: str = POSTGRES_URL, database_url: str | None = None, query: str = "") -> Iterator[Stack]:
    """A stack on its own schema of `server` (`query` adds URL options); `database_url` (that schema,
    reached another way) is what the processes are given."""
    with postgres_schema(server, query) as url:
        schema_query = url.partition("?")[2]
        given = f"{database_url}{'&' if '?' in database_url else '?'}{schema_query}" if database_url else url
        yield from deployed(Stack("sql-postgresql-ha", given, "sql"))


def start_maintain(stack: Stack, log: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "scheduler", "-v", "maintain", "--relay-interval", "0.5s"]
    with log.open("a") as err:
        process = subprocess.Popen(argv, env=stack.env(), stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=ROOT)
    wait_until(lambda: log.read_text() != "" or process.poll() is not None, timeout=30)
    return process


def stop_all(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def schedule_spread(stack: Stack, ids: list[str], over_s: float) -> None:
    """The orders and their timeouts, coming due one after another over the next `over_s` seconds."""
    add_orders(stack.engine, ids)
    start = datetime.now(UTC) + timedelta(seconds=0.5)
    for chunk in range(0, len(ids), 50):
        client = stack.timeouts()
        for i, order_id in enumerate(ids[chunk : chunk + 50], start=chunk):
            client.schedule(order_id, due_at=start + timedelta(seconds=over_s * i / len(ids)))


def lateness_after(stack: Stack, moment_ms: int) -> tuple[float, float]:
    """Seconds from `moment_ms` to the first cancel after it, and the lateness p99 of every cancel."""
    records = [r for r in registry_records(stack.engine).values() if r.state is TimeoutState.DONE]
    fired = sorted(r.fired_ms for r in records if r.fired_ms is not None)
    late = sorted((r.fired_ms or 0) - r.due_ms for r in records)
    first_after = next(f for f in fired if f >= moment_ms)
    return (first_after - moment_ms) / 1000, late[int(len(late) * 0.99) - 1] / 1000


def assert_outage_logged_once(log: Path, what: str) -> None:
    text = log.read_text()
    assert text.count(f"{what} unavailable") >= 1, text[-3000:]
    # Once per process and outage, not per retry: each of the processes writing here logged it once.
    assert text.count(f"{what} unavailable") == text.count(f"{what} back after"), text[-3000:]


def test_workers_and_maintain_ride_over_a_postgresql_restart(fresh_pair: None, tmp_path: Path) -> None:
    ids = [f"r-{i:04d}" for i in range(600)]
    log = tmp_path / "processes.log"
    with open_stack(PRIMARY) as stack:
        schedule_spread(stack, ids, over_s=8)
        processes = [stack.start_worker("--batch-size", "50", log_to=log) for _ in range(2)]
        processes.append(start_maintain(stack, log))
        try:
            time.sleep(3)
            pair("restart")
            back_ms = int(time.time() * 1000)
            stack.engine.dispose()
            wait_until(lambda: len(cancel_counts(stack.engine)) == len(ids), timeout=45, interval=0.2)
            assert [p.poll() for p in processes] == [None, None, None], log.read_text()[-3000:]
        finally:
            stop_all(processes)
        assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)
        assert all(r.state is TimeoutState.DONE for r in registry_records(stack.engine).values())
        first, p99 = lateness_after(stack, back_ms)
        report.warning("postgresql restarted: first cancel %.2fs after it was back; lateness p99 %.2fs", first, p99)
        # The backoff is capped at 5 s: work resumes at most that long after the server is back.
        assert first < 5.5, (first, p99)
    assert_outage_logged_once(log, "the registry database")


def caught_up(standby: str = STANDBY, primary: str = PRIMARY) -> bool:
    with psycopg.connect(primary, autocommit=True) as conn:
        written = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
    with psycopg.connect(standby, autocommit=True) as conn:
        replayed = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", written).fetchone()
    return bool(replayed and replayed[0])


def test_workers_maintain_and_the_api_follow_a_promotion_of_the_standby(fresh_pair: None, tmp_path: Path) -> None:
    ids = [f"f-{i:04d}" for i in range(600)]
    log = tmp_path / "processes.log"
    with open_stack(PRIMARY, database_url=EITHER) as stack:
        schedule_spread(stack, ids, over_s=8)
        wait_until(caught_up, timeout=30)
        processes = [stack.start_worker("--batch-size", "50", log_to=log) for _ in range(2)]
        processes.append(start_maintain(stack, log))
        try:
            time.sleep(3)
            failed_ms = int(time.time() * 1000)
            pair("kill")
            pair("promote")
            # The API's engine reconnects to the new primary too: schedule one more order through it.
            add_orders_when_up(stack, "f-after")
            stack.timeouts().schedule("f-after", due_at=datetime.now(UTC))
            wait_until(lambda: len(cancel_counts(stack.engine)) == len(ids) + 1, timeout=45, interval=0.2)
            assert [p.poll() for p in processes] == [None, None, None], log.read_text()[-3000:]
        finally:
            stop_all(processes)
        # Cancels the old primary committed but had not streamed yet are gone with it, together with
        # their registry outcome: those timeouts ran again on the new primary, each order cancelled once.
        assert cancel_counts(stack.engine) == dict.fromkeys([*ids, "f-after"], 1)
        assert all(r.state is TimeoutState.DONE for r in registry_records(stack.engine).values())
        first, p99 = lateness_after(stack, failed_ms)
        report.warning(
            "postgresql primary killed, standby promoted: first cancel %.2fs after; lateness p99 %.2fs", first, p99
        )
        assert first < 10, (first, p99)


def add_orders_when_up(stack: Stack, order_id: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            add_orders(stack.engine, [order_id])
            return
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_frozen_worker_holds_its_batch_only_until_the_server_ends_its_transaction(tmp_path: Path) -> None:
    """SIGSTOP inside the batch transaction: the server ends the idle transaction (3 s here, through the
    URL; 12 s by default), another worker takes the rows, and the frozen one's late commit changes nothing."""
    ids = [f"z-{i:03d}" for i in range(40)]
    query = "%20-c%20idle_in_transaction_session_timeout%3D3s"
    with open_stack(query=query) as stack:
        add_orders(stack.engine, ids)
        stack.timeouts().schedule_many(ids, due_at=datetime.now(UTC))
        marker = tmp_path / "in-batch"
        frozen = stack.start_worker(
            "--batch-size", "40", **pausing_after_cancel(marker), ORDER_TIMEOUTS_TEST_PAUSE_S="8"
        )
        other: subprocess.Popen[str] | None = None
        try:
            wait_until(marker.exists, timeout=30)
            frozen.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            other = stack.start_worker("--batch-size", "40")
            wait_until(lambda: len(cancel_counts(stack.engine)) == len(ids), timeout=30, interval=0.1)
            taken_over = time.monotonic() - stopped
            assert taken_over < 3 + 5 + 2
            frozen.send_signal(signal.SIGCONT)
            # It wakes, finishes its pause, and its commit fails: the server ended that session.
            time.sleep(10)
            assert frozen.poll() is None
            assert cancel_counts(stack.engine) == dict.fromkeys(ids, 1)
        finally:
            frozen.send_signal(signal.SIGCONT)
            stop_all([p for p in (frozen, other) if p is not None])


def test_every_registry_connection_bounds_idle_transactions_and_dead_peers() -> None:
    with postgres_schema() as url:
        client = OrderTimeouts(settings=Settings(database_url=url))
        try:
            with client.engine.connect() as conn:
                settings = {
                    name: conn.execute(text(f"SHOW {name}")).scalar_one()
                    for name in ("idle_in_transaction_session_timeout", "search_path")
                }
                keepalives = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        finally:
            client.close()
    assert settings["idle_in_transaction_session_timeout"] == "12s"
    assert settings["search_path"].startswith("ot_"), "the URL's own options are kept"
    assert keepalives.get("keepalives_idle") == "5"


def test_the_api_in_an_order_service_survives_a_restart(fresh_pair: None) -> None:
    with open_stack(PRIMARY) as stack:
        client = stack.timeouts()
        client.schedule("a-1")
        pair("restart")
        # The same client, after the restart: the pool's dead connections are replaced on checkout.
        client.schedule("a-2")
        assert {"a-1", "a-2"} <= set(registry_records(stack.engine))


def test_a_worker_whose_listening_connection_was_cut_reopens_it_and_still_wakes() -> None:
    """After a restart the batch connections come back on their own; a cut LISTEN connection shows
    only at the worker's next sleep, and is reopened there rather than reported as a second outage."""
    with open_stack(query="&application_name=ot-listen-cut") as stack:
        client = stack.timeouts()
        client.schedule("far", delay=timedelta(hours=1))
        transport = SqlTransport(stack.engine, client.clock)
        woke: list[float] = []

        def receive() -> None:
            start = time.monotonic()
            if transport.receive(100, timeout=8.0):
                woke.append(time.monotonic() - start)

        try:
            assert not transport.receive(100, timeout=0.2), "nothing due: it listened and slept"
            with psycopg.connect(psycopg_url(POSTGRES_URL), autocommit=True) as admin:
                cut = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
                    ("ot-listen-cut",),
                ).fetchone()
            assert cut is not None and cut[0] >= 1
            waiting = threading.Thread(target=receive)
            waiting.start()
            time.sleep(0.5)  # it finds the cut listener, reopens it and sleeps until the far timeout
            client.schedule("near", due_at=datetime.now(UTC))
            waiting.join()
        finally:
            transport.close()
        assert woke and woke[0] < 3.0, "woke on the new schedule through the reopened listener"
