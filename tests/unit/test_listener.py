"""Batching, listener lifecycle, and group/pool distribution on memory://."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest

import tidings
from tidings import NotificationResult, Target
from tidings.testing.conformance_harness import RawListener
from tidings.transports.base import Binding
from tidings.transports.envelope import decode, encode, pack_context

WAIT = 5.0


class BatchRecorder:
    def __init__(self, result: Any = None) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.result = result

    def info(self, messages: list[dict[str, Any]]) -> Any:
        with self.cond:
            self.batches.append(messages)
            self.cond.notify_all()
        return self.result

    def total(self) -> int:
        return sum(len(b) for b in self.batches)

    def wait_total(self, n: int, timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.total() >= n, timeout)


def test_batches_of_100_100_and_5(transport: tidings.Transport) -> None:
    n = tidings.Notifier(transport, "p", topics=["b"])
    for i in range(205):  # queued before the listener starts: batches fill deterministically
        n.info({}, "e", {"i": i})
    rec = BatchRecorder()
    listener = tidings.get_batch_notification_listener(
        transport, [Target(topic="b")], [rec], batch_size=100, batch_timeout=0.5)
    listener.start()
    assert rec.wait_total(205)
    listener.stop()
    assert listener.wait(WAIT)
    assert [len(b) for b in rec.batches] == [100, 100, 5]
    assert [m["payload"]["i"] for b in rec.batches for m in b] == list(range(205))
    assert set(rec.batches[0][0]) >= {"ctxt", "publisher_id", "event_type", "payload",
                                      "metadata"}


def test_batch_timeout_flushes_a_partial_batch(transport: tidings.Transport) -> None:
    rec = BatchRecorder()
    listener = tidings.get_batch_notification_listener(
        transport, [Target(topic="b")], [rec], batch_size=1000, batch_timeout=0.2)
    listener.start()
    n = tidings.Notifier(transport, "p", topics=["b"])
    for i in range(3):
        n.info({}, "e", {"i": i})
    assert rec.wait_total(3)
    listener.stop()
    assert listener.wait(WAIT)
    assert rec.total() == 3 and len(rec.batches[0]) <= 3


def test_batch_requeue(transport: tidings.Transport) -> None:
    rec = BatchRecorder(result=NotificationResult.REQUEUE)
    listener = tidings.get_batch_notification_listener(
        transport, [Target(topic="b")], [rec], batch_size=2, batch_timeout=0.1, allow_requeue=True)
    listener.start()
    tidings.Notifier(transport, "p", topics=["b"]).info({}, "e", {})
    assert rec.wait_total(2)  # the same message, delivered twice
    listener.stop()
    assert listener.wait(WAIT)
    ids = {m["metadata"]["message_id"] for b in rec.batches for m in b}
    assert len(ids) == 1


def test_bad_batch_arguments(transport: tidings.Transport) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        tidings.get_batch_notification_listener(transport, [Target(topic="b")], [BatchRecorder()],
                                                batch_size=0)
    with pytest.raises(ValueError, match="batch_timeout"):
        tidings.get_batch_notification_listener(transport, [Target(topic="b")], [BatchRecorder()],
                                                batch_size=2, batch_timeout=-1)


# -- lifecycle ----------------------------------------------------------------------------

class Counting:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.cond = threading.Condition()

    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> None:
        with self.cond:
            self.ids.append(payload["id"])
            self.cond.notify_all()

    def wait_count(self, n: int, timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.ids) >= n, timeout)


def test_lifecycle(transport: tidings.Transport) -> None:
    ep = Counting()
    listener = tidings.get_notification_listener(transport, [Target(topic="l")], [ep])
    listener.stop()  # stop before start: nothing to do
    assert listener.wait(0.1)
    listener.start()
    listener.start()  # second start is a no-op
    assert listener.running
    assert not listener.wait(timeout=0.3)  # wait before stop times out, listener still runs
    n = tidings.Notifier(transport, "p", topics=["l"])
    n.info({}, "e", {"id": "a"})
    assert ep.wait_count(1)
    listener.stop()
    assert listener.wait(WAIT)
    assert not listener.running
    n.info({}, "e", {"id": "b"})  # sent while stopped: waits in the group queue
    listener.start()  # restart after stop
    assert ep.wait_count(2)
    listener.stop()
    assert listener.wait(WAIT)
    assert ep.ids == ["a", "b"]


def test_stop_with_messages_in_flight_loses_nothing(transport: tidings.Transport) -> None:
    release = threading.Event()
    started = threading.Event()
    handled: list[str] = []

    class Slow:
        def info(self, ctxt: Any, pub: Any, et: Any, payload: Any, md: Any) -> None:
            started.set()
            release.wait(WAIT)
            handled.append(payload["id"])

    listener = tidings.get_notification_listener(transport, [Target(topic="s")], [Slow()],
                                                 prefetch=10)
    listener.start()
    n = tidings.Notifier(transport, "p", topics=["s"])
    for i in range(10):
        n.info({}, "e", {"id": str(i)})
    assert started.wait(WAIT)
    listener.stop()  # while the first message is being handled and 9 are prefetched
    release.set()
    assert listener.wait(WAIT)
    stats = listener.stats.snapshot()
    assert stats["acknowledged"] == len(handled)
    rest = Counting()
    second = tidings.get_notification_listener(transport, [Target(topic="s")], [rest])
    second.start()
    assert rest.wait_count(10 - len(handled))
    second.stop()
    assert second.wait(WAIT)
    assert sorted(handled + rest.ids, key=int) == [str(i) for i in range(10)]


def test_executor_must_be_known(transport: tidings.Transport) -> None:
    with pytest.raises(ValueError, match="eventlet is not supported"):
        tidings.get_notification_listener(transport, [Target(topic="t")], [Counting()],
                                          executor="eventlet")


# -- distribution -------------------------------------------------------------------------

def _start(transport: tidings.Transport, pool: str | None, n: int, topic: str = "d",
           prefetch: int | None = None) -> tuple[list[tidings.NotificationListener],
                                                 list[Counting]]:
    eps = [Counting() for _ in range(n)]
    listeners = [tidings.get_notification_listener(transport, [Target(topic=topic)], [ep],
                                                   pool=pool, prefetch=prefetch)
                 for ep in eps]
    for listener in listeners:
        listener.start()
    return listeners, eps


def _wait_total(eps: list[Counting], n: int) -> bool:
    deadline = threading.Event()
    for _ in range(200):
        if sum(len(e.ids) for e in eps) >= n:
            return True
        deadline.wait(0.025)
    return False


def test_group_and_pools_split_and_copy(transport: tidings.Transport) -> None:
    total = 300
    # With room for everything, delivery is strictly round-robin (as on RabbitMQ, a member
    # with a full prefetch window is skipped, so smaller windows give first-free-first-served).
    group, group_eps = _start(transport, None, 3, prefetch=total)
    pool_a, a_eps = _start(transport, "pool-a", 2)
    pool_b, b_eps = _start(transport, "pool-b", 2)
    n = tidings.Notifier(transport, "p", topics=["d"])
    for i in range(total):
        n.info({}, "e", {"id": str(i)})
    for eps in (group_eps, a_eps, b_eps):
        assert _wait_total(eps, total)
    for listener in group + pool_a + pool_b:
        listener.stop()
    for listener in group + pool_a + pool_b:
        assert listener.wait(WAIT)
    expected = [str(i) for i in range(total)]
    for eps in (group_eps, a_eps, b_eps):
        ids = [i for e in eps for i in e.ids]
        assert sorted(ids, key=int) == expected  # each group/pool: every message exactly once
        assert all(e.ids for e in eps)            # every member got some
    assert Counter(len(e.ids) for e in group_eps) == Counter({100: 3})


def test_exchanges_are_isolated(transport: tidings.Transport) -> None:
    ep_a, ep_b = Counting(), Counting()
    la = tidings.get_notification_listener(transport, [Target(topic="x", exchange="a")], [ep_a])
    lb = tidings.get_notification_listener(transport, [Target(topic="x", exchange="b")], [ep_b],
                                           pool="same")
    la.start()
    lb.start()
    tidings.Notifier(transport, "p", topics=["x"], exchange="a").info({}, "e", {"id": "A"})
    tidings.Notifier(transport, "p", topics=["x"], exchange="b").info({}, "e", {"id": "B"})
    assert ep_a.wait_count(1) and ep_b.wait_count(1)
    for listener in (la, lb):
        listener.stop()
        assert listener.wait(WAIT)
    assert ep_a.ids == ["A"] and ep_b.ids == ["B"]


def test_join_consumer_pool_gets_the_whole_message(transport: tidings.Transport) -> None:
    got: dict[str, list[dict[str, Any]]] = {"p1": [], "p2": []}
    done = threading.Semaphore(0)

    def cb(pool: str) -> Any:
        def callback(message: dict[str, Any]) -> None:
            got[pool].append(message)
            done.release()
        return callback

    h1 = transport.join_consumer_pool(cb("p1"), "p1", "notifications.info", "nova")
    h2 = transport.join_consumer_pool(cb("p2"), "p2", "notifications.info", "nova")
    tidings.Notifier(transport, "compute", exchange="nova").info({"u": 1}, "e", {"k": 2})
    assert done.acquire(timeout=WAIT) and done.acquire(timeout=WAIT)
    assert h1.stop() and h2.stop()
    for pool in ("p1", "p2"):
        (msg,) = got[pool]
        assert msg["_context_u"] == 1 and msg["payload"] == {"k": 2}
        assert msg["priority"] == "INFO" and msg["publisher_id"] == "compute"


def test_prefetch_bounds_what_a_listener_holds(transport: tidings.Transport) -> None:
    n = tidings.Notifier(transport, "p", topics=["q"])
    for i in range(50):
        n.info({}, "e", {"id": str(i)})
    listener = RawListener(transport.listen([Binding("openstack", "q.info")], prefetch=7), 7)
    held = list(listener.poll(0.5))
    assert len(held) == 7
    assert list(listener.poll(0.05)) == []
    held[0].ack()
    assert held[0].ack() is False and held[0].requeue() is False  # second settlement: no-op
    more = list(listener.poll(0.5))
    assert len(more) == 1
    listener.close()


def test_envelopes_round_trip() -> None:
    msg = pack_context({"message_id": "m", "priority": "INFO", "payload": {"ü": "✓"}},
                       {"user": "u"})
    v2 = encode(msg, 2.0)
    assert b'"oslo.version": "2.0"' in v2
    assert decode(v2) == msg
    assert decode(encode(msg, 1.0)) == msg
