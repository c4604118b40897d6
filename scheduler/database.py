"""Engines for the registry: SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.pool import NullPool

from scheduler.config import database_url

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

_SQLITE_BEGIN = "order_timeouts_sqlite_begin"
#: how long a SQLite writer waits for another process's write lock before giving up
SQLITE_BUSY_TIMEOUT_S = 30.0


#: see postgresql_connect_args
POSTGRESQL_CONNECT_DEFAULTS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}
IDLE_IN_TRANSACTION_TIMEOUT = "12s"


#: execution options of a read-only connection (see `reading`)
READ_ONLY = {_SQLITE_BEGIN: "DEFERRED"}


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    parsed = database_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            parsed,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            poolclass=NullPool if parsed.database in (None, "", ":memory:") else None,
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args=postgresql_connect_args(dict(parsed.query)),
    )


def postgresql_connect_args(query: Mapping[str, str | tuple[str, ...]]) -> dict[str, Any]:
    """libpq settings that bound how long a lost server or a frozen client holds anything up; each
    one that the URL's query string gives is left as the URL says.

    - connect_timeout: a host that does not answer is given up (the next one of a multi-host URL is
      tried) after this long;
    - TCP keepalives: a connection to a server that vanished (a partition, a dead host) fails within
      about 11 s instead of the kernel's two hours;
    - idle_in_transaction_session_timeout: the server ends a session that sits in a transaction
      without a word for this long. A worker frozen in its batch (SIGSTOP, a long GC pause, a paused
      VM) or cut off by the network holds its claimed rows' locks no longer than that; then another
      worker takes them, and the frozen worker's late commit fails and changes nothing.
    """
    args: dict[str, Any] = {key: value for key, value in POSTGRESQL_CONNECT_DEFAULTS.items() if key not in query}
    options = query.get("options", "")
    options = " ".join(options) if isinstance(options, tuple) else options
    if "idle_in_transaction_session_timeout" not in options:
        args["options"] = f"{options} -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT}".strip()
    return args


def _server_settings(options: str | tuple[str, ...]) -> dict[str, str]:
    """libpq's `options` ("-c a=1 -cb=2") as name -> value."""
    words = " ".join(options) if isinstance(options, tuple) else options
    settings: dict[str, str] = {}
    for word in words.replace("-c ", "-c").split():
        name, _, value = word.removeprefix("-c").partition("=")
        if name and value:
            settings[name] = value
    return settings


def _configure_sqlite(engine: Engine) -> None:
    # WAL lets readers (CLI, demo progress) run beside the one writer; the busy timeout makes
    # several worker processes queue for the write lock instead of failing.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so that we can say BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    # BEGIN IMMEDIATE takes the write lock up front. A deferred transaction that reads and then
    # writes can fail with SQLITE_BUSY at the upgrade without waiting for the busy timeout,
    # which is exactly what a claim (read due rows, then update them) does.
    # Read-only work (listings, next due time) opts out with `reading(engine)`.
    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(_SQLITE_BEGIN, "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")


def reading(engine: Engine) -> Connection:
    """A connection for reads only: on SQLite it does not take the write lock."""
    return engine.connect().execution_options(**READ_ONLY)


def make_async_engine(url: str, *, pool_size: int = 5) -> AsyncEngine:
    """The registry engine of `AsyncOrderTimeouts`: the same settings as `make_engine`'s on an
    asyncio driver (sqlite+aiosqlite, postgresql+psycopg in its async mode, postgresql+asyncpg)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    parsed = database_url(url, asyncio=True)
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(
            parsed,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            poolclass=NullPool if parsed.database in (None, "", ":memory:") else None,
        )
        # aiosqlite's connection takes the same pragmas and BEGIN as pysqlite's, through the
        # engine's synchronous facade (SQLAlchemy's documented way for this driver).
        _configure_sqlite(engine.sync_engine)
        return engine
    if parsed.drivername == "postgresql+asyncpg":
        # asyncpg does not go through libpq: the same bounds in its own words (it has no TCP keepalive
        # option), and libpq's `options=-c name=value` of the URL as server settings.
        settings = _server_settings(parsed.query.get("options", ""))
        settings.setdefault("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION_TIMEOUT)
        parsed = parsed.difference_update_query(["options"])
        connect_args: dict[str, Any] = {
            "timeout": POSTGRESQL_CONNECT_DEFAULTS["connect_timeout"],
            "server_settings": settings,
        }
    else:
        connect_args = postgresql_connect_args(dict(parsed.query))
    return create_async_engine(
        parsed, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, connect_args=connect_args
    )
