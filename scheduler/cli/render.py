"""Parsing and printing for the CLI: instants, tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from scheduler.clock import from_ms, to_ms
from scheduler.errors import InvalidTimeout

if TYPE_CHECKING:
    from scheduler.registry import TimeoutRecord
    from scheduler.registry.control import Pause

console = Console()


def parse_instant(text: str, what: str = "time") -> datetime:
    """ISO 8601 with a UTC offset ('2026-11-21T10:00:00+00:00' or '...Z'); naive times are refused."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidTimeout(f"{what} {text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise InvalidTimeout(f"{what} {text!r} has no UTC offset; add Z or +00:00")
    return moment


def instant_ms(text: str | None, what: str) -> int | None:
    return None if text is None else to_ms(parse_instant(text, what))


def iso(ms: int | None) -> str | None:
    return None if ms is None else from_ms(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def relative(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "-"
    delta = (ms - now_ms) / 1000
    return f"in {human(delta)}" if delta >= 0 else f"{human(-delta)} ago"


def human(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def record_json(record: TimeoutRecord) -> dict[str, Any]:
    data = asdict(record)
    for key in ("due_ms", "created_ms", "updated_ms", "published_ms", "fired_ms", "finished_ms"):
        data[key.removesuffix("_ms") + "_at"] = iso(data.pop(key))
    data["state"] = record.state.value
    data["outcome"] = record.outcome.value if record.outcome else None
    return data


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def timeouts_table(title: str, records: list[TimeoutRecord], now_ms: int, *, errors: bool = False) -> Table:
    table = Table(title=title)
    table.add_column("order id", overflow="fold")
    table.add_column("due at (UTC)")
    table.add_column("due")
    table.add_column("state")
    table.add_column("attempts", justify="right")
    if errors:
        table.add_column("error", overflow="fold")
    for r in records:
        row = [r.order_id, iso(r.due_ms) or "", relative(r.due_ms, now_ms), r.state.value, str(r.attempts)]
        if errors:
            row.append(r.error or "")
        table.add_row(*row)
    return table


def histogram_table(counts: list[int], start_ms: int, width_ms: int, now_ms: int, width: int = 40) -> Table:
    peak = max(counts) if counts else 0
    table = Table(title="pending timeouts by due time", show_edge=False)
    table.add_column("due from (UTC)")
    table.add_column("", justify="right")
    table.add_column("count", justify="right")
    table.add_column("")
    for i, count in enumerate(counts):
        start = start_ms + i * width_ms
        bar = "█" * (round(count / peak * width) if peak else 0)
        if count and not bar:
            bar = "▏"
        table.add_row(iso(start) or "", relative(start, now_ms), str(count), f"[cyan]{bar}[/]")
    return table


def pause_json(pause: Pause | None) -> dict[str, Any] | None:
    if pause is None:
        return None
    return {"by": pause.by.value, "reason": pause.reason, "since": iso(pause.since_ms)}


def pause_line(pause: Pause, now_ms: int) -> str:
    """One line for people: who paused the fleet, since when, and why."""
    since = f"{iso(pause.since_ms)} ({relative(pause.since_ms, now_ms)})"
    return (
        f"PAUSED by {pause.by.value} since {since}: {pause.reason}; nothing is cancelled until `order-timeouts resume`"
    )
