"""The transports under test: each entry yields (database_url, broker_url) isolated for one test.

The contract suite runs once per entry. A new transport adds one entry here and its own
`test_<transport>.py` for what is specific to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.rabbitmq_support import rabbitmq_stack
from tests.redis_support import redis_stack
from tests.rq_support import rq_stack
from tests.support import postgres_schema

StackFactory = Callable[[Path], contextlib.AbstractContextManager[tuple[str, str]]]


@contextlib.contextmanager
def sql_sqlite(tmp: Path) -> Iterator[tuple[str, str]]:
    yield f"sqlite:///{tmp / 'registry.sqlite3'}", "sql"


@contextlib.contextmanager
def sql_postgresql(tmp: Path) -> Iterator[tuple[str, str]]:
    with postgres_schema() as url:
        yield url, "sql"


STACKS: dict[str, StackFactory] = {
    "sql-sqlite": sql_sqlite,
    "sql-postgresql": sql_postgresql,
    "redis": redis_stack,
    "rabbitmq": rabbitmq_stack,
    "rq": rq_stack,
}
#: the registry databases, for tests that are about the registry rather than a broker
DATABASES: dict[str, StackFactory] = {"sqlite": sql_sqlite, "postgresql": sql_postgresql}
