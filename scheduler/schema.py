"""`init-db`: create the registry tables and, when absent, the `orders` table. Never alters a table."""

from __future__ import annotations

from sqlalchemy import Engine, MetaData, inspect

from scheduler.config import OrdersTableNames
from scheduler.registry import metadata as registry_metadata


def init_db(engine: Engine, orders: OrdersTableNames | None) -> list[str]:
    """Create what is missing; return the names of the tables created. Safe to run again."""
    from consumers.orders import orders_table  # the orders table belongs to the consumer side

    existing = set(inspect(engine).get_table_names())
    created = [name for name in registry_metadata.tables if name not in existing]
    registry_metadata.create_all(engine, checkfirst=True)
    if orders is not None and orders.table not in existing:
        extra = MetaData()
        orders_table(orders, extra)
        extra.create_all(engine, checkfirst=True)
        created.append(orders.table)
    return created
