"""The baselines, written as their users would write them, on the same workload and machine.

- RQ: `Queue.enqueue_in` (pipelined for the bulk), 2 `rq worker` SimpleWorkers with the scheduler
  on; the job checks one order's payment on PostgreSQL and cancels it if unpaid.
- APScheduler 3: date jobs in a SQLAlchemyJobStore on SQLite; its thread pool runs the same job.

Each job records its own finish time (a Redis list for RQ, a list in the process for APScheduler),
so that lateness is measured the same way as the product's: finished minus due.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Engine, insert

from benchmarks.measure import Lateness, ProcessGroup, SystemResult, now_ms, percentile, rate, wait_for
from benchmarks.plan import Services, Sizes
from benchmarks.sandbox import (
    delete_matching,
    delete_rq_keys,
    delete_rq_namespace,
    postgres_schema,
    redis_client,
    rq_keys,
    unique,
)
from benchmarks.workloads import BULK_DELAY, POLL_S, Progress, add_orders, lead_ms
from scheduler.clock import from_ms
from scheduler.config import Settings
from scheduler.database import make_engine
from scheduler.schema import init_db, orders_table

#: the worker processes find the orders database here
ENV_ORDERS_URL = "ORDER_TIMEOUTS_BENCH_ORDERS_URL"
#: RQ jobs per pipeline round trip in the bulk enqueue
RQ_PIPELINE = 1000
#: the folder that holds this package (scripts/): `rq worker` imports the job function by its
#: dotted name, benchmarks.baselines.rq_timeout_job, and the bench is not an installed package
SCRIPTS_DIR = str(Path(__file__).resolve().parent.parent)

_local = threading.local()
_aps_finished: list[tuple[int, int]] = []


def _orders_connection() -> psycopg.Connection[Any]:
    """One connection per process (per thread for APScheduler's pool), as a job module would keep it."""
    conn: psycopg.Connection[Any] | None = getattr(_local, "conn", None)
    if conn is None:
        conn = psycopg.connect(os.environ[ENV_ORDERS_URL], autocommit=True)
        _local.conn = conn
    return conn


def cancel_if_unpaid(order_id: str) -> None:
    """The one-order job: read its payment status, cancel it with a conditional update if unpaid."""
    conn = _orders_connection()
    with conn.transaction():
        row = conn.execute("SELECT status FROM orders WHERE id = %s", (order_id,)).fetchone()
        if row is not None and row[0] == "PENDING":
            conn.execute(
                "UPDATE orders SET status = 'CANCELLED', cancelled_at = now() WHERE id = %s AND status = 'PENDING'",
                (order_id,),
            )


def rq_timeout_job(order_id: str, due_ms: int, results_key: str) -> None:
    from rq import get_current_job

    cancel_if_unpaid(order_id)
    job = get_current_job()
    assert job is not None
    job.connection.rpush(results_key, f"{due_ms} {now_ms()}")


def aps_timeout_job(order_id: str, due_ms: int) -> None:
    cancel_if_unpaid(order_id)
    _aps_finished.append((due_ms, now_ms()))


@contextlib.contextmanager
def _orders_database(services: Services) -> Iterator[tuple[Engine, str]]:
    with postgres_schema(services.postgres_url) as url:
        engine = make_engine(url)
        init_db(engine, Settings().orders)
        os.environ[ENV_ORDERS_URL] = url  # for APScheduler's threads; RQ workers get it in their env
        try:
            yield engine, url
        finally:
            engine.dispose()


def _single_latency(engine: Engine, count: int, schedule: Any) -> dict[str, float | None]:
    """Insert the order and commit, then schedule its timeout (neither baseline can join the transaction)."""
    table = orders_table(Settings().orders)
    samples: list[float] = []
    for i in range(count):
        order_id = f"single-{i:06d}"
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(insert(table).values(id=order_id, status="PENDING"))
        schedule(order_id)
        samples.append((time.perf_counter() - started) * 1000)
    return {"schedule_p50_ms": percentile(samples, 0.50), "schedule_p99_ms": percentile(samples, 0.99)}


def _record(result: SystemResult, name: str, lateness: Lateness, finished_at: int | None, due: int, count: int) -> None:
    result.lateness[name] = lateness.samples
    if name == "burst":
        result.figures |= lateness.summary("burst")
        if finished_at is not None:
            seconds = max(finished_at - due, 1) / 1000
            result.figures |= {"burst_all_finished_s": seconds, "burst_drain_rate": count / seconds}
    else:
        result.figures["steady_p50_ms"] = percentile(lateness.samples, 0.50)
        result.figures["steady_p99_ms"] = percentile(lateness.samples, 0.99)


# -- RQ ------------------------------------------------------------------------------------------


def run_rq(sizes: Sizes, services: Services, progress: Progress) -> SystemResult:
    from rq import Queue

    result = SystemResult("baseline-rq")
    name = unique("bench")
    results_key = f"{name}:finished"
    client = redis_client(services.redis_url)
    queue = Queue(name, connection=client)
    try:
        with _orders_database(services) as (engine, orders_url):
            progress(f"RQ: enqueue_in of {sizes.bulk:,}, pipelined")
            before = int(client.info("memory")["used_memory"])  # (connected, as the product's clients are)
            result.figures["bulk_rate"] = _rq_bulk(queue, sizes.bulk, results_key)
            result.figures["bulk_n"] = sizes.bulk
            used = int(client.info("memory")["used_memory"]) - before
            result.figures["redis_bytes_per_timeout"] = used / sizes.bulk
            # Clear the far-off jobs before the workers start: the burst must not share their registry.
            delete_matching(client, *rq_keys(name))

            result.figures |= _single_latency(
                engine,
                sizes.latency,
                lambda oid: queue.enqueue_in(BULK_DELAY, rq_timeout_job, oid, 0, results_key, job_id=f"{name}-{oid}"),
            )
            delete_matching(client, *rq_keys(name))

            def argv(index: int) -> list[str]:
                return [
                    sys.executable, "-c", "from rq.cli import main; main()", "worker", "--quiet",
                    "--url", services.redis_url, "--worker-class", "rq.worker.SimpleWorker", "--with-scheduler",
                    "--name", f"{name}-{index}", name,
                ]  # fmt: skip

            workers = ProcessGroup(argv, sizes.workers, {ENV_ORDERS_URL: orders_url, "PYTHONPATH": _python_path()})
            try:
                for step in ("burst", "steady"):
                    count, due = _due_plan(step, sizes, result.figures["bulk_rate"])
                    ids = [f"{step}-{i:06d}" for i in range(count)]
                    progress(f"RQ: {step} of {count:,} timeouts, {sizes.workers} SimpleWorkers")
                    add_orders(engine, ids, Settings())
                    _rq_enqueue(queue, list(zip(ids, due, strict=True)), results_key)
                    done = wait_for(
                        partial(_at_least, lambda: int(client.llen(results_key)), count), timeout=_patience(count, due)
                    )
                    finished_at = now_ms() if done else None
                    if not done:
                        result.notes.append(f"RQ: {step} not finished in time: {workers.stderr_tail()}")
                    entries = [entry.decode().split() for entry in client.lrange(results_key, 0, -1)]
                    lateness = Lateness([float(int(end) - int(start)) for start, end in entries])
                    _record(result, step, lateness, finished_at, due[0], count)
                    client.delete(results_key)
            finally:
                workers.stop()
    finally:
        delete_matching(client, f"{name}:*")
        client.close()
        delete_rq_keys(services.redis_url, name)
    return result


def _python_path() -> str:
    """PYTHONPATH for the `rq worker` processes: this package's folder first, then the caller's."""
    return os.pathsep.join(filter(None, (SCRIPTS_DIR, os.environ.get("PYTHONPATH"))))


def rq_bulk_rate(sizes: Sizes, services: Services) -> float:
    """One more pipelined bulk of RQ jobs in a queue of its own, for the interleaved rounds (see run_bench)."""
    from rq import Queue

    name = unique("bench")
    client = redis_client(services.redis_url)
    try:
        return _rq_bulk(Queue(name, connection=client), sizes.bulk, f"{name}:finished")
    finally:
        delete_rq_namespace(client, name)
        client.close()


def _rq_bulk(queue: Any, count: int, results_key: str) -> float:
    items = [(f"bulk-{i:07d}", now_ms() + _ms(BULK_DELAY)) for i in range(count)]
    started = time.perf_counter()
    _rq_enqueue(queue, items, results_key)
    return rate(count, time.perf_counter() - started)


def _rq_enqueue(queue: Any, items: list[tuple[str, int]], results_key: str) -> None:
    connection = queue.connection
    for start in range(0, len(items), RQ_PIPELINE):
        with connection.pipeline() as pipe:
            for order_id, due in items[start : start + RQ_PIPELINE]:
                queue.enqueue_at(
                    from_ms(due), rq_timeout_job, order_id, due, results_key,
                    job_id=f"{queue.name}-{order_id}", pipeline=pipe,
                )  # fmt: skip
            pipe.execute()


def _due_plan(step: str, sizes: Sizes, schedule_rate: float | None) -> tuple[int, list[int]]:
    if step == "burst":
        due = now_ms() + lead_ms(sizes.burst, schedule_rate)
        return sizes.burst, [due] * sizes.burst
    count = int(sizes.steady_rate * sizes.steady_seconds)
    first = now_ms() + lead_ms(count, schedule_rate)
    return count, [first + int(i * 1000 / sizes.steady_rate) for i in range(count)]


def _patience(count: int, due: list[int]) -> float:
    return (due[-1] - now_ms()) / 1000 + max(60.0, count / 50)


def _at_least(count_now: Callable[[], int], count: int) -> bool:
    return count_now() >= count


def _ms(delta: timedelta) -> int:
    return int(delta.total_seconds() * 1000)


# -- APScheduler ---------------------------------------------------------------------------------


def run_apscheduler(sizes: Sizes, services: Services, progress: Progress) -> SystemResult:
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    result = SystemResult("baseline-apscheduler")
    folder = Path(tempfile.mkdtemp(prefix="order-timeouts-bench-aps-"))
    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{folder / 'jobs.sqlite3'}")},
        executors={"default": ThreadPoolExecutor(10)},
        # Without this APScheduler skips any job more than a second late: a timeout must never be skipped.
        job_defaults={"misfire_grace_time": None},
        timezone=UTC,
    )
    scheduler.start(paused=True)
    try:
        with _orders_database(services) as (engine, _url):
            try:
                _apscheduler_steps(scheduler, engine, sizes, result, progress)
            finally:
                # Before the orders schema goes: the pool's threads hold connections to it.
                scheduler.shutdown(wait=True)
    finally:
        os.environ.pop(ENV_ORDERS_URL, None)
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    return result


def _apscheduler_steps(scheduler: Any, engine: Engine, sizes: Sizes, result: SystemResult, progress: Progress) -> None:
    def add(order_id: str, due: int) -> None:
        run_date = datetime.fromtimestamp(due / 1000, tz=UTC)
        scheduler.add_job(aps_timeout_job, "date", run_date=run_date, args=[order_id, due], id=order_id)

    count = sizes.bulk_apscheduler
    progress(f"APScheduler: add_job of {count:,} date jobs")
    started = time.perf_counter()
    far = now_ms() + _ms(BULK_DELAY)
    for i in range(count):
        add(f"bulk-{i:07d}", far)
    result.figures["bulk_rate"] = rate(count, time.perf_counter() - started)
    result.figures["bulk_n"] = count
    scheduler.remove_all_jobs()
    result.figures |= _single_latency(engine, sizes.latency, lambda oid: add(oid, far))
    scheduler.remove_all_jobs()
    for step in ("burst", "steady"):
        count, due = _due_plan(step, sizes, result.figures["bulk_rate"])
        ids = [f"{step}-{i:06d}" for i in range(count)]
        progress(f"APScheduler: {step} of {count:,} timeouts")
        add_orders(engine, ids, Settings())
        _aps_finished.clear()
        scheduler.pause()
        for order_id, at in zip(ids, due, strict=True):
            add(order_id, at)
        scheduler.resume()
        done = wait_for(
            partial(_at_least, _aps_finished.__len__, count), timeout=_patience(count, due), interval=POLL_S
        )
        finished_at = now_ms() if done else None
        if not done:
            result.notes.append(f"APScheduler: {step} not finished in time")
        lateness = Lateness([float(end - start) for start, end in list(_aps_finished)])
        _record(result, step, lateness, finished_at, due[0], count)
