"""OpenTelemetry spans, when the optional extra is installed (`pip install order-timeouts[otel]`).

One trace runs from the order request to its cancel: `schedule` runs in the caller's span, and the
W3C `traceparent` of its own span is stored with the timeout (the registry's `trace_context`).
The worker's batch is a trace of its own, as OpenTelemetry's guidance for deferred and batched
work has it: its span links to the stored context of each timeout it handled, with the order id
and the outcome on the link, and its children are the batch's steps (claim, payment check, cancel,
commit). Publishing and the relay have spans of their own.

Spans carry `order_timeouts.order_id` (a single order), `order_timeouts.transport` and
`order_timeouts.outcome`. Without opentelemetry-api installed nothing is imported and every
call here is a shared no-op; with it, spans go to whatever tracer provider the process set up
(none: OpenTelemetry's own no-op).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

#: attribute names
ORDER_ID = "order_timeouts.order_id"
TRANSPORT = "order_timeouts.transport"
OUTCOME = "order_timeouts.outcome"
COUNT = "order_timeouts.count"

_INSTRUMENTATION = "order_timeouts"


def _installed() -> bool:
    """Whether opentelemetry-api is there, asked without importing it."""
    try:
        return importlib.util.find_spec("opentelemetry") is not None
    except (ImportError, ValueError):
        return False


#: decided once per process: without the extra, every call below is a no-op that imports nothing
ENABLED = _installed()


class _NoSpan:
    """What a step gets without OpenTelemetry: attributes and links go nowhere."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def link(self, traceparent: str | None, attributes: Mapping[str, Any]) -> None:
        pass


class _Span(_NoSpan):
    def __init__(self, span: Any) -> None:
        self._span = span

    def set_attribute(self, key: str, value: Any) -> None:
        self._span.set_attribute(key, value)

    def link(self, traceparent: str | None, attributes: Mapping[str, Any]) -> None:
        """Link to the span whose W3C traceparent this is (a scheduling request's), if it is one."""
        context = _span_context(traceparent)
        if context is not None:
            self._span.add_link(context, dict(attributes))


Step = _NoSpan
_NO_SPAN = _NoSpan()


@contextmanager
def span(name: str, *, kind: str = "internal", attributes: Mapping[str, Any] | None = None) -> Iterator[Step]:
    """A span around a step, child of the current one; `kind`: internal, producer or consumer."""
    if not ENABLED:
        yield _NO_SPAN
        return
    from opentelemetry import trace

    tracer = trace.get_tracer(_INSTRUMENTATION)
    with tracer.start_as_current_span(
        name, kind=getattr(trace.SpanKind, kind.upper()), attributes=_clean(attributes or {})
    ) as current:
        yield _Span(current) if current.is_recording() else _NO_SPAN


def current_traceparent() -> str | None:
    """The current span's context as a W3C traceparent, to store with a timeout (None: no trace)."""
    if not ENABLED:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _span_context(traceparent: str | None) -> Any:
    if not traceparent:
        return None
    from opentelemetry.trace import SpanContext, TraceFlags

    parts = traceparent.split("-")
    if len(parts) != 4:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None  # a context another service wrote badly is not worth failing a batch for
    context = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    return context if context.is_valid else None


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attributes.items() if value is not None}
