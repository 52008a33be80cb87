"""One thread per driver that keeps its idle connections alive with AMQP heartbeats.

Heartbeats must go out while nobody else uses a connection: a publisher between sends, or a
listener whose endpoint takes minutes on one message (its poll loop is not polling then). Without
them RabbitMQ closes the connection after two missed intervals and the listener's unacknowledged
messages are redelivered to someone else while it is still working on them. oslo.messaging runs a
heartbeat thread per connection; one thread per driver, waking every ``heartbeat / 4`` seconds, is
enough, since each member only does work when its connection has been quiet.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Protocol

__all__ = ["Beating", "HeartbeatThread"]

LOG = logging.getLogger("tidings.drivers.rabbit")


class Beating(Protocol):
    def beat(self) -> None:
        """Send a heartbeat if the connection has been quiet; never block for long."""


class HeartbeatThread:
    """Calls ``beat()`` on every registered member every ``interval`` seconds until stopped."""

    def __init__(self, interval: float, name: str = "tidings-rabbit-heartbeat") -> None:
        self._interval = interval
        self._name = name
        self._members: weakref.WeakSet[Beating] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, member: Beating) -> None:
        with self._lock:
            self._members.add(member)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def discard(self, member: Beating) -> None:
        with self._lock:
            self._members.discard(member)

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                members = list(self._members)
            for member in members:
                try:
                    member.beat()
                except Exception:
                    LOG.debug("heartbeat for %r failed", member, exc_info=True)
