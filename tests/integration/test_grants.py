"""Least privilege on PostgreSQL: the grants docs/operations.md gives, applied as written (roles and
schema renamed for the test), are enough for a worker, `maintain` and the order service, and a
worker cannot change the schema. The registry is created from `init-db --print-sql` by its owner."""

from __future__ import annotations

import contextlib
import re
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError

from consumers.worker import Worker
from scheduler import OrderTimeouts, Settings
from scheduler.cli import main
from scheduler.database import make_engine
from scheduler.maintenance import Maintenance
from scheduler.observability import RegistryCollector
from scheduler.registry import Outcome, TimeoutState
from scheduler.schema import migration_sql
from tests.redis_support import broker_url, redis_prefix
from tests.services import unique
from tests.support import add_orders, order_status, postgres_schema, psycopg_url

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
ROLES = ("order_timeouts_owner", "order_timeouts_worker", "order_timeouts_maintain", "order_service")


def documented_grants() -> list[str]:
    """The statements of the SQL block under "Least privilege" in docs/operations.md."""
    section = OPERATIONS.read_text().split("### Least privilege", 1)[1]
    block = section.split("```sql\n", 1)[1].split("```", 1)[0]
    lines = [line.split("--", 1)[0] for line in block.splitlines()]
    return [statement.strip() for statement in " ".join(lines).split(";") if statement.strip()]


@dataclass
class Deployment:
    schema: str
    #: database URL per documented role name, each logging in as that test role
    urls: dict[str, str]


@contextlib.contextmanager
def least_privilege() -> Iterator[Deployment]:
    """A schema whose registry the owner role created from the printed SQL, and a role per kind
    of process with exactly the documented grants; roles dropped afterwards."""
    with postgres_schema() as url:
        schema = re.search(r"search_path%3D(\w+)", url)
        assert schema is not None
        name = schema.group(1)
        password = secrets.token_hex(8)
        roles = {role: unique(role.replace("order_timeouts", "ot")) for role in ROLES}

        def rename(statement: str) -> str:
            for role, test_role in roles.items():
                statement = re.sub(rf"\b{role}\b", test_role, statement)
            statement = statement.replace("LOGIN", f"LOGIN PASSWORD '{password}'")
            return re.sub(r"\bapp\b", name, statement)

        statements = [rename(statement) for statement in documented_grants()]
        on_tables = [s for s in statements if re.search(rf"\bON {name}\.", s)]
        with psycopg.connect(psycopg_url(url), autocommit=True) as admin:
            try:
                for statement in statements:
                    if statement not in on_tables:
                        admin.execute(statement)
                admin.execute(f"SET ROLE {roles['order_timeouts_owner']}")
                admin.execute(f"SET search_path = {name}")
                admin.execute(migration_sql("postgresql", Settings().orders))
                admin.execute("RESET ROLE")
                for statement in on_tables:
                    admin.execute(statement)
                server = url.split("@", 1)[1]
                urls = {role: f"postgresql://{test_role}:{password}@{server}" for role, test_role in roles.items()}
                yield Deployment(name, urls)
            finally:
                names = ", ".join(roles.values())
                admin.execute("RESET ROLE")
                with contextlib.suppress(psycopg.Error):
                    admin.execute(f"DROP OWNED BY {names} CASCADE")
                admin.execute(f"DROP ROLE IF EXISTS {names}")


def client(deployment: Deployment, role: str, broker: str, **settings: object) -> OrderTimeouts:
    return OrderTimeouts(settings=Settings(database_url=deployment.urls[role], broker_url=broker, **settings))


@pytest.mark.slow
def test_a_worker_maintain_and_the_order_service_run_under_the_documented_grants_and_no_more() -> None:
    with least_privilege() as deployment, redis_prefix() as prefix:
        broker = broker_url(prefix)
        service = client(deployment, "order_service", broker)
        worker = client(deployment, "order_timeouts_worker", broker)
        maintain = client(deployment, "order_timeouts_maintain", broker, retention=timedelta(milliseconds=1))
        try:
            owner = make_engine(deployment.urls["order_timeouts_owner"])
            add_orders(owner, ["unpaid", "paid", "relayed"])
            with owner.begin() as conn:
                conn.execute(text("UPDATE orders SET status = 'PAID' WHERE id = 'paid'"))

            # The order service: schedule, reschedule, cancel, fire; one row left for the relay.
            service.schedule_many(["unpaid", "paid"], delay=timedelta(hours=1))
            service.reschedule("paid", delay=timedelta(hours=2))
            service.fire("unpaid")
            service.fire("paid")
            with service.engine.begin() as conn:
                service.schedule("relayed", delay=timedelta(hours=1), connection=conn)
            service.fire("relayed")
            assert service.get("relayed") is not None

            # maintain: the relay publishes the row written on a bare connection (leases, UPDATE).
            jobs = Maintenance(maintain)
            runs = {run.job: run for run in jobs.run_once()}
            assert not any(run.error for run in runs.values()), runs
            assert runs["relay"].rows >= 1

            # The worker: claim, read payment status, cancel the unpaid orders.
            deadline = time.monotonic() + 20
            while order_status(owner)["relayed"] != "CANCELLED" or order_status(owner)["unpaid"] != "CANCELLED":
                Worker(worker, burst=True).run()
                assert time.monotonic() < deadline, order_status(owner)
            records = {order: service.get(order) for order in ("unpaid", "paid", "relayed")}
            assert {order: r and (r.state, r.outcome) for order, r in records.items()} == {
                "unpaid": (TimeoutState.DONE, Outcome.CANCELLED),
                "paid": (TimeoutState.DONE, Outcome.PAID),
                "relayed": (TimeoutState.DONE, Outcome.CANCELLED),
            }

            # maintain: the purge deletes finished rows (retention 1 ms here); the gauges read.
            time.sleep(0.01)
            runs = {run.job: run for run in jobs.run_once()}
            assert not any(run.error for run in runs.values()), runs
            assert runs["purge"].rows == 3
            for role_client in (maintain, worker):
                gauges = {
                    m.name: m.samples[0].value
                    for m in RegistryCollector(role_client.engine, role_client.clock).collect()
                }
                assert gauges["order_timeouts_registry_up"] == 1

            # The sql transport under the same grants: the registry is the queue (claims, LISTEN/NOTIFY).
            sql_service = client(deployment, "order_service", "sql")
            sql_worker = client(deployment, "order_timeouts_worker", "sql")
            try:
                add_orders(owner, ["sql-unpaid"])
                sql_service.schedule("sql-unpaid", delay=timedelta(hours=1))
                sql_service.fire("sql-unpaid")
                assert Worker(sql_worker, burst=True).run().cancelled == 1
                assert order_status(owner)["sql-unpaid"] == "CANCELLED"
            finally:
                sql_service.close()
                sql_worker.close()

            # No DDL for a worker, and no access to the orders table beyond its two columns.
            with worker.engine.begin() as conn, pytest.raises(ProgrammingError, match="permission denied"):
                conn.execute(text("CREATE TABLE sneaky (id int)"))
            with worker.engine.begin() as conn, pytest.raises(ProgrammingError, match="permission denied"):
                conn.execute(text("DELETE FROM order_timeouts"))
            owner.dispose()
        finally:
            for opened in (service, worker, maintain):
                opened.close()


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["order-timeouts", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0)


def test_init_db_print_sql_prints_the_ddl_for_the_url_dialect_without_connecting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # No server listens on port 1, and the SQLite file must not be created: nothing is connected to.
    unreachable = "postgresql://app:secret@127.0.0.1:1/orders"
    assert run_cli(["--database-url", unreachable, "init-db", "--print-sql"], monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "CREATE TABLE order_timeouts (" in printed and "order_timeouts_leases" in printed
    assert "WHERE state = 'pending'" in printed, "the partial indexes of PostgreSQL"
    assert "CREATE TABLE IF NOT EXISTS orders" in printed
    assert "INSERT INTO order_timeouts_alembic_version" in printed, "the version row, so init-db later agrees"
    assert "secret" not in printed

    sqlite_file = tmp_path / "registry.sqlite3"
    assert (
        run_cli(["--database-url", f"sqlite:///{sqlite_file}", "init-db", "--print-sql", "--no-orders"], monkeypatch)
        == 0
    )
    printed = capsys.readouterr().out
    assert "CREATE TABLE order_timeouts (" in printed and "orders (" not in printed
    assert not sqlite_file.exists()

    assert run_cli(["--database-url", unreachable, "init-db", "--print-sql", "--since", "0003"], monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "0003 -> 0004" in printed and "CREATE TABLE order_timeouts (" not in printed

    assert run_cli(["init-db", "--print-sql", "--since", "nope"], monkeypatch) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert run_cli(["init-db", "--since", "0003"], monkeypatch) == 2
