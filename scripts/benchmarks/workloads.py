"""The product's workloads, one system at a time, each group of steps in a fresh deployment.

    bulk + latency:  schedule_many of far-off timeouts (rate, Redis bytes), then single schedule()
                     calls inside order transactions (p50/p99), OrderTimeouts and AsyncOrderTimeouts in turns
    drains:          2 worker processes; a burst due at one instant (half the orders paid), a
                     steady stream due at N per second, then the same burst again with a large
                     number of far-off timeouts pending (rates against the empty system; the fire
                     rates are the better of two bursts on each side)

Lateness comes from the registry: finished_ms - due_ms of each timeout (finished_ms is the time the
batch that handled it wrote its outcome, just before its commit). "All finished" is the bench's own clock when the
registry showed nothing pending up to the due time.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from benchmarks.measure import Lateness, ProcessGroup, SystemResult, now_ms, percentile, rate, wait_for
from benchmarks.plan import Services, Sizes
from benchmarks.sandbox import Deployment, deployment, finish_rehashing, redis_client
from scheduler import registry, retention
from scheduler.api import OrderTimeouts
from scheduler.async_api import AsyncOrderTimeouts
from scheduler.clock import from_ms
from scheduler.config import ENV_BROKER_URL, ENV_DATABASE_URL, Settings
from scheduler.database import reading
from scheduler.names import REGISTRY_TABLE
from scheduler.registry import PENDING_DUE_INDEX, TimeoutState, timeouts
from scheduler.schema import init_db, orders_table
from scheduler.testing import add_finished

#: bulk and latency timeouts: far enough off that nothing fires during the step
BULK_DELAY = timedelta(minutes=30)
#: the pending load of the loaded measurement: never due during the bench
FAR_DELAY = timedelta(days=20)
#: rows per schedule_many call when filling the pending load (keeps the client's memory flat)
FILL_CHUNK = 100_000
#: seconds between looks at the registry while waiting for a drain
POLL_S = 0.02
#: seconds to allow a worker process to start (imports, connections) on a busy machine
WORKER_START_S = 2.0
#: the systems whose registry databases differ: the purge rate is measured on these
REGISTRY_SYSTEMS = ("sql-sqlite", "sql-postgresql")
HOUR_MS = 3_600_000
#: rate assumed for the lead time of the first burst when no bulk rate was measured
FALLBACK_RATE = 5000.0

Progress = Callable[[str], None]


def lead_ms(count: int, schedule_rate: float | None, minimum_s: float = WORKER_START_S) -> int:
    """How far ahead to put a due time so that scheduling `count` timeouts ends before it."""
    expected = count / (schedule_rate or FALLBACK_RATE)
    return int(max(minimum_s, expected * 1.5 + 0.5) * 1000)


def run_product(system: str, sizes: Sizes, services: Services, progress: Progress) -> SystemResult:
    result = SystemResult(system)
    with deployment(system, services) as target:
        progress(f"{system}: bulk schedule of {sizes.bulk:,} and {sizes.latency:,} single schedules")
        _bulk_and_latency(target, sizes, services, result)
    with deployment(system, services) as target:
        _drains(target, sizes, result, progress)
    return result


def bulk_rate(system: str, sizes: Sizes, services: Services) -> float:
    """One more bulk schedule in a fresh deployment, for the interleaved rounds (see run_bench)."""
    with deployment(system, services) as target:
        client = _client(target)
        try:
            client.transport.figures()  # connected first, as in _bulk_and_latency
            return _timed_bulk(client, sizes.bulk)
        finally:
            client.close()


def _timed_bulk(client: OrderTimeouts, count: int) -> float:
    ids = [f"bulk-{i:07d}" for i in range(count)]
    started = time.perf_counter()
    client.schedule_many(ids, delay=BULK_DELAY)
    return rate(count, time.perf_counter() - started)


def _client(target: Deployment) -> OrderTimeouts:
    client = OrderTimeouts(settings=Settings(database_url=target.database_url, broker_url=target.broker_url))
    init_db(client.engine, client.settings.orders)
    return client


def _bulk_and_latency(target: Deployment, sizes: Sizes, services: Services, result: SystemResult) -> None:
    client = _client(target)
    memory = redis_client(services.redis_url) if target.system in ("redis", "rq") else None
    try:
        # Connected first, as a running order service is: the rabbitmq transport's first connection
        # to a fresh vhost declares its quorum queues, once per deployment, not per bulk.
        client.transport.figures()
        before = int(memory.info("memory")["used_memory"]) if memory is not None else 0
        result.figures["bulk_rate"] = _timed_bulk(client, sizes.bulk)
        result.figures["bulk_n"] = sizes.bulk
        if memory is not None:
            used = int(memory.info("memory")["used_memory"]) - before
            result.figures["redis_bytes_per_timeout"] = used / sizes.bulk

        result.figures |= asyncio.run(_single_latency(client, sizes.latency))
    finally:
        client.close()
        if memory is not None:
            memory.close()


async def _single_latency(client: OrderTimeouts, count: int) -> dict[str, float | None]:
    """schedule() inside an order transaction, with each API in turn (sync, then async, `count` times):
    the two sample the same moments of this machine's load.

    The order service's transaction: the order row and its timeout commit together. Two timings of
    each: the `schedule()` call itself, the API's own cost (DESIGN.md's 1.5x is about this one); and
    the whole transaction, the order service's own statements and commit included. With a Session,
    broker transports publish right after the commit, inside the transaction's timing; with an
    AsyncSession the publish runs in a task after the commit, which that timing waits for too
    (`flush`), so that both hold the same work."""
    orders = orders_table(client.settings.orders)
    samples: dict[str, list[float]] = {"sync": [], "async": [], "sync_call": [], "async_call": []}
    async with AsyncOrderTimeouts(settings=client.settings) as twin:
        for i in range(count + 1):
            started = time.perf_counter()
            with Session(client.engine) as session, session.begin():
                session.execute(insert(orders).values(id=f"single-{i:06d}", status="PENDING"))
                call_started = time.perf_counter()
                client.schedule(f"single-{i:06d}", delay=BULK_DELAY, connection=session)
                sync_call = time.perf_counter() - call_started
            sync_at = time.perf_counter()
            async with AsyncSession(twin.engine) as async_session, async_session.begin():
                await async_session.execute(insert(orders).values(id=f"async-{i:06d}", status="PENDING"))
                call_started = time.perf_counter()
                await twin.schedule(f"async-{i:06d}", delay=BULK_DELAY, connection=async_session)
                async_call = time.perf_counter() - call_started
            await twin.flush()
            if i:  # the first round connects the asyncio client: not a sample
                samples["sync"].append((sync_at - started) * 1000)
                samples["async"].append((time.perf_counter() - sync_at) * 1000)
                samples["sync_call"].append(sync_call * 1000)
                samples["async_call"].append(async_call * 1000)
    figures = {
        "schedule_p50_ms": percentile(samples["sync"], 0.50),
        "schedule_p99_ms": percentile(samples["sync"], 0.99),
        "async_schedule_p50_ms": percentile(samples["async"], 0.50),
        "async_schedule_p99_ms": percentile(samples["async"], 0.99),
        "schedule_call_p50_ms": percentile(samples["sync_call"], 0.50),
        "schedule_call_p99_ms": percentile(samples["sync_call"], 0.99),
        "async_schedule_call_p50_ms": percentile(samples["async_call"], 0.50),
        "async_schedule_call_p99_ms": percentile(samples["async_call"], 0.99),
    }
    figures["async_schedule_p99_ratio"] = _ratio(figures["async_schedule_p99_ms"], figures["schedule_p99_ms"])
    figures["async_schedule_call_p99_ratio"] = _ratio(
        figures["async_schedule_call_p99_ms"], figures["schedule_call_p99_ms"]
    )
    return figures


def add_orders(engine: Engine, ids: Sequence[str], settings: Settings) -> set[str]:
    """Orders rows for the ids, every other one already PAID; returns the unpaid ids."""
    names = settings.orders
    table = orders_table(names)
    rows = [
        {names.id_column: oid, names.status_column: names.paid_status if i % 2 else names.pending_status}
        for i, oid in enumerate(ids)
    ]
    with engine.begin() as conn:
        for start in range(0, len(rows), 10_000):
            conn.execute(insert(table), rows[start : start + 10_000])
    return {oid for i, oid in enumerate(ids) if i % 2 == 0}


class _Drains:
    """The worker group's steps in one deployment, in order: burst, steady, loaded burst."""

    def __init__(self, target: Deployment, sizes: Sizes, result: SystemResult, progress: Progress) -> None:
        self.target = target
        self.sizes = sizes
        self.result = result
        self.progress = progress
        self.client = _client(target)
        self.engine = self.client.engine
        self.env = {ENV_DATABASE_URL: target.database_url, ENV_BROKER_URL: target.broker_url}
        #: what the command run beside the last steady load printed
        self.beside_output = ""

    def pending_up_to(self, due_ms: int) -> int:
        with reading(self.engine) as conn:
            if conn.dialect.name == "sqlite":
                # The partial index, pinned as the registry pins it for the claim: this poll must
                # not walk a million pending rows every 20 ms.
                pinned = text(
                    f"SELECT count(*) FROM {REGISTRY_TABLE} INDEXED BY {PENDING_DUE_INDEX} "
                    f"WHERE state = '{TimeoutState.PENDING.value}' AND due_ms <= :due"
                )
                return int(conn.execute(pinned, {"due": due_ms}).scalar_one())
            stmt = (
                select(func.count())
                .select_from(timeouts)
                .where(timeouts.c.state == TimeoutState.PENDING.value, timeouts.c.due_ms <= due_ms)
            )
            return int(conn.execute(stmt).scalar_one())

    def lateness(self, prefix: str) -> Lateness:
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(timeouts.c.due_ms, timeouts.c.finished_ms).where(
                    timeouts.c.order_id.like(f"{prefix}-%"), timeouts.c.state == TimeoutState.DONE.value
                )
            ).all()
        return Lateness([float(finished - due) for due, finished in rows if finished is not None])

    def verify(self, prefix: str, unpaid: set[str], total: int) -> bool:
        """Every unpaid order cancelled, every paid one left paid, every timeout done."""
        names = self.client.settings.orders
        with reading(self.engine) as conn:
            cancelled = conn.execute(
                text(
                    f"SELECT {names.id_column} FROM {names.table} "
                    f"WHERE {names.status_column} = :cancelled AND {names.id_column} LIKE :prefix"
                ),
                {"cancelled": names.cancelled_status, "prefix": f"{prefix}-%"},
            ).scalars()
            done = conn.execute(
                select(func.count())
                .select_from(timeouts)
                .where(timeouts.c.order_id.like(f"{prefix}-%"), timeouts.c.state == TimeoutState.DONE.value)
            ).scalar_one()
            return set(cancelled) == unpaid and int(done) == total

    def wait_drained(self, due_ms: int, workers: ProcessGroup, timeout: float) -> int | None:
        """The bench's clock when nothing due by `due_ms` was pending any more; None on timeout."""
        ok = wait_for(lambda: self.pending_up_to(due_ms) == 0 or not workers.alive(), timeout=timeout, interval=POLL_S)
        if not ok:
            self.result.notes.append(f"{self.target.system}: timeouts still pending after {timeout:.0f}s")
            return None
        failure = workers.failure()
        if failure:
            self.result.notes.append(f"{self.target.system}: {failure}")
            return None
        return now_ms()

    def burst(
        self, prefix: str, workers: ProcessGroup, schedule_rate: float | None, started_s: float = 0.5
    ) -> dict[str, Any]:
        """`burst` timeouts due at one instant, half of their orders paid; returns its figures."""
        count = self.sizes.burst
        ids = [f"{prefix}-{i:06d}" for i in range(count)]
        unpaid = add_orders(self.engine, ids, self.client.settings)
        self.analyze()
        due = now_ms() + lead_ms(count, schedule_rate, started_s)
        started = time.perf_counter()
        self.client.schedule_many(ids, due_at=from_ms(due))
        scheduled = rate(count, time.perf_counter() - started)
        if now_ms() > due:
            self.result.notes.append(f"{self.target.system}: {prefix} scheduling ended after the due time")
        finished = self.wait_drained(due, workers, timeout=max(60.0, count / 100))
        lateness = self.lateness(prefix)
        figures: dict[str, Any] = {"schedule_rate": scheduled, **lateness.summary("lateness")}
        if finished is not None:
            seconds = max(finished - due, 1) / 1000
            figures |= {"all_finished_s": seconds, "drain_rate": count / seconds}
            figures["verified"] = self.verify(prefix, unpaid, count)
        self.result.lateness[prefix] = lateness.samples
        return figures

    def analyze(self) -> None:
        """Vacuumed tables with fresh planner statistics on PostgreSQL, as autovacuum leaves them a
        minute or so after a bulk load, and the load's WAL checkpointed: the figures are for a
        system in its steady state, not for the minute after a million rows arrived (autovacuum
        busy on them, a checkpoint forced by max_wal_size writing them out during the probes).
        Only our schema's tables (search_path); CHECKPOINT only where the role may run it."""
        if self.engine.dialect.name == "postgresql":
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f"VACUUM (ANALYZE) {REGISTRY_TABLE}, {self.client.settings.orders.table}"))
                try:
                    conn.execute(text("CHECKPOINT"))
                except DBAPIError:  # neither superuser nor pg_checkpoint: PostgreSQL's own schedule then
                    pass

    def settle(self) -> None:
        """A loaded system as it is a while after its million timeouts arrived, not in the minute
        after: PostgreSQL vacuumed and checkpointed (analyze), Redis's hash tables rehashed
        (finish_rehashing). The rates right after the fill are measured too, before this."""
        self.analyze()
        if self.target.redis_url is not None:
            finish_rehashing(self.target.redis_url, self.target.redis_keys)

    def schedule_rate(self, prefix: str) -> float:
        """The best of five bulk schedules of far-off timeouts, each half a burst. Each takes a
        fraction of a second, at the mercy of whatever else the machine does in that moment (a
        SQLite checkpoint, autovacuum, another tenant of the VM slowing its cores). Interference
        only ever slows a probe down, so the fastest is the one nearest to what scheduling costs,
        as `timeit` takes the best of its repeats; a median would keep part of the interference."""
        size = max(self.sizes.burst // 2, 1)
        rates = []
        for probe in range(5):
            ids = [f"{prefix}-probe{probe}-{i:06d}" for i in range(size)]
            started = time.perf_counter()
            self.client.schedule_many(ids, delay=FAR_DELAY)
            rates.append(rate(size, time.perf_counter() - started))
        return max(rates)

    def steady(self, workers: ProcessGroup, prefix: str = "steady", beside: list[str] | None = None) -> Lateness:
        """`steady_rate` timeouts due a second for `steady_seconds`; with `beside`, that command runs
        from the first due time until it exits (after the drain at the latest)."""
        per_second, seconds = self.sizes.steady_rate, self.sizes.steady_seconds
        count = int(per_second * seconds)
        ids = [f"{prefix}-{i:06d}" for i in range(count)]
        add_orders(self.engine, ids, self.client.settings)
        first = now_ms() + lead_ms(count, self.result.figures.get("bulk_rate"), 0.5)
        due = [first + int(i * 1000 / per_second) for i in range(count)]
        self.client.schedule_many([(oid, from_ms(at)) for oid, at in zip(ids, due, strict=True)])
        command = None
        shown = " ".join((beside or [])[2:])  # without the interpreter and `-m`
        if beside is not None:
            time.sleep(max(first - now_ms(), 0) / 1000)
            env = {**os.environ, **self.env}
            command = subprocess.Popen(beside, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.wait_drained(due[-1], workers, timeout=seconds + 60.0 + (first - now_ms()) / 1000)
        if command is not None:
            out, err = command.communicate(timeout=600)
            self.beside_output = out
            if command.returncode != 0:
                self.result.notes.append(f"{self.target.system}: {shown} failed: {err[-500:]}")
        lateness = self.lateness(prefix)
        self.result.lateness[prefix] = lateness.samples
        return lateness

    def purge_rate(self) -> None:
        """Rows a second of a purge of `purge` finished timeouts made in SQL, among what the earlier
        steps left (pending timeouts included), through the registry's own purge as `purge` runs it."""
        count = self.sizes.purge
        now = registry.database_now_ms(self.engine)
        add_finished(self.engine, count, prefix="history", finished_ms=now - 2 * HOUR_MS, spread_ms=HOUR_MS // 2)
        self.analyze()
        started = time.perf_counter()
        purged = retention.purge(self.engine, before_ms=now - HOUR_MS, states=registry.PURGED_STATES)
        self.result.figures["purge_rate"] = rate(purged, time.perf_counter() - started)
        if purged != count:
            self.result.notes.append(f"{self.target.system}: the purge deleted {purged:,} rows of {count:,}")

    def steady_during_purge(self, workers: ProcessGroup) -> None:
        """The steady load twice, each with `purge_load` finished rows waiting in the registry: first
        alone, then while `order-timeouts purge` deletes them (in a process of its own, as an admin
        or `maintain` would)."""
        figures = self.result.figures
        count = self.sizes.purge_load
        now = registry.database_now_ms(self.engine)
        add_finished(self.engine, count, prefix="load-history", finished_ms=now - 2 * HOUR_MS, spread_ms=HOUR_MS // 2)
        self.analyze()
        alone = self.steady(workers, "steady-history")
        purge = [sys.executable, "-m", "scheduler", "purge", "--older-than", "1h", "--json"]
        during = self.steady(workers, "steady-purge", beside=purge)
        figures["steady_history_p99_ms"] = percentile(alone.samples, 0.99)
        figures["steady_purge_p99_ms"] = percentile(during.samples, 0.99)
        figures["steady_purge_ratio"] = _ratio(figures["steady_purge_p99_ms"], figures["steady_history_p99_ms"])
        if self.beside_output:
            report = json.loads(self.beside_output)
            figures["purge_load_rows"] = report["count"]
            figures["purge_load_seconds"] = report["seconds"]
            figures["purge_load_rate"] = rate(report["count"], report["seconds"])

    def fill(self, count: int) -> None:
        """Far-off pending timeouts (no orders rows needed: they never fire during the bench)."""
        started = time.perf_counter()
        for start in range(0, count, FILL_CHUNK):
            ids = [f"load-{i:08d}" for i in range(start, min(start + FILL_CHUNK, count))]
            self.client.schedule_many(ids, delay=FAR_DELAY)
        self.result.figures["pending_fill_rate"] = rate(count, time.perf_counter() - started)

    def close(self) -> None:
        self.client.close()


def _drains(target: Deployment, sizes: Sizes, result: SystemResult, progress: Progress) -> None:
    steps = _Drains(target, sizes, result, progress)
    env = {ENV_DATABASE_URL: target.database_url, ENV_BROKER_URL: target.broker_url}
    argv = [sys.executable, "-m", "scheduler", "worker", "--batch-size", str(sizes.batch_size)]
    workers = ProcessGroup(argv, sizes.workers, env)
    figures = result.figures
    # A first small schedule opens the client's connections (pool, broker, Lua scripts), so that the
    # empty system's rates are not charged for it while the loaded ones are not.
    steps.client.schedule_many([f"warm-{i:03d}" for i in range(100)], delay=FAR_DELAY)
    # Nor for the worker processes' start-up (imports, connections), which takes a core or two.
    time.sleep(sizes.worker_start_s)
    try:
        progress(f"{target.system}: burst of {sizes.burst:,} due at once, {sizes.workers} workers")
        empty_rate = steps.schedule_rate("empty") if sizes.pending else None
        empty = steps.burst("burst", workers, figures.get("bulk_rate"))
        figures |= {
            "burst_all_finished_s": empty.get("all_finished_s"),
            "burst_drain_rate": empty.get("drain_rate"),
            "burst_p50_ms": empty.get("lateness_p50_ms"),
            "burst_p99_ms": empty.get("lateness_p99_ms"),
            "burst_max_ms": empty.get("lateness_max_ms"),
            "burst_verified": empty.get("verified"),
        }
        # The fire rates of the loaded/empty ratio are the better of two bursts each, as the
        # schedule rates are the best of five probes: one burst alone is at the mercy of a moment.
        empty_again = steps.burst("burst2", workers, figures.get("bulk_rate")) if sizes.pending else {}
        if empty_again:
            figures["burst_verified"] = bool(figures["burst_verified"]) and bool(empty_again.get("verified"))
        progress(f"{target.system}: steady {sizes.steady_rate}/s for {sizes.steady_seconds:g}s")
        steady = steps.steady(workers)
        figures["steady_p50_ms"] = percentile(steady.samples, 0.50)
        figures["steady_p99_ms"] = percentile(steady.samples, 0.99)
        if sizes.pending:
            progress(f"{target.system}: {sizes.pending:,} far-off timeouts pending, then the burst again")
            steps.fill(sizes.pending)
            at_fill_rate = steps.schedule_rate("at-fill")
            steps.settle()
            loaded_rate = steps.schedule_rate("loaded")
            loaded = steps.burst("loaded", workers, empty.get("schedule_rate"))
            loaded_again = steps.burst("loaded2", workers, empty.get("schedule_rate"))
            empty_fire = _best(empty.get("drain_rate"), empty_again.get("drain_rate"))
            loaded_fire = _best(loaded.get("drain_rate"), loaded_again.get("drain_rate"))
            figures |= {
                "empty_schedule_rate": empty_rate,
                "loaded_schedule_rate": loaded_rate,
                "loaded_schedule_rate_at_fill": at_fill_rate,
                "empty_fire_rate": empty_fire,
                "loaded_fire_rate": loaded_fire,
                "loaded_verified": bool(loaded.get("verified")) and bool(loaded_again.get("verified")),
                "loaded_pending": sizes.pending,
            }
            figures["loaded_schedule_ratio"] = _ratio(loaded_rate, empty_rate)
            figures["loaded_schedule_ratio_at_fill"] = _ratio(at_fill_rate, empty_rate)
            figures["loaded_fire_ratio"] = _ratio(loaded_fire, empty_fire)
        if sizes.purge and target.system in REGISTRY_SYSTEMS:
            progress(f"{target.system}: purge of {sizes.purge:,} finished timeouts")
            steps.purge_rate()
        if sizes.purge_load:
            progress(f"{target.system}: steady {sizes.steady_rate}/s while {sizes.purge_load:,} finished are purged")
            steps.steady_during_purge(workers)
    finally:
        workers.stop()
        steps.close()


def _best(*rates: float | None) -> float | None:
    measured = [rate for rate in rates if rate is not None]
    return max(measured) if measured else None


def _ratio(loaded: float | None, empty: float | None) -> float | None:
    if loaded is None or not empty:
        return None
    return loaded / empty
