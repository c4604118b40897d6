"""OpenTelemetry (order-timeouts[otel]): one trace from the order request to its cancel, across a real
worker process, read with the SDK's in-memory exporter on both sides; and nothing of it without the extra."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from scheduler import AsyncOrderTimeouts, Settings
from tests.conftest import ROOT, Stack, open_stack
from tests.otel_worker import SPANS_FILE, described
from tests.stacks import STACKS
from tests.support import order_status, wait_until

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """This process's finished spans. The SDK's provider can be set once per process: the first use
    sets it, and each test starts from an empty exporter."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture
def redis_only(tmp_path: Path) -> Iterator[Stack]:
    """Registry and orders on PostgreSQL, timers on Redis: every span of the path has its step."""
    yield from open_stack("redis", STACKS, tmp_path)


def named(found: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [span for span in found if span["name"] == name]


@pytest.mark.slow
def test_the_cancel_links_back_to_the_order_request_across_a_worker_process(
    redis_only: Stack, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    stack = redis_only
    tracer = trace.get_tracer("order-service")
    client = stack.timeouts()
    insert = text("INSERT INTO orders (id, status) VALUES (:id, 'PENDING')")

    with tracer.start_as_current_span("POST /orders sync") as request:
        with Session(stack.engine) as session, session.begin():
            session.execute(insert, {"id": "traced-sync"})
            client.schedule("traced-sync", delay=timedelta(milliseconds=300), connection=session)

    async def async_order_service() -> None:
        settings = Settings(database_url=stack.database_url, broker_url=stack.broker_url)
        async with AsyncOrderTimeouts(settings=settings) as timeouts:
            with tracer.start_as_current_span("POST /orders async"):
                async with AsyncSession(timeouts.engine) as session, session.begin():
                    await session.execute(insert, {"id": "traced-async"})
                    await timeouts.schedule("traced-async", delay=timedelta(milliseconds=300), connection=session)
            await timeouts.flush()

    asyncio.run(async_order_service())
    # A fresh Redis has no lineage marker yet: this first relay run publishes every pending timeout again.
    relayed = client.publish_unpublished()
    mine = [described(span) for span in spans.get_finished_spans()]
    (relay,) = named(mine, "order-timeouts relay")
    assert relay["attributes"] == {"order_timeouts.transport": "redis", "order_timeouts.count": relayed}

    scheduled = {span["attributes"]["order_timeouts.order_id"]: span for span in named(mine, "order-timeouts schedule")}
    assert set(scheduled) == {"traced-sync", "traced-async"}
    sync_span = scheduled["traced-sync"]
    assert sync_span["parent_id"] == request.get_span_context().span_id, "schedule runs in the order request's trace"
    assert sync_span["kind"] == "PRODUCER"
    assert sync_span["attributes"] == {
        "order_timeouts.order_id": "traced-sync",
        "order_timeouts.transport": "redis",
        "order_timeouts.outcome": "created",
    }
    publishes = [span for span in named(mine, "order-timeouts publish") if span["parent_id"] != relay["span_id"]]
    assert {span["attributes"]["order_timeouts.order_id"] for span in publishes} == {"traced-sync", "traced-async"}
    assert all(span["attributes"]["order_timeouts.outcome"] == "published" for span in publishes)
    for oid, span in scheduled.items():
        record = client.get(oid)
        assert record is not None
        assert record.trace_context is not None
        assert record.trace_context.split("-")[:3] == ["00", f"{span['trace_id']:032x}", f"{span['span_id']:016x}"]

    spans_file = tmp_path / "worker-spans.json"
    worker = stack.start_worker(module="tests.otel_worker", **{SPANS_FILE: str(spans_file)})
    try:
        wait_until(lambda: set(order_status(stack.engine).values()) == {"CANCELLED"}, timeout=30)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    theirs = json.loads(spans_file.read_text())

    links = {}
    for batch in named(theirs, "order-timeouts batch"):
        assert batch["kind"] == "CONSUMER"
        assert batch["attributes"]["order_timeouts.transport"] == "redis"
        for link in batch["links"]:
            links[link["attributes"]["order_timeouts.order_id"]] = (batch, link)
    assert set(links) == {"traced-sync", "traced-async"}, "each fire links to its scheduling request"
    for oid, (batch, link) in links.items():
        assert (link["trace_id"], link["span_id"]) == (scheduled[oid]["trace_id"], scheduled[oid]["span_id"])
        assert link["attributes"]["order_timeouts.outcome"] == "cancelled"
        assert batch["attributes"]["order_timeouts.outcome"] == "committed"
        steps = {span["name"] for span in theirs if span["parent_id"] == batch["span_id"]}
        assert steps == {
            "order-timeouts claim",
            "order-timeouts payment check",
            "order-timeouts cancel",
            "order-timeouts commit",
        }


def test_without_the_extra_nothing_of_opentelemetry_is_imported_and_timeouts_work(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        from datetime import timedelta

        class Absent(importlib.abc.MetaPathFinder):
            # opentelemetry as if it were not installed
            def find_spec(self, name, path, target=None):
                if name.partition(".")[0] == "opentelemetry":
                    raise ModuleNotFoundError(name)

        sys.meta_path.insert(0, Absent())

        from consumers.worker import Worker
        from scheduler import OrderTimeouts, tracing
        from scheduler.schema import init_db
        from sqlalchemy import text

        with OrderTimeouts("sqlite:///{tmp_path / "registry.sqlite3"}") as client:
            init_db(client.engine, client.settings.orders)
            with client.engine.begin() as conn:
                conn.execute(text("INSERT INTO orders (id, status) VALUES ('plain', 'PENDING')"))
            client.schedule("plain", delay=timedelta(hours=1))
            client.fire("plain")
            Worker(client, burst=True).run()
            record = client.get("plain")
        assert not tracing.ENABLED
        assert record.outcome == "cancelled" and record.trace_context is None, record
        loaded = sorted(name for name in sys.modules if name.partition(".")[0] == "opentelemetry")
        assert not loaded, loaded
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
