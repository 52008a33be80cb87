"""Fuzz the decode and dispatch path: whatever arrives, the listener survives, every bad message
is rejected with its id logged, and the good messages around it are delivered."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tidings
from tidings import NotificationFilter, Target
from tidings.notify.dispatcher import NotificationDispatcher
from tidings.notify.listener import NotificationListener
from tidings.transports.base import IncomingMessage

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
field_values = json_values | st.binary(max_size=16).map(lambda b: b.hex())


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    """Notification-shaped dicts with a wrong type (or a missing key) anywhere."""
    msg: dict[str, Any] = {
        "message_id": draw(field_values), "publisher_id": draw(field_values),
        "event_type": draw(field_values), "payload": draw(json_values),
        "timestamp": draw(field_values),
        "priority": draw(st.sampled_from(["INFO", "info", "WARN", "SAMPLE", "bogus", ""])
                         | field_values),
    }
    for key in draw(st.lists(st.sampled_from(sorted(msg)), max_size=3)):
        msg.pop(key, None)
    for key, value in draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)).items():
        msg["_context_" + key] = value
    return msg


def _enveloped(msg: Any, version: Any = "2.0") -> bytes:
    return json.dumps({"oslo.version": version, "oslo.message": json.dumps(msg)}).encode()


bodies = st.one_of(
    st.binary(max_size=64),                                              # noise, bad UTF-8
    json_values.map(lambda v: json.dumps(v).encode()),                   # any JSON at all
    messages().map(lambda m: json.dumps(m).encode()),                    # v1, wrong types
    messages().map(_enveloped),                                          # v2, wrong types
    st.tuples(messages(), json_values).map(lambda t: _enveloped(*t)),    # wrong versions
    json_values.map(lambda v: json.dumps({"oslo.version": "2.0", "oslo.message": v}).encode()),
    st.integers(1, 200_000).map(lambda d: b"[" * d + b"]" * d),           # deep nesting
    st.integers(1, 200_000).map(lambda d: ('{"a":' * d + "1" + "}" * d).encode()),
    st.just(b'{"payload": "' + b"x" * 70_000 + b'", "priority": "INFO"}'),  # over the limit
)


class FakeMessage(IncomingMessage):
    """A message as a driver hands it over; records every settlement that reaches the
    consumer's settlement queue."""

    __slots__ = ("queued",)

    def __init__(self, body: bytes, message_id: str) -> None:
        super().__init__(body, message_id)
        self.queued: list[str | None] = []
        self._sink = lambda m: self.queued.append(m.settled)


class Everything:
    def __init__(self) -> None:
        self.calls = 0

    def _got(self, ctxt: Any, pub: Any, et: Any, payload: Any, md: Any) -> None:
        self.calls += 1

    audit = debug = info = warn = error = critical = sample = _got


class Filtered(Everything):
    """Filters see the same odd types: a non-string never matches, and nothing raises."""

    filter_rule = NotificationFilter(publisher_id=".*", event_type="", context={"k": ".*"},
                                     metadata={"message_id": ".*"}, payload={"x": ".*"})


TRANSPORT = tidings.get_notification_transport("memory:///fuzz?max_message_size=65536")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_any_body_is_settled_exactly_once_and_never_raises(body: bytes) -> None:
    endpoint = Everything()
    filtered = Filtered()
    listener = NotificationListener(TRANSPORT, [Target(topic="f")],
                                    NotificationDispatcher([filtered, endpoint]))
    msg = FakeMessage(body, message_id="fuzz-1")
    listener._handle([msg])  # must not raise, whatever the body
    assert msg.settled in ("ack", "reject")
    if msg.settled == "ack":
        assert endpoint.calls == 1 and filtered.calls <= 1
    else:
        assert endpoint.calls == 0 and filtered.calls == 0
    assert msg.queued == [msg.settled]  # settled once, and that once queued for the driver


def test_bad_messages_between_good_ones_on_a_running_listener(
        caplog: pytest.LogCaptureFixture) -> None:
    vhost = f"memory:///{uuid.uuid4().hex}"
    transport = tidings.get_notification_transport(f"{vhost}?max_message_size=65536")
    # A sender that allows more, so the listener's own limit is what refuses the big one.
    lenient = tidings.get_notification_transport(f"{vhost}?max_message_size=1000000")
    got: list[Any] = []
    done = threading.Event()

    class Endpoint:
        def info(self, ctxt: Any, pub: Any, et: Any, payload: Any, md: Any) -> None:
            got.append(payload)
            if payload == "last":
                done.set()

    listener = tidings.get_notification_listener(transport, [Target(topic="f")], [Endpoint()])
    listener.start()
    notifier = tidings.Notifier(transport, "p", topics=["f"])
    bad = [b"\xff", b"{", b"[]", b"[" * 30_000 + b"]" * 30_000, _enveloped({}, "9.9"),
           _enveloped({"priority": 7}), b"x" * 70_000]
    with caplog.at_level(logging.ERROR):
        for i, body in enumerate(bad):
            notifier.info({}, "e", f"good-{i}")
            lenient.send_raw(Target(topic="f.info"), body, message_id=f"bad-{i}")
        notifier.info({}, "e", "last")
        assert done.wait(10)
        listener.stop()
        assert listener.wait(10)
    assert got == [f"good-{i}" for i in range(len(bad))] + ["last"]
    for i in range(len(bad)):
        assert f"bad-{i}" in caplog.text
    assert "over max_message_size=65536" in caplog.text
    assert listener.stats.snapshot()["rejected"] == len(bad)
    transport.cleanup()


def test_oversized_send_is_refused() -> None:
    transport = tidings.get_notification_transport("memory:///fuzz-big?max_message_size=1024")
    with pytest.raises(tidings.MessageTooLarge, match="max_message_size=1024"):
        transport.send_raw(Target(topic="f.info"), b"x" * 2048, message_id="big")
