"""BackgroundNotifier while the broker is unreachable: close(timeout) returns on time even with
a full queue, and prepare() copies stay non-blocking BackgroundNotifiers sharing the queue.

The broker is a RabbitMQ URL on a port where nothing listens, so every send attempt fails and
the notifier retries forever (retry=None), which is what an outage looks like."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import tidings

UNREACHABLE = "rabbit://guest:guest@127.0.0.1:1/?retry_interval=0.05&retry_max_interval=0.1"


@pytest.fixture
def transport() -> Iterator[tidings.Transport]:
    pytest.importorskip("kombu")
    t = tidings.get_notification_transport(UNREACHABLE)
    yield t
    t.cleanup()  # ends the endless retry of the sending thread


def _wait_until(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    idle = threading.Event()
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        idle.wait(0.01)
    return False


def _in_thread(call: object, timeout: float) -> tuple[bool, list[object]]:
    """Run ``call`` in a daemon thread; (finished within timeout, [its result])."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)  # type: ignore[operator]
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), result


def test_close_returns_on_time_with_a_full_queue(transport: tidings.Transport) -> None:
    notifier = tidings.BackgroundNotifier(transport, "p", retry=None, queue_size=1,
                                          on_full="drop", pipeline=1)
    notifier.info({}, "e", {"n": 1})  # taken by the thread, which retries it forever
    assert _wait_until(lambda: notifier._queue.qsize() == 0)
    notifier.info({}, "e", {"n": 2})  # fills the queue
    notifier.info({}, "e", {"n": 3})  # dropped
    assert notifier._queue.full()
    began = time.monotonic()
    finished, result = _in_thread(lambda: notifier.close(timeout=1.0), timeout=10.0)
    assert finished, "close(timeout=1) blocked while the queue was full"
    assert result == [False]  # not flushed: the broker is away
    assert time.monotonic() - began < 5.0
    with pytest.raises(RuntimeError, match="closed"):
        notifier.info({}, "e", {"n": 4})
    assert notifier.stats.snapshot()["dropped"] == 1


def test_close_after_the_outage_ends_the_thread(transport: tidings.Transport) -> None:
    notifier = tidings.BackgroundNotifier(transport, "p", retry=None, queue_size=1,
                                          on_full="drop", pipeline=1)
    notifier.info({}, "e", {"n": 1})
    assert _wait_until(lambda: notifier._queue.qsize() == 0)
    notifier.info({}, "e", {"n": 2})
    finished, result = _in_thread(lambda: notifier.close(timeout=0.5), timeout=10.0)
    assert finished and result == [False]
    transport.cleanup()  # sends now fail at once: the thread drains the queue and ends
    notifier._thread.join(10.0)
    assert not notifier._thread.is_alive()
    assert notifier.pending() == 0


def test_prepare_keeps_a_background_notifier(transport: tidings.Transport) -> None:
    notifier = tidings.BackgroundNotifier(transport, "p", retry=None, queue_size=10)
    child = notifier.prepare(publisher_id="other")
    assert isinstance(child, tidings.BackgroundNotifier)
    assert child._queue is notifier._queue and child.stats is notifier.stats
    finished, _ = _in_thread(lambda: child.info({}, "e", {"n": 1}), timeout=5.0)
    assert finished, "a prepare()d copy blocked on the unreachable broker"
    assert notifier.pending() >= 1
    assert child.publisher_id == "other" and notifier.publisher_id == "p"
    notifier.close(timeout=0.2)
    with pytest.raises(RuntimeError, match="closed"):
        child.info({}, "e", {"n": 2})
