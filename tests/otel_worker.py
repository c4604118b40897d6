"""`python -m tests.otel_worker …`: the order-timeouts CLI with OpenTelemetry's SDK set up, spans kept
by the SDK's in-memory exporter and written at exit, as JSON, to the file OTEL_TEST_SPANS names."""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

SPANS_FILE = "OTEL_TEST_SPANS"


def described(span: ReadableSpan) -> dict[str, Any]:
    """What the tests read of a finished span."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": context.trace_id,
        "span_id": context.span_id,
        "parent_id": span.parent.span_id if span.parent else None,
        "attributes": dict(span.attributes or {}),
        "links": [
            {
                "trace_id": link.context.trace_id,
                "span_id": link.context.span_id,
                "attributes": dict(link.attributes or {}),
            }
            for link in span.links
        ],
    }


def main() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    target = Path(os.environ[SPANS_FILE])
    atexit.register(lambda: target.write_text(json.dumps([described(s) for s in exporter.get_finished_spans()])))

    from scheduler.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
