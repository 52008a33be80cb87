"""memory:// settles acks made in the polling thread at its next poll() (one broker-lock
acquisition for the lot); these pin down that nothing observable changes: the prefetch window
refills, acked messages are never redelivered, unsettled ones come back in order."""

from __future__ import annotations

import threading
import time

import tidings
from tidings import Target
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


def test_acks_in_the_polling_thread_refill_the_prefetch_window(
        transport: tidings.Transport) -> None:
    _send(transport, 5)
    listener = transport.listen(BINDING, None, prefetch=2)
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
    first = transport.listen(BINDING, None, prefetch=4)
    got = list(first.poll(WAIT))
    assert _ids(got) == [0, 1, 2, 3]
    assert got[0].ack() and got[2].reject()  # noted for the next poll, which never comes
    first.close()
    assert got[1].settled == "requeue" and got[3].settled == "requeue"
    assert not got[1].ack()  # settled by close(): a late ack is a no-op
    second = transport.listen(BINDING, None, prefetch=4)
    try:
        again = list(second.poll(WAIT))
        assert _ids(again) == [1, 3] and all(m.redelivered for m in again)
        assert second.poll(0.05) == []
    finally:
        second.close()


def test_an_ack_from_another_thread_wakes_a_blocked_poll(transport: tidings.Transport) -> None:
    """Outside the polling thread an ack is applied at once: a poll() blocked on a full window
    gets the next message when another thread acks, without waiting out its timeout."""
    _send(transport, 2)
    listener = transport.listen(BINDING, None, prefetch=1)
    try:
        first = list(listener.poll(WAIT))
        assert _ids(first) == [0]
        acker = threading.Timer(0.2, first[0].ack)  # fires while the poll below is blocked
        acker.start()
        began = time.monotonic()
        second = list(listener.poll(WAIT))
        assert _ids(second) == [1]
        assert time.monotonic() - began < WAIT / 2
        acker.join(WAIT)
    finally:
        listener.close()


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
    listener = tidings.get_notification_listener(transport, [Target("s")], [counter],
                                                 prefetch=8)
    listener.start()
    _send(transport, 500)
    assert counter.done.wait(WAIT)
    listener.stop()
    assert listener.wait(WAIT)
    assert listener.stats.snapshot()["acknowledged"] == 500
    second = transport.listen(BINDING, None, prefetch=8)
    try:
        assert second.poll(0.05) == []  # nothing was left unsettled
    finally:
        second.close()

