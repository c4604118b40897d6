"""Retention: finished timeouts leave the registry once they are older than a cutoff.

Every statement here reads finished rows through the partial index
`ix_order_timeouts_state_finished (state, finished_ms) WHERE state <> 'pending'`, one range of it per
state: a purge, its dry run and the age of the oldest finished row never look at a pending row, nor
at a finished row younger than the cutoff. The statements state `is_finished` themselves, because
SQLite uses a partial index only for a query that implies the index's WHERE.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ColumnElement, Connection, and_, delete, func, select

from scheduler.registry.queries import fast_paths
from scheduler.registry.schema import TimeoutState, is_finished, timeouts

#: what a purge removes unless told otherwise: a dead timeout waits for a person (`dead replay`)
PURGED_STATES = (TimeoutState.DONE, TimeoutState.REVOKED)


def purged_states(*, include_dead: bool) -> tuple[TimeoutState, ...]:
    return (*PURGED_STATES, TimeoutState.DEAD) if include_dead else PURGED_STATES


def _finished_before(states: Sequence[TimeoutState], before_ms: int) -> tuple[ColumnElement[bool], ...]:
    # A row finished exactly at the cutoff is not older than it, and stays.
    return is_finished, timeouts.c.state.in_([state.value for state in states]), timeouts.c.finished_ms < before_ms


def purge_finished(conn: Connection, *, before_ms: int, state: TimeoutState, limit: int) -> int:
    """Delete up to `limit` rows in `state` finished before `before_ms`, oldest first; return how many went.

    One state at a time, in finish order: the rows are the first entries of that state's range of
    the finished index, whatever else the table holds, and an interrupted purge has removed the
    oldest history first. They are deleted by primary key (`fast_paths().purge_where`), which
    re-checks the condition: a row re-armed (`schedule(replace=True)`, `dead replay`) after it was
    chosen is pending when PostgreSQL re-reads it under its row lock, and stays. SKIP LOCKED leaves
    a row another transaction is changing right now to a later purge instead of waiting for it.
    """
    where = _finished_before([state], before_ms)
    chosen = (
        select(timeouts.c.order_id)
        .where(*where)
        .order_by(timeouts.c.finished_ms)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = conn.execute(delete(timeouts).where(*fast_paths(conn).purge_where(chosen, and_(*where))))
    return int(result.rowcount)


def count_finished_before(conn: Connection, *, before_ms: int, states: Sequence[TimeoutState]) -> int:
    """How many rows in `states` finished before `before_ms`: what a purge would delete, counted in
    the finished index."""
    stmt = select(func.count()).select_from(timeouts).where(*_finished_before(states, before_ms))
    return int(conn.execute(stmt).scalar_one())


def oldest_finished_ms(conn: Connection, states: Sequence[TimeoutState]) -> int | None:
    """The earliest finish among rows in `states`: the first entry of each state's range of the index."""
    oldest: list[int] = []
    for state in states:
        first = conn.execute(
            select(timeouts.c.finished_ms)
            .where(is_finished, timeouts.c.state == state.value)
            .order_by(timeouts.c.finished_ms)
            .limit(1)
        ).scalar()
        if first is not None:
            oldest.append(int(first))
    return min(oldest, default=None)
