"""`order-timeouts maintain`: the outbox relay, the reconciler and the purge, as APScheduler interval jobs.

- relay: registry rows the broker has not confirmed go to the broker, in due order, in batches,
  with backoff while the broker is down. This is what makes `schedule()` safe during an outage.
  Then, on a broker that can tell its backlog (RabbitMQ) and has none, timeouts overdue by more
  than HELD_GRACE (3 s) are published again: a delay queue whose dead-lettering stalled when a
  cluster node was lost holds them (Outbox.republish_held).
- reconciler: pending rows overdue by more than a grace period are published again, so a broker
  that lost everything (FLUSHALL, deleted queues) still ends with every timeout handled within
  the grace period plus one sweep. It sweeps nothing while the fleet is paused.
- purge: finished timeouts (done, revoked) older than ORDER_TIMEOUTS_RETENTION leave the registry,
  at most MAX_PURGE_ROWS_PER_RUN per run in small transactions (scheduler/retention.py), so a
  backlog (retention just turned on, or shortened) goes over several runs and never holds the
  lease or the database for long. Dead timeouts stay for a person to look at. Off with
  ORDER_TIMEOUTS_RETENTION=off.
- recheck: exactly-once watched in production. A sample of the timeouts that finished since the
  last run (at most RECHECK_SAMPLE, the newest, each at least one interval old, read from the
  finished-rows index) is asked of the order store again, in one call, and compared with the outcome
  the registry recorded (scheduler/recheck.py): orders paid after this product cancelled them (late
  payments, the shop's refunds) and outcomes the store now contradicts are counted in the
  registry's control table, for `stats` and /metrics. Runs where an order store is known (the
  consumers side registers it, see scheduler.cli.operate.ORDER_STATUS_READERS).

Jobs never overlap (max_instances=1) and missed runs coalesce. Several `maintain` processes may
run: each job takes a lease row in the registry first, so only one process works on it at a time,
and a killed process's lease simply expires.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError

from scheduler import recheck, registry, retention
from scheduler.api import OrderTimeouts
from scheduler.errors import OrderStoreUnavailable, TransportUnavailable
from scheduler.observability import GAUGES_LEASE, MaintenanceMetrics
from scheduler.outage import Outage, first_line
from scheduler.recheck import StatusReader

log = logging.getLogger("order_timeouts.maintain")

#: rows per relay/reconciler round trip
MAINTENANCE_BATCH = 2000
#: most rows one job run handles before giving the other job and the lease a turn
MAX_ROWS_PER_RUN = 100_000
#: most rows one purge run deletes: a few seconds of work at most, far more than finish in an interval
#: at the design's rates (500 a second is 30,000 a minute)
MAX_PURGE_ROWS_PER_RUN = 100_000
#: what each job's rows are, for its log line and `maintain --once`
JOB_VERBS = {"relay": "published", "reconciler": "published", "purge": "purged", "recheck": "rechecked"}
#: how often `serve` looks whether it was asked to stop
STOP_POLL_S = 0.2


@dataclass(frozen=True)
class MaintenancePlan:
    relay_interval: timedelta = timedelta(seconds=1)
    sweep_interval: timedelta = timedelta(seconds=15)
    grace: timedelta = timedelta(seconds=60)
    purge_interval: timedelta = timedelta(minutes=1)
    recheck_interval: timedelta = timedelta(minutes=5)


@dataclass
class JobRun:
    job: str
    rows: int = 0
    skipped: bool = False  #: another process holds the lease, or the job is backing off
    error: str | None = None


class Maintenance:
    def __init__(
        self,
        timeouts: OrderTimeouts,
        plan: MaintenancePlan | None = None,
        *,
        order_status: StatusReader | None = None,
    ) -> None:
        self._timeouts = timeouts
        self.plan = plan or MaintenancePlan()
        self._order_status = order_status
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[:128]
        #: set by `maintain --metrics-port`: when each task last ran without error
        self.metrics: MaintenanceMetrics | None = None
        self._backoff_until: dict[str, float] = {}
        self._outages: dict[str, Outage] = {}
        self._stop = threading.Event()

    def relay(self) -> JobRun:
        def step() -> int:
            # Then overdue timers a broker with no backlog still holds (a stalled delay queue after a
            # node loss): sooner than the reconciler, and, like it, not while the fleet is paused. The
            # pause is read only on a broker that can tell its backlog and has none.
            return _in_batches(self._timeouts.publish_unpublished) + _in_batches(self._timeouts.republish_held)

        return self._run("relay", self.plan.relay_interval, step)

    def reconcile(self) -> JobRun:
        def step() -> int:
            # While the fleet is paused, overdue timers wait on purpose and the brokers keep handing
            # them back: publishing them again would only add a copy of each per grace period. The
            # first sweep after `resume` publishes whatever a broker lost meanwhile.
            if self._timeouts.paused() is not None:
                return 0
            return _in_batches(lambda n: self._timeouts.republish_stranded(self.plan.grace, n))

        return self._run("reconciler", self.plan.sweep_interval, step)

    def purge(self) -> JobRun:
        """Delete finished timeouts older than the retention (skipped when it is off)."""
        keep = self._timeouts.settings.retention
        if keep is None:
            return JobRun("purge", skipped=True)
        timeouts = self._timeouts

        def step() -> int:
            # The cutoff is read once the lease is ours, from the registry's clock.
            before = retention.cutoff_ms(timeouts.clock.now_ms(), keep)
            states = registry.PURGED_STATES
            return retention.purge(timeouts.engine, before_ms=before, states=states, max_rows=MAX_PURGE_ROWS_PER_RUN)

        return self._run("purge", self.plan.purge_interval, step)

    def recheck(self) -> JobRun:
        """Ask the order store again about a sample of recently finished timeouts (skipped without one)."""
        read_status = self._order_status
        if read_status is None:
            return JobRun("recheck", skipped=True)
        timeouts, interval = self._timeouts, self.plan.recheck_interval

        def step() -> int:
            return recheck.run(timeouts.engine, read_status, now=timeouts.clock.now_ms(), min_age=interval)

        return self._run("recheck", interval, step)

    @property
    def jobs(self) -> list[tuple[str, Callable[[], JobRun], timedelta]]:
        """(name, run, interval) of every job this process runs: the purge only with a retention."""
        jobs = [
            ("relay", self.relay, self.plan.relay_interval),
            ("reconciler", self.reconcile, self.plan.sweep_interval),
        ]
        if self._timeouts.settings.retention is not None:
            jobs.append(("purge", self.purge, self.plan.purge_interval))
        if self._order_status is not None:
            jobs.append(("recheck", self.recheck, self.plan.recheck_interval))
        return jobs

    def run_once(self) -> list[JobRun]:
        return [run() for _, run, _ in self.jobs]

    def install_signal_handlers(self) -> None:
        """From now on SIGTERM/SIGINT stop `serve`: the job runs in progress finish, the leases go.
        `maintain` installs them before it serves metrics, so that a process seen up is one that
        stops cleanly."""

        def _request_stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: stopping maintenance", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, _request_stop)
        signal.signal(signal.SIGINT, _request_stop)

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Run every job, the first time at once, until `stop()` (a signal, once installed)."""
        scheduler = BackgroundScheduler(job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 30})
        first = datetime.now(UTC)  # a pass at start instead of after one interval
        for job, step, interval in self.jobs:
            scheduler.add_job(step, "interval", seconds=interval.total_seconds(), id=job, next_run_time=first)
        scheduler.start()
        keep = self._timeouts.settings.retention
        log.info(
            "maintenance ready: %s; retention %s",
            ", ".join(f"{job} every {interval.total_seconds():g}s" for job, _, interval in self.jobs),
            "off" if keep is None else f"{keep.total_seconds():g}s",
        )
        try:
            # Polled, not Event.wait(): a signal handler that sets an Event the main thread is waiting
            # on can deadlock on the Event's own lock.
            while not self._stop.is_set():
                time.sleep(STOP_POLL_S)
        finally:
            scheduler.shutdown(wait=True)  # the runs in progress finish first
            self._release_all()

    def _run(self, job: str, interval: timedelta, step: Callable[[], int]) -> JobRun:
        """One run of `job` under its lease: `step` does the run's work and returns its rows."""
        run = JobRun(job)
        if time.monotonic() < self._backoff_until.get(job, 0.0):
            run.skipped = True
            return run
        timeouts = self._timeouts
        outage = self._outages.setdefault(job, Outage(logging.getLogger(f"order_timeouts.maintain.{job}")))
        # The lease outlives a few missed runs, so that a slow run keeps it, and a dead holder's
        # lease is free again soon after.
        ttl_ms = int(max(interval.total_seconds() * 3, 2.0) * 1000)
        try:
            with timeouts.engine.begin() as conn:
                if not registry.take_lease(conn, job, self.holder, now=timeouts.clock.now_ms(), ttl_ms=ttl_ms):
                    run.skipped = True
                    return run
            run.rows = step()
        except TransportUnavailable as exc:
            run.error = str(exc)
            self._backoff_until[job] = time.monotonic() + outage.failed(timeouts.transport.component, run.error)
            return run
        except OrderStoreUnavailable as exc:
            run.error = str(exc)
            self._backoff_until[job] = time.monotonic() + outage.failed("the order store", run.error)
            return run
        except SQLAlchemyError as exc:
            run.error = f"registry unavailable: {type(exc).__name__}: {first_line(exc)}"
            self._backoff_until[job] = time.monotonic() + outage.failed("the registry database", run.error)
            return run
        outage.recovered()
        if self.metrics is not None:
            self.metrics.last_success.labels(job).set_to_current_time()
        if run.rows:
            log.info("%s: %s %d timeouts", job, JOB_VERBS[job], run.rows)
        return run

    def _release_all(self) -> None:
        try:
            with self._timeouts.engine.begin() as conn:
                for job in (*JOB_VERBS, GAUGES_LEASE):
                    registry.release_lease(conn, job, self.holder)
        except SQLAlchemyError:
            pass  # the leases expire on their own


def _in_batches(step: Callable[[int], int]) -> int:
    """Call `step(MAINTENANCE_BATCH)` until it does less than a batch, or MAX_ROWS_PER_RUN rows are done."""
    rows = 0
    while rows < MAX_ROWS_PER_RUN:
        done = step(MAINTENANCE_BATCH)
        rows += done
        if done < MAINTENANCE_BATCH:
            break
    return rows
