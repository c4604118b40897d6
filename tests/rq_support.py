"""The `rq` stack for the contract suite, and RQ helpers for tests/integration/test_rq.py.

Each test gets its own queue name, which is also its job-id prefix; teardown deletes the keys that
carry that name (queue, registries, jobs, executions, results, locks, the test's rq workers) and
nothing else (never FLUSHDB on a shared server).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import redis

from benchmarks.sandbox import delete_rq_namespace
from tests.redis_support import redis_namespace
from tests.services import REDIS_URL
from tests.support import postgres_schema


def rq_broker_url(namespace: str, base: str = REDIS_URL, **options: object) -> str:
    """The rq+redis:// URL of a queue named `namespace` whose job ids start with `namespace`."""
    query = "&".join(f"{key}={value}" for key, value in {"queue": namespace, "prefix": namespace, **options}.items())
    return f"rq+{base}{'&' if '?' in base else '?'}{query}"


def rq_namespace() -> contextlib.AbstractContextManager[str]:
    return redis_namespace(delete_rq_namespace)


@contextlib.contextmanager
def rq_stack(tmp: Path, **options: object) -> Iterator[tuple[str, str]]:
    """Registry on a fresh PostgreSQL schema, jobs on a fresh RQ queue with its own job-id prefix."""
    with postgres_schema() as database_url, rq_namespace() as namespace:
        yield database_url, rq_broker_url(namespace, **options)


def lose_everything(broker_url: str) -> None:
    """What a Redis restart without persistence does to an rq stack: every key of its namespace gone."""
    namespace = parse_qs(urlsplit(broker_url).query)["queue"][0]
    client = redis.Redis.from_url(REDIS_URL)
    try:
        delete_rq_namespace(client, namespace)
    finally:
        client.close()
