"""Retention: finished timeouts (done, revoked; dead ones only when asked) leave the registry once
they finished longer ago than a cutoff, by `order-timeouts purge` and by `maintain`'s purge job.

A purge is many small transactions, each deleting at most `batch_size()` rows chosen through the
finished index: no lock is held for long, nothing is rewritten, and workers and producers go on
meanwhile. Each batch commits on its own, so a purge stopped at any point (a SIGKILL included) has
deleted whole batches of rows that were due to go anyway; running it again finishes the work. The
cutoff is fixed when the purge starts: rows that finish meanwhile are younger than it, so a purge
always ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from sqlalchemy import Engine

from scheduler import registry
from scheduler.clock import duration_ms
from scheduler.database import reading
from scheduler.registry import TimeoutState

#: rows per DELETE, each its own transaction: a few milliseconds of work for the database
PURGE_BATCH = 5000
#: rows per DELETE where one transaction holds up every other writer (SQLite's write lock)
ONE_WRITER_BATCH = 1000


def batch_size(engine: Engine) -> int:
    """Rows per purge transaction on this database."""
    return ONE_WRITER_BATCH if registry.one_writer_at_a_time(engine) else PURGE_BATCH


def cutoff_ms(now_ms: int, older_than: timedelta) -> int:
    """The finish time before which rows go: a row finished exactly `older_than` ago stays."""
    return now_ms - duration_ms(older_than)


def purge(
    engine: Engine,
    *,
    before_ms: int,
    states: Sequence[TimeoutState],
    batch: int | None = None,
    max_rows: int | None = None,
    deleted: Callable[[int], None] | None = None,
) -> int:
    """Delete the rows in `states` finished before `before_ms`, a batch per transaction, oldest first
    within each state, `batch_size(engine)` rows per transaction unless `batch` says; at most
    `max_rows` of them when given. Returns how many went; `deleted` hears of each batch as it commits.

    Where a transaction holds up every other writer (SQLite), the purge rests after each batch for
    as long as the batch held the write lock: a worker or a producer waiting for the lock polls for
    it between sleeps, and a purge that took the lock again at once would keep it from them.
    """
    one_writer = registry.one_writer_at_a_time(engine)
    size = batch or batch_size(engine)
    total = 0
    for state in states:
        while max_rows is None or total < max_rows:
            limit = size if max_rows is None else min(size, max_rows - total)
            started = time.monotonic()
            with engine.begin() as conn:
                count = registry.purge_finished(conn, before_ms=before_ms, state=state, limit=limit)
            total += count
            if one_writer:
                time.sleep(time.monotonic() - started)
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
