"""The one thread that touches proton: a Container run in a daemon thread, fed by a call queue.

Proton's engine objects (connections, sessions, links, deliveries) are not thread-safe, while the
driver is called from every thread the application has: notifier threads sending, listener poll
threads, executors acknowledging. So every proton call happens here, in the loop thread, and other
threads hand work over with :meth:`EventLoop.call`. A call appends to a list and, only when the
list was empty, writes one byte to a pipe the Container selects on, so a burst of sends or
acknowledgements costs one wake-up, not one per message.

The other direction is batched too: work the loop thread completes for other threads (a send
confirmed, messages for a listener) is announced with :meth:`EventLoop.after_cycle` once the
current I/O cycle is over, not event by event. Waking a thread while the loop is mid-cycle makes
the two fight over the GIL, which proton's C calls release and retake many times per message:
announcing once per cycle keeps the other threads asleep while the loop works.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from proton import Connection, Handler
from proton.reactor import Container

from tidings.transports.errors import TransportUnreachable

__all__ = ["EventLoop"]

LOG = logging.getLogger(__name__)

Call = Callable[[], None]
Abort = Callable[[str], None]


class _Waker:
    """A pipe the Container selects on, so other threads can interrupt its select()."""

    _transport = None  # proton's IO handler looks for this attribute on every selectable

    def __init__(self) -> None:
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._lock = threading.Lock()  # so no write can hit a closed (maybe reused) fd
        self._closed = False

    def fileno(self) -> int:
        return self._rfd

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._wfd, b"!")
            except BlockingIOError:  # the pipe is full: a wake-up is pending anyway
                pass

    def on_selectable_init(self, event: Any) -> None:
        sel = event.context
        sel.reading = True
        sel.update()

    def on_selectable_readable(self, event: Any) -> None:
        try:
            while os.read(self._rfd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._rfd, self._wfd):
                try:
                    os.close(fd)
                except OSError:
                    pass


class _LoopHandler(Handler):
    """The Container's own handler: just before each select(), run the calls other threads
    queued and announce what this cycle completed."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop

    def on_reactor_quiesced(self, event: Any) -> None:
        self.loop._before_select()


class EventLoop:
    """A proton Container in a daemon thread, with a thread-safe way to run code in it.

    ``call(fn, abort)`` runs ``fn()`` in the loop thread; if the loop stops before running it,
    ``abort(reason)`` is called instead (from the stopping thread), so nobody waits forever for
    work that will never happen. ``on_stop`` callbacks run in the loop thread as it ends, so that
    connection owners can fail what they had in flight.
    """

    def __init__(self, name: str = "tidings-amqp1-io") -> None:
        self._lock = threading.Lock()
        self._calls: list[tuple[Call, Abort | None]] = []
        self._wake_pending = False
        self._waker = _Waker()
        self._alive = True
        self._stopping = False
        self._stop_deadline = 0.0
        self._on_stop: dict[int, Callable[[str], None]] = {}
        self._connections: set[Connection] = set()
        self._after_cycle: dict[int, Callable[[], None]] = {}
        self.container: Container | None = None
        self.container_id = f"tidings-{uuid.uuid4().hex[:12]}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._alive

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Call, abort: Abort | None = None) -> None:
        """Run ``fn`` in the loop thread soon. Raises TransportUnreachable if the loop ended."""
        with self._lock:
            if not self._alive or self._stopping:
                raise TransportUnreachable("the AMQP 1.0 driver's I/O thread has stopped; "
                                           "build a new transport")
            self._calls.append((fn, abort))
            if self._wake_pending:
                return
            self._wake_pending = True
        self._waker.wake()

    def add_stop_callback(self, key: int, fn: Callable[[str], None]) -> None:
        """Call ``fn(reason)`` in the loop thread when the loop ends; one per ``key``."""
        self._on_stop[key] = fn

    def remove_stop_callback(self, key: int) -> None:
        self._on_stop.pop(key, None)

    def after_cycle(self, key: int, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the current I/O cycle is over (loop thread only); one per ``key``."""
        self._after_cycle[key] = fn

    # -- connections, so that stop() can close them ------------------------------------------
    def track(self, conn: Connection) -> None:
        self._connections.add(conn)

    def untrack(self, conn: Connection) -> None:
        self._connections.discard(conn)

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        reason = "the I/O thread stopped"
        try:
            container = Container(_LoopHandler(self))
            container.container_id = self.container_id
            container.timeout = 0.5  # longest select(), so a stop deadline is noticed
            self.container = container
            container.selectable(self._waker)
            container.start()
            while True:
                if self._stopping:
                    if not self._connections or time.monotonic() > self._stop_deadline:
                        break
                if not container.process():
                    break
        except BaseException:
            LOG.exception("the AMQP 1.0 driver's I/O thread failed; in-flight sends fail and "
                          "listeners reconnect on a new thread")
            reason = "the I/O thread failed (see the logged traceback)"
        finally:
            with self._lock:
                self._alive = False
                leftover, self._calls = self._calls, []
            for fn in list(self._on_stop.values()):
                try:
                    fn(reason)
                except Exception:
                    LOG.exception("AMQP 1.0 I/O thread: a stop callback failed")
            for _, abort in leftover:
                if abort is not None:
                    try:
                        abort(reason)
                    except Exception:
                        LOG.exception("AMQP 1.0 I/O thread: an abort callback failed")
            self._waker.close()

    def _before_select(self) -> None:
        self._drain()
        if self._after_cycle:
            self._run_after_cycle()

    def _run_after_cycle(self) -> None:
        hooks = list(self._after_cycle.values())
        self._after_cycle.clear()
        for fn in hooks:
            try:
                fn()
            except Exception:
                LOG.exception("AMQP 1.0 I/O thread: an end-of-cycle task failed")

    def _drain(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            self._wake_pending = False
        for fn, _ in calls:
            try:
                fn()
            except Exception:
                LOG.exception("AMQP 1.0 I/O thread: a task failed")

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection (up to ``timeout`` seconds for their close handshakes) and
        end the thread. Safe to call twice and from any thread but the loop's own."""

        def begin() -> None:
            self._stopping = True
            self._stop_deadline = time.monotonic() + max(0.0, timeout - 0.5)
            for conn in list(self._connections):
                try:
                    conn.close()
                except Exception:
                    LOG.debug("closing a connection at stop failed", exc_info=True)

        try:
            self.call(begin)
        except TransportUnreachable:
            return
        if not self.in_loop():
            self._thread.join(timeout)
            if self._thread.is_alive():
                LOG.warning("the AMQP 1.0 driver's I/O thread did not end within %.1fs; "
                            "leaving it to finish in the background", timeout)
