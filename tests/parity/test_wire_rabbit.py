"""On RabbitMQ, side by side: what each library's notifier puts on the wire for the same call,
and what an oslo.messaging listener then sees. The wire is read whole (envelope removed,
context still in its ``_context_*`` keys) by a raw pool member, so the comparison covers every
key that travels, not only what endpoints are shown."""

from __future__ import annotations

import datetime
import decimal
import ipaddress
import logging
import types
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import tidings

from .conftest import Inbox, new_conf, oslo_messaging, request_context

PAYLOADS = {
    "datetime": {"at": datetime.datetime(2024, 1, 2, 3, 4, 5, 123456)},
    "datetime-no-micro": datetime.datetime(2024, 1, 2, 3, 4, 5),
    "date": [datetime.date(2024, 1, 2)],
    "set": {"tags": {"b"}, "frozen": frozenset([1])},
    "tuple": (1, "two", (3,)),
    "bytes": {"raw": b"caf\xc3\xa9"},
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "decimal": {"price": decimal.Decimal("1.10")},
    "exception": {"error": ValueError("bad", 3)},
    "ip": {"v4": ipaddress.IPv4Address("10.0.0.1"), "v6": ipaddress.IPv6Address("::1")},
    "unicode": {"name": "caf\u00e9 \u2713 \U0001f600"},
    "lone-surrogate": {"s": "a\ud800b"},
    "int-keys": {1: "one", 2.5: "x", None: "n", False: "f"},
    "mapping": types.MappingProxyType({"k": datetime.date(2020, 2, 2)}),
    "class": {"cls": int},
    "nested": {"a": [{"b": {"c": [datetime.datetime(2020, 1, 1), {1, 2}]}}]},
    "string": "plain",
    "none": None,
}


class Secretive:
    """A context object with to_dict() and no redacted_copy()."""

    def to_dict(self) -> dict[str, Any]:
        return {"user": "u-1", "auth_token": "SECRET-TOKEN", "roles": ["admin"]}


CONTEXTS = {
    "request-context": request_context,
    "dict": lambda: {"user": "u-1", "auth_token": "SECRET-TOKEN", "password": "SECRET-PW",
                     "note": "password=SECRET-NOTE", "count": 3},
    "to_dict-only": Secretive,
    "none": lambda: None,
    "empty": dict,
}


@pytest.fixture(scope="module")
def transports(rabbit_url: str) -> Iterator[dict[str, Any]]:
    out = {"oslo": oslo_messaging.get_notification_transport(new_conf(), url=rabbit_url),
           "tidings": tidings.get_notification_transport(new_conf(), url=rabbit_url)}
    yield out
    for t in out.values():
        t.cleanup()


@pytest.fixture
def wire(transports: dict[str, Any]) -> Iterator[Any]:
    """wire(lib, send) -> the message(s) the call put on the wire, whole, as dicts."""
    handles = []

    def capture(lib: str, send: Any, count: int = 1, driver: str = "messagingv2") -> list[Any]:
        topic = f"w-{uuid.uuid4().hex[:10]}"
        inbox = Inbox()
        handles.append(transports["tidings"].join_consumer_pool(
            inbox.add, f"wire-{topic}", f"{topic}.info", "openstack"))
        module = oslo_messaging if lib == "oslo" else tidings
        send(module.Notifier(transports[lib], "pub.host", driver=driver, topics=[topic]))
        got = inbox.settle(count, quiet=0.2)
        # oslo.messaging's rabbit driver adds a random '_unique_id' for its listeners' duplicate
        # check; tidings does not (README), and oslo.messaging's listeners do without it.
        assert all(("_unique_id" in m) == (lib == "oslo") for m in got)
        return [{k: v for k, v in m.items() if k not in ("message_id", "timestamp",
                                                         "_unique_id")} for m in got]

    yield capture
    for handle in handles:
        handle.stop()


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_payload_encoding_as_oslo(name: str, wire: Any) -> None:
    def send(notifier: Any) -> None:
        notifier.info({}, "payload.test", PAYLOADS[name])

    assert wire("tidings", send) == wire("oslo", send)


def test_v1_messaging_driver_as_oslo(wire: Any) -> None:
    def send(notifier: Any) -> None:
        notifier.info(request_context(), "v1.test", {"a": [1, 2.5, None, True, "é"]})

    assert wire("tidings", send, driver="messaging") == wire("oslo", send, driver="messaging")


def test_v1_typed_values_as_oslo(wire: Any, transports: dict[str, Any]) -> None:
    """The v1 body goes through kombu's JSON on oslo.messaging's rabbit driver: datetimes,
    dates, times, Decimals, UUIDs and bytes are written as typed markers, and listeners (both
    libraries) turn them back into the values; a set cannot be sent (oslo.messaging logs that
    and sends nothing, tidings raises TypeError to the caller)."""
    payload = {"at": datetime.datetime(2024, 1, 2, 3, 4, 5, 6), "day": datetime.date(2024, 1, 2),
               "t": datetime.time(1, 2), "price": decimal.Decimal("1.5"),
               "id": uuid.UUID(int=7), "raw": b"caf\xc3\xa9", "bin": b"\xff\x00"}

    def send(notifier: Any) -> None:
        notifier.info({}, "v1.typed", payload)

    ours, theirs = wire("tidings", send, driver="messaging"), \
        wire("oslo", send, driver="messaging")
    assert ours == theirs and ours[0]["payload"] == payload
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        wire("tidings", lambda n: n.info({}, "v1.set", {"s": {1}}), count=0,
             driver="messaging")


@pytest.mark.parametrize("name", sorted(CONTEXTS))
def test_what_context_travels(name: str, wire: Any) -> None:
    """A RequestContext travels exactly as with oslo.messaging (redacted: auth_token None).
    oslo.messaging sends no context at all for a dict or an object with only to_dict();
    tidings sends it with every secret masked as oslo_utils' mask_dict_password masks it
    (README): no secret reaches the wire in either library."""
    def send(notifier: Any) -> None:
        notifier.info(CONTEXTS[name](), "context.test", {})

    ours, theirs = wire("tidings", send), wire("oslo", send)
    assert "SECRET" not in repr(ours) and "SECRET" not in repr(theirs)
    context = {k: v for k, v in ours[0].items() if k.startswith("_context_")}
    if name in ("request-context", "none", "empty"):
        assert ours == theirs
        return
    assert not any(k.startswith("_context_") for k in theirs[0])
    if name == "dict":
        assert context == {"_context_user": "u-1", "_context_auth_token": "***",
                           "_context_password": "***", "_context_note": "password=***",
                           "_context_count": 3}
    else:
        assert context == {"_context_user": "u-1", "_context_auth_token": "***",
                           "_context_roles": ["admin"]}


def test_unencodable_payload(wire: Any, caplog: pytest.LogCaptureFixture) -> None:
    """An object JSON cannot carry and to_primitive cannot convert: oslo.messaging logs the
    error and sends nothing; tidings raises ValueError to the caller (README)."""
    with caplog.at_level(logging.ERROR):
        assert wire("oslo", lambda n: n.info({}, "bad", {"o": object()}), count=0) == []
    assert any("Cannot convert" in r.getMessage() or r.exc_info for r in caplog.records)
    with pytest.raises(ValueError, match="Cannot convert"):
        wire("tidings", lambda n: n.info({}, "bad", {"o": object()}), count=0)


def test_oslo_listener_sees_the_same(transports: dict[str, Any]) -> None:
    """What an oslo.messaging listener's endpoint gets from each library's notifier."""
    got = {}
    for lib in ("oslo", "tidings"):
        topic = f"l-{uuid.uuid4().hex[:10]}"
        inbox = Inbox()

        class Endpoint:
            def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                     metadata: Any, inbox: Inbox = inbox) -> None:
                inbox.add((dict(ctxt), publisher_id, event_type, payload, sorted(metadata)))

        listener = oslo_messaging.get_notification_listener(
            transports["oslo"], [oslo_messaging.Target(topic=topic)], [Endpoint()],
            executor="threading", pool="view")
        listener.start()
        module = oslo_messaging if lib == "oslo" else tidings
        notifier = module.Notifier(transports[lib], "pub.host", driver="messagingv2",
                                   topics=[topic])
        notifier.info(request_context(), "seen.test", PAYLOADS["nested"])
        notifier.error(request_context(), "seen.error", PAYLOADS["datetime"])
        got[lib] = sorted(map(repr, inbox.settle(1, quiet=0.5)))
        listener.stop()
        listener.wait()
    assert got["tidings"] == got["oslo"]
