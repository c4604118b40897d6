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

log = logging.getLogger("order_timeouts.worker")

#: longest a receive blocks, so that a stop request is seen within this time
RECEIVE_SLICE_S = 1.0


@dataclass
class WorkerTotals(BatchReport):
    batches: int = 0

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
            transport=timeouts.transport.name,
        )
        self._batch_size = batch_size
        self._burst = burst
        self._stop = threading.Event()
        self.metrics = metrics
        self.totals = WorkerTotals()

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
