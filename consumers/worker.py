"""The worker loop: one member of the consumer group.

It is the only component that talks to the broker for acks (dramatiq's rule): receive a batch,
let the handler decide it in one registry transaction, then settle it with the transport.
SIGTERM and SIGINT let the current batch finish, then the loop exits.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, fields
from types import FrameType

from sqlalchemy.exc import SQLAlchemyError

from consumers.handler import BatchReport, Handler, RetryPolicy
from consumers.orders import OrderStore, load_order_store
from scheduler.api import OrderTimeouts
from scheduler.errors import TransportUnavailable
from scheduler.observability import WorkerMetrics
from scheduler.outage import Outage, first_line
from scheduler.registry import control

log = logging.getLogger("order_timeouts.worker")

#: longest a receive blocks, so that a stop request is seen within this time
RECEIVE_SLICE_S = 1.0


@dataclass
class WorkerTotals(BatchReport):
    batches: int = 0
    foreign: int = 0  #: timers of another deployment, dead-lettered by the transport

    def add(self, report: BatchReport) -> None:
        self.batches += 1
        for f in fields(BatchReport):
            if f.name != "lateness_ms":  # per batch only: totals would grow without bound
                setattr(self, f.name, getattr(self, f.name) + getattr(report, f.name))


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:64]


class Worker:
    def __init__(
        self,
        timeouts: OrderTimeouts,
        *,
        store: OrderStore | None = None,
        batch_size: int = 500,
        burst: bool = False,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._timeouts = timeouts
        self._transport = timeouts.transport
        self._outbox = timeouts.outbox
        self._handler = Handler(
            timeouts.engine,
            store or load_order_store(timeouts.settings),
            clock=timeouts.clock,
            worker_id=worker_id(),
            outbox=timeouts.outbox,
            retry=RetryPolicy.from_settings(timeouts.settings),
        )
        self._batch_size = batch_size
        self._burst = burst
        self._stop = threading.Event()
        self.metrics = metrics
        self.totals = WorkerTotals()
        self._foreign_unrecorded: dict[str, int] = {}  # by owner: counted here, not yet in the registry

    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def _request_stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: finishing the current batch, then stopping", signal.Signals(signum).name)
            # From another thread: the handler runs in the main thread, which may be inside
            # self._stop.wait() at a moment it holds the Event's lock, and Event.set() here would wait
            # for that lock forever (it is not reentrant).
            threading.Thread(target=self.stop, name="order-timeouts-stop").start()

        signal.signal(signal.SIGTERM, _request_stop)
        signal.signal(signal.SIGINT, _request_stop)

    def run(self) -> WorkerTotals:
        """Handle batches until stopped (or, in burst mode, until nothing is due)."""
        log.info(
            "worker %s ready: %s transport, batches of %d%s",
            self._handler.worker_id,
            self._transport.name,
            self._batch_size,
            ", burst" if self._burst else "",
        )
        outage = Outage(log)
        while not self._stop.is_set():
            try:
                batch = self._transport.receive(self._batch_size, 0.0 if self._burst else RECEIVE_SLICE_S)
                if batch.foreign:
                    self._record_foreign(batch.foreign)
                if not batch:
                    outage.recovered()
                    if self._burst:
                        break
                    continue
                started = time.perf_counter()
                settlement, report = self._handler.handle(batch)
                self._transport.settle(settlement)
                self._outbox.rearmed([message for _, message in settlement.retry])
            except TransportUnavailable as exc:
                self._stop.wait(outage.failed(self._transport.component, str(exc)))
                continue
            except SQLAlchemyError as exc:
                # Re-arming after the commit marks rows published in the registry; the timers are
                # already re-armed, and a row left unmarked is only published once more by the relay.
                self._stop.wait(outage.failed("the registry database", f"{type(exc).__name__}: {first_line(exc)}"))
                continue
            if settlement.rolled_back:
                what, _, reason = (settlement.unavailable or "registry database: the batch rolled back").partition(": ")
                self._stop.wait(outage.failed(f"the {what}", reason))
                continue
            outage.recovered()
            self.totals.add(report)
            if self.metrics is not None:
                self.metrics.observe(report, time.perf_counter() - started)
            if self._burst and not report.claimed and not batch.deliveries:
                # Due rows exist but other workers hold them; their transactions will finish them.
                self._stop.wait(0.01)
        return self.totals

    def _record_foreign(self, foreign: dict[str, int]) -> None:
        """Count timers of other deployments (dead-lettered by the transport) where `check`, `stats` and
        every process's /metrics read them: the registry's control table, not this process's memory.

        Never raises: the batch that came with them is handled first. Counts the registry could not
        take are added to the next ones."""
        count = sum(foreign.values())
        self.totals.foreign += count
        if self.metrics is not None:
            self.metrics.foreign.inc(count)
        for owner, n in foreign.items():
            self._foreign_unrecorded[owner] = self._foreign_unrecorded.get(owner, 0) + n
        pending = self._foreign_unrecorded
        try:
            with self._timeouts.engine.begin() as conn:
                control.add_counts(
                    conn,
                    control.FOREIGN,
                    {"total": sum(pending.values()), **{f"from:{owner}": n for owner, n in pending.items()}},
                    now=self._timeouts.clock.now_ms(),
                    last_from=max(foreign, key=lambda owner: foreign[owner]),
                    last_worker=self._handler.worker_id,
                )
        except SQLAlchemyError as exc:
            log.warning("foreign deliveries not recorded in the registry yet: %s", first_line(exc))
            return
        self._foreign_unrecorded = {}
