"""Trace context across the bus: W3C ``traceparent`` in the notification context.

A ``traceparent`` (and ``tracestate``) key in the notifier's context travels with the notification
like any context item and reaches the endpoint's ``ctxt``, whatever the driver. With
OpenTelemetry installed (``pip install 'tidings[otel]'``), publishing gets a PRODUCER span whose
context is injected into the notification, and handling gets a CONSUMER span continuing that
trace; without it, this module costs one check per message.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["active", "inject", "process_span", "publish_span"]

try:  # optional: the core stays light
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind
except ImportError:  # pragma: no cover - exercised where OpenTelemetry is absent
    trace = None  # type: ignore[assignment]

_TRACE_KEYS = ("traceparent", "tracestate")


_configured = False
_next_check = 0.0


def active() -> bool:
    """True once an OpenTelemetry tracer provider is configured; the hot path skips tracing
    entirely otherwise (the API alone only hands out non-recording spans).

    A provider, once set, stays set, so a yes is remembered; a no is asked again at most once
    a second, because asking reads the environment.
    """
    global _configured, _next_check
    if _configured or trace is None:
        return _configured
    now = time.monotonic()
    if now < _next_check:
        return False
    _next_check = now + 1.0
    _configured = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return _configured


@contextlib.contextmanager
def publish_span(event_type: str, exchange: str, message_id: str) -> Iterator[None]:
    """A PRODUCER span around sending one notification (a no-op without OpenTelemetry)."""
    if trace is None:
        yield
        return
    tracer = trace.get_tracer("tidings")
    with tracer.start_as_current_span(
            f"{exchange} publish", kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "tidings", "messaging.operation": "publish",
                        "messaging.destination.name": exchange,
                        "messaging.message.id": message_id,
                        "tidings.event_type": event_type}):
        yield


def inject(context: dict[str, Any]) -> dict[str, Any]:
    """Add the current span's ``traceparent`` to ``context`` unless it carries one already."""
    if trace is None or "traceparent" in context:
        return context
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier.get("traceparent"):
        return context
    return {**context, **{k: v for k, v in carrier.items() if k in _TRACE_KEYS}}


@contextlib.contextmanager
def process_span(ctxt: Any, event_type: Any, message_id: Any) -> Iterator[None]:
    """A CONSUMER span around dispatching one notification, continuing the sender's trace."""
    if trace is None:
        yield
        return
    carrier = {k: ctxt[k] for k in _TRACE_KEYS
               if isinstance(ctxt, dict) and isinstance(ctxt.get(k), str)}
    parent = propagate.extract(carrier) if carrier else None
    tracer = trace.get_tracer("tidings")
    with tracer.start_as_current_span(
            f"{event_type} process", context=parent, kind=SpanKind.CONSUMER,
            attributes={"messaging.system": "tidings", "messaging.operation": "process",
                        "messaging.message.id": str(message_id),
                        "tidings.event_type": str(event_type)}):
        yield
