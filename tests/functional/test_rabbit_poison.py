"""rabbit:// deliveries that must cost only themselves: properties py-amqp cannot decode (a
message_id that is not UTF-8) and bodies over max_message_size, which the content header
announces. Each is rejected (dead-lettered where configured) on the listener's connection, which
stays up; the oversized body is dropped frame by frame, never joined. Against the RabbitMQ on
127.0.0.1:5672, on a fresh vhost; the memory bound of many large bodies is in
tests/reliability/test_limits.py.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import amqp
import pytest

import tidings
from tidings import Target
from tidings.testing.brokers import rabbit_vhost, require_service
from tidings.testing.conformance_harness import RawListener, poll_until
from tidings.transports import envelope
from tidings.transports.base import Binding

WAIT = 15.0


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    require_service("rabbitmq")
    with rabbit_vhost("tidings-poison") as name:
        yield name


@pytest.fixture
def channel(vhost: str) -> Iterator[Any]:
    """A plain py-amqp channel: it publishes what tidings never would."""
    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest",
                           virtual_host=vhost)
    conn.connect()
    ch = conn.channel()
    ch.auto_decode = False
    yield ch
    conn.close()


@pytest.fixture
def transport(vhost: str) -> Iterator[Callable[[str], tidings.Transport]]:
    made: list[tidings.Transport] = []

    def build(query: str) -> tidings.Transport:
        t = tidings.get_notification_transport(
            f"rabbit://guest:guest@127.0.0.1:5672/{vhost}?{query}")
        made.append(t)
        return t

    yield build
    for t in made:
        t.cleanup()


def uid() -> str:
    return uuid.uuid4().hex[:10]


def good(key: str) -> tuple[str, bytes]:
    message_id = str(uuid.uuid4())
    return message_id, envelope.encode({
        "message_id": message_id, "publisher_id": "test", "event_type": "poison.test",
        "priority": "INFO", "payload": {"key": key}, "timestamp": "2026-01-01 00:00:00"})


def depth(ch: Any, queue: str) -> int:
    return int(ch.queue_declare(queue, passive=True).message_count)


def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT}s waiting for {what}")
        time.sleep(0.05)


def publish(ch: Any, routing_key: str, body: bytes, **props: Any) -> None:
    props.setdefault("content_type", "application/json")
    ch.basic_publish(amqp.Message(body, **props),
                     exchange="openstack", routing_key=routing_key)


def test_undecodable_properties_are_rejected_on_the_same_connection(
        transport: Any, channel: Any) -> None:
    """Driver level: the poison delivery comes back with ``problem`` set (the core rejects it)
    and the good ones around it arrive normally, without a reconnect."""
    t = transport("")
    topic = f"poison-{uid()}.info"
    listener = RawListener(t.listen([Binding("openstack", topic)], None, 10), 10)
    try:
        link = listener.receiver._link  # type: ignore[attr-defined]
        before_id, before = good("before")
        publish(channel, topic, before, message_id=before_id)
        publish(channel, topic, b"{}", message_id=b"\xff\xfe-poison")  # not UTF-8
        publish(channel, topic, b"{}", message_id="x", content_type=b"\xc3(",
                application_headers={"h": "v"})
        after_id, after = good("after")
        publish(channel, topic, after, message_id=after_id)
        got = poll_until(listener, 4, WAIT)
        assert [m.problem is None for m in got] == [True, False, False, True]
        assert got[0].body == before and got[3].body == after
        assert got[1].message_id == "\\xff\\xfe-poison"
        assert "cannot be decoded" in (got[1].problem or "")
        assert got[2].message_id == "x"
        for msg in got:
            assert msg.ack() if msg.problem is None else msg.reject()
        assert listener.poll(0.3) == []
        assert listener.receiver._link is link, "the receiver reconnected"  # type: ignore
    finally:
        listener.close()
    assert depth(channel, topic) == 0


def test_poison_message_is_dead_lettered_and_the_listener_keeps_going(
        transport: Any, channel: Any, caplog: pytest.LogCaptureFixture) -> None:
    dlx = f"dlx-{uid()}"
    t = transport(f"dead_letter_exchange={dlx}")
    topic = f"poison-{uid()}"
    got: list[Any] = []
    done = threading.Event()

    class Endpoint:
        def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                 metadata: Any) -> None:
            got.append(payload["key"])
            done.set()

    listener = tidings.get_notification_listener(t, [Target(topic=topic)], [Endpoint()])
    listener.start()
    try:
        with caplog.at_level(logging.ERROR, logger="tidings"):
            publish(channel, f"{topic}.info", b"{}", message_id=b"\xff-poison")
            message_id, body = good("good")
            publish(channel, f"{topic}.info", body, message_id=message_id)
            assert done.wait(WAIT), "the listener never got the message after the poison one"
            wait_until(lambda: depth(channel, dlx) == 1, "the poison message dead-lettered")
        assert got == ["good"]
        time.sleep(0.5)  # (py-amqp here could not read the dead letter's properties either)
        assert depth(channel, dlx) == 1
        rejected = [r.getMessage() for r in caplog.records if "rejecting" in r.getMessage()]
        assert len(rejected) == 1, rejected  # delivered once: no reconnect, no redelivery
        assert "\\xff-poison" in rejected[0] and "cannot be decoded" in rejected[0]
    finally:
        listener.stop()
        listener.wait(WAIT)


def test_body_over_max_message_size_is_refused_unread(
        transport: Any, channel: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The content header announces 3 MiB against a 1 MiB limit: the delivery is rejected with
    its id, its body never reaches the receiver, and the next message arrives as usual."""
    dlx = f"dlx-{uid()}"
    t = transport(f"dead_letter_exchange={dlx}&max_message_size={1024 * 1024}")
    topic = f"big-{uid()}.info"
    listener = RawListener(t.listen([Binding("openstack", topic)], None, 10), 10)
    try:
        link = listener.receiver._link  # type: ignore[attr-defined]
        publish(channel, topic, b"x" * (3 * 1024 * 1024), message_id="too-big",
                application_headers={"k": "v"})
        fits_id, fits = good("fits")
        publish(channel, topic, fits, message_id=fits_id)
        got = poll_until(listener, 2, WAIT)
        assert got[0].message_id == "too-big" and got[0].body == b""
        assert "over max_message_size" in (got[0].problem or "")
        assert got[1].problem is None and got[1].body == fits
        assert got[0].reject() and got[1].ack()
        assert listener.poll(0.3) == []
        assert listener.receiver._link is link, "the receiver reconnected"  # type: ignore
    finally:
        listener.close()
    wait_until(lambda: depth(channel, dlx) == 1, "the big message dead-lettered")
    assert len(channel.basic_get(dlx, no_ack=True).body) == 3 * 1024 * 1024
