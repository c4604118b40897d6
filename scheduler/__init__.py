"""order-timeouts, producer side: schedule, cancel and reschedule the payment timeouts of orders."""

from scheduler.api import OrderTimeouts, ScheduleResult, ScheduleSummary
from scheduler.config import Settings
from scheduler.errors import (
    ConfigurationError,
    InvalidTimeout,
    MalformedMessage,
    OrderStoreUnavailable,
    OrderTimeoutsError,
    TimeoutNotFound,
    TransportUnavailable,
)
from scheduler.registry import Outcome, TimeoutRecord, TimeoutState

__all__ = [
    "ConfigurationError",
    "InvalidTimeout",
    "MalformedMessage",
    "OrderStoreUnavailable",
    "OrderTimeouts",
    "OrderTimeoutsError",
    "Outcome",
    "ScheduleResult",
    "ScheduleSummary",
    "Settings",
    "TimeoutNotFound",
    "TimeoutRecord",
    "TimeoutState",
    "TransportUnavailable",
]
