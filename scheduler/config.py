"""Configuration from the environment, overridable by CLI options and constructor arguments."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, overload

from scheduler.clock import parse_duration
from scheduler.errors import ConfigurationError, InvalidTimeout
from scheduler.names import DEFAULT_SQLITE_FILE

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

ENV_DATABASE_URL = "ORDER_TIMEOUTS_DATABASE_URL"
ENV_BROKER_URL = "ORDER_TIMEOUTS_BROKER_URL"
ENV_ORDER_STORE = "ORDER_TIMEOUTS_ORDER_STORE"
ENV_MAX_DELAY = "ORDER_TIMEOUTS_MAX_DELAY_SECONDS"
ENV_MAX_ATTEMPTS = "ORDER_TIMEOUTS_MAX_ATTEMPTS"
ENV_MAX_CLOCK_SKEW = "ORDER_TIMEOUTS_MAX_CLOCK_SKEW"
ENV_RETRY_BACKOFF = "ORDER_TIMEOUTS_RETRY_BACKOFF"
ENV_RETENTION = "ORDER_TIMEOUTS_RETENTION"
ENV_MODE = "ORDER_TIMEOUTS_MODE"
ENV_MAX_CANCELS_PER_MINUTE = "ORDER_TIMEOUTS_MAX_CANCELS_PER_MINUTE"
ENV_MAX_UNPAID_RATIO = "ORDER_TIMEOUTS_MAX_UNPAID_RATIO"
ENV_UNPAID_RATIO_MIN_ORDERS = "ORDER_TIMEOUTS_UNPAID_RATIO_MIN_ORDERS"

#: ORDER_TIMEOUTS_RETENTION's value that keeps every finished timeout
RETENTION_OFF = "off"
#: the longest first retry delay or cap ORDER_TIMEOUTS_RETRY_BACKOFF accepts
MAX_RETRY_BACKOFF = timedelta(days=1)


class Mode(StrEnum):
    LIVE = "live"  #: cancel unpaid orders
    SHADOW = "shadow"  #: decide as usual, record `would_cancel`, cancel nothing (beside an existing cron job)


def parse_mode(raw: str, name: str = ENV_MODE) -> Mode:
    try:
        return Mode(raw.strip().lower())
    except ValueError:
        raise ConfigurationError(f"{name} must be live or shadow, got {raw!r}") from None


@dataclass(frozen=True)
class BreakerLimits:
    """The cancel circuit breaker's bounds, fleet-wide over the last minute; None turns a rule off."""

    #: more cancels than this in the last minute pause the fleet
    max_cancels_per_minute: int | None = None
    #: a share of unpaid answers above this, over at least `min_orders` decided orders, pauses the fleet
    max_unpaid_ratio: float | None = None
    min_orders: int = 100

    @property
    def active(self) -> bool:
        return self.max_cancels_per_minute is not None or self.max_unpaid_ratio is not None


@dataclass(frozen=True)
class OrdersTableNames:
    """Names of the order service's table as the default SQL order store sees them."""

    table: str = "orders"
    id_column: str = "id"
    status_column: str = "status"
    cancelled_at_column: str = "cancelled_at"
    pending_status: str = "PENDING"
    paid_status: str = "PAID"
    cancelled_status: str = "CANCELLED"


@dataclass(frozen=True)
class Settings:
    database_url: str = f"sqlite:///{DEFAULT_SQLITE_FILE}"
    broker_url: str = "sql"
    #: "module:callable" building a consumers.orders.OrderStore; empty = SQL store on the database
    order_store: str = ""
    default_delay: timedelta = timedelta(minutes=30)
    max_delay: timedelta = timedelta(days=30)
    #: attempts with payment status UNKNOWN before the timeout is dead-lettered
    max_attempts: int = 5
    #: first retry delay for UNKNOWN payment status; doubles per attempt up to `retry_backoff_cap`
    retry_backoff: timedelta = timedelta(seconds=2)
    retry_backoff_cap: timedelta = timedelta(minutes=5)
    #: a broker delivery seen this many times without an ack (workers crashing on it) is dead-lettered
    max_deliveries: int = 10
    #: a process whose clock is further off the registry's than this is reported (log, metric, check)
    max_clock_skew: timedelta = timedelta(seconds=1)
    #: finished timeouts (done, revoked) older than this are purged by `maintain`; None keeps them all
    retention: timedelta | None = timedelta(days=7)
    orders: OrdersTableNames = field(default_factory=OrdersTableNames)
    #: live cancels; shadow records `would_cancel` and cancels nothing
    mode: Mode = Mode.LIVE
    breaker: BreakerLimits = field(default_factory=BreakerLimits)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        backoff, backoff_cap = _backoff(env, ENV_RETRY_BACKOFF, cls.retry_backoff, cls.retry_backoff_cap)
        settings = cls(
            database_url=env.get(ENV_DATABASE_URL) or cls.database_url,
            broker_url=env.get(ENV_BROKER_URL) or cls.broker_url,
            order_store=env.get(ENV_ORDER_STORE, ""),
            max_delay=timedelta(seconds=_positive_int(env, ENV_MAX_DELAY, 30 * 86400)),
            max_attempts=_positive_int(env, ENV_MAX_ATTEMPTS, 5),
            retry_backoff=backoff,
            retry_backoff_cap=backoff_cap,
            max_clock_skew=_seconds(env, ENV_MAX_CLOCK_SKEW, timedelta(seconds=1)),
            retention=_retention(env, ENV_RETENTION, cls.retention),
            mode=parse_mode(env[ENV_MODE]) if env.get(ENV_MODE) else Mode.LIVE,
            breaker=BreakerLimits(
                max_cancels_per_minute=_positive_int(env, ENV_MAX_CANCELS_PER_MINUTE, None),
                max_unpaid_ratio=_ratio(env, ENV_MAX_UNPAID_RATIO),
                min_orders=_positive_int(env, ENV_UNPAID_RATIO_MIN_ORDERS, BreakerLimits.min_orders),
            ),
        )
        given = {key: value for key, value in overrides.items() if value is not None}
        return replace(settings, **given)  # type: ignore[arg-type]


@overload
def _positive_int(env: os._Environ[str], name: str, default: int) -> int: ...
@overload
def _positive_int(env: os._Environ[str], name: str, default: None) -> int | None: ...
def _positive_int(env: os._Environ[str], name: str, default: int | None) -> int | None:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ConfigurationError(f"{name} must be a positive integer, got {raw!r}")
    return value


def _ratio(env: os._Environ[str], name: str) -> float | None:
    """A share above 0 and below 1 (0.9 or 90%), or None when unset."""
    raw = env.get(name)
    if not raw:
        return None
    text = raw.strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise ConfigurationError(f"{name} must be a share above 0 and below 1, like 0.9 or 90%, got {raw!r}")
    return value


def _seconds(env: os._Environ[str], name: str, default: timedelta) -> timedelta:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not 0 < value < 86400:
        raise ConfigurationError(f"{name} must be a number of seconds above 0 and below a day, got {raw!r}")
    return timedelta(seconds=value)


def _backoff(env: os._Environ[str], name: str, base: timedelta, cap: timedelta) -> tuple[timedelta, timedelta]:
    """`2s` (the first retry delay; the cap stays `cap`) or `2s..10m` (first delay..cap), in the
    duration forms of the CLI's --delay."""
    raw = env.get(name)
    if not raw:
        return base, cap
    first, dots, longest = raw.partition("..")
    usage = f"{name} must be a duration like 2s, or first..longest like 2s..10m, each above 0 and at most a day"
    try:
        base = parse_duration(first)
        if dots:
            cap = parse_duration(longest)
    except InvalidTimeout:
        raise ConfigurationError(f"{usage}; got {raw!r}") from None
    if not timedelta(0) < base <= MAX_RETRY_BACKOFF or not timedelta(0) < cap <= MAX_RETRY_BACKOFF:
        raise ConfigurationError(f"{usage}; got {raw!r}")
    if base > cap:
        longest = longest.strip() or f"{cap.total_seconds():g}s (the default)"
        raise ConfigurationError(f"{name}: the first retry delay {first.strip()} is longer than the longest, {longest}")
    return base, cap


def _retention(env: os._Environ[str], name: str, default: timedelta | None) -> timedelta | None:
    """A duration in the forms of the CLI's --delay, above 0, or `off` (keep every finished timeout)."""
    raw = env.get(name)
    if not raw:
        return default
    if raw.strip().lower() == RETENTION_OFF:
        return None
    try:
        value = parse_duration(raw)
    except InvalidTimeout:
        value = timedelta(0)
    if value <= timedelta(0):
        raise ConfigurationError(f"{name} must be a duration above 0 like 12h or 7d, or {RETENTION_OFF}; got {raw!r}")
    return value


#: the registry's drivers for each kind of caller; one URL serves both (the asyncio API, the workers)
_SYNC_DRIVERS = {
    "sqlite+aiosqlite": "sqlite",
    "postgresql+asyncpg": "postgresql+psycopg",
    "postgresql+psycopg_async": "postgresql+psycopg",
}
_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "sqlite+pysqlite": "sqlite+aiosqlite"}


def database_url(raw: str, *, asyncio: bool = False) -> URL:
    """Parse a registry URL; plain postgresql:// means psycopg 3, the driver we ship with.

    The driver follows the caller: a synchronous one for the workers, the CLI and `OrderTimeouts`,
    an asyncio one for `AsyncOrderTimeouts` (aiosqlite; psycopg's async mode, or asyncpg when the
    URL names it), so that a deployment sets one URL for all of its processes."""
    # Imported here: the settings are read by every command, SQLAlchemy is needed only by those
    # that open the database.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(_hosts_in_query(raw))
    except (ArgumentError, ValueError):
        raise ConfigurationError(f"not a database URL: {redact(raw)}") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    drivers = _ASYNC_DRIVERS if asyncio else _SYNC_DRIVERS
    url = url.set(drivername=drivers.get(url.drivername, url.drivername))
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ConfigurationError(f"the registry needs SQLite or PostgreSQL, not {backend}: {redact(raw)}")
    return url


def _hosts_in_query(raw: str) -> str:
    """libpq's multi-host form `postgresql://u@h1:5432,h2:5433/db` as SQLAlchemy spells it,
    `postgresql://u@/db?host=h1:5432&host=h2:5433`; any other URL unchanged."""
    scheme, sep, rest = raw.partition("://")
    authority, slash, tail = rest.partition("/")
    credentials, at, hosts = authority.rpartition("@")
    if not sep or "," not in hosts:
        return raw
    path, question, query = tail.partition("?")
    given = "&".join(f"host={host}" for host in hosts.split(",") if host)
    return f"{scheme}://{credentials}{at}{slash}{path}?{given}{'&' + query if question and query else ''}"


#: query options whose values are secrets (redis-py's key passphrase): redact hides them too
_SECRET_QUERY = re.compile(r"(?<=[?&])(ssl_password|password)=[^&#]*")


def redact(url: str) -> str:
    """The URL with its password replaced, for anything that is printed or logged."""
    url = _SECRET_QUERY.sub(r"\1=***", url)
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user, colon, _password = credentials.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


def bounded_int(transport: str, key: str, value: str, limits: tuple[int, int]) -> int:
    """An integer URL option within its limits, or a ConfigurationError naming the option."""
    low, high = limits
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise ConfigurationError(f"{transport} option {key}={value!r}: give an integer from {low} to {high}")
    return number
