"""Prometheus metrics for `worker` and `maintain` (their logging: scheduler/logs.py).

Metric names follow Prometheus conventions: a `order_timeouts_` namespace, `_total` counters,
base units (seconds). Registry gauges (pending, overdue lag, dead, ...) are read from the database at
scrape time. They describe the whole deployment, so one process exports them: the `maintain`
process that holds the `gauges` lease (GaugeLease). Each deployment then has one series of each,
however many replicas are scraped, which is what an autoscaler and an alert need; workers export
what they count themselves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from scheduler import recheck, registry
from scheduler.clock import Clock
from scheduler.database import reading
from scheduler.registry import control
from scheduler.registry.control import Pause

_LATENESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class WorkerMetrics:
    """What one worker process counts. Outcomes: cancelled, paid, already_cancelled, would_cancel, retried,
    dead, stale, early."""

    def __init__(self, prometheus: CollectorRegistry) -> None:
        self.fired = Counter(
            "order_timeouts_fired_total", "Timeouts claimed by this worker (due and still pending)", registry=prometheus
        )
        self.outcomes = Counter(
            "order_timeouts_outcomes_total", "What handling a timeout led to", ["outcome"], registry=prometheus
        )
        self.breaker_trips = Counter(
            "order_timeouts_breaker_trips_total",
            "Pauses this worker's circuit breaker started (the fleet's pause: order_timeouts_paused)",
            registry=prometheus,
        )
        self.foreign = Counter(
            "order_timeouts_foreign_deliveries_total",
            "Timers of another deployment (another registry) delivered to this worker and dead-lettered",
            registry=prometheus,
        )
        self.batch_seconds = Histogram(
            "order_timeouts_batch_duration_seconds",
            "Time from receiving a batch to settling it with the broker",
            buckets=_BATCH_BUCKETS,
            registry=prometheus,
        )
        self.lateness_seconds = Histogram(
            "order_timeouts_lateness_seconds",
            "Claim time minus due time of each timeout",
            buckets=_LATENESS_BUCKETS,
            registry=prometheus,
        )

    def observe(self, report: Any, seconds: float) -> None:
        self.fired.inc(report.claimed)
        self.breaker_trips.inc(report.breaker_trips)
        for outcome in ("cancelled", "paid", "already_cancelled", "would_cancel", "retried", "dead", "stale", "early"):
            count = getattr(report, outcome)
            if count:
                self.outcomes.labels(outcome).inc(count)
        self.batch_seconds.observe(seconds)
        for late in report.lateness_ms:
            self.lateness_seconds.observe(max(late, 0) / 1000)


#: the lease row (order_timeouts_leases) of the process that exports the registry gauges
GAUGES_LEASE = "gauges"
#: how long the gauges stay with the process that exported them last: three scrapes at Prometheus's
#: usual 15 s, so that the holder keeps them while it is scraped, and another replica takes over
#: within this long of the holder's end
GAUGES_LEASE_TTL = timedelta(seconds=45)


@dataclass(frozen=True)
class GaugeLease:
    """Who may export the registry gauges: the holder of the `gauges` lease, renewed at each scrape."""

    holder: str
    ttl: timedelta = GAUGES_LEASE_TTL


class MaintenanceMetrics:
    """What a `maintain` process reports of its jobs (relay, reconciler, purge)."""

    def __init__(self, prometheus: CollectorRegistry, retention: timedelta | None) -> None:
        self.last_success = Gauge(
            "order_timeouts_maintenance_last_success_timestamp_seconds",
            "Unix time of the last run of each maintenance task that finished without error (lease holder only)",
            ["task"],
            registry=prometheus,
        )
        self.retention = Gauge(
            "order_timeouts_retention_seconds",
            "ORDER_TIMEOUTS_RETENTION: finished timeouts older than this are purged (absent when off)",
            registry=prometheus,
        )
        if retention is not None:
            self.retention.set(retention.total_seconds())


class ClockCollector(Collector):
    """This process's clock offset to the registry's, as last read (no query of its own)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        offset = getattr(self._clock, "offset_ms", None)
        if offset is not None:
            skew = GaugeMetricFamily(
                "order_timeouts_clock_offset_seconds",
                "This process's clock minus the registry database's (the one that decides), at the last reading",
            )
            skew.add_metric([], -offset / 1000)
            yield skew


class RegistryCollector(Collector):
    """Gauges read from the registry at scrape time; with a lease, only while this process holds it.

    `order_timeouts_registry_up` is always exported: it is this process's view of its database."""

    def __init__(self, engine: Engine, clock: Clock, lease: GaugeLease | None = None) -> None:
        self._engine = engine
        self._clock = clock
        self._lease = lease

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        pending = GaugeMetricFamily("order_timeouts_pending", "Timeouts waiting for their due time or a worker")
        overdue = GaugeMetricFamily("order_timeouts_overdue", "Pending timeouts past their due time")
        lag = GaugeMetricFamily("order_timeouts_overdue_lag_seconds", "Age of the oldest overdue pending timeout")
        dead = GaugeMetricFamily("order_timeouts_dead", "Dead-lettered timeouts waiting for a replay")
        up = GaugeMetricFamily("order_timeouts_registry_up", "1 when the registry answered this scrape")
        due_soon = GaugeMetricFamily("order_timeouts_due_next_hour", "Pending timeouts coming due within the next hour")
        unpublished = GaugeMetricFamily(
            "order_timeouts_unpublished", "Pending timeouts the broker has not confirmed yet: the relay's backlog"
        )
        finished_age = GaugeMetricFamily(
            "order_timeouts_oldest_finished_age_seconds",
            "Age of the oldest done or revoked timeout still in the registry: what the purge has left",
        )
        now = self._clock.now_ms()
        yield from ClockCollector(self._clock).collect()
        try:
            if self._lease is not None:
                with self._engine.begin() as conn:
                    ttl_ms = int(self._lease.ttl.total_seconds() * 1000)
                    held = registry.take_lease(conn, GAUGES_LEASE, self._lease.holder, now=now, ttl_ms=ttl_ms)
                if not held:
                    up.add_metric([], 1)
                    yield up
                    return
            with reading(self._engine) as conn:
                # Each read from the index over the rows it counts: the cost of a scrape does not grow
                # with the finished rows the registry keeps.
                registry.read_by_index(conn)
                pending_count = registry.count_pending(conn)
                dead_count = registry.count_dead(conn)
                next_due = registry.next_due_ms(conn)
                overdue_count = registry.count_pending(conn, due_before=now)
                due_soon_count = registry.count_pending(conn, due_after=now, due_before=now + 3_600_000)
                unpublished_count = registry.count_unpublished(conn)
                oldest_finished = registry.oldest_finished_ms(conn, registry.PURGED_STATES)
                paused = control.read_pause(conn)
                found = recheck.figures(conn)
                foreign = control.read(conn, control.FOREIGN) or {}
        except SQLAlchemyError:
            up.add_metric([], 0)
            yield up
            return
        pending.add_metric([], pending_count)
        overdue.add_metric([], overdue_count)
        due_soon.add_metric([], due_soon_count)
        lag.add_metric([], max(now - next_due, 0) / 1000 if next_due is not None else 0.0)
        dead.add_metric([], dead_count)
        unpublished.add_metric([], unpublished_count)
        finished_age.add_metric([], max(now - oldest_finished, 0) / 1000 if oldest_finished is not None else 0.0)
        up.add_metric([], 1)
        yield from (pending, overdue, due_soon, lag, dead, unpublished, finished_age, up, *_pause_gauges(paused, now))
        # Fleet-wide counts kept in the registry (control table), exported with the gauges above.
        for name, documentation, value in (
            ("rechecked", "Finished timeouts maintain's recheck asked the order store about again", found["checked"]),
            (
                "late_payments",
                "Rechecked orders paid after this product cancelled them (refunds)",
                found["late_payments"],
            ),
            (
                "recheck_disagreements",
                "Rechecked timeouts whose recorded outcome the order store now contradicts",
                found["disagreements"],
            ),
            (
                "registry_foreign_deliveries",
                "Timers of other deployments dead-lettered by this deployment's workers",
                int(foreign.get("total", 0)),
            ),
        ):
            family = CounterMetricFamily(f"order_timeouts_{name}", documentation)
            family.add_metric([], value)
            yield family


def _pause_gauges(pause: Pause | None, now: int) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    """1 while the fleet is paused, labelled with who paused it and why; and for how long."""
    paused = GaugeMetricFamily(
        "order_timeouts_paused",
        "1 while the fleet is paused (order-timeouts pause, or the circuit breaker): nothing is cancelled",
        labels=["by", "reason"],
    )
    seconds = GaugeMetricFamily("order_timeouts_paused_seconds", "How long the fleet has been paused (0: it is not)")
    if pause is None:
        paused.add_metric(["", ""], 0)
        seconds.add_metric([], 0)
    else:
        paused.add_metric([pause.by.value, pause.reason], 1)
        seconds.add_metric([], max(now - pause.since_ms, 0) / 1000)
    return paused, seconds


#: a worker whose loop has not come round for this long is stuck: /healthz answers 503. Above the
#: longest batch (the order store's timeouts, the registry's idle-in-transaction timeout of 12 s) and
#: the longest outage back-off (5 s), during which the loop keeps coming round.
STUCK_AFTER_S = 60.0


class Health:
    """A worker's /healthz (its loop comes round) and /readyz (connected to its broker and database)."""

    def __init__(self, stuck_after_s: float = STUCK_AFTER_S) -> None:
        self._stuck_after_s = stuck_after_s
        self._last_beat = time.monotonic()
        self._connected = False

    def beat(self) -> None:
        """The loop came round: called at each turn, whether or not there was work."""
        self._last_beat = time.monotonic()

    def connected(self, connected: bool) -> None:
        """A receive and its batch went through (True), or the broker or the database failed (False)."""
        self._connected = connected

    @property
    def alive(self) -> bool:
        return time.monotonic() - self._last_beat < self._stuck_after_s

    @property
    def ready(self) -> bool:
        return self._connected and self.alive


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # the base class's name
        """Probes and scrapes every few seconds are not worth a log line each."""


def serve_metrics(
    port: int, engine: Engine, clock: Clock, lease: GaugeLease | None = None, health: Health | None = None
) -> CollectorRegistry:
    """Serve /metrics on `port` (0.0.0.0), and /healthz and /readyz when `health` is given (200 or
    503); return the registry to add metrics to. The registry gauges are exported under `lease`
    (maintain), or not at all without one (workers)."""
    prometheus = CollectorRegistry()
    prometheus.register(RegistryCollector(engine, clock, lease) if lease is not None else ClockCollector(clock))
    metrics = make_wsgi_app(prometheus)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if health is not None and path in ("/healthz", "/readyz"):
            ok = health.alive if path == "/healthz" else health.ready
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not ok\n"]
        return metrics(environ, start_response)

    server = make_server("0.0.0.0", port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="order-timeouts-metrics", daemon=True).start()
    return prometheus
