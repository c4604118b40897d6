"""Rows of the control table (schema.py `control`) that keep apart deployments sharing a broker and
count what production shows of exactly-once.

- `deployment`: this registry's identity, `{"id": …}`. Every broker message carries it, and the
  redis and rabbitmq transports put it in their key and queue names, so two registries on one broker
  never take each other's timers (docs/operations.md, "Several deployments on one broker").
  `init-db` writes it; a process on a registry migrated without `init-db` creates it on first use.
  Whoever comes first wins and everyone reads the winner's: the insert is a no-op when the row is there.
- `foreign`: deliveries of another deployment that reached this one's workers (dead-lettered).
- `recheck`: what `maintain`'s re-check of finished timeouts found against the order store.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from scheduler.registry.schema import control

DEPLOYMENT = "deployment"
FOREIGN = "foreign"
RECHECK = "recheck"


def deployment_id(engine: Engine, *, now: int) -> str:
    """This registry's deployment identity, created when the registry has none yet."""
    with engine.begin() as conn:
        return ensure_deployment(conn, now=now)


def ensure_deployment(conn: Connection, *, now: int) -> str:
    """Inside the caller's transaction (`init-db`): the identity, written first if absent."""
    value = read(conn, DEPLOYMENT)
    if value is None:
        _insert_absent(conn, DEPLOYMENT, {"id": uuid.uuid4().hex[:12]}, now=now)
        value = read(conn, DEPLOYMENT)
    assert value is not None
    return str(value["id"])


def read(conn: Connection, name: str) -> dict[str, Any] | None:
    text = conn.execute(select(control.c.value).where(control.c.name == name)).scalar()
    return None if text is None else dict(json.loads(text))


def add_counts(conn: Connection, name: str, counts: dict[str, int], *, now: int, **latest: Any) -> dict[str, Any]:
    """Add to the row's counters and set its other fields, under a row lock (concurrent writers add up);
    return the new value."""
    _insert_absent(conn, name, {}, now=now)
    locked = select(control.c.value).where(control.c.name == name).with_for_update()
    value = dict(json.loads(conn.execute(locked).scalar_one()))
    for key, count in counts.items():
        value[key] = int(value.get(key, 0)) + count
    value.update(latest, updated_ms=now)
    conn.execute(update(control).where(control.c.name == name).values(value=json.dumps(value), updated_ms=now))
    return value


def _insert_absent(conn: Connection, name: str, value: dict[str, Any], *, now: int) -> None:
    """Insert the row unless it is there; a concurrent insert of the same row wins (the savepoint
    rolls back only this statement)."""
    if read(conn, name) is not None:
        return
    try:
        with conn.begin_nested():
            conn.execute(insert(control).values(name=name, value=json.dumps(value), updated_ms=now))
    except IntegrityError:
        pass
