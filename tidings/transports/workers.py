"""Where handlers run: inline on the poll thread, or on a bounded pool of worker threads.

oslo.messaging's ``threading`` executor runs each message's endpoints on a pool of up to
``executor_thread_pool_size`` (64) threads, so an endpoint that waits on a database does not
hold up the next message. The pool here does the same with less: threads start only when work
is waiting and every thread is busy, one queue feeds them, and the consumer never hands over more
than its prefetch, so the queue is bounded without a bound of its own.

``stop()`` drops the work that has not started (those messages stay unsettled, and the consumer
gives them back to the broker) and waits for the handlers that are running.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Inline", "WorkerPool"]

LOG = logging.getLogger(__name__)

Work = Callable[[Any], None]


class Inline:
    """Runs each piece of work at once, in the calling thread (oslo's ``blocking``)."""

    concurrent = False

    def submit(self, work: Work, arg: Any) -> None:
        work(arg)

    def stop(self, timeout: float | None = None) -> bool:
        return True

    def runs_in(self, thread: threading.Thread) -> bool:
        return False

    def nudge(self) -> bool:
        return False


class WorkerPool:
    """Up to ``size`` threads named ``name-N`` taking work from one queue.

    Threads are added only while work waits behind threads that are all busy with something
    slow (a handler that took over ``grow_after`` seconds, or none taken for that long): fast
    handlers then run on one or two threads without trading the GIL between dozens, while
    handlers that wait on I/O double their threads each round, up to ``size``.
    """

    concurrent = True
    grow_after = 0.002
    """Seconds a handler may run before the work queued behind it gets another thread."""

    def __init__(self, size: int, name: str) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"executor_thread_pool_size={size!r} must be a positive integer")
        self.size = size
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Work, Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work
        self._last_take = 0.0  # when a thread last took work
        self._stopping = False

    @property
    def threads(self) -> int:
        """How many worker threads exist now (they start on demand)."""
        return len(self._threads)

    def runs_in(self, thread: threading.Thread) -> bool:
        """Whether ``thread`` is one of this pool's workers."""
        return thread in self._threads

    def submit(self, work: Work, arg: Any) -> None:
        """Queue ``work(arg)``; start a thread if there is none, or if the busy ones are
        stuck (see the class docstring)."""
        self._queue.put((work, arg))
        if not self._idle:
            self.nudge()

    def nudge(self) -> bool:
        """Add a thread if work waits and no thread took any for ``grow_after`` seconds.
        True while work waits and the pool may still grow: call again soon."""
        with self._lock:
            if self._stopping or len(self._threads) >= self.size or not self._queue.qsize():
                return False
            if not self._threads or (not self._idle and time.monotonic() - self._last_take
                                     > self.grow_after):
                self._spawn()
            return True

    def _spawn(self) -> None:
        """Caller holds the lock."""
        thread = threading.Thread(target=self._run, name=f"{self._name}-{len(self._threads) + 1}",
                                  daemon=True)
        self._threads.append(thread)
        self._last_take = time.monotonic()  # the new thread takes work now
        thread.start()

    def _run(self) -> None:
        get, lock, clock = self._queue.get, self._lock, time.monotonic
        while True:
            with lock:
                self._idle += 1
            item = get()
            began = clock()
            with lock:
                self._idle -= 1
                self._last_take = began
            if item is None or self._stopping:
                return
            work, arg = item
            try:
                work(arg)
            except BaseException:  # the work settles its own messages; never lose the thread
                LOG.exception("%s: a handler escaped its error handling", self._name)
            if clock() - began > self.grow_after and self._queue.qsize():
                # Slow work, and more waits behind it: as many threads again (up to size and
                # to what waits), so a pool of slow handlers doubles each round.
                with lock:
                    more = min(self.size - len(self._threads), self._queue.qsize(),
                               len(self._threads))
                    for _ in range(0 if self._idle or self._stopping else more):
                        self._spawn()

    def stop(self, timeout: float | None = None) -> bool:
        """Drop queued work, wait up to ``timeout`` for running work; True if all finished."""
        with self._lock:
            self._stopping = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join(timeout)
        return not any(t.is_alive() for t in threads if t is not current)
