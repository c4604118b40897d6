"""Maintenance leases: one row per job in the lease table, so that several `maintain` processes
never run the same job at once."""

from __future__ import annotations

from sqlalchemy import Connection, update

from scheduler.registry.queries import fast_paths
from scheduler.registry.schema import leases


def take_lease(conn: Connection, job: str, holder: str, *, now: int, ttl_ms: int) -> bool:
    """Take or renew the job's lease; False while another live holder has it.

    A holder that dies simply stops renewing: its lease expires after `ttl_ms` and the next
    process takes over, so a killed `maintain` leaves nothing stuck.
    """
    # RETURNING rather than rowcount, as in insert_absent.
    taken = conn.execute(
        update(leases)
        .where(leases.c.job == job, (leases.c.holder == holder) | (leases.c.expires_ms < now))
        .values(holder=holder, expires_ms=now + ttl_ms)
        .returning(leases.c.job)
    ).first()
    if taken is not None:
        return True
    return fast_paths(conn).insert_absent(conn, leases, {"job": job, "holder": holder, "expires_ms": now + ttl_ms})


def release_lease(conn: Connection, job: str, holder: str) -> None:
    conn.execute(update(leases).where(leases.c.job == job, leases.c.holder == holder).values(expires_ms=0))
