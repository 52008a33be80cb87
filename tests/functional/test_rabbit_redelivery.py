"""The core's redelivery limit on RabbitMQ: a message that always fails is delivered a bounded
number of times, then rejected; on quorum queues the count is the broker's own
(x-delivery-count), so it holds across listeners."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import tidings
from tidings.testing.brokers import rabbit_vhost

WAIT = 30.0


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    with rabbit_vhost("tidings-redelivery") as name:
        yield name


class Failing:
    """Raises on every notification; counts the calls and signals each one."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.calls = 0
        self.lock = threading.Condition()
        self.stop_after = stop_after

    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> None:
        with self.lock:
            self.calls += 1
            self.lock.notify_all()
        raise RuntimeError("this one always fails")

    def wait_calls(self, n: int) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: self.calls >= n, WAIT), self.calls


def _wait_stat(listener: Any, key: str, value: int) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while (stats := listener.stats.snapshot())[key] < value:
        assert time.monotonic() < deadline, stats
        threading.Event().wait(0.05)
    return stats


def test_a_message_that_always_fails_is_rejected_after_max_deliveries(vhost: str) -> None:
    url = (f"rabbit://guest:guest@127.0.0.1:5672/{vhost}"
           f"?max_deliveries=3&requeue_delay=0.05&requeue_max_delay=0.05")
    transport = tidings.get_notification_transport(url)
    topic = f"redeliver-{uuid.uuid4().hex[:8]}"
    endpoint = Failing()
    listener = tidings.get_notification_listener(
        transport, [tidings.Target(topic=topic)], [endpoint], allow_requeue=True)
    listener.start()
    try:
        tidings.Notifier(transport, "p", topics=[topic]).info({}, "e", {"k": 1})
        stats = _wait_stat(listener, "rejected_after_max_deliveries", 1)
    finally:
        listener.stop()
        assert listener.wait(WAIT)
        transport.cleanup()
    assert endpoint.calls == 3
    assert (stats["requeued"], stats["rejected"]) == (2, 1), stats


def test_quorum_queues_count_deliveries_across_listeners(vhost: str) -> None:
    url = (f"rabbit://guest:guest@127.0.0.1:5672/{vhost}?quorum=true"
           f"&max_deliveries=3&requeue_delay=0.5&requeue_max_delay=0.5")
    transport = tidings.get_notification_transport(url)
    topic = f"quorum-{uuid.uuid4().hex[:8]}"
    target = [tidings.Target(topic=topic)]
    first = Failing()
    a = tidings.get_notification_listener(transport, target, [first], allow_requeue=True,
                                          pool="q")
    a.start()
    try:
        tidings.Notifier(transport, "p", topics=[topic]).info({}, "e", {"k": 1})
        first.wait_calls(2)  # then it waits out its requeue delay: stop it now
    finally:
        a.stop()
        assert a.wait(WAIT)
    # A new listener remembers nothing, but the broker counted two deliveries: the third
    # is the last one.
    second = Failing()
    b = tidings.get_notification_listener(transport, target, [second], allow_requeue=True,
                                          pool="q")
    b.start()
    try:
        stats = _wait_stat(b, "rejected_after_max_deliveries", 1)
    finally:
        b.stop()
        assert b.wait(WAIT)
        transport.cleanup()
    assert first.calls == 2 and second.calls == 1, (first.calls, second.calls)
    assert stats["requeued"] == 0, stats
