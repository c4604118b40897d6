"""The control table's rows that steer the whole fleet: the pause, and when it was last lifted.

    pause     {"reason": "...", "since_ms": 1764650000000, "by": "operator" | "breaker"}
              present while the fleet is paused; `resume` deletes it
    resumed   {"since_ms": 1764650000000, "by": "operator"}
              the last resume: the circuit breaker counts cancels from then on, not from before

Workers read both rows with one primary-key read inside each batch transaction (`read_valves`),
so a pause written by `order-timeouts pause` or by a worker's breaker holds from the next batch of
every worker, survives restarts, and needs no message to reach anyone. Other fleet-wide rows (the
deployment's identity) sit beside these in the same table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, delete, select, update

from scheduler.errors import InvalidInput
from scheduler.registry.queries import fast_paths
from scheduler.registry.schema import control

PAUSE = "pause"
RESUMED = "resumed"
#: longest pause reason kept; it is shown in one line by `stats`, `check`, logs and a metric label
MAX_REASON_LENGTH = 200


class PausedBy(StrEnum):
    OPERATOR = "operator"  #: `order-timeouts pause` (or OrderTimeouts.pause)
    BREAKER = "breaker"  #: a worker's circuit breaker tripped


@dataclass(frozen=True)
class Pause:
    """The fleet's pause: no worker cancels anything, timers stay pending until `resume`."""

    reason: str
    since_ms: int
    by: PausedBy

    def to_json(self) -> str:
        return json.dumps({"reason": self.reason, "since_ms": self.since_ms, "by": self.by.value})

    @classmethod
    def from_row(cls, value: str, updated_ms: int) -> Pause:
        # A row another program wrote badly still pauses: failing safe is the point of a pause.
        try:
            data: Any = json.loads(value)
            return cls(str(data["reason"]), int(data["since_ms"]), PausedBy(data["by"]))
        except (ValueError, TypeError, KeyError):
            return cls(f"unreadable pause row: {value[:80]!r}", updated_ms, PausedBy.OPERATOR)


@dataclass(frozen=True)
class Valves:
    """What a batch reads from the control table before it claims anything."""

    pause: Pause | None = None
    #: when the fleet was last resumed (registry clock, ms); None if never
    resumed_ms: int | None = None


def clean_reason(reason: str) -> str:
    """The reason as it is stored: one line, not empty, at most MAX_REASON_LENGTH characters."""
    text = " ".join(reason.split())
    if not text:
        raise InvalidInput("the pause reason is empty: say why the fleet is paused")
    if len(text) > MAX_REASON_LENGTH:
        raise InvalidInput(f"the pause reason is {len(text)} characters long; at most {MAX_REASON_LENGTH}")
    return text


def read_valves(conn: Connection) -> Valves:
    """Both rows in one primary-key read: the cost a batch pays for the pause."""
    rows = conn.execute(
        select(control.c.name, control.c.value, control.c.updated_ms).where(control.c.name.in_((PAUSE, RESUMED)))
    ).all()
    pause: Pause | None = None
    resumed_ms: int | None = None
    for name, value, updated_ms in rows:
        if name == PAUSE:
            pause = Pause.from_row(value, updated_ms)
        else:
            resumed_ms = updated_ms
    return Valves(pause, resumed_ms)


def read_pause(conn: Connection) -> Pause | None:
    return read_valves(conn).pause


def pause(conn: Connection, reason: str, by: PausedBy, *, now: int) -> tuple[Pause, bool]:
    """Pause the fleet unless it is paused already; return the pause in force and whether this call
    started it. A pause in force keeps its reason, author and start: a breaker tripping during an
    operator's pause, or a second operator, does not rewrite what the first one said."""
    wanted = Pause(clean_reason(reason), now, by)
    while True:
        if fast_paths(conn).insert_control(conn, PAUSE, wanted.to_json(), now=now):
            return wanted, True
        current = read_pause(conn)
        if current is not None:
            return current, False
        # A resume deleted the row between the two statements: insert again.


def resume(conn: Connection, *, now: int, by: PausedBy = PausedBy.OPERATOR) -> Pause | None:
    """Lift the pause (None when there was none) and record when, for the breaker's window."""
    lifted = conn.execute(
        delete(control).where(control.c.name == PAUSE).returning(control.c.value, control.c.updated_ms)
    ).first()
    value = json.dumps({"since_ms": now, "by": by.value})
    written = conn.execute(
        update(control).where(control.c.name == RESUMED).values(value=value, updated_ms=now).returning(control.c.name)
    ).first()
    if written is None:
        fast_paths(conn).insert_control(conn, RESUMED, value, now=now)
    return None if lifted is None else Pause.from_row(lifted.value, lifted.updated_ms)
