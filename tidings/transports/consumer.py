"""The one poll loop behind every consumer: notification listeners and join_consumer_pool.

It owns the listener's lifecycle (start, stop, wait, restart) and batching, so both public
consumers behave the same and no driver runs a loop of its own. Every driver call for one
listener (poll, settlements done inline, close) comes from this loop's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from tidings.transports.base import IncomingMessage, Listener
from tidings.transports.errors import ListenerLifecycleError
from tidings.transports.stats import ConsumerStats

__all__ = ["PollLoop"]

LOG = logging.getLogger(__name__)

Handler = Callable[[list[IncomingMessage]], None]


class PollLoop:
    """Polls a driver listener in a thread and hands messages to ``handle`` in order.

    ``handle`` gets each poll's messages (or, with ``batch_size``, lists of at most that many,
    flushed early after ``batch_timeout`` seconds) and must settle every message it gets.
    Messages received but not yet handed over when the loop stops stay unsettled, so the
    driver's ``close()`` returns them to the broker: nothing unacknowledged is lost.
    """

    poll_interval = 0.2

    def __init__(self, open_listener: Callable[[], Listener], handle: Handler, *, name: str,
                 batch_size: int | None = None, batch_timeout: float | None = None,
                 stats: ConsumerStats | None = None) -> None:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None")
        if batch_timeout is not None and batch_timeout <= 0:
            raise ValueError(f"batch_timeout={batch_timeout!r} must be positive seconds or None")
        self._open = open_listener
        self._handle = handle
        self._name = name
        self._batch_size = batch_size
        self._batch_timeout = batch_timeout
        self.stats = stats or ConsumerStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._stopped.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stop.is_set()

    def start(self) -> bool:
        """Open the driver listener and start polling. A second start() is a no-op (False)."""
        with self._lock:
            if self.running:
                LOG.debug("%s: start() while running is ignored", self._name)
                return False
            previous = self._thread
        if previous is not None:  # restart after stop(): let the old loop finish first
            previous.join()
        with self._lock:
            if self.running:
                return False
            listener = self._open()  # raises here, in the caller, if the broker is unreachable
            self._stop.clear()
            self._stopped.clear()
            self._thread = threading.Thread(target=self._run, args=(listener,),
                                            name=self._name, daemon=True)
            self._thread.start()
            return True

    def stop(self) -> None:
        """Ask the loop to stop after the message being handled; returns at once."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the loop has stopped and its listener is closed.

        Returns True once stopped; False if ``timeout`` passed first (for instance wait()
        before stop(): the loop keeps running until someone stops it).
        """
        thread = self._thread
        if thread is None:
            return True
        if thread is threading.current_thread():
            raise ListenerLifecycleError("wait() called from an endpoint of the same listener "
                                         "would wait forever; call stop() only")
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self, listener: Listener) -> None:
        pending: list[IncomingMessage] = []
        first_at = 0.0
        failures = 0
        try:
            while not self._stop.is_set():
                timeout = self.poll_interval
                if pending and self._batch_timeout is not None:
                    timeout = max(0.0, min(timeout, first_at + self._batch_timeout
                                           - time.monotonic()))
                try:
                    got: Sequence[IncomingMessage] = listener.poll(timeout)
                    failures = 0
                except Exception:
                    failures += 1
                    LOG.exception("%s: poll failed (%d in a row); retrying", self._name, failures)
                    self._stop.wait(min(5.0, 0.1 * 2 ** min(failures, 6)))
                    continue
                if got:
                    self.stats.received(len(got))
                if self._batch_size is None and self._batch_timeout is None:
                    if got:
                        self._deliver(list(got))
                    continue
                if got:
                    if not pending:
                        first_at = time.monotonic()
                    pending.extend(got)
                size = self._batch_size or len(pending) or 1
                while len(pending) >= size and not self._stop.is_set():
                    batch, pending = pending[:size], pending[size:]
                    first_at = time.monotonic()
                    self._deliver(batch)
                if (pending and self._batch_timeout is not None
                        and time.monotonic() - first_at >= self._batch_timeout):
                    batch, pending = pending, []
                    self._deliver(batch)
        finally:
            try:
                listener.close()  # pending and unsettled messages go back to the broker
            except Exception:
                LOG.exception("%s: closing the driver listener failed", self._name)
            self._stopped.set()

    def _deliver(self, messages: list[IncomingMessage]) -> None:
        try:
            self._handle(messages)
        except Exception:
            # The handler settles its messages; if it broke, reject what is left rather than
            # leave them in limbo, and log each id so nothing goes unexplained.
            LOG.exception("%s: handler failed", self._name)
            for msg in messages:
                if msg.settled is None and msg.reject():
                    LOG.error("%s: rejected message %s after a handler failure", self._name,
                              msg.message_id)
                    self.stats.settled("reject")
