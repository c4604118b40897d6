"""Input checks for the producer API and the CLI: bad input raises InvalidTimeout and changes nothing."""

from __future__ import annotations

from datetime import datetime, timedelta

from scheduler.clock import duration_ms, to_ms
from scheduler.errors import InvalidTimeout
from scheduler.registry import MAX_ORDER_ID_LENGTH


def order_id(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidTimeout(f"order id must be text, not {type(value).__name__}")
    if not value:
        raise InvalidTimeout("order id is empty")
    if len(value) > MAX_ORDER_ID_LENGTH:
        raise InvalidTimeout(f"order id is {len(value)} characters long; the limit is {MAX_ORDER_ID_LENGTH}")
    if value != value.strip():
        raise InvalidTimeout(f"order id {value!r} has leading or trailing whitespace")
    if not value.isprintable():
        raise InvalidTimeout(f"order id {value!r} contains control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTimeout(f"order id {value!r} is not valid Unicode text") from None
    return value


def due_ms(
    *,
    now_ms: int,
    delay: timedelta | None,
    due_at: datetime | None,
    default_delay: timedelta,
    max_delay: timedelta,
) -> int:
    """The due time in epoch ms from exactly one of `delay` or `due_at` (default delay if neither).

    A `due_at` in the past is accepted and fires at once: backfilling old orders needs that.
    """
    if delay is not None and due_at is not None:
        raise InvalidTimeout("give either delay or due_at, not both")
    max_ms = duration_ms(max_delay)
    if due_at is not None:
        if not isinstance(due_at, datetime):
            raise InvalidTimeout(f"due_at must be a datetime, not {type(due_at).__name__}")
        if due_at.tzinfo is None or due_at.utcoffset() is None:
            raise InvalidTimeout("due_at must be timezone-aware (for example datetime.now(UTC) + delay)")
        due = to_ms(due_at)
        if due - now_ms > max_ms:
            raise InvalidTimeout(f"due_at {due_at.isoformat()} is further away than the maximum delay {max_delay}")
        return due
    if delay is None:
        delay = default_delay
    if not isinstance(delay, timedelta):
        raise InvalidTimeout(f"delay must be a timedelta, not {type(delay).__name__}")
    delay_ms = duration_ms(delay)
    if delay_ms <= 0:
        raise InvalidTimeout(f"delay must be positive, got {delay}")
    if delay_ms > max_ms:
        raise InvalidTimeout(f"delay {delay} is above the maximum {max_delay}")
    return now_ms + delay_ms
