"""A clock that moves only when a test moves it."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

from scheduler.clock import SystemClock, duration_ms, to_ms


class ManualClock:
    """`scheduler.clock.Clock` for tests: starts at `start` (default: the system's now) and stays there
    until `advance` or `set` moves it. Safe to share between threads.

        clock = ManualClock()
        timeouts = OrderTimeouts(database_url, clock=clock, transport=InMemoryTransport(clock))
        timeouts.schedule("A-1", delay=timedelta(minutes=30))
        clock.advance(timedelta(minutes=30))   # now it is due
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._lock = threading.Lock()
        self._now_ms = SystemClock().now_ms() if start is None else to_ms(start)

    def now_ms(self) -> int:
        with self._lock:
            return self._now_ms

    def advance(self, delta: timedelta) -> None:
        """Move forward by `delta`; a clock never moves backwards (use `set` to simulate a jump)."""
        if delta < timedelta(0):
            raise ValueError("advance() takes a non-negative timedelta; set() jumps anywhere")
        with self._lock:
            self._now_ms += duration_ms(delta)

    def set(self, moment: datetime) -> None:
        """Jump to `moment` (timezone-aware), backwards included: a clock corrected by NTP does that."""
        with self._lock:
            self._now_ms = to_ms(moment)
