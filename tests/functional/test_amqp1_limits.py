"""amqp:// limits: a message over max_message_size is dropped transfer by transfer and rejected
with its id, on the listener's connection, which stays up; and building, using and cleaning up
transports leaves no proton objects behind (python-qpid-proton keeps the Python attributes of
its objects reachable from a global set, so a cycle through them was never collected: about
1.6 MB per transport). Against the RabbitMQ on 127.0.0.1:5672 (AMQP 1.0 plugin), on a fresh
vhost. The memory bound of many large bodies is in tests/reliability/test_limits.py.
"""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import amqp
import cproton
import pytest
from proton import Message

import tidings
from tidings import Target
from tidings.drivers.amqp1.loop import EventLoop
from tidings.drivers.amqp1.receiving import sniff_id
from tidings.testing.brokers import rabbit_vhost, require_service
from tidings.testing.conformance_harness import RawListener, poll_until
from tidings.transports import envelope
from tidings.transports.base import Binding

WAIT = 15.0


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    require_service("rabbitmq")
    with rabbit_vhost("tidings-amqp1-limits") as name:
        yield name


@pytest.fixture
def channel(vhost: str) -> Iterator[Any]:
    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest",
                           virtual_host=vhost)
    conn.connect()
    yield conn.channel()
    conn.close()


def url(vhost: str, query: str = "") -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{vhost}" + (f"?{query}" if query else "")


def good(key: str) -> tuple[str, bytes]:
    message_id = str(uuid.uuid4())
    return message_id, envelope.encode({
        "message_id": message_id, "publisher_id": "test", "event_type": "limits.test",
        "priority": "INFO", "payload": {"key": key}, "timestamp": "2026-01-01 00:00:00"})


def depth(ch: Any, queue: str) -> int:
    return int(ch.queue_declare(queue, passive=True).message_count)


def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT}s waiting for {what}")
        time.sleep(0.05)


def test_sniff_id_reads_the_id_from_the_first_bytes() -> None:
    encoded = Message(id="the-id", body=b"x" * 100_000, properties={"a": 1}).encode()
    assert sniff_id(encoded[:2000]) == "the-id"
    assert sniff_id(Message(body=b"x").encode()) is None
    assert sniff_id(b"\x00garbage") is None


def test_message_over_max_message_size_is_rejected_as_it_arrives(
        vhost: str, channel: Any) -> None:
    dlx = f"dlx-{uuid.uuid4().hex[:8]}"
    t = tidings.get_notification_transport(
        url(vhost, f"dead_letter_exchange={dlx}&max_message_size={1024 * 1024}"))
    topic = f"big-{uuid.uuid4().hex[:8]}.info"
    listener = RawListener(t.listen([Binding("openstack", topic)], None, 10), 10)
    try:
        receiver = listener.receiver
        channel.basic_publish(amqp.Message(b"x" * (5 * 1024 * 1024), message_id="too-big"),
                              exchange="openstack", routing_key=topic)
        fits_id, fits = good("fits")
        channel.basic_publish(amqp.Message(fits, message_id=fits_id), exchange="openstack",
                              routing_key=topic)
        got = poll_until(listener, 2, WAIT)
        assert got[0].message_id == "too-big" and got[0].body == b""
        assert "over max_message_size" in (got[0].problem or "")
        assert got[1].problem is None and got[1].body == fits
        assert got[0].reject() and got[1].ack()
        assert listener.poll(0.3) == []
        assert receiver._state == "open"  # type: ignore[attr-defined]  # same connection
    finally:
        listener.close()
        t.cleanup()
    wait_until(lambda: depth(channel, dlx) == 1, "the big message dead-lettered")


def _cycle(vhost: str) -> None:
    t = tidings.get_notification_transport(url(vhost))
    topic = f"cycle-{uuid.uuid4().hex[:8]}.info"
    listener = RawListener(t.listen([Binding("openstack", topic)], None, 10), 10)
    message_id, body = good("k")
    t.send_raw(Target(topic=topic), body, message_id=message_id)
    for msg in poll_until(listener, 1, WAIT):
        msg.ack()
    listener.close()
    t.cleanup()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_cleaned_up_transports_leave_no_proton_objects_behind(vhost: str) -> None:
    """Before the fix every cycle kept its EventLoop, Container, connections and handlers
    (+1.6 MB RSS each: 47 -> 360 MB over 200 cycles)."""
    _cycle(vhost)
    gc.collect()
    retained, rss = cproton.retained_count(), _rss_mb()
    cycles = 30
    for _ in range(cycles):
        _cycle(vhost)
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, EventLoop)] == []
    assert cproton.retained_count() - retained < cycles  # was dozens per cycle
    grown = _rss_mb() - rss
    assert grown < 12, f"RSS grew {grown:.1f} MB over {cycles} cycles"
