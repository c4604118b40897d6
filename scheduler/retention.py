"""Retention: finished timeouts (done, revoked; dead ones only when asked) leave the registry once
they finished longer ago than a cutoff, by `order-timeouts purge` and by `maintain`'s purge job.

A purge is many small transactions, each deleting at most `PURGE_BATCH` rows chosen through the
finished index: no lock is held for long, nothing is rewritten, and workers and producers go on
meanwhile. Each batch commits on its own, so a purge stopped at any point (a SIGKILL included) has
deleted whole batches of rows that were due to go anyway; running it again finishes the work. The
cutoff is fixed when the purge starts: rows that finish meanwhile are younger than it, so a purge
always ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta

from sqlalchemy import Engine

from scheduler import registry
from scheduler.clock import duration_ms
from scheduler.database import reading
from scheduler.registry import TimeoutState

#: rows per DELETE, each its own transaction: a few milliseconds of work for the database
PURGE_BATCH = 5000


def cutoff_ms(now_ms: int, older_than: timedelta) -> int:
    """The finish time before which rows go: a row finished exactly `older_than` ago stays."""
    return now_ms - duration_ms(older_than)


def purge(
    engine: Engine,
    *,
    before_ms: int,
    states: Sequence[TimeoutState],
    batch: int = PURGE_BATCH,
    max_rows: int | None = None,
    deleted: Callable[[int], None] | None = None,
) -> int:
    """Delete the rows in `states` finished before `before_ms`, a batch per transaction, oldest first
    within each state; at most `max_rows` of them when given. Returns how many went; `deleted` hears
    of each batch as it commits."""
    total = 0
    for state in states:
        while max_rows is None or total < max_rows:
            limit = batch if max_rows is None else min(batch, max_rows - total)
            with engine.begin() as conn:
                count = registry.purge_finished(conn, before_ms=before_ms, state=state, limit=limit)
            total += count
            if deleted is not None and count:
                deleted(count)
            # Not `count < limit`: a row skipped because another transaction holds it (SKIP LOCKED), or
            # re-armed since it was chosen, must not end the purge of the rows after it.
            if count == 0:
                break
    return total


def count(engine: Engine, *, before_ms: int, states: Sequence[TimeoutState]) -> int:
    """How many rows `purge` would delete now (a dry run)."""
    with reading(engine) as conn:
        return registry.count_finished_before(conn, before_ms=before_ms, states=states)
