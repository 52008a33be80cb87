"""One bad message never costs another: a poison body, an endpoint that always fails and a
priority nobody handles are each settled alone, boundedly, while good messages flow.

Run on memory://, which goes through the same core as every driver (decode, signature checks,
dispatch, the redelivery policy, settlement)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest

import tidings
from tidings.transports.envelope import encode

WAIT = 10.0
SECRET = b"k" * 32


def _url() -> str:
    return f"memory:///poison-{uuid.uuid4().hex}"


def _poison_signed_body() -> bytes:
    """A v2 envelope whose oslo.message holds a lone surrogate, signed with a real key id and a
    junk signature: its MAC cannot even be computed."""
    inner = json.dumps({"message_id": "poison-1", "publisher_id": "x", "event_type": "e",
                        "priority": "INFO", "payload": {"k": "\ud800"},
                        "timestamp": "2026-01-01 00:00:00.000000"})
    return json.dumps({"oslo.version": "2.0", "oslo.message": inner,
                       "tidings.signature": {"alg": "hmac-sha256", "kid": "k1",
                                             "ts": 1796601600000, "ex": "openstack",
                                             "rk": "s.info", "sig": "AAAA"}}).encode()


class Collect:
    def __init__(self, expected: int) -> None:
        self.keys: list[Any] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.expected = expected

    def add(self, key: Any) -> None:
        with self.lock:
            self.keys.append(key)
            if len(self.keys) >= self.expected:
                self.done.set()

    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> None:
        self.add(payload["i"])


class CollectBatch(Collect):
    def info(self, messages: list[dict[str, Any]]) -> None:  # type: ignore[override]
        for m in messages:
            self.add(m["payload"]["i"])


@pytest.mark.parametrize("kind", ["listener", "batch", "pool"])
def test_a_poison_signed_message_is_rejected_alone(kind: str) -> None:
    keys = tidings.SigningKeys({"k1": SECRET}, active="k1", require=True)
    transport = tidings.get_notification_transport(_url(), signing=keys)
    target = tidings.Target(topic="t")
    got = CollectBatch(60) if kind == "batch" else Collect(60)
    if kind == "listener":
        consumer: Any = tidings.get_notification_listener(transport, [target], [got])
    elif kind == "batch":
        consumer = tidings.get_batch_notification_listener(transport, [target], [got],
                                                           batch_size=10, batch_timeout=0.2)
    else:
        consumer = None
    try:
        if consumer is not None:
            consumer.start()
        else:
            consumer = transport.join_consumer_pool(lambda m: got.add(m["payload"]["i"]),
                                                    "audit", "t.info")
        transport.send_raw(tidings.Target(topic="t.info"), _poison_signed_body(),
                           message_id="amqp-prop-1")
        notifier = tidings.Notifier(transport, "p", topics=["t"])
        for i in range(60):
            notifier.info({}, "e", {"i": i})
        assert got.done.wait(WAIT), f"only {len(got.keys)} of 60 good messages arrived"
        assert sorted(got.keys) == list(range(60))
    finally:
        if isinstance(consumer, tidings.transports.transport.ConsumerPoolHandle):
            assert consumer.stop(WAIT)
        elif consumer is not None:
            consumer.stop()
            assert consumer.wait(WAIT)
    assert consumer.stats.snapshot()["rejected"] == 1
    transport.cleanup()


def test_always_failing_messages_are_retried_boundedly_and_good_ones_flow() -> None:
    """64 messages whose endpoint always raises fill a prefetch window of 64; the 100 good
    messages sent after them still arrive, and each poison message is delivered at most
    max_deliveries times, then rejected."""
    transport = tidings.get_notification_transport(f"{_url()}?prefetch=64")
    deliveries: Counter[int] = Counter()
    good = Collect(100)

    class Endpoint:
        def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                 metadata: Any) -> None:
            if payload["poison"]:
                deliveries[payload["i"]] += 1
                raise RuntimeError("always fails")
            good.add(payload["i"])

    listener = tidings.get_notification_listener(transport, [tidings.Target(topic="t")],
                                                 [Endpoint()], allow_requeue=True)
    notifier = tidings.Notifier(transport, "p", topics=["t"])
    for i in range(64):
        notifier.info({}, "e", {"i": i, "poison": True})
    for i in range(100):
        notifier.info({}, "e", {"i": i, "poison": False})
    listener.start()
    try:
        assert good.done.wait(WAIT), f"only {len(good.keys)} of 100 good messages arrived"
        # The last poison messages may still be waiting out their delay.
        deadline = time.monotonic() + WAIT
        while listener.stats.snapshot()["rejected_after_max_deliveries"] < 64:
            assert time.monotonic() < deadline, listener.stats.snapshot()
            threading.Event().wait(0.05)
        stats = listener.stats.snapshot()
    finally:
        listener.stop()
        assert listener.wait(WAIT)
    assert stats["rejected_after_max_deliveries"] == 64, stats
    assert set(deliveries.values()) == {5}, deliveries  # the default max_deliveries
    transport.cleanup()


@pytest.mark.parametrize("priority", ["bogus", "ERROR"])
def test_a_priority_no_endpoint_handles_is_rejected_not_requeued(priority: str) -> None:
    transport = tidings.get_notification_transport(_url())
    good = Collect(1)
    listener = tidings.get_notification_listener(transport, [tidings.Target(topic="t")], [good],
                                                 allow_requeue=True)
    listener.start()
    try:
        body = encode({"message_id": "odd-1", "publisher_id": "p", "event_type": "e",
                       "priority": priority, "payload": {"i": -1},
                       "timestamp": "2026-01-01 00:00:00.000000"})
        transport.send_raw(tidings.Target(topic="t.info"), body, message_id="odd-1")
        tidings.Notifier(transport, "p", topics=["t"]).info({}, "e", {"i": 1})
        assert good.done.wait(WAIT)
    finally:
        listener.stop()
        assert listener.wait(WAIT)
    stats = listener.stats.snapshot()
    assert (stats["rejected"], stats["requeued"], stats["acknowledged"]) == (1, 0, 1), stats
    assert good.keys == [1]
    transport.cleanup()
