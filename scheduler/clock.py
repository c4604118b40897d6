"""Time as the registry stores it: integer milliseconds since the Unix epoch, UTC.

Integers keep the due-time index compact and the comparisons identical on SQLite, PostgreSQL,
Redis scores and broker messages. Datetimes appear only at the edges (API, CLI).

One clock decides for the whole fleet: `RegistryClock`, the registry database's clock as every
process reads it. A process whose own clock runs fast would otherwise find timeouts due before
they are, and cancel orders whose customers still have time to pay.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from scheduler.errors import InvalidTimeout

log = logging.getLogger("order_timeouts.clock")


class Clock(Protocol):
    def now_ms(self) -> int:
        """Current time in epoch milliseconds."""
        ...


class SystemClock:
    """This process's own wall clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class RegistryClock:
    """The authority's time (the registry database's clock), as this process can know it.

    `read` returns the authority's time in epoch ms; it is called at the first `now_ms` and again
    once `refresh` has passed. In between the clock advances by this process's monotonic clock, so
    a step of the process's wall clock (NTP, a VM resumed, a fake time) changes nothing. The
    authority's reading is taken as if made at the end of its round trip: this clock can be behind
    the authority by up to that round trip, never ahead, so nothing is acted on before it is due.

    While the authority cannot be read (the database is down), the last reading goes on advancing
    by the monotonic clock; before any reading succeeded, the process's wall clock stands in (and
    the next reading is tried after `refresh`).

    With `read=None` the clock never reads by itself: its owner asks `wants_reading()` and hands it
    each reading with `record` (the asyncio API, whose reads are awaited: `now_ms` does no I/O).
    """

    def __init__(
        self,
        read: Callable[[], int] | None,
        *,
        refresh: timedelta = timedelta(seconds=5),
        tolerance: timedelta = timedelta(seconds=1),
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], int] | None = None,
    ) -> None:
        self._read = read
        self._refresh_s = refresh.total_seconds()
        self._tolerance_ms = duration_ms(tolerance)
        self._monotonic = monotonic
        self._wall = wall or SystemClock().now_ms
        self._lock = threading.Lock()
        self._base_ms: int | None = None  # the authority's time at `_base_at`
        self._base_at = 0.0
        self._tried_at: float | None = None
        self._skew_reported = False
        #: the authority's time minus this process's wall clock, at the last reading
        self.offset_ms: int | None = None

    def now_ms(self) -> int:
        with self._lock:
            at = self._monotonic()
            if self._read is not None and self._wants_reading(at):
                self._measure(self._read)
                at = self._monotonic()
            if self._base_ms is None:
                return self._wall()
            return self._base_ms + int((at - self._base_at) * 1000)

    def wants_reading(self) -> bool:
        """Whether the next `now_ms` is due a fresh reading of the authority (first use, or `refresh`
        has passed since the last try)."""
        with self._lock:
            return self._wants_reading(self._monotonic())

    def record(self, authority_ms: int | None) -> None:
        """A reading of the authority taken just now by the owner (None: the read failed)."""
        with self._lock:
            self._tried_at = self._monotonic()
            if authority_ms is not None:
                self._take(authority_ms)

    def _wants_reading(self, at: float) -> bool:
        return self._tried_at is None or at - self._tried_at >= self._refresh_s

    def _measure(self, read: Callable[[], int]) -> None:
        self._tried_at = self._monotonic()
        try:
            authority = read()
        except Exception as exc:  # any failure to read leaves the last reading in force
            log.warning("could not read the registry's clock, keeping the last reading: %s", exc)
            return
        self._take(authority)

    def _take(self, authority: int) -> None:
        self._base_at = self._monotonic()
        self._base_ms = authority
        self.offset_ms = authority - self._wall()
        skewed = abs(self.offset_ms) > self._tolerance_ms
        if skewed and not self._skew_reported:
            log.error(
                "this process's clock is %+.3f s off the registry's (tolerance %.3f s): the registry's is used",
                -self.offset_ms / 1000,
                self._tolerance_ms / 1000,
            )
        self._skew_reported = skewed


_MS = timedelta(milliseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ms(moment: datetime) -> int:
    """The instant in epoch ms, rounded up: a due time is never moved earlier by the rounding."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("naive datetime")
    return -((_EPOCH - moment) // _MS)


def duration_ms(delta: timedelta) -> int:
    """The duration in whole ms, rounded up, computed exactly (a float of seconds is not)."""
    # divmod, not -(-delta // _MS): negating the most negative timedelta overflows.
    whole, rest = divmod(delta, _MS)
    return whole + (1 if rest else 0)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str, what: str = "duration") -> timedelta:
    """'90s', '30m', '2h', '1d', '500ms'; a bare number is seconds. The CLI's options and the
    environment's durations read the same way."""
    match = _DURATION.match(text)
    if not match:
        raise InvalidTimeout(f"{what} {text!r} is not a duration like 90s, 30m, 2h or 1d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
