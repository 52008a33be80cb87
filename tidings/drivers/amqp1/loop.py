"""The one thread that touches proton: a Container run in a daemon thread, fed by a call queue.

Proton's engine objects are not thread-safe, while the driver is called from every thread the
application has. So every proton call happens in the loop thread; other threads hand work over
with :meth:`EventLoop.call`, which wakes the Container's select() only when its list of calls
was empty, so a burst of sends or settlements costs one wake-up, not one per message. The other
direction is batched too: what the loop thread completes for other threads (sends confirmed,
messages for a listener) is announced once the current I/O cycle is over (``after_cycle``), not
event by event: waking a thread mid-cycle makes the two fight over the GIL, which proton's C
calls release and retake many times per message.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from proton import Connection, Endpoint, Handler
from proton.reactor import ApplicationEvent, Container, EventInjector

from tidings.transports.errors import TransportUnreachable

__all__ = ["EventLoop"]

LOG = logging.getLogger(__name__)

Call = Callable[[], None]
Abort = Callable[[str], None]
_WAKE = ApplicationEvent("tidings_wake")  # nothing handles it: the wake-up is the point


class EventLoop(Handler):
    """A proton Container in a daemon thread (this is its handler), with a thread-safe way to
    run code in it.

    The attributes are the loop thread's: ``connections`` (stop() closes them),
    ``stop_callbacks`` (by key, each called with the reason as the loop ends, so connection
    owners fail what they had in flight) and ``after_cycle`` (by key, each run once the current
    I/O cycle is over).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[tuple[Call, Abort | None]] = []
        self._waker = EventInjector()  # a pipe the Container selects on: other threads wake it
        self.alive = True
        self._stopping = False
        self._stop_deadline = 0.0
        self.connections: set[Connection] = set()
        self.made: list[Connection] = []
        self.stop_callbacks: dict[int, Abort] = {}
        self.after_cycle: dict[int, Call] = {}
        self.container: Container | None = None
        self._thread = threading.Thread(target=self._run, name="tidings-amqp1-io", daemon=True)
        self._thread.start()

    def call(self, fn: Call, abort: Abort | None = None) -> None:
        """Run ``fn`` in the loop thread soon, or, if the loop stops first, ``abort(reason)``
        (so nobody waits forever). Raises TransportUnreachable if the loop has ended."""
        with self._lock:
            if not self.alive or self._stopping:
                raise TransportUnreachable("the AMQP 1.0 driver's I/O thread has stopped; "
                                           "build a new transport")
            self._calls.append((fn, abort))
            if len(self._calls) == 1:  # else a wake-up is already on its way
                # Under the lock, so never on a pipe the ending loop closed.
                self._waker.trigger(_WAKE)

    def _run(self) -> None:
        reason = "the I/O thread stopped"
        try:
            container = Container(self)
            container.container_id = f"tidings-{uuid.uuid4().hex[:12]}"
            container.timeout = 0.5  # longest select(), so a stop deadline is noticed
            self.container = container
            container.selectable(self._waker)
            container.start()
            while not (self._stopping and (not self.connections
                                           or time.monotonic() > self._stop_deadline)):
                if not container.process():
                    break
        except BaseException:
            LOG.exception("the AMQP 1.0 driver's I/O thread failed; in-flight sends fail and "
                          "listeners reconnect on a new thread")
            reason = "the I/O thread failed (see the logged traceback)"
        finally:
            with self._lock:
                self.alive = False
                leftover, self._calls = self._calls, []
                for fd in self._waker.pipe:
                    os.close(fd)
            callbacks = [*self.stop_callbacks.values(), *(a for _, a in leftover if a)]
            _release(self)
            for fn in callbacks:
                try:
                    fn(reason)
                except Exception:
                    LOG.exception("AMQP 1.0 I/O thread: a stop callback failed")

    def on_reactor_quiesced(self, event: Any) -> None:
        """Just before each select(): run the calls other threads queued, then announce what
        this cycle completed."""
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, _ in calls:
            _run_task(fn)
        if self.after_cycle:
            hooks = list(self.after_cycle.values())
            self.after_cycle.clear()
            for fn in hooks:
                _run_task(fn)

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection (up to ``timeout`` seconds for their close handshakes) and
        end the thread. Safe to call twice; not from the loop thread."""

        def begin() -> None:
            self._stopping = True
            self._stop_deadline = time.monotonic() + max(0.0, timeout - 0.5)
            for conn in list(self.connections):
                try:
                    conn.close()
                    transport = conn.transport
                    if transport is not None and not conn.state & Endpoint.REMOTE_ACTIVE:
                        # Never answered (still connecting): no close handshake to wait for.
                        transport.close_tail()
                        transport.close_head()
                except Exception:
                    LOG.debug("closing a connection at stop failed", exc_info=True)

        try:
            self.call(begin)
        except TransportUnreachable:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            LOG.warning("the AMQP 1.0 driver's I/O thread did not end within %.1fs; "
                        "leaving it to finish in the background", timeout)


def _release(loop: EventLoop) -> None:
    """Once the loop has ended, free what proton would keep for ever: python-qpid-proton keeps
    the Python attributes of a connection, session, link or transport (handlers, ours) in a
    dict reachable from a global set until the C object is freed, and they refer back to the
    wrappers that keep it alive: a cycle the garbage collector never sees, which kept each
    cleaned-up transport's Container, connections and buffers (about 1.6 MB a transport)."""
    container, loop.container, made, loop.made = loop.container, None, loop.made, []
    for table in (loop.connections, loop.stop_callbacks, loop.after_cycle):
        table.clear()
    for conn in made:
        try:
            ends: list[Any] = [conn, conn.transport]
            for end in (conn.session_head(0), conn.link_head(0)):
                while end is not None:
                    ends.append(end)
                    end = end.next(0)
            for end in ends:
                attrs = getattr(end, "__dict__", {}).get("_attrs")
                if isinstance(attrs, dict):
                    attrs.clear()
            if conn.transport is not None:
                conn.transport.unbind()
            conn.free()
        except Exception:
            LOG.debug("releasing a connection's proton objects failed", exc_info=True)
    if container is not None:
        container.stop_events()


def _run_task(fn: Call) -> None:
    try:
        fn()
    except Exception:
        LOG.exception("AMQP 1.0 I/O thread: a task failed")
