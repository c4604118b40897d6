"""The order store: the one place that knows how to read payment status and cancel an order.

The default is SQL over an `orders` table (names configurable, consumers/orders/sql.py). An order
service with an HTTP API is asked through it (ORDER_TIMEOUTS_ORDER_STORE=https://…,
consumers/orders/http.py). Anything else implements `OrderStore` (two methods) and points
ORDER_TIMEOUTS_ORDER_STORE at a factory.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from sqlalchemy import Connection

from scheduler.config import Settings
from scheduler.errors import ConfigurationError

__all__ = ["OrderStore", "PaymentStatus", "load_order_store"]


class PaymentStatus(StrEnum):
    UNPAID = "unpaid"  #: still waiting for payment: the timeout cancels it
    PAID = "paid"  #: paid, or moved on past payment (shipped, refunded, ...): never cancelled
    CANCELLED = "cancelled"  #: already cancelled by someone else
    UNKNOWN = "unknown"  #: the store answered but cannot say for this order (missing): retried, never cancelled


class OrderStore(Protocol):
    """How the handler sees the order service. Both calls get a whole batch at once.

    `conn` is the registry's open batch transaction. A store on the same database should use it,
    so that the cancel and the registry outcome commit together; any other store may ignore it.

    Raise OrderStoreUnavailable when the store cannot answer at all (unreachable, an error of the
    whole request, an answer it cannot read). That is an outage, not an answer: the handler rolls
    the batch back and hands it back whole, spends no attempt and dead-letters nothing, and the
    worker backs off. Only an answer about an order (UNKNOWN for it) spends one of its attempts.
    Both calls should give up well within a few seconds: a worker holds its batch meanwhile.
    """

    def payment_status(self, conn: Connection, order_ids: Sequence[str]) -> dict[str, PaymentStatus]:
        """Status of each order; an id missing from the answer counts as UNKNOWN."""
        ...

    def cancel_unpaid(self, conn: Connection, order_ids: Sequence[str], now: datetime) -> set[str]:
        """Cancel the orders that are still unpaid, conditionally, and return the ids cancelled.

        An order paid between `payment_status` and this call must stay paid: the payment wins.
        Must be idempotent: cancelling an already cancelled order changes nothing. After a failure
        of this call the whole batch is asked again (status, then cancel): a cancel that took effect
        before the failure is then seen as CANCELLED.
        """
        ...


def load_order_store(settings: Settings) -> OrderStore:
    """The store named by ORDER_TIMEOUTS_ORDER_STORE: the order service's HTTP API (http(s)://…,
    consumers/orders/http.py), "module:factory" (called with the settings), or by default the SQL
    store on the registry's database."""
    if not settings.order_store:
        from consumers.orders.sql import SqlOrderStore

        return SqlOrderStore(settings.orders)
    if settings.order_store.startswith(("http://", "https://")):
        from consumers.orders import http  # httpx is loaded only by those who use it

        return http.from_env(settings.order_store)
    module_name, _, attribute = settings.order_store.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(f"cannot load order store {settings.order_store!r}: {exc}") from None
    store: OrderStore = factory(settings)
    return store
