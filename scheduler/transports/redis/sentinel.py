"""Redis under Sentinel: `redis+sentinel://[[user]:password@]h1:26379,h2:26379/SERVICE[/DB][?options]`,
`rediss+sentinel://` for TLS to the sentinels and the servers alike (the `ssl_*` options apply to both).

The hosts are sentinels (port 26379 when left out); SERVICE is the name they monitor; the user and
password are the Redis servers' (and the sentinels' too with `sentinel_auth=1`). The client comes from
redis-py's `Sentinel(...).master_for(SERVICE)`: each new connection asks the sentinels for the current
primary, and a connection that meets a demoted primary ("You can't write against a read only
replica") is dropped by redis-py with a ConnectionError, so the next attempt asks the sentinels again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from redis.connection import parse_url as redis_url_options
from redis.sentinel import Sentinel

from scheduler.config import redact
from scheduler.errors import ConfigurationError

#: URL schemes of a Redis under Sentinel (the rq transport's `rq+` in front is taken off before)
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: a sentinel's port when the URL leaves it out
SENTINEL_DEFAULT_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: the sentinels take the URL's user and password too
    sentinel_auth: bool = False
    #: query options for redis-py, as redis-py's URL parser types them (socket_timeout, ...)
    redis_options: dict[str, Any] = field(default_factory=dict)
    #: TLS to the sentinels and the servers (`rediss+sentinel://`)
    tls: bool = False

    def tls_options(self) -> dict[str, Any]:
        """redis-py's keyword arguments for TLS (`ssl` and the URL's `ssl_*` options), empty without it."""
        if not self.tls:
            return {}
        return {"ssl": True, **{key: value for key, value in self.redis_options.items() if key.startswith("ssl_")}}


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The parts of a sentinel URL; a bad form raises ConfigurationError naming the problem."""
    shown = redact(url)
    parts = urlsplit(url)
    credentials, at, hosts = parts.netloc.rpartition("@")
    if not at:
        credentials, hosts = "", parts.netloc
    user, colon, password = credentials.partition(":")
    sentinels = tuple(_sentinel_address(host, shown) for host in hosts.split(","))
    path = [unquote(p) for p in parts.path.strip("/").split("/")] if parts.path.strip("/") else []
    if not path or not path[0]:
        raise ConfigurationError(f"redis sentinel URL names no service (…/SERVICE[/DB]): {shown}")
    if len(path) > 2:
        raise ConfigurationError(f"redis sentinel URL path is /SERVICE[/DB], not {parts.path!r}: {shown}")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ConfigurationError(f"redis sentinel URL database must be a number, not {path[1]!r}: {shown}")
        db = int(path[1])
    sentinel_auth = False
    passed: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "sentinel_auth":
            if value not in ("0", "1", "true", "false"):
                raise ConfigurationError(f"redis option sentinel_auth={value!r}: use 1 or 0")
            sentinel_auth = value in ("1", "true")
        elif key == "db":
            raise ConfigurationError(f"redis sentinel URL takes the database in its path (/SERVICE/DB): {shown}")
        else:
            passed.append((key, value))
    try:
        # redis-py's own URL parser types the options it knows (socket_timeout=2.5 → float, ...).
        options = redis_url_options(f"redis://?{urlencode(passed)}") if passed else {}  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigurationError(f"bad redis sentinel URL option: {exc}: {shown}") from None
    for key in ("host", "port", "path", "db", "username", "password", "connection_class"):
        options.pop(key, None)
    return SentinelTarget(
        sentinels=sentinels,
        service=path[0],
        db=db,
        username=unquote(user) or None,
        password=unquote(password) if colon else None,
        sentinel_auth=sentinel_auth,
        redis_options=options,
        tls=parts.scheme.lower() == "rediss+sentinel",
    )


def _sentinel_address(host: str, shown: str) -> tuple[str, int]:
    if host.startswith("["):  # [IPv6]:port
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigurationError(f"redis sentinel address {host!r} is not [address]:port: {shown}")
        port = rest[1:]
    else:
        name, _, port = host.partition(":")
    if not name:
        raise ConfigurationError(f"redis sentinel URL has an empty sentinel address in {host!r}: {shown}")
    if not port:
        return name, SENTINEL_DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"redis sentinel address {host!r}: the port must be a number from 1 to 65535: {shown}")
    return name, int(port)


def connect_sentinel(target: SentinelTarget, sentinel_class: Any = None, **defaults: Any) -> Any:
    """A client of the current primary of the service; connections are made on first use.
    `sentinel_class`: redis.asyncio's Sentinel for an asyncio client (default: redis-py's)."""
    credentials = {"username": target.username, "password": target.password}
    # The sentinels answer small queries: a short timeout lets a dead one be skipped quickly.
    sentinel_kwargs: dict[str, Any] = {
        "socket_connect_timeout": defaults.get("socket_connect_timeout"),
        "socket_timeout": defaults.get("socket_connect_timeout"),
    }
    if target.sentinel_auth:
        sentinel_kwargs.update(credentials)
    # The sentinels speak TLS with the same CA and client certificate as the servers.
    sentinel_kwargs.update(target.tls_options())
    sentinel: Any = (sentinel_class or Sentinel)(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(
        target.service, db=target.db, **credentials, **{**defaults, **target.redis_options, **target.tls_options()}
    )
