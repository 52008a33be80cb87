"""Dispatcher, filters, results and the requeue rules, end to end on memory://."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

import tidings
from tidings import NotificationFilter, NotificationResult, Target
from tidings.notify.dispatcher import PRIORITIES, NotificationDispatcher
from tidings.transports.envelope import Notification

WAIT = 5.0


class Recorder:
    """An endpoint that records every call and can be told what to return or raise."""

    def __init__(self, result: Any = None, exc: Exception | None = None,
                 filter_rule: NotificationFilter | None = None) -> None:
        self.calls: list[tuple[str, Any, Any, Any, Any, Any]] = []
        self.result = result
        self.exc = exc
        self.changed = threading.Condition()
        if filter_rule is not None:
            self.filter_rule = filter_rule
        for prio in PRIORITIES:
            setattr(self, prio, self._make(prio))

    def _make(self, prio: str) -> Any:
        def method(ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                   metadata: Any) -> Any:
            with self.changed:
                self.calls.append((prio, ctxt, publisher_id, event_type, payload, metadata))
                self.changed.notify_all()
            if self.exc is not None:
                raise self.exc
            return self.result(len(self.calls)) if callable(self.result) else self.result
        return method

    def wait_for(self, n: int, timeout: float = WAIT) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.calls) >= n, timeout)


def _run(listener: tidings.NotificationListener) -> None:
    listener.start()


def _stop(listener: tidings.NotificationListener) -> None:
    listener.stop()
    assert listener.wait(WAIT)


def test_every_priority_reaches_its_method(transport: tidings.Transport) -> None:
    rec = Recorder()
    listener = tidings.get_notification_listener(transport, [Target(topic="notifications")], [rec])
    listener.start()
    notifier = tidings.Notifier(transport, "compute.host1")
    for prio in PRIORITIES:
        getattr(notifier, prio)({"request_id": "r1"}, f"ev.{prio}", {"p": prio})
    notifier.warning({}, "ev.warning", {})
    assert rec.wait_for(len(PRIORITIES) + 1)
    _stop(listener)
    seen = {c[0] for c in rec.calls}
    assert seen == set(PRIORITIES)
    info = next(c for c in rec.calls if c[0] == "info")
    assert info[1] == {"request_id": "r1"}
    assert info[2] == "compute.host1" and info[3] == "ev.info" and info[4] == {"p": "info"}
    assert set(info[5]) == {"message_id", "timestamp"}
    assert [c[0] for c in rec.calls if c[3] == "ev.warning"] == ["warn"]


def test_only_endpoint_priorities_are_consumed(transport: tidings.Transport) -> None:
    class InfoOnly:
        def __init__(self) -> None:
            self.got = threading.Event()

        def info(self, *args: Any) -> None:
            self.got.set()

    ep = InfoOnly()
    listener = tidings.get_notification_listener(transport, [Target(topic="n")], [ep])
    assert [b.routing_key for b in listener.bindings] == ["n.info"]
    listener.start()
    notifier = tidings.Notifier(transport, "p", topics=["n"])
    notifier.error({}, "e", {})  # no binding: stays in the group queue n.error for others
    notifier.info({}, "e", {})
    assert ep.got.wait(WAIT)
    _stop(listener)


def test_filters_select_by_regex(transport: tidings.Transport) -> None:
    compute = Recorder(filter_rule=NotificationFilter(
        publisher_id=r"^compute\.", event_type=r"^instance\.",
        context={"tenant": "^t1$"}, payload={"state": "^active$"}))
    everything = Recorder()
    listener = tidings.get_notification_listener(
        transport, [Target(topic="notifications")], [compute, everything])
    listener.start()
    n = tidings.Notifier(transport, "compute.h1")
    n.info({"tenant": "t1"}, "instance.create", {"state": "active"})   # matches
    n.info({"tenant": "t2"}, "instance.create", {"state": "active"})   # context differs
    n.info({"tenant": "t1"}, "volume.create", {"state": "active"})     # event type differs
    n.prepare(publisher_id="network.h1").info({"tenant": "t1"}, "instance.x",
                                               {"state": "active"})  # publisher differs
    n.info({"tenant": "t1"}, "instance.create", {"other": "key"})      # missing key
    n.info({"tenant": "t1"}, "instance.create", ["not", "a", "dict"])  # payload not a dict
    assert everything.wait_for(6)
    _stop(listener)
    assert len(compute.calls) == 1
    assert compute.calls[0][1] == {"tenant": "t1"}


def test_filter_unit_semantics() -> None:
    f = NotificationFilter(metadata={"timestamp": "2026"}, payload={"n": "1"})
    assert f.match({}, "p", "e", {"timestamp": "2026-01-01"}, {"n": "1"})
    assert not f.match({}, "p", "e", {"timestamp": "2025"}, {"n": "1"})
    assert not f.match({}, "p", "e", {"timestamp": "2026"}, {"n": 1})  # non-string value
    assert NotificationFilter().match(None, None, None, None, None)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        NotificationFilter(event_type="(")


def test_requeue_result_requeues_when_allowed(transport: tidings.Transport) -> None:
    # First delivery asks for a requeue, the second handles it.
    rec = Recorder(result=lambda n: NotificationResult.REQUEUE if n == 1 else None)
    listener = tidings.get_notification_listener(transport, [Target(topic="t")], [rec],
                                                 allow_requeue=True)
    listener.start()
    tidings.Notifier(transport, "p", topics=["t"]).info({}, "e", {"k": 1})
    assert rec.wait_for(2)
    _stop(listener)
    assert rec.calls[0][5]["message_id"] == rec.calls[1][5]["message_id"]
    assert listener.stats.snapshot()["requeued"] == 1
    assert listener.stats.snapshot()["acknowledged"] == 1


def test_exception_requeues_when_allowed(transport: tidings.Transport) -> None:
    rec = Recorder(exc=RuntimeError("boom"))
    listener = tidings.get_notification_listener(transport, [Target(topic="t")], [rec],
                                                 allow_requeue=True)
    listener.start()
    tidings.Notifier(transport, "p", topics=["t"]).info({}, "e", {})
    assert rec.wait_for(3)  # it keeps coming back
    _stop(listener)
    assert listener.stats.snapshot()["requeued"] >= 2


@pytest.mark.parametrize("kind", ["requeue", "exception"])
def test_failure_without_requeue_is_logged_and_rejected(
        transport: tidings.Transport, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    rec = Recorder(result=NotificationResult.REQUEUE) if kind == "requeue" \
        else Recorder(exc=ValueError("bad"))
    listener = tidings.get_notification_listener(transport, [Target(topic="t")], [rec])
    listener.start()
    with caplog.at_level(logging.ERROR):
        tidings.Notifier(transport, "p", topics=["t"]).info({}, "e", {})
        assert rec.wait_for(1)
        _stop(listener)
    msg_id = rec.calls[0][5]["message_id"]
    assert f"notification {msg_id}" in caplog.text and "rejecting it" in caplog.text
    stats = listener.stats.snapshot()
    assert stats["rejected"] == 1 and stats["acknowledged"] == 0 and stats["in_flight"] == 0
    # Rejected, not silently requeued: a new listener does not get it again.
    again = Recorder()
    second = tidings.get_notification_listener(transport, [Target(topic="t")], [again])
    second.start()
    tidings.Notifier(transport, "p", topics=["t"]).info({}, "marker", {})
    assert again.wait_for(1)
    _stop(second)
    assert [c[3] for c in again.calls] == ["marker"]


def test_requeue_stops_later_endpoints(transport: tidings.Transport) -> None:
    first = Recorder(result=NotificationResult.REQUEUE)
    second = Recorder()
    dispatcher = NotificationDispatcher([first, second])
    note = Notification({}, "p", "e", "info", {}, {"message_id": "m"})
    assert dispatcher.dispatch(note) == NotificationResult.REQUEUE
    assert len(first.calls) == 1 and second.calls == []


def test_dispatcher_needs_priority_methods() -> None:
    with pytest.raises(ValueError, match="no endpoint has a method named after a priority"):
        NotificationDispatcher([object()])
    with pytest.raises(ValueError, match="at least one endpoint"):
        NotificationDispatcher([])


def test_malformed_bodies_are_rejected_and_listening_goes_on(
        transport: tidings.Transport, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    listener = tidings.get_notification_listener(transport, [Target(topic="t")], [rec])
    listener.start()
    bad = [b"not json", b"\xff\xfe", b"[1, 2]", b'{"oslo.version": "3.0", "oslo.message": "{}"}',
           b'{"oslo.version": "2.0", "oslo.message": 5}', b'{"no": "priority"}']
    with caplog.at_level(logging.ERROR):
        for i, body in enumerate(bad):
            transport.send_raw(Target(topic="t.info"), body, message_id=f"bad-{i}")
        tidings.Notifier(transport, "p", topics=["t"]).info({}, "good", {})
        assert rec.wait_for(1)
        _stop(listener)
    for i in range(len(bad)):
        assert f"bad-{i}" in caplog.text
    assert [c[3] for c in rec.calls] == ["good"]
    assert listener.stats.snapshot()["rejected"] == len(bad)


def test_serializer_applies_to_payload_and_context(transport: tidings.Transport) -> None:
    class Upper(tidings.NoOpSerializer):
        def deserialize_entity(self, ctxt: Any, entity: Any) -> Any:
            return {k.upper(): v for k, v in entity.items()}

        def deserialize_context(self, ctxt: dict[str, Any]) -> Any:
            return {**ctxt, "seen": True}

    rec = Recorder()
    listener = tidings.get_notification_listener(transport, [Target(topic="t")], [rec],
                                                 serializer=Upper())
    listener.start()
    tidings.Notifier(transport, "p", topics=["t"]).info({"a": 1}, "e", {"k": 1})
    assert rec.wait_for(1)
    _stop(listener)
    assert rec.calls[0][1] == {"a": 1, "seen": True} and rec.calls[0][4] == {"K": 1}


def test_context_objects_use_redacted_copy_and_to_dict(transport: tidings.Transport) -> None:
    class Ctx:
        def redacted_copy(self) -> Ctx:
            c = Ctx()
            c.secret = "***"
            return c

        secret = "token"

        def to_dict(self) -> dict[str, Any]:
            return {"user": "u", "auth_token": self.secret}

    rec = Recorder()
    listener = tidings.get_notification_listener(transport, [Target(topic="t")], [rec])
    listener.start()
    tidings.Notifier(transport, "p", topics=["t"]).info(Ctx(), "e", {})
    assert rec.wait_for(1)
    _stop(listener)
    assert rec.calls[0][1] == {"user": "u", "auth_token": "***"}


def test_log_and_noop_notifier_drivers(transport: tidings.Transport,
                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="oslo.messaging.notification"):
        tidings.Notifier(transport, "p", driver="log").info({}, "compute.start", {"x": 1})
    assert any(r.name == "oslo.messaging.notification.compute.start"
               for r in caplog.records)
    noop = tidings.Notifier(transport, "p", driver="noop")
    assert not noop.is_enabled()
    noop.info({}, "e", {})
    with pytest.raises(ValueError, match="unknown notifier driver"):
        tidings.Notifier(transport, driver="kafka")


def test_a_notifier_with_several_topics_sends_each_the_same_notification(
        transport: tidings.Transport) -> None:
    from tidings.testing.conformance_harness import RawListener
    from tidings.transports.base import Binding

    listeners = {t: RawListener(transport.listen([Binding("openstack", f"{t}.info")]), 64)
                 for t in ("a", "b")}
    notifier = tidings.Notifier(transport, "p", topics=["a", "b"])
    notifier.info({"user": "u1"}, "e.x", {"k": [1, "é"]})

    class Ctx:  # not a dict: the general encoding path
        def to_dict(self) -> dict[str, Any]:
            return {"user": "u2"}

    notifier.info(Ctx(), "e.y", {"k": 2})
    got = {t: [] for t in listeners}
    for topic, lst in listeners.items():
        deadline = time.monotonic() + WAIT
        while len(got[topic]) < 2 and time.monotonic() < deadline:
            got[topic].extend(lst.poll(0.1))
        assert len(got[topic]) == 2, topic
    assert [m.body for m in got["a"]] == [m.body for m in got["b"]]  # one encoding, both topics
    first = transport.decode(got["a"][0])
    assert (first["event_type"], first["payload"], first["_context_user"]) == \
        ("e.x", {"k": [1, "é"]}, "u1")
    assert transport.decode(got["b"][1])["_context_user"] == "u2"
    for lst in listeners.values():
        lst.close()
