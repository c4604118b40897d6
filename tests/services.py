"""Where the tests find the real services, and what happens when one is missing.

A missing service skips a test on a laptop and fails it when CI=true (dramatiq's check_redis).
Only loopback addresses are used.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

POSTGRES_URL = os.environ.get("ORDER_TIMEOUTS_TEST_POSTGRES_URL", "postgresql://postgres:postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ORDER_TIMEOUTS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("ORDER_TIMEOUTS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def require(name: str, port: int) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        message = f"{name} is not running on 127.0.0.1:{port} (scripts/services.sh starts it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"
