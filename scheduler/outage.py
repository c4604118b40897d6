"""Riding over an outage: backoff with jitter and a cap, and one log line when it starts and one when it ends.

A long-running process (a worker, `maintain`) meets a component that cannot be reached (the registry
database, the broker, the order store) again and again while it is down. Logging every retry would bury
the first line that matters, so an `Outage` logs a warning when the component first fails, stays quiet
while it keeps failing, and logs once more when it works again, with how long it was gone. The waits
double from `base_s` up to `cap_s`, each one between half and all of that (jitter), so that a fleet of
workers does not come back in one thundering herd, and work resumes at most `cap_s` after the return.
"""

from __future__ import annotations

import logging
import random
import time

#: first wait after a failure, and the longest: work resumes at most this long after the component is back
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 5.0


class Outage:
    def __init__(self, log: logging.Logger, *, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S) -> None:
        self._log = log
        self._base_s = base_s
        self._cap_s = cap_s
        self._failures = 0
        # The components reported down in this outage, in the order they failed: one outage can
        # move between them (the registry database, then the order store on the same server).
        self._down: list[str] = []
        self._since = 0.0

    @property
    def ongoing(self) -> bool:
        return bool(self._down)

    @property
    def lasted_s(self) -> float:
        """Seconds since the ongoing outage began; 0 when there is none."""
        return time.monotonic() - self._since if self._down else 0.0

    def describe(self) -> str:
        """The components down in the ongoing outage, for a message."""
        return " and ".join(self._down)

    def failed(self, what: str, reason: str) -> float:
        """Record a failure of `what` (the component, e.g. "the broker"); return the seconds to wait."""
        if not self._down:
            self._since = time.monotonic()
        if what not in self._down:
            self._log.warning("%s unavailable, retrying with backoff (up to %.0fs): %s", what, self._cap_s, reason)
            self._down.append(what)
        self._failures += 1
        ceiling = min(self._cap_s, self._base_s * 2 ** (self._failures - 1))
        return random.uniform(ceiling / 2, ceiling)

    def recovered(self) -> None:
        """A step worked: the outage, if there was one, is over for every component it reported."""
        for what in self._down:
            self._log.warning("%s back after %.1fs, carrying on", what, time.monotonic() - self._since)
        self._down.clear()
        self._failures = 0


def first_line(error: BaseException) -> str:
    """The first line of an error's message: drivers add the statement and a link on later lines."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
