"""Prometheus metrics for `worker` and `maintain` (their logging: scheduler/logs.py).

Metric names follow Prometheus conventions: a `order_timeouts_` namespace, `_total` counters,
base units (seconds). Registry gauges (pending, overdue lag, dead) are read from the database at
scrape time, so every process reports the same truth and nothing has to be kept in sync.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from scheduler import recheck, registry
from scheduler.clock import Clock
from scheduler.database import reading
from scheduler.registry import control

_LATENESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class WorkerMetrics:
    """What one worker process counts. Outcomes: cancelled, paid, already_cancelled, retried, dead, stale, early."""

    def __init__(self, prometheus: CollectorRegistry) -> None:
        self.fired = Counter(
            "order_timeouts_fired_total", "Timeouts claimed by this worker (due and still pending)", registry=prometheus
        )
        self.outcomes = Counter(
            "order_timeouts_outcomes_total", "What handling a timeout led to", ["outcome"], registry=prometheus
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
        for outcome in ("cancelled", "paid", "already_cancelled", "retried", "dead", "stale", "early"):
            count = getattr(report, outcome)
            if count:
                self.outcomes.labels(outcome).inc(count)
        self.batch_seconds.observe(seconds)
        for late in report.lateness_ms:
            self.lateness_seconds.observe(max(late, 0) / 1000)


class RegistryCollector(Collector):
    """Gauges read from the registry at scrape time."""

    def __init__(self, engine: Engine, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        pending = GaugeMetricFamily("order_timeouts_pending", "Timeouts waiting for their due time or a worker")
        overdue = GaugeMetricFamily("order_timeouts_overdue", "Pending timeouts past their due time")
        lag = GaugeMetricFamily("order_timeouts_overdue_lag_seconds", "Age of the oldest overdue pending timeout")
        dead = GaugeMetricFamily("order_timeouts_dead", "Dead-lettered timeouts waiting for a replay")
        up = GaugeMetricFamily("order_timeouts_registry_up", "1 when the registry answered this scrape")
        now = self._clock.now_ms()
        offset = getattr(self._clock, "offset_ms", None)
        if offset is not None:
            skew = GaugeMetricFamily(
                "order_timeouts_clock_offset_seconds",
                "This process's clock minus the registry database's (the one that decides), at the last reading",
            )
            skew.add_metric([], -offset / 1000)
            yield skew
        try:
            with reading(self._engine) as conn:
                # Each read from the index over the rows it counts: the cost of a scrape does not grow
                # with the finished rows the registry keeps.
                registry.read_by_index(conn)
                pending_count = registry.count_pending(conn)
                dead_count = registry.count_dead(conn)
                next_due = registry.next_due_ms(conn)
                overdue_count = registry.count_pending(conn, due_before=now)
                found = recheck.figures(conn)
                foreign = control.read(conn, control.FOREIGN) or {}
        except SQLAlchemyError:
            up.add_metric([], 0)
            yield up
            return
        pending.add_metric([], pending_count)
        overdue.add_metric([], overdue_count)
        lag.add_metric([], max(now - next_due, 0) / 1000 if next_due is not None else 0.0)
        dead.add_metric([], dead_count)
        up.add_metric([], 1)
        yield from (pending, overdue, lag, dead, up)
        # Fleet-wide counts kept in the registry (control table), the same from every process.
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


def serve_metrics(port: int, engine: Engine, clock: Clock) -> CollectorRegistry:
    """Start the /metrics endpoint on `port` (0.0.0.0) and return the registry to add metrics to."""
    prometheus = CollectorRegistry()
    prometheus.register(RegistryCollector(engine, clock))
    start_http_server(port, registry=prometheus)
    return prometheus
