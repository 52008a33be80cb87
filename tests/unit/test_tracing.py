"""Trace context travels with notifications; with OpenTelemetry, publish and handle get spans
in one trace. The OpenTelemetry part runs in a subprocess: a tracer provider is process-global
and would add trace context to every other test's notifications."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import uuid
from typing import Any

import pytest

import tidings
from tidings import Target


class Capture:
    def __init__(self) -> None:
        self.ctxts: list[dict[str, Any]] = []
        self.got = threading.Semaphore(0)

    def info(self, ctxt: Any, pub: Any, et: Any, payload: Any, md: Any) -> None:
        self.ctxts.append(ctxt)
        self.got.release()


def test_given_traceparent_reaches_the_endpoint_unchanged() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    transport = tidings.get_notification_transport(f"memory:///{uuid.uuid4().hex}")
    ep = Capture()
    listener = tidings.get_notification_listener(transport, [Target(topic="tr")], [ep])
    listener.start()
    tidings.Notifier(transport, "p", topics=["tr"]).info({"traceparent": tp, "u": 1}, "e", {})
    assert ep.got.acquire(timeout=5)
    listener.stop()
    assert listener.wait(5)
    assert ep.ctxts == [{"traceparent": tp, "u": 1}]


SCRIPT = textwrap.dedent("""
    import json, threading, uuid
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    import tidings

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    transport = tidings.get_notification_transport(f"memory:///{uuid.uuid4().hex}")
    got, seen = threading.Event(), []

    class Endpoint:
        def info(self, ctxt, pub, event_type, payload, md):
            seen.append(ctxt)
            got.set()

    listener = tidings.get_notification_listener(transport, [tidings.Target(topic="tr")],
                                                 [Endpoint()])
    listener.start()
    with trace.get_tracer("test").start_as_current_span("request") as request:
        tidings.Notifier(transport, "p", topics=["tr"]).info({"user": "u"}, "trace.me", {})
    assert got.wait(5)
    listener.stop()
    assert listener.wait(5)
    spans = [{"name": s.name, "kind": s.kind.name, "trace": format(s.context.trace_id, "032x"),
              "span": format(s.context.span_id, "016x"),
              "parent": format(s.parent.span_id, "016x") if s.parent else None,
              "event_type": (s.attributes or {}).get("tidings.event_type")}
             for s in exporter.get_finished_spans()]
    print(json.dumps({"ctxt": seen[0], "spans": spans,
                      "root": format(request.get_span_context().trace_id, "032x")}))
""")


def test_publish_and_process_spans_share_one_trace() -> None:
    pytest.importorskip("opentelemetry.sdk.trace", reason="pip install opentelemetry-sdk")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    spans = {s["kind"]: s for s in out["spans"] if s["name"] != "request"}
    publish, process = spans["PRODUCER"], spans["CONSUMER"]
    assert publish["trace"] == process["trace"] == out["root"]
    assert process["parent"] == publish["span"]  # handling continues the publish span
    assert process["event_type"] == "trace.me"
    assert out["ctxt"]["user"] == "u"
    assert out["ctxt"]["traceparent"].split("-")[1:3] == [out["root"], publish["span"]]
