"""The default order store: payment status and conditional cancel over the SQL `orders` table."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.exc import SQLAlchemyError

from consumers.orders import PaymentStatus
from scheduler.config import OrdersTableNames
from scheduler.errors import OrderStoreUnavailable
from scheduler.schema import orders_table


class SqlOrderStore:
    """Payment status and conditional cancel over an SQL `orders` table.

    With `engine=None` the table lives in the registry's database and every statement runs in the
    handler's batch transaction. With an engine of its own, the cancel commits first and the
    registry outcome after; a crash in between is harmless because the retry finds the order
    already cancelled.

    A database error is the store failing as a whole (OrderStoreUnavailable): the handler rolls the
    batch transaction back, so no savepoint is needed to keep it usable, and none costs a round trip.
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
