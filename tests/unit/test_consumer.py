"""The core consumer's own logic, against a scripted receiver: reconnecting with backoff after a
lost connection, forgetting what the lost connection delivered, isolating a delivery the driver
could not unwrap, returning unsettled messages on close, and the worker pool's bounds."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

import pytest

from tidings.transports.base import ACK, REJECT, REQUEUE, IncomingMessage, Outcome, Receiver
from tidings.transports.consumer import Consumer
from tidings.transports.errors import TransportUnreachable
from tidings.transports.workers import WorkerPool

WAIT = 5.0


class Scripted(Receiver):
    """Hands out what the test queues; records settlements; can be told to fail once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: deque[IncomingMessage] = deque()
        self.settled: list[tuple[str, str]] = []
        self.asked: list[int] = []
        self.fail_next = False
        self.closed = threading.Event()
        self.lock = threading.Lock()

    def put(self, *keys: str, problem: str | None = None) -> None:
        for key in keys:
            msg = IncomingMessage(key.encode(), key, token=self.name)
            msg.problem = problem
            with self.lock:
                self.queue.append(msg)

    def receive(self, max_messages: int, timeout: float) -> Sequence[IncomingMessage]:
        self.asked.append(max_messages)
        if self.fail_next:
            self.fail_next = False
            raise TransportUnreachable(f"{self.name}: connection reset")
        with self.lock:
            out = [self.queue.popleft() for _ in range(min(max_messages, len(self.queue)))]
        if not out:
            time.sleep(min(timeout, 0.01))
        return out

    def settle(self, outcomes: Sequence[Outcome]) -> None:
        for msg, how in outcomes:
            assert msg.token == self.name, "a settlement reached the wrong connection"
            self.settled.append((msg.message_id or "", how))

    def close(self) -> None:
        self.closed.set()


def _wait_until(check: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_lost_connection_is_reopened_and_its_messages_forgotten(
        caplog: pytest.LogCaptureFixture) -> None:
    receivers = [Scripted("first"), Scripted("second")]
    opened: list[Scripted] = []
    held_back = threading.Event()
    handled: list[IncomingMessage] = []

    def open_receiver() -> Receiver:
        r = receivers[len(opened)]
        opened.append(r)
        return r

    def handle(messages: list[IncomingMessage]) -> None:
        for m in messages:
            handled.append(m)
            if m.message_id == "a":
                continue  # settled later, after its connection is gone
            m.ack()
        held_back.set()

    consumer = Consumer(open_receiver, handle, name="t-reconnect", prefetch=8,
                        backoff=(0.01, 0.05))
    receivers[0].put("a", "b")
    consumer.start()
    try:
        assert held_back.wait(WAIT)
        _wait_until(lambda: ("b", ACK) in receivers[0].settled, "b's ack")
        receivers[0].fail_next = True
        _wait_until(lambda: len(opened) == 2, "a new connection")
        assert receivers[0].closed.is_set()
        # "a" belonged to the lost connection: its late ack is dropped, never sent to the new
        # connection (where its delivery tag would mean another message).
        next(m for m in handled if m.message_id == "a").ack()
        receivers[1].put("c")
        _wait_until(lambda: ("c", ACK) in receivers[1].settled, "c on the new connection")
        assert [k for k, _ in receivers[1].settled] == ["c"]
        assert consumer.stats.snapshot()["lost_with_connection"] == 1
    finally:
        consumer.stop()
        assert consumer.wait(WAIT)
    assert "lost its connection" in caplog.text


def test_reconnect_attempts_back_off_and_stop_ends_them() -> None:
    attempts: list[float] = []
    first = Scripted("first")
    first.fail_next = True

    def open_receiver() -> Receiver:
        if not attempts:
            attempts.append(time.monotonic())
            return first
        attempts.append(time.monotonic())
        raise TransportUnreachable("refused")

    consumer = Consumer(open_receiver, lambda ms: None, name="t-backoff", prefetch=1,
                        backoff=(0.02, 0.08))
    consumer.start()
    _wait_until(lambda: len(attempts) >= 6, "reconnect attempts")
    consumer.stop()
    assert consumer.wait(WAIT)
    gaps = [b - a for a, b in itertools.pairwise(attempts[1:])]
    assert gaps[0] >= 0.035, gaps  # 0.02 then 0.04: doubling
    assert all(g >= 0.075 for g in gaps[2:]), gaps  # capped at 0.08, never a hot loop


def test_a_delivery_the_driver_could_not_unwrap_is_rejected_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    r = Scripted("only")
    r.put("good-1")
    r.put("bad", problem="its headers are a list, not a mapping")
    r.put("good-2")
    got: list[str] = []
    done = threading.Event()

    def handle(messages: list[IncomingMessage]) -> None:
        for m in messages:
            got.append(m.message_id or "")
            m.ack()
        if len(got) == 2:
            done.set()

    consumer = Consumer(lambda: r, handle, name="t-problem", prefetch=8)
    with caplog.at_level(logging.ERROR):
        consumer.start()
        assert done.wait(WAIT)
        _wait_until(lambda: len(r.settled) == 3, "three settlements")
        consumer.stop()
        assert consumer.wait(WAIT)
    assert got == ["good-1", "good-2"]
    assert sorted(r.settled) == [("bad", REJECT), ("good-1", ACK), ("good-2", ACK)]
    assert "rejecting message bad: its headers are a list" in caplog.text


def test_close_returns_what_is_unsettled_and_never_asks_beyond_prefetch() -> None:
    r = Scripted("only")
    r.put(*[f"m{i}" for i in range(10)])
    started = threading.Event()

    def handle(messages: list[IncomingMessage]) -> None:
        started.set()  # takes the messages and never settles them

    consumer = Consumer(lambda: r, handle, name="t-close", prefetch=3)
    consumer.start()
    assert started.wait(WAIT)
    _wait_until(lambda: consumer.held == 3, "a full window")
    consumer.stop()
    assert consumer.wait(WAIT)
    assert r.closed.is_set()
    assert sorted(r.settled) == [("m0", REQUEUE), ("m1", REQUEUE), ("m2", REQUEUE)]
    assert max(r.asked) <= 3 and len(r.queue) == 7


def test_workers_run_handlers_concurrently_and_stop_waits_for_them() -> None:
    r = Scripted("only")
    r.put(*[f"m{i}" for i in range(6)])
    lock = threading.Lock()
    running = [0, 0]
    release = threading.Event()

    def handle(messages: list[IncomingMessage]) -> None:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        release.wait(WAIT)
        for m in messages:
            m.ack()
        with lock:
            running[0] -= 1

    consumer = Consumer(lambda: r, handle, name="t-workers", prefetch=4, workers=8)
    consumer.start()
    _wait_until(lambda: running[1] == 4, "four handlers at once")
    consumer.stop()
    assert not consumer.wait(0.2), "wait() returned while handlers were still running"
    release.set()
    assert consumer.wait(WAIT)
    assert running[1] == 4  # never more than prefetch, though the pool has 8 threads
    assert sorted(k for k, how in r.settled if how == ACK) == ["m0", "m1", "m2", "m3"]


def test_worker_pool_starts_threads_on_demand_and_refuses_a_bad_size() -> None:
    pool = WorkerPool(4, "t-pool")
    done = threading.Semaphore(0)
    for _ in range(10):
        pool.submit(lambda _: done.release(), None)
    for _ in range(10):
        assert done.acquire(timeout=WAIT)
    assert 1 <= pool.threads <= 4
    assert pool.stop(WAIT)
    with pytest.raises(ValueError, match="executor_thread_pool_size"):
        WorkerPool(0, "t-bad")


@pytest.mark.parametrize("workers", [0, 4])
def test_wait_from_a_handler_of_the_same_consumer_is_refused(workers: int) -> None:
    from tidings.transports.errors import ListenerLifecycleError

    r = Scripted("only")
    r.put("m0")
    outcome: list[BaseException | None] = []
    done = threading.Event()
    holder: dict[str, Consumer] = {}

    def handle(messages: list[IncomingMessage]) -> None:
        try:
            holder["c"].wait(0.1)
            outcome.append(None)
        except ListenerLifecycleError as exc:
            outcome.append(exc)
        for m in messages:
            m.ack()
        done.set()

    holder["c"] = consumer = Consumer(lambda: r, handle, name="t-same-name", prefetch=2,
                                      workers=workers)
    # Another consumer with the same name: its handlers may wait for the first one.
    other = Consumer(lambda: Scripted("other"), lambda ms: None, name="t-same-name",
                     prefetch=1)
    consumer.start()
    other.start()
    try:
        assert done.wait(WAIT)
        assert isinstance(outcome[0], ListenerLifecycleError)
        assert other.wait(0.01) is False  # not refused: a different consumer
    finally:
        consumer.stop()
        other.stop()
        assert consumer.wait(WAIT) and other.wait(WAIT)


def test_worker_pool_grows_for_slow_handlers_only_as_work_waits() -> None:
    """Handlers that wait (50 ms each) with work queued behind them: the pool doubles its
    threads each round instead of running them one after the other."""
    pool = WorkerPool(16, "t-grow")
    done = threading.Semaphore(0)

    def slow(_: object) -> None:
        threading.Event().wait(0.05)  # an endpoint waiting on a database
        done.release()

    began = time.monotonic()
    for _ in range(32):
        pool.submit(slow, None)
    for _ in range(32):
        assert done.acquire(timeout=WAIT)
    took = time.monotonic() - began
    assert pool.threads >= 8, pool.threads
    assert took < 32 * 0.05 / 2, f"{took:.2f}s: the slow handlers ran mostly one at a time"
    assert pool.stop(WAIT)
