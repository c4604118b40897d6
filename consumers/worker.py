"""The worker loop: one member of the consumer group.

It is the only component that talks to the broker for acks (dramatiq's rule): receive a batch,
let the handler decide it in one registry transaction, then settle it with the transport.
SIGTERM and SIGINT let the current batch finish, then the loop exits. While the fleet is paused
(`order-timeouts pause`, or the circuit breaker) each batch is handed back whole and the loop
waits PAUSED_POLL_S before the next; a burst worker stops instead. An outage (the registry, the
broker, the order store) is ridden over with backoff; a burst worker gives up once it has lasted
BURST_OUTAGE_LIMIT_S, leaving what is due to the next run.
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

from consumers.breaker import Breaker
from consumers.handler import BatchReport, Handler, RetryPolicy
from consumers.orders import OrderStore, load_order_store
from scheduler.api import OrderTimeouts
from scheduler.clock import from_ms
from scheduler.config import Mode
from scheduler.errors import TransportUnavailable
from scheduler.observability import Health, WorkerMetrics
from scheduler.outage import Outage, first_line
from scheduler.registry import control
from scheduler.registry.control import Pause

log = logging.getLogger("order_timeouts.worker")

#: longest a receive blocks, so that a stop request is seen within this time
RECEIVE_SLICE_S = 1.0
#: how long a paused worker waits before it receives again (and reads the pause row)
PAUSED_POLL_S = 1.0
#: how long a burst worker rides over an outage before it gives up (a run from cron or a deploy
#: step must end; what is due stays pending for the next run)
BURST_OUTAGE_LIMIT_S = 30.0


@dataclass
class WorkerTotals(BatchReport):
    batches: int = 0
    foreign: int = 0  #: timers of another deployment, dead-lettered by the transport
    #: why a burst run ended before everything due was handled: the outage it gave up on
    gave_up: str | None = None

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
        burst_outage_limit_s: float = BURST_OUTAGE_LIMIT_S,
        metrics: WorkerMetrics | None = None,
        mode: Mode | None = None,
    ) -> None:
        self._timeouts = timeouts
        settings = timeouts.settings
        self._mode = mode or settings.mode
        self._transport = timeouts.transport
        self._outbox = timeouts.outbox
        self._handler = Handler(
            timeouts.engine,
            store or load_order_store(timeouts.settings),
            clock=timeouts.clock,
            worker_id=worker_id(),
            outbox=timeouts.outbox,
            retry=RetryPolicy.from_settings(settings),
            mode=self._mode,
            breaker=Breaker(timeouts.engine, timeouts.clock, settings.breaker) if settings.breaker.active else None,
            transport=timeouts.transport.name,
        )
        self._batch_size = batch_size
        self._burst = burst
        self._burst_outage_limit_s = burst_outage_limit_s
        self._stop = threading.Event()
        self.metrics = metrics
        #: set by `worker --metrics-port`: what /healthz and /readyz answer
        self.health: Health | None = None
        self.totals = WorkerTotals()
        #: the pause this worker last reported, so that it logs each pause once
        self._seen_pause: tuple[int, str] | None = None
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
            "worker %s ready: %s transport, batches of %d%s%s",
            self._handler.worker_id,
            self._transport.name,
            self._batch_size,
            ", burst" if self._burst else "",
            ", SHADOW mode: records would_cancel, cancels nothing" if self._mode is Mode.SHADOW else "",
        )
        outage = Outage(log)
        health = self.health or Health()
        while not self._stop.is_set():
            health.beat()
            try:
                batch = self._transport.receive(self._batch_size, 0.0 if self._burst else RECEIVE_SLICE_S)
                if batch.foreign:
                    self._record_foreign(batch.foreign)
                if not batch:
                    outage.recovered()
                    health.connected(True)
                    if self._burst:
                        break
                    continue
                started = time.perf_counter()
                settlement, report = self._handler.handle(batch)
                self._transport.settle(settlement)
                self._outbox.rearmed([message for _, message in settlement.retry])
            except TransportUnavailable as exc:
                health.connected(False)
                if self._ride_over(outage, self._transport.component, str(exc)):
                    continue
                break
            except SQLAlchemyError as exc:
                health.connected(False)
                # Re-arming after the commit marks rows published in the registry; the timers are
                # already re-armed, and a row left unmarked is only published once more by the relay.
                if self._ride_over(outage, "the registry database", f"{type(exc).__name__}: {first_line(exc)}"):
                    continue
                break
            if settlement.paused is not None:
                outage.recovered()
                self.totals.add(report)
                self._report_pause(settlement.paused)
                if self._burst:
                    break
                self._stop.wait(PAUSED_POLL_S)
                continue
            if self._seen_pause is not None:
                log.warning("the fleet is resumed: cancelling again")
                self._seen_pause = None
            if settlement.rolled_back:
                health.connected(False)
                what, _, reason = (settlement.unavailable or "registry database: the batch rolled back").partition(": ")
                if self._ride_over(outage, f"the {what}", reason):
                    continue
                break
            outage.recovered()
            health.connected(True)
            self.totals.add(report)
            if self.metrics is not None:
                self.metrics.observe(report, time.perf_counter() - started)
            if self._burst and not report.claimed and not batch.deliveries:
                # Due rows exist but other workers hold them; their transactions will finish them.
                self._stop.wait(0.01)
        return self.totals

    def _ride_over(self, outage: Outage, what: str, reason: str) -> bool:
        """Record the failure and wait its backoff; False when a burst worker gives up instead."""
        wait_s = outage.failed(what, reason)
        if self._burst and outage.lasted_s >= self._burst_outage_limit_s:
            self.totals.gave_up = f"{outage.describe()} unavailable for {outage.lasted_s:.0f}s: {reason}"
            log.error("burst run stopped, what is due stays pending for the next run: %s", self.totals.gave_up)
            return False
        self._stop.wait(wait_s)
        return True

    def _report_pause(self, pause: Pause) -> None:
        if self._seen_pause == (pause.since_ms, pause.by.value):
            return
        self._seen_pause = (pause.since_ms, pause.by.value)
        log.warning(
            "the fleet is paused by %s since %s: %s; cancelling nothing, timers stay pending until "
            "`order-timeouts resume`",
            pause.by.value,
            from_ms(pause.since_ms).isoformat(timespec="seconds"),
            pause.reason,
        )

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
