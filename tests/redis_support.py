"""The `redis` stack for the contract suite, and Redis helpers for tests/integration/test_redis.py.

Each test gets its own key prefix on the shared Redis; teardown deletes that prefix's keys and
nothing else (never FLUSHDB on a shared server).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from tests.services import REDIS_URL, require, unique
from tests.support import postgres_schema


def broker_url(prefix: str, base: str = REDIS_URL, **options: object) -> str:
    query = "&".join(f"{key}={value}" for key, value in {"prefix": prefix, **options}.items())
    return f"{base}{'&' if '?' in base else '?'}{query}"


def delete_prefix(client: Any, prefix: str) -> None:
    """Delete the keys of one prefix: `{prefix:<shard>}:…` and `{prefix}:…`, on every node of a cluster."""
    for pattern in (f"{{{prefix}:*", f"{{{prefix}}}:*"):
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)


@contextlib.contextmanager
def redis_namespace(delete: Callable[[Any, str], None]) -> Iterator[str]:
    """A fresh name on the shared Redis; afterwards `delete(client, name)` removes what carries it."""
    require("Redis", 6379)
    name = unique("ot")
    try:
        yield name
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            delete(client, name)
        finally:
            client.close()


def redis_prefix() -> contextlib.AbstractContextManager[str]:
    return redis_namespace(delete_prefix)


@contextlib.contextmanager
def redis_stack(tmp: Path, **options: object) -> Iterator[tuple[str, str]]:
    """Registry on a fresh PostgreSQL schema, timers under a fresh Redis key prefix."""
    with postgres_schema() as database_url, redis_prefix() as prefix:
        yield database_url, broker_url(prefix, **options)
