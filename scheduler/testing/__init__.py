"""For tests, ours and our users': a controllable clock, a broker in memory, a log of cancels.

    from scheduler.testing import InMemoryTransport, ManualClock

    clock = ManualClock()
    timeouts = OrderTimeouts("sqlite:///test.sqlite3", clock=clock, transport=InMemoryTransport(clock))

The clock and the transport keep the rules the real ones keep (scheduler/transports/base.py), so
that the API, the handler and the maintenance jobs can be tested in milliseconds; the real brokers
stay in integration tests. `install_cancel_log` counts every order cancelled, for the check that
each unpaid order was cancelled exactly once. `add_history` writes a registry with a long history
in SQL, for what must stay fast at millions of rows.
"""

from scheduler.testing.cancel_log import cancel_log_counts, install_cancel_log
from scheduler.testing.clock import ManualClock
from scheduler.testing.history import History, add_finished, add_history
from scheduler.testing.transport import DeadLetter, InMemoryTransport

__all__ = [
    "DeadLetter",
    "History",
    "InMemoryTransport",
    "ManualClock",
    "add_finished",
    "add_history",
    "cancel_log_counts",
    "install_cancel_log",
]
