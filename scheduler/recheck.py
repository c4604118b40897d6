"""The recheck (a `maintain` job): is exactly-once holding in production?

A sample of the timeouts that finished since the last run is asked of the order store again and
compared with the outcome the registry recorded:

    registry outcome   store now says   counted as
    cancelled          paid             late payment: paid after this product cancelled it (a refund)
    cancelled          unpaid           disagreement: the cancel this product recorded is not there
    paid               unpaid           disagreement: recorded paid, the order waits for payment again
    already_cancelled  unpaid           disagreement
    any                unknown          unknown (the store no longer knows the order)
    anything else                       agreed (a paid order cancelled later by the shop is its own business)

The counts add up in the registry's control table (row `recheck`), so that `stats` and every
process's /metrics show the same figures whichever `maintain` process took the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, Engine

from scheduler import registry
from scheduler.registry import Outcome, control

#: how the recheck asks the order store: payment status per order id (consumers' OrderStore.payment_status)
StatusReader = Callable[[Connection, Sequence[str]], Mapping[str, Any]]

#: most timeouts one run asks about: one call to the order store, whatever the throughput
RECHECK_SAMPLE = 200
#: how far back the first run ever looks
FIRST_LOOKBACK_MS = 3_600_000
#: order ids kept as examples of each kind of finding, newest first
EXAMPLES = 10

#: (registry outcome, store status) → finding; pairs not listed agree
_FINDINGS = {
    (Outcome.CANCELLED.value, "paid"): "late_payments",
    (Outcome.CANCELLED.value, "unpaid"): "disagreements",
    (Outcome.PAID.value, "unpaid"): "disagreements",
    (Outcome.ALREADY_CANCELLED.value, "unpaid"): "disagreements",
}


def run(engine: Engine, read_status: StatusReader, *, now: int, min_age: timedelta) -> int:
    """One run: the newest RECHECK_SAMPLE timeouts that finished since the last run and at least
    `min_age` ago (time for a late payment to come in), compared; returns how many were asked about."""
    end = now - int(min_age / timedelta(milliseconds=1))
    with engine.begin() as conn:
        state = control.read(conn, control.RECHECK) or {}
        start = int(state.get("cursor_ms", end - FIRST_LOOKBACK_MS))
        if start >= end:
            return 0
        registry.read_by_index(conn)
        sample = registry.finished_sample(conn, start_ms=start, end_ms=end, limit=RECHECK_SAMPLE)
        statuses = read_status(conn, [order_id for order_id, _ in sample]) if sample else {}
        counts = {"checked": len(sample), "agreed": 0, "late_payments": 0, "disagreements": 0, "unknown": 0}
        examples: dict[str, list[str]] = {"late_payments": [], "disagreements": []}
        for order_id, outcome in sample:
            status = str(statuses.get(order_id, "unknown"))
            finding = "unknown" if status == "unknown" else _FINDINGS.get((outcome, status), "agreed")
            counts[finding] += 1
            if finding in examples:
                examples[finding].append(order_id)
        latest = {
            f"{kind}_examples": (found + list(state.get(f"{kind}_examples", [])))[:EXAMPLES]
            for kind, found in examples.items()
        }
        # The cursor moves to the end of the window even when the sample left rows out: each timeout
        # is asked about at most once, and the sample stays the newest of each run.
        control.add_counts(conn, control.RECHECK, counts, now=now, cursor_ms=end, last_run_ms=now, **latest)
    return len(sample)


def figures(conn: Connection) -> dict[str, Any]:
    """What the recheck found so far, for `stats` and /metrics (zeros before its first run)."""
    state = control.read(conn, control.RECHECK) or {}
    result: dict[str, Any] = {
        key: int(state.get(key, 0)) for key in ("checked", "agreed", "late_payments", "disagreements", "unknown")
    }
    result["last_run_ms"] = state.get("last_run_ms")
    for kind in ("late_payments", "disagreements"):
        result[f"{kind}_examples"] = list(state.get(f"{kind}_examples", []))
    return result
