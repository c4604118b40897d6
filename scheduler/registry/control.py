"""The control table's rows (schema.py `control`): one JSON document each, steering the whole fleet
of one deployment.

- `pause`: `{"reason": …, "since_ms": …, "by": "operator" | "breaker"}`, present while the fleet is
  paused; `resume` deletes it.
- `resumed`: `{"since_ms": …, "by": "operator"}`, the last resume: the circuit breaker counts cancels
  from then on, not from before.
- `deployment`: this registry's identity, `{"id": …}`. Every broker message carries it, and the
  redis and rabbitmq transports put it in their key and queue names, so two registries on one broker
  never take each other's timers (docs/operations.md, "Several deployments on one broker").
  `init-db` writes it; a process on a registry migrated without `init-db` creates it on first use.
  Whoever comes first wins and everyone reads the winner's: the insert is a no-op when the row is there.
- `foreign`: deliveries of another deployment that reached this one's workers (dead-lettered).
- `recheck`: what `maintain`'s re-check of finished timeouts found against the order store.

Workers read `pause` and `resumed` with one primary-key read inside each batch transaction
(`read_valves`), so a pause written by `order-timeouts pause` or by a worker's breaker holds from the
next batch of every worker, survives restarts, and needs no message to reach anyone.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, delete, select, update

from scheduler.errors import InvalidInput
from scheduler.registry.queries import fast_paths
from scheduler.registry.schema import control

PAUSE = "pause"
RESUMED = "resumed"
DEPLOYMENT = "deployment"
FOREIGN = "foreign"
RECHECK = "recheck"

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
        if _insert(conn, PAUSE, wanted.to_json(), now=now):
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
        _insert(conn, RESUMED, value, now=now)
    return None if lifted is None else Pause.from_row(lifted.value, lifted.updated_ms)


def deployment_id(engine: Engine, *, now: int) -> str:
    """This registry's deployment identity, created when the registry has none yet."""
    with engine.begin() as conn:
        return ensure_deployment(conn, now=now)


def ensure_deployment(conn: Connection, *, now: int) -> str:
    """Inside the caller's transaction (`init-db`): the identity, written first if absent."""
    value = read(conn, DEPLOYMENT)
    if value is None:
        _insert(conn, DEPLOYMENT, json.dumps(new_deployment()), now=now)
        value = read(conn, DEPLOYMENT)
    assert value is not None
    return str(value["id"])


def new_deployment() -> dict[str, str]:
    """A new identity: 12 hex characters, short enough for key and queue names."""
    return {"id": uuid.uuid4().hex[:12]}


def read(conn: Connection, name: str) -> dict[str, Any] | None:
    text = conn.execute(select(control.c.value).where(control.c.name == name)).scalar()
    return None if text is None else dict(json.loads(text))


def add_counts(conn: Connection, name: str, counts: dict[str, int], *, now: int, **latest: Any) -> dict[str, Any]:
    """Add to the row's counters and set its other fields, under a row lock (concurrent writers add up);
    return the new value."""
    _insert(conn, name, "{}", now=now)
    locked = select(control.c.value).where(control.c.name == name).with_for_update()
    value = dict(json.loads(conn.execute(locked).scalar_one()))
    for key, count in counts.items():
        value[key] = int(value.get(key, 0)) + count
    value.update(latest, updated_ms=now)
    conn.execute(update(control).where(control.c.name == name).values(value=json.dumps(value), updated_ms=now))
    return value


def _insert(conn: Connection, name: str, value: str, *, now: int) -> bool:
    """Insert the row unless it is there; a concurrent insert of the same row wins (INSERT … ON
    CONFLICT DO NOTHING). True when this call inserted it."""
    return fast_paths(conn).insert_absent(conn, control, {"name": name, "value": value, "updated_ms": now})
