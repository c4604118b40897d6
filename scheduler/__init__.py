"""order-timeouts, producer side: schedule, cancel and reschedule the payment timeouts of orders."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from scheduler.config import Settings
from scheduler.errors import (
    ConfigurationError,
    InvalidInput,
    InvalidTimeout,
    MalformedMessage,
    OrderStoreUnavailable,
    OrderTimeoutsError,
    TimeoutNotFound,
    TransportUnavailable,
)

if TYPE_CHECKING:
    from scheduler.api import OrderTimeouts, ScheduleResult, ScheduleSummary
    from scheduler.async_api import AsyncOrderTimeouts
    from scheduler.registry import Outcome, TimeoutRecord, TimeoutState

__all__ = [
    "AsyncOrderTimeouts",
    "ConfigurationError",
    "InvalidInput",
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

# Names whose modules load SQLAlchemy: imported on first use (PEP 562), so that a process that
# only needs the errors, the settings or the CLI's help does not pay for it.
_LAZY = {
    "AsyncOrderTimeouts": "scheduler.async_api",
    "OrderTimeouts": "scheduler.api",
    "ScheduleResult": "scheduler.api",
    "ScheduleSummary": "scheduler.api",
    "Outcome": "scheduler.registry",
    "TimeoutRecord": "scheduler.registry",
    "TimeoutState": "scheduler.registry",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
