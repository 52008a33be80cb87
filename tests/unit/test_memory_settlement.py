"""memory:// as the core drives it: settlements arrive in batches on the poll thread (one
broker-lock acquisition for the lot). These pin down what is observable: the prefetch window
refills, acked messages are never redelivered, unsettled ones come back in order, a settlement
made on another thread ends a blocked receive at once."""

from __future__ import annotations

import threading
import time

import tidings
from tidings import Target
from tidings.testing.conformance_harness import RawListener
from tidings.transports.base import Binding
from tidings.transports.envelope import decode

WAIT = 5.0


def _send(transport: tidings.Transport, count: int) -> None:
    notifier = tidings.Notifier(transport, "p", topics=["s"])
    for i in range(count):
        notifier.info({}, "e", {"i": i})


def _ids(messages: list[tidings.transports.base.IncomingMessage]) -> list[int]:
    return [decode(m.body)["payload"]["i"] for m in messages]


BINDING = [Binding("openstack", "s.info")]


def _listen(transport: tidings.Transport, prefetch: int) -> RawListener:
    return RawListener(transport.listen(BINDING, None, prefetch), prefetch)


def test_acks_in_the_polling_thread_refill_the_prefetch_window(
        transport: tidings.Transport) -> None:
    _send(transport, 5)
    listener = _listen(transport, 2)
    try:
        seen: list[int] = []
        while len(seen) < 5:
            got = listener.poll(WAIT)
            assert got, f"window never refilled after {seen}"
            assert len(got) <= 2
            seen += _ids(list(got))
            for m in got:
                assert m.ack()
        assert seen == [0, 1, 2, 3, 4]
        assert listener.poll(0.05) == []
    finally:
        listener.close()


def test_close_drops_acked_and_requeues_the_rest_in_order(transport: tidings.Transport) -> None:
    _send(transport, 4)
    first = _listen(transport, 4)
    got = list(first.poll(WAIT))
    assert _ids(got) == [0, 1, 2, 3]
    assert got[0].ack() and got[2].reject()  # noted for the next poll, which never comes
    first.close()
    assert got[1].settled == "requeue" and got[3].settled == "requeue"
    assert not got[1].ack()  # settled by close(): a late ack is a no-op
    second = _listen(transport, 4)
    try:
        again = list(second.poll(WAIT))
        assert _ids(again) == [1, 3] and all(m.redelivered for m in again)
        assert second.poll(0.05) == []
    finally:
        second.close()


def test_interrupt_ends_a_blocked_receive(transport: tidings.Transport) -> None:
    receiver = transport.listen(BINDING, None, 1)
    try:
        waker = threading.Timer(0.2, receiver.interrupt)
        waker.start()
        began = time.monotonic()
        assert list(receiver.receive(1, WAIT)) == []
        assert time.monotonic() - began < WAIT / 2
        waker.join(WAIT)
    finally:
        receiver.close()


def test_an_ack_from_another_thread_refills_a_full_window_at_once(
        transport: tidings.Transport) -> None:
    """prefetch=1, handlers on workers, each message acked 0.2 s later by another thread: the
    consumer, waiting for room, takes the next message as soon as the ack is made, not a poll
    timeout later."""
    _send(transport, 3)
    acked: list[float] = []
    done = threading.Event()

    def handle(messages: list[tidings.transports.base.IncomingMessage]) -> None:
        for m in messages:
            def ack(m: tidings.transports.base.IncomingMessage = m) -> None:
                acked.append(time.monotonic())
                m.ack()
                if len(acked) == 3:
                    done.set()
            threading.Timer(0.2, ack).start()

    consumer = transport.consumer(BINDING, None, handle, name="t-refill", prefetch=1, workers=2)
    consumer.settle_interval = WAIT  # only a wake-up can make this fast
    consumer.poll_interval = WAIT
    began = time.monotonic()
    consumer.start()
    try:
        assert done.wait(WAIT * 2)
        assert acked[-1] - began < WAIT / 2, f"acks at {[t - began for t in acked]}"
    finally:
        consumer.stop()
        assert consumer.wait(WAIT * 2)


def test_a_running_listener_acks_everything_once(transport: tidings.Transport) -> None:
    class Counter:
        def __init__(self) -> None:
            self.n = 0
            self.done = threading.Event()

        def info(self, *args: object) -> None:
            self.n += 1
            if self.n == 500:
                self.done.set()

    counter = Counter()
    listener = tidings.get_notification_listener(transport, [Target(topic="s")], [counter],
                                                 prefetch=8)
    listener.start()
    _send(transport, 500)
    assert counter.done.wait(WAIT)
    listener.stop()
    assert listener.wait(WAIT)
    assert listener.stats.snapshot()["acknowledged"] == 500
    second = _listen(transport, 8)
    try:
        assert second.poll(0.05) == []  # nothing was left unsettled
    finally:
        second.close()

