"""Private corners of the shared services for one bench step: a PostgreSQL schema, a SQLite file, a
Redis key prefix, a RabbitMQ vhost. Each is removed afterwards; nothing else is touched (no FLUSHDB,
nothing in `public`)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import redis

from benchmarks.plan import Services

#: keys or sorted-set members looked up per command by finish_rehashing
REHASH_BATCH = 5000


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def with_search_path(postgres_url: str, schema: str) -> str:
    joiner = "&" if "?" in postgres_url else "?"
    return f"{postgres_url}{joiner}options={quote(f'-csearch_path={schema}')}"


@contextlib.contextmanager
def postgres_schema(postgres_url: str) -> Iterator[str]:
    """A fresh schema selected through search_path; yields the URL that uses it."""
    schema = unique("bench")
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(postgres_url, schema)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@contextlib.contextmanager
def sqlite_file() -> Iterator[str]:
    folder = Path(tempfile.mkdtemp(prefix="order-timeouts-bench-"))
    try:
        yield f"sqlite:///{folder / 'registry.sqlite3'}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def redis_client(redis_url: str) -> Any:
    return redis.Redis.from_url(redis_url)


def delete_matching(client: Any, *patterns: str) -> None:
    for pattern in patterns:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=2000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch = []
        if batch:
            client.delete(*batch)


def redis_keys(prefix: str) -> tuple[str, ...]:
    """The key patterns of the product's redis transport under `prefix` (hash-tagged keys)."""
    return (f"{{{prefix}:*", f"{{{prefix}}}:*")


def rq_keys(name: str) -> tuple[str, ...]:
    """The key pattern of an RQ queue and job-id prefix named `name`: job hashes, results, the queue
    and its registries all carry the name (two global sets list them too, see delete_rq_namespace)."""
    return (f"rq:*{name}*",)


@contextlib.contextmanager
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of our own for the product's redis transport; its keys are deleted afterwards."""
    prefix = unique("bench")
    try:
        yield prefix
    finally:
        client = redis_client(redis_url)
        try:
            delete_matching(client, *redis_keys(prefix))
        finally:
            client.close()


@contextlib.contextmanager
def rq_namespace(redis_url: str) -> Iterator[str]:
    """A name for an RQ queue and its job ids; every RQ key and set entry naming it goes afterwards."""
    name = unique("bench")
    try:
        yield name
    finally:
        delete_rq_keys(redis_url, name)


def delete_rq_keys(redis_url: str, name: str) -> None:
    client = redis_client(redis_url)
    try:
        delete_rq_namespace(client, name)
    finally:
        client.close()


def delete_rq_namespace(client: Any, name: str) -> None:
    """Every RQ key that carries the name, and its entries in RQ's two global sets (the queue; the
    workers named after it, which may still be listed once killed)."""
    delete_matching(client, *rq_keys(name))
    client.srem("rq:queues", f"rq:queue:{name}")
    gone = [member for member in client.smembers("rq:workers") if name.encode() in member]
    if gone:
        client.srem("rq:workers", *gone)


def finish_rehashing(redis_url: str, patterns: Sequence[str]) -> None:
    """Leave the keys a bulk load wrote as a running system's next million operations would leave
    them: with their hash tables rehashed.

    Redis doubles a full hash table and then moves its entries over a bucket at a time, one bucket
    per operation on that table. The keyspace also moves in the background (1 ms every 100 ms), a
    sorted set's table only as the set is used. The bench's million far-off timers take the
    scheduled set just past 2^20 members, and for its next million operations every insert looks
    in both tables and moves a bucket: arming costs about twice as much in Redis until the move is
    over. One lookup of every key and of every member of every sorted
    set finishes it; nothing is written."""
    client = redis_client(redis_url)
    try:
        for pattern in patterns:
            keys: list[bytes] = []
            for key in client.scan_iter(match=pattern, count=REHASH_BATCH):
                keys.append(key)
                if len(keys) >= REHASH_BATCH:
                    client.exists(*keys)
                    keys = []
            if keys:
                client.exists(*keys)
            for key in client.scan_iter(match=pattern, count=REHASH_BATCH, _type="zset"):
                for start in range(0, client.zcard(key), REHASH_BATCH):
                    members = client.zrange(key, start, start + REHASH_BATCH - 1)
                    if members:
                        client.zmscore(key, members)
    finally:
        client.close()


def rabbitmqctl(*args: str) -> None:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")


@contextlib.contextmanager
def rabbitmq_vhost(rabbitmq_url: str) -> Iterator[str]:
    """A vhost of our own that the URL's user may use; deleted (with every queue in it) afterwards."""
    if shutil.which("rabbitmqctl") is None:
        raise RuntimeError("rabbitmqctl is not installed: the bench needs a vhost of its own")
    vhost = unique("bench")
    user = urlsplit(rabbitmq_url).username or "guest"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        parts = urlsplit(rabbitmq_url)
        yield urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), parts.query, ""))
    finally:
        _delete_vhost(vhost)


def _delete_vhost(vhost: str, attempts: int = 10) -> None:
    """Retried: other people's tests restart the shared broker, and a vhost must not be left behind."""
    for attempt in range(attempts):
        try:
            rabbitmqctl("delete_vhost", vhost)
            return
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            time.sleep(3.0)


@dataclass(frozen=True)
class Deployment:
    """One product system: where its registry lives and which broker URL the workers get."""

    system: str
    database_url: str
    broker_url: str
    #: where its timers are in Redis, if they are: the server and its keys' patterns
    redis_url: str | None = None
    redis_keys: tuple[str, ...] = ()


@contextlib.contextmanager
def deployment(system: str, services: Services) -> Iterator[Deployment]:
    """A fresh, empty deployment of one product system."""
    with contextlib.ExitStack() as stack:
        if system == "sql-sqlite":
            yield Deployment(system, stack.enter_context(sqlite_file()), "sql")
            return
        database_url = stack.enter_context(postgres_schema(services.postgres_url))
        redis_url: str | None = None
        keys: tuple[str, ...] = ()
        if system == "sql-postgresql":
            broker_url = "sql"
        elif system == "redis":
            prefix = stack.enter_context(redis_prefix(services.redis_url))
            broker_url = _with_query(services.redis_url, prefix=prefix)
            redis_url, keys = services.redis_url, redis_keys(prefix)
        elif system == "rq":
            # RQ's keys are global (`rq:job:<id>`, `rq:scheduled:<queue>`): a queue and job-id prefix
            # of our own keep other deployments' jobs out of ours, and let us delete ours afterwards.
            prefix = stack.enter_context(rq_namespace(services.redis_url))
            broker_url = "rq+" + _with_query(services.redis_url, prefix=prefix, queue=prefix)
            redis_url, keys = services.redis_url, rq_keys(prefix)
        elif system == "rabbitmq":
            broker_url = stack.enter_context(rabbitmq_vhost(services.rabbitmq_url))
        else:
            raise ValueError(f"unknown system {system!r}")
        yield Deployment(system, database_url, broker_url, redis_url, keys)


def _with_query(url: str, **options: str) -> str:
    query = "&".join(f"{key}={value}" for key, value in options.items())
    return f"{url}{'&' if '?' in url else '?'}{query}"
