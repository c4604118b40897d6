"""What the bench measures and how big: systems, sizes per profile, the targets of DESIGN.md."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from typing import Any

#: the product's transports, in the order the table shows them
PRODUCT_SYSTEMS = ("sql-sqlite", "sql-postgresql", "redis", "rabbitmq", "rq")
#: what users would pick instead, measured in the same run on the same machine
BASELINES = ("baseline-rq", "baseline-apscheduler")
#: the systems of the scale figures: the registry's two databases
SCALE_SYSTEMS = ("sql-postgresql", "sql-sqlite")
BASELINE_LABELS = {"baseline-rq": "RQ", "baseline-apscheduler": "APScheduler"}


def available_systems() -> list[str]:
    """Every system the bench knows; the product's `rq` transport only once its module exists."""
    product = [name for name in PRODUCT_SYSTEMS if name != "rq" or _has_rq_transport()]
    return [*product, *BASELINES]


def _has_rq_transport() -> bool:
    return importlib.util.find_spec("scheduler.transports.rq.adapter") is not None


@dataclass(frozen=True)
class Sizes:
    #: orders per bulk schedule (`schedule_many`, RQ pipelined `enqueue_in`)
    bulk: int
    #: APScheduler adds jobs one by one, each in its own job store transaction: its bulk sample is capped
    bulk_apscheduler: int
    #: single `schedule()` calls, each in its own order transaction
    latency: int
    #: timeouts due at the same moment, drained by the worker processes
    burst: int
    #: steady load: timeouts coming due per second, and for how long
    steady_rate: int
    steady_seconds: float
    #: far-future timeouts kept pending for the loaded measurement; 0 skips it
    pending: int
    #: finished timeouts made in SQL and purged, for the purge rate (the `sql-*` systems: one per registry database)
    purge: int = 0
    #: finished timeouts purged while a second steady load runs, against a third without the purge; 0 skips it
    purge_load: int = 0
    #: worker processes of the consumer group (RQ: SimpleWorkers)
    workers: int = 2
    #: timeouts per worker transaction
    batch_size: int = 500
    #: seconds to let the worker processes start (imports, connections) before the first burst
    worker_start_s: float = 2.0
    #: the scale figures (scale.py): registry rows of the large PostgreSQL and SQLite registries,
    #: and of the small one both are compared with; 0 rows: no scale figures, the other figures
    scale_rows: int = 0
    scale_sqlite_rows: int = 0
    scale_small_rows: int = 10_000


PROFILES: dict[str, Sizes] = {
    "full": Sizes(
        bulk=100_000,
        bulk_apscheduler=10_000,
        latency=1000,
        burst=20_000,
        steady_rate=500,
        steady_seconds=20.0,
        pending=1_000_000,
        purge=300_000,
    ),
    "quick": Sizes(
        bulk=10_000,
        bulk_apscheduler=1000,
        latency=100,
        burst=2000,
        steady_rate=500,
        steady_seconds=2.0,
        pending=20_000,
        purge=50_000,
        worker_start_s=1.5,
    ),
    # Only the admin commands at 10M registry rows against 10k (scale.py): a few minutes per database.
    "scale": Sizes(
        bulk=0,
        bulk_apscheduler=0,
        latency=0,
        burst=0,
        steady_rate=0,
        steady_seconds=0.0,
        pending=0,
        scale_rows=10_000_000,
        scale_sqlite_rows=10_000_000,
    ),
    # For the test suite: every figure, in a few seconds per system.
    "tiny": Sizes(
        bulk=500,
        bulk_apscheduler=200,
        latency=20,
        burst=200,
        steady_rate=200,
        steady_seconds=1.0,
        pending=1000,
        purge=2000,
        purge_load=2000,
        worker_start_s=1.0,
    ),
}


@dataclass(frozen=True)
class Services:
    """Where the shared services are. The bench works in its own schema, key prefix and vhost."""

    postgres_url: str = "postgresql://postgres:postgres@127.0.0.1:5432/test"
    redis_url: str = "redis://127.0.0.1:6379/0"
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"


@dataclass(frozen=True)
class BenchPlan:
    systems: tuple[str, ...]
    sizes: Sizes
    profile: str
    services: Services = field(default_factory=Services)

    @classmethod
    def build(cls, profile: str, systems: list[str] | None, services: Services, **sizes: Any) -> BenchPlan:
        given = {key: value for key, value in sizes.items() if value is not None}
        every = SCALE_SYSTEMS if PROFILES[profile].scale_rows else tuple(available_systems())
        chosen = tuple(systems) if systems else every
        return cls(systems=chosen, sizes=replace(PROFILES[profile], **given), profile=profile, services=services)


@dataclass(frozen=True)
class Target:
    figure: str
    #: "min": the figure must be at least `value`; "max": at most
    kind: str
    value: float
    #: the systems the target is for
    systems: tuple[str, ...]
    text: str
    #: a figure of the scale profile (scale.py), which measures none of the others
    scale: bool = False

    def met(self, measured: float | None) -> bool | None:
        if measured is None:
            return None
        return measured >= self.value if self.kind == "min" else measured <= self.value


_ALL = ("sql-sqlite", "sql-postgresql", "redis", "rabbitmq", "rq")
_POSTGRES = ("sql-postgresql", "redis", "rabbitmq", "rq")

#: DESIGN.md, "Figures the product must reach"
TARGETS: tuple[Target, ...] = (
    Target("bulk_rate", "min", 20_000, _POSTGRES, "≥ 20k/s (registry on PostgreSQL)"),
    Target("bulk_vs_rq", "min", 6.0, _POSTGRES, "≥ 6x RQ"),
    Target("burst_all_finished_s", "max", 4.0, _POSTGRES, "≤ 4 s after due"),
    Target("burst_vs_rq", "min", 10.0, _POSTGRES, "≥ 10x RQ's drain rate"),
    Target("steady_p99_ms", "max", 250.0, ("redis", "rabbitmq", "rq"), "p99 ≤ 250 ms"),
    Target("steady_p99_ms", "max", 1000.0, ("sql-sqlite", "sql-postgresql"), "p99 ≤ 1 s"),
    Target("redis_bytes_per_timeout", "max", 150.0, ("redis",), "≤ 150 B"),
    Target(
        "async_schedule_call_p99_ratio", "max", 1.5, _ALL, "AsyncOrderTimeouts.schedule() p99 ≤ 1.5x the sync one's"
    ),
    Target("loaded_schedule_ratio", "min", 0.8, _ALL, "within 20 % of empty"),
    Target("loaded_fire_ratio", "min", 0.8, _ALL, "within 20 % of empty"),
    Target("purge_rate", "min", 50_000, ("sql-postgresql",), "≥ 50k rows/s on PostgreSQL"),
    Target("steady_purge_ratio", "max", 2.0, _ALL, "≤ 2x without the purge"),
    Target("admin_worst_process_ratio", "max", 3.0, SCALE_SYSTEMS, "each admin command at 10M rows ≤ 3x 10k", True),
)


def targets_for(system: str) -> list[Target]:
    return [target for target in TARGETS if system in target.systems]
