"""init-db: Alembic migrations for the registry, idempotent, never touching the order service's tables."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, inspect, text

from scheduler.database import make_engine
from scheduler.names import CONTROL_TABLE, LEASE_TABLE, MIGRATIONS_VERSION_TABLE, REGISTRY_TABLE
from scheduler.registry import metadata
from scheduler.registry.schema import leases, timeouts
from scheduler.schema import current_revision, head, init_db, migrations
from tests.stacks import DATABASES
from tests.support import postgres_schema


@pytest.fixture(params=sorted(DATABASES))
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with DATABASES[request.param](tmp_path) as (database_url, _):
        engine = make_engine(database_url)
        yield engine
        engine.dispose()


def revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return current_revision(conn)


def test_init_db_upgrades_an_older_registry_and_keeps_its_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        config = migrations()
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.execute(
            text(
                "INSERT INTO order_timeouts (order_id, due_ms, state, version, attempts, created_ms, updated_ms) "
                "VALUES ('old-order', 1, 'pending', 1, 0, 1, 1)"
            )
        )
    assert revision(engine) == "0001"
    assert LEASE_TABLE not in inspect(engine).get_table_names()

    created = init_db(engine, None)
    assert created == sorted([CONTROL_TABLE, LEASE_TABLE])
    assert revision(engine) == head()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT order_id FROM order_timeouts")).scalars().all() == ["old-order"]


def test_init_db_twice_changes_nothing_the_second_time(engine: Engine) -> None:
    first = init_db(engine, None)
    assert set(first) == {REGISTRY_TABLE, LEASE_TABLE, CONTROL_TABLE}
    assert init_db(engine, None) == []
    assert MIGRATIONS_VERSION_TABLE in inspect(engine).get_table_names(), "its own version table, not alembic_version"
    assert "alembic_version" not in inspect(engine).get_table_names()


def test_a_registry_made_before_migrations_is_adopted_not_recreated(engine: Engine) -> None:
    # The tables create_all made before migrations existed: the registry and its leases.
    metadata.create_all(engine, tables=[timeouts, leases])
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE order_timeouts DROP COLUMN trace_context"))  # added by 0005
        conn.execute(
            text(
                "INSERT INTO order_timeouts (order_id, due_ms, state, version, attempts, created_ms, updated_ms) "
                "VALUES ('kept', 1, 'pending', 1, 0, 1, 1)"
            )
        )
    assert init_db(engine, None) == [CONTROL_TABLE], "only what later migrations add"
    assert revision(engine) == head()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM order_timeouts")).scalar_one() == 1


def test_the_migrations_build_what_the_code_expects(engine: Engine) -> None:
    init_db(engine, None)
    live = inspect(engine)
    for table in metadata.sorted_tables:
        assert {c["name"] for c in live.get_columns(table.name)} == {c.name for c in table.columns}
        assert {i["name"] for i in live.get_indexes(table.name)} == {i.name for i in table.indexes}


def index_definitions(engine: Engine) -> dict[str, str]:
    """The database's own text of each registry index, as it was created."""
    query = (
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = :table"
        if engine.dialect.name == "postgresql"
        else "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = :table AND sql IS NOT NULL"
    )
    with engine.connect() as conn:
        return dict(conn.execute(text(query), {"table": REGISTRY_TABLE}).all())


def test_the_migrations_make_each_partial_index_partial_and_only_those(engine: Engine) -> None:
    init_db(engine, None)
    definitions = index_definitions(engine)
    partial = {name for name, definition in definitions.items() if " WHERE " in definition.upper()}
    assert partial == {
        "ix_order_timeouts_pending_due",
        "ix_order_timeouts_unpublished",
        "ix_order_timeouts_state_finished",
    }
    assert "pending" in definitions["ix_order_timeouts_state_finished"], "finished rows only"


def test_an_upgraded_registry_keeps_no_pending_row_in_the_finished_index(engine: Engine) -> None:
    with engine.begin() as conn:
        config = migrations()
        config.attributes["connection"] = conn
        command.upgrade(config, "0002")
    assert " WHERE " not in index_definitions(engine)["ix_order_timeouts_state_finished"].upper()
    init_db(engine, None)
    assert " WHERE " in index_definitions(engine)["ix_order_timeouts_state_finished"].upper()
    assert revision(engine) == head()


def test_two_init_db_jobs_started_at_once_both_succeed_and_migrate_once() -> None:
    """The Kubernetes init-db Job may run twice at once (a retry, two deploys): the advisory lock
    makes the second wait, then find everything there."""
    with postgres_schema() as url:
        env = {**os.environ, "ORDER_TIMEOUTS_DATABASE_URL": url}
        argv = [sys.executable, "-m", "scheduler", "init-db"]
        jobs = [
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"
        ]
        results = [job.communicate(timeout=120) for job in jobs]
        assert [job.returncode for job in jobs] == [0, 0], results
        outputs = sorted(out.split(" in ")[0] for out, _ in results)
        assert outputs[0].startswith("created ") and "orders" in outputs[0]
        assert outputs[1] == "schema already present", "the second one waited for the first, then found it all"
        engine = make_engine(url)
        try:
            assert revision(engine) == head()
        finally:
            engine.dispose()
