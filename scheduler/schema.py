"""`init-db`: bring the registry schema to the latest migration and create the `orders` table when
it is absent. Never alters the order service's tables. Safe to run again, and from several
processes (PostgreSQL serialises them with an advisory lock).

The `orders` table's shape is part of the product's contract (DESIGN.md): `init-db` creates it and
the default SQL order store of `consumers` reads and cancels through it.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from sqlalchemy import Column, Connection, DateTime, Engine, MetaData, String, Table, inspect, text

from scheduler.config import OrdersTableNames
from scheduler.names import CONTROL_TABLE, LEASE_TABLE, MIGRATIONS_VERSION_TABLE, REGISTRY_TABLE
from scheduler.registry import control

# Alembic is imported by the functions that migrate: the workers import this module for the
# orders table alone.
if TYPE_CHECKING:
    from alembic.config import Config

#: pg_advisory_xact_lock key for init-db ("order-timeouts" in ASCII, truncated to fit a bigint)
_INIT_LOCK = 0x6F72646572_74696D


def orders_table(names: OrdersTableNames, metadata: MetaData | None = None) -> Table:
    """The `orders` table of DESIGN.md, under the configured names (used by init-db and the SQL order store)."""
    return Table(
        names.table,
        metadata if metadata is not None else MetaData(),
        Column(names.id_column, String(255), primary_key=True),
        Column(names.status_column, String(32), nullable=False, index=True),
        Column(names.cancelled_at_column, DateTime(timezone=True)),
    )


def migrations() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "scheduler:migrations")
    return config


def head() -> str:
    from alembic.script import ScriptDirectory

    revision = ScriptDirectory.from_config(migrations()).get_current_head()
    assert revision is not None
    return revision


def current_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn, opts={"version_table": MIGRATIONS_VERSION_TABLE}).get_current_revision()


def migration_sql(dialect_name: str, orders: OrdersTableNames | None, since: str | None = None) -> str:
    """The SQL that init-db would run on an empty database of this dialect (`postgresql`, `sqlite`),
    written without connecting to any: Alembic's offline mode for the registry (from revision `since`
    when given, for a database already at it), then the orders table when `orders` is given, created
    only if it is absent. For DBAs who apply schema changes by hand."""
    import io

    from alembic import command
    from alembic.util import CommandError
    from sqlalchemy.schema import CreateIndex, CreateTable

    from scheduler.errors import ConfigurationError

    output = io.StringIO()
    config = migrations()
    config.attributes.update(dialect_name=dialect_name, output=output)
    try:
        command.upgrade(config, f"{since}:head" if since else "head", sql=True)
    except CommandError as exc:
        raise ConfigurationError(f"--since {since!r}: {exc}") from None
    # The deployment's identity, as init-db writes it: once, kept when the registry has one already.
    identity = json.dumps(control.new_deployment())
    output.write("-- this deployment's identity (docs/registry.md, the control table), kept if already written\n\n")
    output.write(
        f"INSERT INTO {CONTROL_TABLE} (name, value, updated_ms) VALUES ('{control.DEPLOYMENT}', '{identity}', "
        f"{int(time.time() * 1000)}) ON CONFLICT (name) DO NOTHING;\n\n"
    )
    if orders is not None:
        from sqlalchemy.engine import URL

        dialect = URL.create(dialect_name).get_dialect()()
        table = orders_table(orders)
        output.write(f"-- the orders table, when absent ({orders.table})\n\n")
        output.write(f"{str(CreateTable(table, if_not_exists=True).compile(dialect=dialect)).strip()};\n\n")
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            output.write(f"{str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect)).strip()};\n\n")
    return output.getvalue()


def init_db(engine: Engine, orders: OrdersTableNames | None) -> list[str]:
    """Migrate the registry to head and create what is missing; return the tables created."""
    from alembic import command

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _INIT_LOCK})
        before = set(inspect(conn).get_table_names())
        config = migrations()
        config.attributes["connection"] = conn
        if REGISTRY_TABLE in before and MIGRATIONS_VERSION_TABLE not in before:
            # Created by create_all before migrations existed: record what it already has.
            command.stamp(config, "0002" if LEASE_TABLE in before else "0001")
        command.upgrade(config, "head")
        # The deployment's identity (registry/control.py), before any process publishes: init-db
        # runs before the workers in every documented deploy, so their names are this one's.
        control.ensure_deployment(conn, now=int(time.time() * 1000))
        if orders is not None and orders.table not in before:
            extra = MetaData()
            orders_table(orders, extra)
            extra.create_all(conn, checkfirst=True)
        after = set(inspect(conn).get_table_names())
    return sorted(after - before - {MIGRATIONS_VERSION_TABLE})
