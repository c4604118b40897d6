"""scripts/bench.py: the product's transports against RQ and APScheduler,
same workload, same run, same machine. See plan.py for the sizes and the targets."""

from __future__ import annotations

import os
import platform
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from benchmarks.measure import SystemResult, cpu_steadiness, machine_load
from benchmarks.plan import BASELINES, PROFILES, SCALE_SYSTEMS, BenchPlan, Services, Sizes, available_systems
from benchmarks.report import derive_target_figures

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


#: rounds in which every product system and RQ schedule a bulk in turn (see run_bench)
BULK_ROUNDS = 3


def run_bench(plan: BenchPlan, progress: Callable[[str], None]) -> BenchRun:
    """Measure every system of the plan; a system that fails is reported and the run goes on.

    The bulk rate, whose target is a multiple of RQ's, is the best of the system's own bulk and of
    BULK_ROUNDS more, taken first in rounds where every system and RQ schedule in turn. A shared
    VM's speed drifts within a run (the CPU probe before and after says by how much), and bulks
    taken minutes apart would carry that drift into the ratio. APScheduler's bulk is no target: it keeps
    its one bulk.
    """
    from benchmarks.baselines import run_apscheduler, run_rq
    from benchmarks.workloads import run_product

    run = BenchRun(plan)
    if plan.sizes.scale_rows:
        return _run_scale(run, progress)
    # Baselines last: their slow drains should not warm anything up for the product, nor the reverse.
    ordered = [s for s in plan.systems if s not in BASELINES] + [s for s in plan.systems if s in BASELINES]
    rounds = _bulk_rounds(plan, [s for s in ordered if s != "baseline-apscheduler"], progress)
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
        samples = [r for r in (result.figures.get("bulk_rate"), *rounds.get(system, ())) if r is not None]
        if samples:
            result.figures["bulk_rate"], result.figures["bulk_rates"] = max(samples), samples
        run.results.append(result)
    run.meta["machine"]["load_after"] = machine_load()
    run.meta["machine"]["cpu_after"] = cpu_steadiness()
    derive_target_figures(run.results)
    return run


def _run_scale(run: BenchRun, progress: Callable[[str], None]) -> BenchRun:
    """The scale figures alone (scale.py), for the registry databases among the plan's systems."""
    from benchmarks.scale import run_scale

    for system in run.plan.systems:
        if system not in SCALE_SYSTEMS:
            progress(f"{system}: no scale figures (they are the registry database's)")
            continue
        try:
            result = run_scale(system, run.plan.sizes, run.plan.services, progress)
        except Exception as exc:  # one broken system must not cost the figures of the other
            result = SystemResult(system, notes=[f"{system} failed: {type(exc).__name__}: {exc}"])
            progress(traceback.format_exc())
        run.results.append(result)
    run.meta["machine"]["load_after"] = machine_load()
    run.meta["machine"]["cpu_after"] = cpu_steadiness()
    return run


def _bulk_rounds(plan: BenchPlan, systems: list[str], progress: Callable[[str], None]) -> dict[str, list[float]]:
    """Bulk rates of the systems scheduling in turn, round after round; a failed bulk is left out."""
    from benchmarks.baselines import rq_bulk_rate
    from benchmarks.workloads import bulk_rate

    rates: dict[str, list[float]] = {system: [] for system in systems}
    for round_number in range(1, BULK_ROUNDS + 1):
        progress(f"bulk round {round_number} of {BULK_ROUNDS}: {plan.sizes.bulk:,} each, {', '.join(systems)}")
        for system in systems:
            try:
                if system == "baseline-rq":
                    rates[system].append(rq_bulk_rate(plan.sizes, plan.services))
                else:
                    rates[system].append(bulk_rate(system, plan.sizes, plan.services))
            except Exception as exc:  # the system's own run reports what fails
                progress(f"{system}: bulk round {round_number} failed: {type(exc).__name__}: {exc}")
    return rates
