"""Trace context travels with notifications; with OpenTelemetry, publish and handle get spans
in one trace."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

import tidings
from tidings import Target

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="pip install opentelemetry-sdk")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind  # noqa: E402

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider() -> None:
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)


class Capture:
    def __init__(self) -> None:
        self.ctxts: list[dict[str, Any]] = []
        self.got = threading.Semaphore(0)

    def info(self, ctxt: Any, pub: Any, et: Any, payload: Any, md: Any) -> None:
        self.ctxts.append(ctxt)
        self.got.release()


def _roundtrip(ctxt: dict[str, Any]) -> dict[str, Any]:
    transport = tidings.get_notification_transport(f"memory:///{uuid.uuid4().hex}")
    ep = Capture()
    listener = tidings.get_notification_listener(transport, [Target("tr")], [ep])
    listener.start()
    tidings.Notifier(transport, "p", topics=["tr"]).info(ctxt, "trace.me", {})
    assert ep.got.acquire(timeout=5)
    listener.stop()
    assert listener.wait(5)
    transport.cleanup()
    return ep.ctxts[0]


def test_given_traceparent_reaches_the_endpoint_unchanged() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert _roundtrip({"traceparent": tp, "user": "u"}) == {"traceparent": tp, "user": "u"}


def test_publish_and_process_spans_share_one_trace() -> None:
    EXPORTER.clear()
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        ctxt = _roundtrip({"user": "u"})
    trace_id = format(request.get_span_context().trace_id, "032x")
    assert ctxt["traceparent"].split("-")[1] == trace_id
    spans = {s.kind: s for s in EXPORTER.get_finished_spans() if s.name != "request"}
    publish, process = spans[SpanKind.PRODUCER], spans[SpanKind.CONSUMER]
    root = request.get_span_context().trace_id
    assert publish.context.trace_id == process.context.trace_id == root
    assert process.parent.span_id == publish.context.span_id
    assert process.attributes["tidings.event_type"] == "trace.me"
