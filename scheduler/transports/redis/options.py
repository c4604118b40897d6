"""The `redis` transport's URL: our options in the query string, the rest handed to redis-py.

The options are listed in the docstring of scheduler/transports/redis/adapter.py and in
docs/transports.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from scheduler.config import bounded_int, redact
from scheduler.errors import ConfigurationError
from scheduler.transports.redis.keys import REDIS_DEFAULT_PREFIX
from scheduler.transports.redis.sentinel import connect_sentinel, is_sentinel_url, parse_sentinel_url

#: seconds to wait for a TCP connection; a dead broker must not stall schedule() for long
CONNECT_TIMEOUT_S = 2.0
#: seconds to wait for a reply unless the URL says otherwise; above the longest XREADGROUP block
SOCKET_TIMEOUT_S = 10.0
#: longest XREADGROUP block, well inside the socket timeout
MAX_BLOCK_MS = 2000


@dataclass(frozen=True)
class RedisOptions:
    prefix: str = REDIS_DEFAULT_PREFIX
    shards: int = 1
    claim_idle_ms: int = 12_000
    cluster: bool = False
    move_batch: int = 1000
    dead_maxlen: int = 100_000


_LIMITS = {"shards": (1, 16384), "claim_idle_ms": (1, 86_400_000), "move_batch": (1, 5000), "dead_maxlen": (1, 10**9)}


def parse_url(broker_url: str) -> tuple[str, RedisOptions]:
    """Split a broker URL into the URL redis-py gets and our options; bad options raise ConfigurationError."""
    try:
        parts = urlsplit(broker_url)
    except ValueError as exc:  # an unbalanced IPv6 bracket
        raise ConfigurationError(f"bad redis URL {redact(broker_url)!r}: {exc}") from None
    ours: dict[str, Any] = {}
    passed: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "prefix":
            if not value or "{" in value or "}" in value:
                raise ConfigurationError(f"redis option prefix={value!r}: give a non-empty name without braces")
            ours[key] = value
        elif key == "cluster":
            if value not in ("0", "1", "true", "false"):
                raise ConfigurationError(f"redis option cluster={value!r}: use 1 or 0")
            ours[key] = value in ("1", "true")
        elif key in _LIMITS:
            ours[key] = bounded_int("redis", key, value, _LIMITS[key])
        else:
            passed.append((key, value))
    url = urlunsplit(parts._replace(query=urlencode(passed)))
    if is_sentinel_url(url):
        if ours.get("cluster"):
            raise ConfigurationError(f"redis option cluster=1 does not go with a sentinel URL: {redact(url)}")
        parse_sentinel_url(url)  # a bad form fails here, at start-up, not on first use
    return url, RedisOptions(**ours)


def connect(url: str, options: RedisOptions, *, asyncio: bool = False) -> Any:
    """A client for the URL (one server, a Redis Cluster, or the primary a Sentinel names); connections
    are opened on first use, so a dead broker fails later, per call. With `asyncio`, the same client
    from redis.asyncio (the asyncio API's publisher), with the same options.

    Typed Any: redis-py declares every reply as `Awaitable[Any] | Any` (sync and async share stubs).
    """
    client_module: Any = redis
    cluster_class: Any = RedisCluster
    retry_class: Any = Retry
    sentinel_class: Any = None  # connect_sentinel's default, redis-py's
    if asyncio:
        import redis.asyncio as client_module
        from redis.asyncio.cluster import RedisCluster as cluster_class
        from redis.asyncio.retry import Retry as retry_class
        from redis.asyncio.sentinel import Sentinel as sentinel_class
    defaults: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT_S}
    if "socket_timeout" not in urlsplit(url).query:
        defaults["socket_timeout"] = SOCKET_TIMEOUT_S
    try:
        if options.cluster:
            # Cluster mode has only database 0; a /0 path is harmless, anything else is a mistake.
            path = urlsplit(url).path.strip("/")
            if path not in ("", "0"):
                raise ConfigurationError(f"redis cluster has only database 0, not {path!r}: {redact(url)}")
            seed = urlunsplit(urlsplit(url)._replace(path=""))
            return cluster_class.from_url(seed, **defaults)
        # A couple of quick reconnects ride over a dropped connection; a dead broker fails within a second.
        retry = retry_class(ExponentialBackoff(cap=0.5, base=0.05), 2)
        if is_sentinel_url(url):
            return connect_sentinel(parse_sentinel_url(url), sentinel_class, retry=retry, **defaults)
        return client_module.Redis.from_url(url, retry=retry, **defaults)
    except ValueError as exc:  # redis-py's URL parser
        raise ConfigurationError(f"bad redis URL {redact(url)!r}: {exc}") from None
