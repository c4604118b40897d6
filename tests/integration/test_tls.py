"""TLS with client certificates to every component: `rediss://` (redis and rq transports) and
`amqps://` against a Redis and a RabbitMQ node that speak TLS only and refuse clients without a
certificate (scripts/tls_services.sh), and libpq's TLS settings carried by the database URL."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from scheduler import OrderTimeouts, Settings
from scheduler.config import redact
from scheduler.database import make_engine
from scheduler.errors import ConfigurationError, TransportUnavailable
from scheduler.registry import Outcome, TimeoutState
from tests.conftest import Stack, deployed
from tests.services import POSTGRES_URL, require, unique
from tests.support import add_orders, cancel_counts, order_status, postgres_schema
from tests.tls_support import (
    RABBITMQ_TLS_PORT,
    REDIS_TLS_PORT,
    SENTINEL_TLS_PORT,
    SENTINEL_TLS_SERVICE,
    make_certificates,
    tls_services,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Certificates made for this module, and the TLS servers started with them (stopped after)."""
    folder = make_certificates(tmp_path_factory.mktemp("tls"))
    tls_services("stop")  # servers a crashed run left behind hold certificates of another CA
    tls_services("start", str(folder))
    try:
        yield folder
    finally:
        tls_services("stop")


def broker_url(transport: str, certs: Path, ca: str = "ca", client: bool = True) -> str:
    prefix = unique("ot")
    if transport == "rabbitmq":
        query = f"cacertfile={certs}/{ca}.pem"
        if client:
            query += f"&certfile={certs}/client.pem&keyfile={certs}/client.key"
        return f"amqps://guest:guest@127.0.0.1:{RABBITMQ_TLS_PORT}/%2F?{query}"
    query = f"ssl_ca_certs={certs}/{ca}.pem"
    if client:
        query += f"&ssl_certfile={certs}/client.pem&ssl_keyfile={certs}/client.key"
    if transport == "redis-sentinel":
        return f"rediss+sentinel://127.0.0.1:{SENTINEL_TLS_PORT}/{SENTINEL_TLS_SERVICE}?prefix={prefix}&{query}"
    scheme = "rq+rediss" if transport == "rq" else "rediss"
    return f"{scheme}://127.0.0.1:{REDIS_TLS_PORT}/0?prefix={prefix}&{query}"


@pytest.mark.parametrize("transport", ["redis", "redis-sentinel", "rq", "rabbitmq"])
def test_a_timeout_is_scheduled_fired_and_its_order_cancelled_over_tls_with_a_client_certificate(
    transport: str, certs: Path
) -> None:
    with postgres_schema() as database_url:
        with contextlib.contextmanager(deployed)(Stack(transport, database_url, broker_url(transport, certs))) as stack:
            add_orders(stack.engine, ["tls-1"])
            client = stack.timeouts()
            client.schedule("tls-1", delay=timedelta(hours=1))
            client.fire("tls-1")
            stack.drain_until(lambda: (r := client.get("tls-1")) is not None and r.state is TimeoutState.DONE)
            record = client.get("tls-1")
            assert record is not None and record.outcome is Outcome.CANCELLED
            assert order_status(stack.engine) == {"tls-1": "CANCELLED"}
            assert cancel_counts(stack.engine) == {"tls-1": 1}


# Not redis-sentinel: the same redis-py TLS connection refuses the same way, after redis-py's retries
# of the sentinel queries (about 15 s a case).
@pytest.mark.parametrize("transport", ["redis", "rq", "rabbitmq"])
@pytest.mark.parametrize("problem", ["a CA that did not sign the server", "no client certificate"])
def test_a_broker_that_cannot_be_trusted_or_refuses_the_client_is_reported_as_unavailable(
    transport: str, problem: str, certs: Path, tmp_path: Path
) -> None:
    if problem == "no client certificate":
        url = broker_url(transport, certs, client=False)
    else:
        url = broker_url(transport, certs, ca="other-ca")
    client = OrderTimeouts(settings=Settings(database_url=f"sqlite:///{tmp_path / 'r.sqlite3'}", broker_url=url))
    try:
        with pytest.raises(TransportUnavailable):
            client.transport.probe(None)
    finally:
        client.close()


def test_an_amqps_url_with_a_missing_certificate_file_is_a_configuration_error_naming_no_password(
    tmp_path: Path,
) -> None:
    url = f"amqps://guest:s3cret@127.0.0.1:{RABBITMQ_TLS_PORT}/%2F?cacertfile={tmp_path}/absent.pem"
    with pytest.raises(ConfigurationError, match="TLS files") as error:
        OrderTimeouts(settings=Settings(database_url=f"sqlite:///{tmp_path / 'r.sqlite3'}", broker_url=url))
    assert "s3cret" not in str(error.value)
    url = f"amqp://guest:guest@127.0.0.1:5672/%2F?cacertfile={tmp_path}/ca.pem"
    with pytest.raises(ConfigurationError, match="amqps"):
        OrderTimeouts(settings=Settings(database_url=f"sqlite:///{tmp_path / 'r.sqlite3'}", broker_url=url))


def test_libpq_tls_settings_in_the_database_url_reach_the_postgresql_driver(tmp_path: Path) -> None:
    require("PostgreSQL", 5432)
    # The shared server may or may not offer TLS; either way verify-full with a root certificate
    # file that does not exist cannot connect, while the same URL without it does: the URL's
    # settings are handed to libpq as they are.
    absent = tmp_path / "root.crt"
    for url, connects in ((POSTGRES_URL, True), (f"{POSTGRES_URL}?sslmode=verify-full&sslrootcert={absent}", False)):
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar() == 1
        except OperationalError as error:
            assert not connects, error
            assert "root.crt" in str(error) or "SSL was required" in str(error)
        else:
            assert connects, f"{redact(url)} connected"
        finally:
            engine.dispose()


def test_printed_urls_hide_the_password_and_a_key_passphrase_but_keep_the_certificate_paths() -> None:
    url = "rediss://app:pw1@redis:6380/0?ssl_certfile=/certs/c.pem&ssl_password=pw2&ssl_keyfile=/certs/c.key"
    shown = redact(url)
    assert "pw1" not in shown and "pw2" not in shown
    assert shown == "rediss://app:***@redis:6380/0?ssl_certfile=/certs/c.pem&ssl_password=***&ssl_keyfile=/certs/c.key"
