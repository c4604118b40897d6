"""A small FastAPI order service on AsyncOrderTimeouts: each order's payment timeout is scheduled in
the transaction that creates the order, and revoked in the transaction that records its payment.

    ORDER_TIMEOUTS_DATABASE_URL=postgresql://…  ORDER_TIMEOUTS_BROKER_URL=redis://…  \
        uvicorn --app-dir docs/examples fastapi_orders:app --port 8000
    order-timeouts worker            # the workers cancel what stays unpaid

The orders live in the registry's database (the default order store: an `orders` table with `id`,
`status` and `cancelled_at`, created by `order-timeouts init-db`). `ORDERS_DATABASE_URL` points the
service at it with a driver of its choice; by default it shares the engine of AsyncOrderTimeouts.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from scheduler import AsyncOrderTimeouts, InvalidTimeout


class NewOrder(BaseModel):
    id: str
    #: how long the customer has to pay
    pay_within_seconds: float = Field(default=1800, gt=0)


class OrderView(BaseModel):
    id: str
    status: str
    timeout: str | None = None  #: the state of its payment timeout in the registry


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncOrderTimeouts.from_env() as timeouts:
        own_url = os.environ.get("ORDERS_DATABASE_URL")
        orders: AsyncEngine = create_async_engine(own_url) if own_url else timeouts.engine
        app.state.timeouts, app.state.orders = timeouts, orders
        yield
        if own_url:
            await orders.dispose()


app = FastAPI(title="orders", lifespan=lifespan)


def services(request: Request) -> tuple[AsyncOrderTimeouts, AsyncEngine]:
    return request.app.state.timeouts, request.app.state.orders


@app.post("/orders", status_code=201)
async def create_order(order: NewOrder, request: Request) -> OrderView:
    timeouts, orders = services(request)
    try:
        async with AsyncSession(orders) as session, session.begin():
            await session.execute(text("INSERT INTO orders (id, status) VALUES (:id, 'PENDING')"), {"id": order.id})
            # Same transaction: no order without its timeout, no timeout without its order.
            await timeouts.schedule(order.id, delay=timedelta(seconds=order.pay_within_seconds), connection=session)
    except IntegrityError:
        raise HTTPException(409, f"order {order.id!r} exists") from None
    except InvalidTimeout as exc:
        raise HTTPException(422, str(exc)) from None
    return OrderView(id=order.id, status="PENDING", timeout="pending")


@app.post("/orders/{order_id}/pay")
async def pay_order(order_id: str, request: Request) -> OrderView:
    timeouts, orders = services(request)
    async with AsyncSession(orders) as session, session.begin():
        # Conditional: a payment that commits before the worker's cancel wins; after it, it finds the
        # order cancelled (the refund path) and changes nothing.
        paid = await session.execute(
            text("UPDATE orders SET status = 'PAID' WHERE id = :id AND status = 'PENDING'"), {"id": order_id}
        )
        if paid.rowcount == 1:  # type: ignore[attr-defined]
            await timeouts.cancel(order_id, connection=session)  # revoked with the payment, or not at all
            return OrderView(id=order_id, status="PAID", timeout="revoked")
        status = (await session.execute(text("SELECT status FROM orders WHERE id = :id"), {"id": order_id})).scalar()
    if status is None:
        raise HTTPException(404, f"no order {order_id!r}")
    raise HTTPException(409, f"order {order_id!r} is {status}")


@app.get("/orders/{order_id}")
async def get_order(order_id: str, request: Request) -> OrderView:
    timeouts, orders = services(request)
    async with orders.connect() as conn:
        status = (await conn.execute(text("SELECT status FROM orders WHERE id = :id"), {"id": order_id})).scalar()
    if status is None:
        raise HTTPException(404, f"no order {order_id!r}")
    record = await timeouts.get(order_id)
    return OrderView(id=order_id, status=status, timeout=record.state.value if record else None)
