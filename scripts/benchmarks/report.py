"""The bench's output: a table for people (each figure against the baselines and its target), a JSON
document for machines, a PNG of the lateness distributions."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from benchmarks.measure import SystemResult
from benchmarks.plan import BASELINE_LABELS, BASELINES, targets_for

PLOT_SKIPPED = "plot skipped: pip install order-timeouts[bench]"


def _rate(value: float) -> str:
    return f"{value / 1000:,.1f}k/s" if value >= 1000 else f"{value:,.0f}/s"


def _ms(value: float) -> str:
    return f"{value / 1000:,.2f} s" if value >= 10_000 else f"{value:,.1f} ms"


def _times(value: float) -> str:
    return f"{value:.2f}x"


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    show: Callable[[float], str]
    #: "higher" or "lower" is better; None: no ratio against the baselines
    better: str | None


FIGURES: tuple[Figure, ...] = (
    Figure("bulk_rate", "bulk schedule (schedule_many)", _rate, "higher"),
    Figure("schedule_p50_ms", "schedule() in an order transaction p50", _ms, "lower"),
    Figure("schedule_p99_ms", "schedule() in an order transaction p99", _ms, "lower"),
    Figure("async_schedule_p50_ms", "async schedule() in an order transaction p50", _ms, None),
    Figure("async_schedule_p99_ms", "async schedule() in an order transaction p99", _ms, None),
    Figure("async_schedule_p99_ratio", "async order transaction p99, async / sync", _times, None),
    Figure("schedule_call_p50_ms", "the schedule() call in an order transaction p50", _ms, None),
    Figure("schedule_call_p99_ms", "the schedule() call in an order transaction p99", _ms, None),
    Figure("async_schedule_call_p50_ms", "the async schedule() call p50", _ms, None),
    Figure("async_schedule_call_p99_ms", "the async schedule() call p99", _ms, None),
    Figure("async_schedule_call_p99_ratio", "the schedule() call p99, async / sync", _times, None),
    Figure("burst_all_finished_s", "burst: all finished after due", lambda v: f"{v:,.2f} s", "lower"),
    Figure("burst_drain_rate", "burst: drain rate", _rate, "higher"),
    Figure("burst_p50_ms", "burst lateness p50", _ms, "lower"),
    Figure("burst_p99_ms", "burst lateness p99", _ms, "lower"),
    Figure("burst_max_ms", "burst lateness max", _ms, "lower"),
    Figure("steady_p50_ms", "steady lateness p50", _ms, "lower"),
    Figure("steady_p99_ms", "steady lateness p99", _ms, "lower"),
    Figure("redis_bytes_per_timeout", "Redis bytes per pending timeout", lambda v: f"{v:,.0f} B", "lower"),
    Figure("loaded_schedule_ratio", "schedule rate, loaded / empty", _times, None),
    Figure("loaded_schedule_ratio_at_fill", "schedule rate, loaded / empty, right after the fill", _times, None),
    Figure("loaded_fire_ratio", "fire rate, loaded / empty", _times, None),
    Figure("purge_rate", "purge of finished timeouts", lambda v: _rate(v).replace("/s", " rows/s"), None),
    Figure("steady_history_p99_ms", "steady lateness p99, history to purge present", _ms, None),
    Figure("steady_purge_p99_ms", "steady lateness p99, while it is purged", _ms, None),
    Figure("steady_purge_ratio", "steady p99, while purging / not", _times, None),
)
#: figures of the registry database alone, measured on the `sql-*` systems (the others' registry is PostgreSQL too)
REGISTRY_FIGURES = ("purge_rate",)
#: figures of the steady load during a purge, measured only when asked (--purge-load)
PURGE_LOAD_FIGURES = ("steady_history_p99_ms", "steady_purge_p99_ms", "steady_purge_ratio")
#: figures every product system reports (Redis bytes only where Redis holds the timers)
PRODUCT_FIGURES = tuple(
    f.key
    for f in FIGURES
    if f.key != "redis_bytes_per_timeout" and f.key not in REGISTRY_FIGURES and f.key not in PURGE_LOAD_FIGURES
)
BASELINE_FIGURES = tuple(f.key for f in FIGURES if f.better is not None and f.key != "redis_bytes_per_timeout")


def times_better(figure: Figure, value: float | None, baseline: float | None) -> float | None:
    """How many times better than the baseline (above 1 is better, whichever way the figure points)."""
    if value is None or baseline is None or figure.better is None or value <= 0 or baseline <= 0:
        return None
    return value / baseline if figure.better == "higher" else baseline / value


def comparisons(results: Sequence[SystemResult]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{system: {baseline: {figure: times better}}} for the product's systems."""
    baselines = {r.system: r.figures for r in results if r.system in BASELINES}
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for result in results:
        if result.system in BASELINES:
            continue
        out[result.system] = {
            name: {f.key: times_better(f, result.figures.get(f.key), figures.get(f.key)) for f in FIGURES if f.better}
            for name, figures in baselines.items()
        }
    return out


def derive_target_figures(results: Sequence[SystemResult]) -> None:
    """The figures DESIGN.md states against RQ: bulk rate and burst drain rate, as multiples."""
    rq = next((r.figures for r in results if r.system == "baseline-rq"), None)
    if rq is None:
        return
    for result in results:
        if result.system in BASELINES:
            continue
        for key, source in (("bulk_vs_rq", "bulk_rate"), ("burst_vs_rq", "burst_drain_rate")):
            mine, theirs = result.figures.get(source), rq.get(source)
            result.figures[key] = mine / theirs if mine and theirs else None


def target_checks(results: Sequence[SystemResult]) -> list[dict[str, Any]]:
    checks = []
    for result in results:
        scale = "admin_commands" in result.figures
        for target in targets_for(result.system):
            if target.scale != scale:
                continue
            measured = result.figures.get(target.figure)
            checks.append(
                {
                    "system": result.system,
                    "figure": target.figure,
                    "target": target.text,
                    "measured": measured,
                    "met": target.met(measured),
                }
            )
    return checks


def table(results: Sequence[SystemResult], title: str) -> Table:
    grid = Table(title=title, show_lines=True)
    grid.add_column("figure")
    for result in results:
        grid.add_column(BASELINE_LABELS.get(result.system, result.system), justify="right")
    compared = comparisons(results)
    checks = {(c["system"], c["figure"]): c for c in target_checks(results)}
    for figure in FIGURES:
        row = [figure.label]
        for result in results:
            value = result.figures.get(figure.key)
            if value is None:
                row.append("[dim]-[/]")
                continue
            cell = figure.show(float(value))
            check = checks.get((result.system, figure.key))
            if check is not None and check["met"] is not None:
                cell += " [green]✓[/]" if check["met"] else " [red]✗[/]"
            ratios = [
                f"{r:.1f}x {BASELINE_LABELS[name]}"
                for name, by_figure in compared.get(result.system, {}).items()
                if (r := by_figure.get(figure.key)) is not None
            ]
            if ratios:
                cell += "\n[dim]" + " · ".join(ratios) + "[/]"
            row.append(cell)
        grid.add_row(*row)
    extra = ["target multiples: bulk ≥ 6x RQ, burst drain ≥ 10x RQ"]
    for result in results:
        bulk, burst = result.figures.get("bulk_vs_rq"), result.figures.get("burst_vs_rq")
        if bulk is not None or burst is not None:
            extra.append(f"{result.system}: bulk {bulk or 0:.1f}x RQ, burst drain {burst or 0:.1f}x RQ")
    grid.caption = "ratios: how many times better than the baseline (above 1 = better). " + "; ".join(extra)
    return grid


def scale_table(results: Sequence[SystemResult], title: str) -> Table:
    """The scale figures: each admin command at both registry sizes, in process and as a process."""
    grid = Table(title=title)
    grid.add_column("system")
    grid.add_column("command")
    for way in ("in process", "as a process"):
        grid.add_column(f"{way}: small", justify="right")
        grid.add_column("large", justify="right")
        grid.add_column("ratio", justify="right")
    for result in results:
        commands = result.figures.get("admin_commands", {})
        sizes = f"{result.figures.get('scale_small_rows', 0):,} → {result.figures.get('scale_large_rows', 0):,} rows"
        for label, figures in commands.items():
            row = [f"{result.system}\n[dim]{sizes}[/]" if label == next(iter(commands)) else "", label]
            for way in ("in_process", "process"):
                ratio = figures[f"{way}_ratio"]
                mark = " [green]✓[/]" if ratio <= 3 else " [red]✗[/]"
                row += [_ms(figures[f"{way}_small_s"] * 1000), _ms(figures[f"{way}_large_s"] * 1000)]
                row.append(f"{ratio:.2f}x" + (mark if way == "process" else ""))
            grid.add_row(*row)
    grid.caption = "best of 5 runs in process, of 3 as a process; target: large / small ≤ 3 (DESIGN.md)"
    return grid


def document(results: Sequence[SystemResult], meta: dict[str, Any], plot: str | None) -> dict[str, Any]:
    return {
        **meta,
        "systems": {r.system: {"figures": r.figures, "notes": r.notes} for r in results},
        "times_better": comparisons(results),
        "targets": target_checks(results),
        "plot": plot,
    }


def plot_lateness(results: Sequence[SystemResult], path: Path) -> str | None:
    """Lateness distributions (CDF) of the burst and the steady load per system; None without matplotlib."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    pyplot: Any = importlib.import_module("matplotlib.pyplot")
    steps = [("burst", "burst: all due at once"), ("steady", "steady load"), ("loaded", "burst with pending load")]
    steps = [s for s in steps if any(r.lateness.get(s[0]) for r in results)]
    if not steps:
        return None
    fig, axes = pyplot.subplots(1, len(steps), figsize=(6 * len(steps), 4.5), squeeze=False)
    for axis, (step, title) in zip(axes[0], steps, strict=True):
        for result in results:
            samples = sorted(max(v, 1.0) for v in result.lateness.get(step, []))
            if samples:
                share = [(i + 1) / len(samples) for i in range(len(samples))]
                axis.step(samples, share, where="post", label=BASELINE_LABELS.get(result.system, result.system))
        axis.set_xscale("log")
        axis.set_xlabel("lateness (finished - due), ms")
        axis.set_ylabel("share of timeouts")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    return str(path)
