"""`order-timeouts bench` / scripts/bench.py: the product's transports against RQ and APScheduler,
same workload, same run, same machine. See plan.py for the sizes and the targets."""

from __future__ import annotations

import os
import platform
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from scheduler.bench.measure import SystemResult, cpu_steadiness, machine_load
from scheduler.bench.plan import BASELINES, PROFILES, BenchPlan, Services, Sizes, available_systems
from scheduler.bench.report import derive_target_figures

__all__ = ["PROFILES", "BenchPlan", "BenchRun", "Services", "Sizes", "available_systems", "run_bench"]


class BenchRun:
    """The results of one run, in the plan's order, with what the machine looked like."""

    def __init__(self, plan: BenchPlan) -> None:
        self.plan = plan
        self.results: list[SystemResult] = []
        self.meta: dict[str, Any] = {
            "bench": "order-timeouts",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "profile": plan.profile,
            "sizes": plan.sizes.__dict__,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_before": machine_load(),
                "cpu_before": cpu_steadiness(),
            },
        }


def run_bench(plan: BenchPlan, progress: Callable[[str], None]) -> BenchRun:
    """Measure every system of the plan; a system that fails is reported and the run goes on."""
    from scheduler.bench.baselines import run_apscheduler, run_rq
    from scheduler.bench.workloads import run_product

    run = BenchRun(plan)
    # Baselines last: their slow drains should not warm anything up for the product, nor the reverse.
    ordered = [s for s in plan.systems if s not in BASELINES] + [s for s in plan.systems if s in BASELINES]
    for system in ordered:
        try:
            if system == "baseline-rq":
                result = run_rq(plan.sizes, plan.services, progress)
            elif system == "baseline-apscheduler":
                result = run_apscheduler(plan.sizes, plan.services, progress)
            else:
                result = run_product(system, plan.sizes, plan.services, progress)
        except Exception as exc:  # one broken system must not cost the figures of the others
            result = SystemResult(system, notes=[f"{system} failed: {type(exc).__name__}: {exc}"])
            progress(traceback.format_exc())
        run.results.append(result)
    run.meta["machine"]["load_after"] = machine_load()
    run.meta["machine"]["cpu_after"] = cpu_steadiness()
    derive_target_figures(run.results)
    return run
