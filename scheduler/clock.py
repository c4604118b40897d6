"""Time as the registry stores it: integer milliseconds since the Unix epoch, UTC.

Integers keep the due-time index compact and the comparisons identical on SQLite, PostgreSQL,
Redis scores and broker messages. Datetimes appear only at the edges (API, CLI).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Current time in epoch milliseconds."""
        ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


_MS = timedelta(milliseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ms(moment: datetime) -> int:
    """The instant in epoch ms, rounded up: a due time is never moved earlier by the rounding."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("naive datetime")
    return -((_EPOCH - moment) // _MS)


def duration_ms(delta: timedelta) -> int:
    """The duration in whole ms, rounded up, computed exactly (a float of seconds is not)."""
    return -(-delta // _MS)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
