"""The project's own exceptions: callers never import pika, redis or SQLAlchemy to catch errors."""

from __future__ import annotations


class OrderTimeoutsError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidTimeout(OrderTimeoutsError, ValueError):
    """Bad input: an order id, a due time or a delay that cannot be scheduled. Nothing was changed."""


class InvalidInput(OrderTimeoutsError, ValueError):
    """Bad input to an operator's command other than a timeout (a pause reason, a mode). Nothing was changed."""


class TimeoutNotFound(OrderTimeoutsError, LookupError):
    """No timeout is registered for this order."""


class ConfigurationError(OrderTimeoutsError):
    """A URL, a table name or an option that cannot work."""


class TransportUnavailable(OrderTimeoutsError):
    """The broker cannot be reached; the registry still holds the timeout and the relay will publish it."""


class ForeignNames(TransportUnavailable):
    """The broker names this transport would use belong to another deployment (another registry):
    nothing is taken from them, so that neither deployment handles, and acks, the other's timers."""


class OrderStoreUnavailable(OrderTimeoutsError):
    """The order store could not answer at all: an outage, not an answer about the orders. The batch
    is handed back whole: nothing is cancelled or decided, and no attempt is spent."""


class MalformedMessage(OrderTimeoutsError):
    """A broker message that is not a timeout message; it is dead-lettered with this reason."""
