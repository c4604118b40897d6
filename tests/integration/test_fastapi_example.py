"""docs/examples/fastapi_orders.py, the FastAPI order service on AsyncOrderTimeouts, run as its users
run it: uvicorn on loopback, real HTTP requests, a worker process cancelling what stays unpaid."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Stack, open_stack
from tests.stacks import STACKS
from tests.support import cancel_counts, wait_until

EXAMPLES = ROOT / "docs" / "examples"
#: one of this project's loopback ports for tests
PORT = 8710


@pytest.fixture
def redis_only(tmp_path: Path) -> Iterator[Stack]:
    """Orders and registry on PostgreSQL, timers on Redis: the publish after the order's commit is real."""
    yield from open_stack("redis", STACKS, tmp_path)


def answers(http: httpx.Client) -> bool:
    try:
        return http.get("/openapi.json").status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def order_service(stack: Stack, log: Path) -> Iterator[httpx.Client]:
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES), "fastapi_orders:app"]
    argv += ["--host", "127.0.0.1", "--port", str(PORT), "--log-level", "warning"]
    with log.open("w") as err:
        process = subprocess.Popen(argv, env=stack.env(), cwd=ROOT, stderr=err)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=10) as http:
            wait_until(lambda: answers(http) or process.poll() is not None, timeout=30)
            assert process.poll() is None, log.read_text()
            yield http
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0, log.read_text()


@pytest.mark.slow
def test_the_fastapi_example_cancels_the_unpaid_orders_and_keeps_the_paid_ones(
    redis_only: Stack, tmp_path: Path
) -> None:
    stack = redis_only
    ids = [f"web-{i:02d}" for i in range(30)]
    paid = set(ids[::3])
    with order_service(stack, tmp_path / "uvicorn.log") as http:
        for oid in ids:
            created = http.post("/orders", json={"id": oid, "pay_within_seconds": 1.5})
            assert created.status_code == 201, created.text
        assert http.post("/orders", json={"id": ids[0]}).status_code == 409, "an order id is created once"
        assert http.post("/orders", json={"id": "bad", "pay_within_seconds": 0}).status_code == 422
        for oid in paid:
            payment = http.post(f"/orders/{oid}/pay")
            assert payment.json() == {"id": oid, "status": "PAID", "timeout": "revoked"}, payment.text

        worker = stack.start_worker()
        try:
            unpaid = [oid for oid in ids if oid not in paid]
            wait_until(lambda: all(http.get(f"/orders/{oid}").json()["status"] == "CANCELLED" for oid in unpaid), 30)
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == 0

        late = http.post(f"/orders/{unpaid[0]}/pay")
        assert (late.status_code, late.json()["detail"]) == (409, f"order {unpaid[0]!r} is CANCELLED")
        views = {oid: http.get(f"/orders/{oid}").json() for oid in ids}
    assert {oid for oid, view in views.items() if view["status"] == "PAID"} == paid
    assert all(views[oid]["timeout"] == "revoked" for oid in paid)
    assert all(views[oid]["timeout"] == "done" for oid in unpaid)
    assert cancel_counts(stack.engine) == dict.fromkeys(unpaid, 1)
