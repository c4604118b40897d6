"""For tests, ours and our users': a controllable clock and a broker in memory.

    from scheduler.testing import InMemoryTransport, ManualClock

    clock = ManualClock()
    timeouts = OrderTimeouts("sqlite:///test.sqlite3", clock=clock, transport=InMemoryTransport(clock))

Both keep the rules the real ones keep (scheduler/transports/base.py), so that the API, the handler
and the maintenance jobs can be tested in milliseconds; the real brokers stay in integration tests.
"""

from scheduler.testing.clock import ManualClock
from scheduler.testing.transport import DeadLetter, InMemoryTransport

__all__ = ["DeadLetter", "InMemoryTransport", "ManualClock"]
