"""The order store: the one place that knows how to read payment status and cancel an order.

The default is SQL over an `orders` table (names configurable). An order service with an HTTP API
is asked through it (ORDER_TIMEOUTS_ORDER_STORE=https://…, consumers/orders_http.py). Anything else
implements `OrderStore` (two methods) and points ORDER_TIMEOUTS_ORDER_STORE at a factory.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.exc import SQLAlchemyError

from scheduler.config import OrdersTableNames, Settings
from scheduler.errors import ConfigurationError, OrderStoreUnavailable
from scheduler.schema import orders_table as orders_table  # the table's shape is the product's contract


class PaymentStatus(StrEnum):
    UNPAID = "unpaid"  #: still waiting for payment: the timeout cancels it
    PAID = "paid"  #: paid, or moved on past payment (shipped, refunded, ...): never cancelled
    CANCELLED = "cancelled"  #: already cancelled by someone else
    UNKNOWN = "unknown"  #: the store cannot say (order missing, service down): retried, never cancelled


class OrderStore(Protocol):
    """How the handler sees the order service. Both calls get a whole batch at once.

    `conn` is the registry's open batch transaction. A store on the same database should use it,
    so that the cancel and the registry outcome commit together; any other store may ignore it.
    """

    def payment_status(self, conn: Connection, order_ids: Sequence[str]) -> dict[str, PaymentStatus]:
        """Status of each order; an id missing from the answer counts as UNKNOWN.

        Raise OrderStoreUnavailable when the store cannot answer at all.
        """
        ...

    def cancel_unpaid(self, conn: Connection, order_ids: Sequence[str], now: datetime) -> set[str]:
        """Cancel the orders that are still unpaid, conditionally, and return the ids cancelled.

        An order paid between `payment_status` and this call must stay paid: the payment wins.
        Must be idempotent: cancelling an already cancelled order changes nothing.
        """
        ...


class SqlOrderStore:
    """Payment status and conditional cancel over an SQL `orders` table.

    With `engine=None` the table lives in the registry's database and every statement runs in the
    handler's batch transaction. With an engine of its own, the cancel commits first and the
    registry outcome after; a crash in between is harmless because the retry finds the order
    already cancelled.
    """

    def __init__(self, names: OrdersTableNames, engine: Engine | None = None) -> None:
        self._names = names
        self._table = orders_table(names)
        self._engine = engine
        self._id = self._table.c[names.id_column]
        self._status = self._table.c[names.status_column]
        self._cancelled_at = self._table.c[names.cancelled_at_column]

    def payment_status(self, conn: Connection, order_ids: Sequence[str]) -> dict[str, PaymentStatus]:
        if not order_ids:
            return {}
        stmt = select(self._id, self._status).where(self._id.in_(order_ids))
        try:
            if self._engine is None:
                # A savepoint, so that a broken orders table fails only this step: the batch
                # transaction stays usable and records the retry (PostgreSQL would abort it).
                with conn.begin_nested():
                    rows = conn.execute(stmt).all()
            else:
                with self._engine.connect() as own:
                    rows = own.execute(stmt).all()
        except SQLAlchemyError as exc:
            raise OrderStoreUnavailable(f"orders table unreadable: {type(exc).__name__}") from exc
        return {order_id: self._classify(status) for order_id, status in rows}

    def cancel_unpaid(self, conn: Connection, order_ids: Sequence[str], now: datetime) -> set[str]:
        if not order_ids:
            return set()
        # The status condition is the whole race story: a payment that committed first makes this
        # match nothing; one that commits later waits for our row lock and then fails its own
        # `WHERE status = 'PENDING'` — the refund path of the order service.
        stmt = (
            update(self._table)
            .where(self._id.in_(order_ids), self._status == self._names.pending_status)
            .values({self._status: self._names.cancelled_status, self._cancelled_at: now})
            .returning(self._id)
        )
        try:
            if self._engine is None:
                with conn.begin_nested():
                    return set(conn.execute(stmt).scalars())
            with self._engine.begin() as own:
                return set(own.execute(stmt).scalars())
        except SQLAlchemyError as exc:
            raise OrderStoreUnavailable(f"orders table not updatable: {type(exc).__name__}") from exc

    def _classify(self, status: str) -> PaymentStatus:
        if status == self._names.pending_status:
            return PaymentStatus.UNPAID
        if status == self._names.cancelled_status:
            return PaymentStatus.CANCELLED
        return PaymentStatus.PAID


def load_order_store(settings: Settings) -> OrderStore:
    """The store named by ORDER_TIMEOUTS_ORDER_STORE: the order service's HTTP API (http(s)://…,
    consumers/orders_http.py), "module:factory" (called with the settings), or by default the SQL
    store on the registry's database."""
    if not settings.order_store:
        return SqlOrderStore(settings.orders)
    if settings.order_store.startswith(("http://", "https://")):
        from consumers import orders_http  # httpx is loaded only by those who use it

        return orders_http.from_env(settings.order_store)
    module_name, _, attribute = settings.order_store.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(f"cannot load order store {settings.order_store!r}: {exc}") from None
    store: OrderStore = factory(settings)
    return store
