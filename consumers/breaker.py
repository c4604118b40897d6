"""The cancel circuit breaker: a fleet that cancels far more than usual pauses itself.

A payment provider that wrongly answers "unpaid", or a bad deploy, would otherwise cancel orders as
fast as the workers go. Two rules, each off unless configured (scheduler/config.py, BreakerLimits):

- more than ORDER_TIMEOUTS_MAX_CANCELS_PER_MINUTE cancels in the last minute;
- a share of unpaid answers above ORDER_TIMEOUTS_MAX_UNPAID_RATIO in the last minute, over at least
  ORDER_TIMEOUTS_UNPAID_RATIO_MIN_ORDERS decided orders.

The window is fleet-wide: the counts are the registry's done rows per outcome that finished in the
last minute, read from the finished-rows index over the window only. A per-worker bound would grow
with the number of workers, which is exactly when it matters. Each worker reads the window at most
once a second, and at once when its own decisions since the last read would take the fleet past a
bound, so the fleet goes past a bound by at most what the other workers finish in a second plus a
batch each. A trip writes the fleet's `pause` row (by `breaker`, with the reason): every worker stops
at its next batch, and `order-timeouts resume` lifts it. The window starts at the last resume, so
that the cancels that tripped the breaker do not trip it again.

Unpaid answers are counted as the outcomes they led to, `cancelled` and (shadow mode)
`would_cancel`; decided orders add `paid` and `already_cancelled`. An unpaid answer that lost the
race to a payment is recorded `paid`, and is not counted as unpaid.
"""

from __future__ import annotations

import logging
import math
import time

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from scheduler import registry
from scheduler.clock import Clock
from scheduler.config import ENV_MAX_CANCELS_PER_MINUTE, ENV_MAX_UNPAID_RATIO, BreakerLimits
from scheduler.outage import first_line
from scheduler.registry import Outcome
from scheduler.registry.control import Pause, PausedBy, Valves, pause

log = logging.getLogger("order_timeouts.breaker")

#: the sliding window the rules count over
WINDOW_MS = 60_000
#: longest a worker goes without reading the fleet's window while it decides orders
CHECK_INTERVAL_S = 1.0

UNPAID = (Outcome.CANCELLED, Outcome.WOULD_CANCEL)


class Breaker:
    """One per worker process; `after_batch` is called after each batch commits."""

    def __init__(
        self, engine: Engine, clock: Clock, limits: BreakerLimits, *, interval_s: float = CHECK_INTERVAL_S
    ) -> None:
        self._engine = engine
        self._clock = clock
        self.limits = limits
        self._interval_s = interval_s
        self._read_at = -math.inf
        # the fleet's figures at the last read, and this worker's decisions since
        self._fleet_unpaid = self._fleet_decided = 0
        self._own_unpaid = self._own_decided = 0

    def after_batch(self, unpaid: int, decided: int, valves: Valves) -> Pause | None:
        """The pause this call started, if the fleet went past a bound; None otherwise."""
        if not self.limits.active or valves.pause is not None or not decided:
            return None
        self._own_unpaid += unpaid
        self._own_decided += decided
        if (
            time.monotonic() - self._read_at < self._interval_s
            and self._rule(self._fleet_unpaid + self._own_unpaid, self._fleet_decided + self._own_decided) is None
        ):
            return None
        try:
            return self._check(valves.resumed_ms)
        except SQLAlchemyError as exc:
            # The batch has committed; the next batch reads the window again.
            log.warning("circuit breaker: the registry could not be read: %s", first_line(exc))
            return None

    def _check(self, resumed_ms: int | None) -> Pause | None:
        with self._engine.begin() as conn:
            now = self._clock.now_ms()
            counts = registry.outcomes_between(conn, max(now - WINDOW_MS, resumed_ms or 0), now + 1)
            self._read_at = time.monotonic()
            self._fleet_unpaid = sum(counts[o] for o in UNPAID)
            self._fleet_decided = sum(counts.values())
            self._own_unpaid = self._own_decided = 0
            reason = self._rule(self._fleet_unpaid, self._fleet_decided)
            if reason is None:
                return None
            current, started = pause(conn, reason, PausedBy.BREAKER, now=now)
        if not started:
            return None
        log.error("circuit breaker tripped, the fleet is paused: %s; `order-timeouts resume` lifts it", reason)
        return current

    def _rule(self, unpaid: int, decided: int) -> str | None:
        """The reason to trip on these figures of the last minute, or None."""
        bound = self.limits.max_cancels_per_minute
        if bound is not None and unpaid > bound:
            return f"{unpaid} cancels in the last minute, above {ENV_MAX_CANCELS_PER_MINUTE}={bound}"
        ratio = self.limits.max_unpaid_ratio
        if ratio is not None and decided >= self.limits.min_orders and unpaid > ratio * decided:
            return (
                f"unpaid answers for {unpaid} of {decided} orders in the last minute "
                f"({unpaid / decided:.0%}), above {ENV_MAX_UNPAID_RATIO}={ratio:g}"
            )
        return None
