"""`order-timeouts maintain`: the outbox relay and the reconciler, as APScheduler interval jobs.

- relay: registry rows the broker has not confirmed go to the broker, in due order, in batches,
  with backoff while the broker is down. This is what makes `schedule()` safe during an outage.
- reconciler: pending rows overdue by more than a grace period are published again, so a broker
  that lost everything (FLUSHALL, deleted queues) still ends with every timeout handled within
  the grace period plus one sweep.

Jobs never overlap (max_instances=1) and missed runs coalesce. Several `maintain` processes may
run: each job takes a lease row in the registry first, so only one process works on it at a time,
and a killed process's lease simply expires.
"""

from __future__ import annotations

import logging
import os
import random
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

from scheduler import registry
from scheduler.api import OrderTimeouts
from scheduler.errors import TransportUnavailable

log = logging.getLogger("order_timeouts.maintain")

#: rows per relay/reconciler round trip
MAINTENANCE_BATCH = 2000
#: most rows one job run handles before giving the other job and the lease a turn
MAX_ROWS_PER_RUN = 100_000
#: longest backoff between relay attempts while the broker is down: what is scheduled during an
#: outage reaches the broker at most this long (and a relay interval) after it is back
MAX_BACKOFF_S = 5.0
#: how often `serve` looks whether it was asked to stop
STOP_POLL_S = 0.2


@dataclass(frozen=True)
class MaintenancePlan:
    relay_interval: timedelta = timedelta(seconds=1)
    sweep_interval: timedelta = timedelta(seconds=15)
    grace: timedelta = timedelta(seconds=60)


@dataclass
class JobRun:
    job: str
    rows: int = 0
    skipped: bool = False  #: another process holds the lease, or the job is backing off
    error: str | None = None


class Maintenance:
    def __init__(self, timeouts: OrderTimeouts, plan: MaintenancePlan | None = None) -> None:
        self._timeouts = timeouts
        self.plan = plan or MaintenancePlan()
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[:128]
        self._backoff_until: dict[str, float] = {}
        self._backoff_s: dict[str, float] = {}
        self._stop = threading.Event()

    def relay(self) -> JobRun:
        return self._run("relay", self.plan.relay_interval, self._timeouts.publish_unpublished)

    def reconcile(self) -> JobRun:
        return self._run(
            "reconciler", self.plan.sweep_interval, lambda n: self._timeouts.republish_stranded(self.plan.grace, n)
        )

    def run_once(self) -> list[JobRun]:
        return [self.relay(), self.reconcile()]

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
        """Run both jobs, the first time at once, until `stop()` (a signal, once installed)."""
        scheduler = BackgroundScheduler(job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 30})
        first = datetime.now(UTC)  # a pass at start instead of after one interval
        for job, step, interval in (
            ("relay", self.relay, self.plan.relay_interval),
            ("reconciler", self.reconcile, self.plan.sweep_interval),
        ):
            scheduler.add_job(step, "interval", seconds=interval.total_seconds(), id=job, next_run_time=first)
        scheduler.start()
        try:
            # Polled, not Event.wait(): a signal handler that sets an Event the main thread is waiting
            # on can deadlock on the Event's own lock.
            while not self._stop.is_set():
                time.sleep(STOP_POLL_S)
        finally:
            scheduler.shutdown(wait=True)  # the runs in progress finish first
            self._release_all()

    def _run(self, job: str, interval: timedelta, step: Callable[[int], int]) -> JobRun:
        run = JobRun(job)
        if time.monotonic() < self._backoff_until.get(job, 0.0):
            run.skipped = True
            return run
        timeouts = self._timeouts
        # The lease outlives a few missed runs, so that a slow run keeps it, and a dead holder's
        # lease is free again soon after.
        ttl_ms = int(max(interval.total_seconds() * 3, 2.0) * 1000)
        try:
            with timeouts.engine.begin() as conn:
                if not registry.take_lease(conn, job, self._holder, now=timeouts.clock.now_ms(), ttl_ms=ttl_ms):
                    run.skipped = True
                    return run
            while run.rows < MAX_ROWS_PER_RUN:
                done = step(MAINTENANCE_BATCH)
                run.rows += done
                if done < MAINTENANCE_BATCH:
                    break
        except TransportUnavailable as exc:
            run.error = str(exc)
            ceiling = min(self._backoff_s.get(job, 0.5) * 2, MAX_BACKOFF_S)
            self._backoff_s[job] = ceiling
            # Jitter: several maintain processes do not retry in step.
            delay = random.uniform(ceiling / 2, ceiling)
            self._backoff_until[job] = time.monotonic() + delay
            log.warning("%s: broker unavailable, next attempt in %.1fs: %s", job, delay, exc)
            return run
        except SQLAlchemyError as exc:
            run.error = f"registry unavailable: {type(exc).__name__}"
            log.warning("%s: %s", job, run.error)
            return run
        self._backoff_s.pop(job, None)
        if run.rows:
            log.info("%s: published %d timeouts", job, run.rows)
        return run

    def _release_all(self) -> None:
        try:
            with self._timeouts.engine.begin() as conn:
                for job in ("relay", "reconciler"):
                    registry.release_lease(conn, job, self._holder)
        except SQLAlchemyError:
            pass  # the leases expire on their own
