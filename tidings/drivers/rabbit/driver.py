"""RabbitDriver: the ``rabbit://`` entry point. It owns one publishing connection (shared by
every send, confirmations pipelined), one connection per receiver and one heartbeat thread.
Nothing connects until the first send or listen, so building a transport never fails for a
broker that is still starting.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from tidings.drivers._rabbitmq.connecting import Connecting
from tidings.drivers.rabbit.link import LinkRefused
from tidings.drivers.rabbit.listener import RabbitReceiver
from tidings.drivers.rabbit.options import BASE_CAPABILITIES, OPTIONS, Settings, Topology
from tidings.drivers.rabbit.publisher import Publisher
from tidings.transports.base import Binding, Driver, OutgoingMessage, Receiver
from tidings.transports.errors import TransportUnreachable
from tidings.transports.url import TransportURL

__all__ = ["RabbitDriver"]

LOG = logging.getLogger("tidings.drivers.rabbit")


class RabbitDriver(Driver):
    """RabbitMQ, wire-compatible with oslo.messaging. ``capabilities`` follow the URL:
    ``durable`` needs ``durable=true`` (or quorum queues), ``dead_letter`` needs
    ``dead_letter_exchange``, and ``exchanges`` needs ``isolate_exchanges=true``."""

    name = "rabbit"
    capabilities = BASE_CAPABILITIES
    options = OPTIONS

    def __init__(self, url: TransportURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        self.settings = Settings.from_url(url, self.conf)
        self.capabilities = self.settings.queues.capabilities(BASE_CAPABILITIES)
        self.topology = Topology(self.settings)
        self._connecting = Connecting()  # cleanup() ends the connects in progress
        self._publisher = Publisher(self.settings, self.topology, self._connecting)
        self._next_host = 0  # a receiver starts at the host the last one reached (failover)
        self._beating: weakref.WeakSet[Any] = weakref.WeakSet([self._publisher])
        self._beats: threading.Thread | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    def send_batch(self, messages: Sequence[OutgoingMessage],
                   timeout: float | None) -> list[BaseException | None]:
        """Publish them all, then wait for the confirmations together (pipelined)."""
        if self._beats is None:
            self._keep_alive()
        return self._publisher.send_batch(messages, 30.0 if timeout is None else timeout)

    def retryable(self, exc: BaseException) -> bool:
        # A refused login or missing permissions: waiting will not fix it.
        return isinstance(exc, TransportUnreachable) and not isinstance(exc, LinkRefused)

    def listen(self, bindings: Sequence[Binding], pool: str | None,
               prefetch: int) -> Receiver:
        label = f"pool {pool!r}" if pool is not None else "group"
        receiver = RabbitReceiver(self.settings, self.topology,
                                  self.topology.model.plan(bindings, pool), prefetch, label,
                                  self._next_host, self.max_message_size, self._connecting)
        self._next_host = receiver.host_index
        self._keep_alive(receiver)
        return receiver

    def cleanup(self) -> None:
        """Close the publishing connection and stop heartbeats. Receivers keep their own
        connections until the core closes them; connects in progress end at once."""
        self._connecting.abort()
        self._publisher.close()
        self._stopped.set()
        if self._beats is not None and self._beats is not threading.current_thread():
            self._beats.join(5.0)

    # -- heartbeats: they must go out while nobody uses a connection, a publisher between sends
    # or a receiver whose handler takes minutes (its poll thread is not reading); else RabbitMQ
    # closes it after two missed intervals and hands the receiver's unacknowledged messages to
    # someone else while it is still working on them. One thread per driver is enough.
    def _keep_alive(self, member: Any = None) -> None:
        if not self.settings.heartbeat:
            return
        with self._lock:
            if member is not None:
                self._beating.add(member)
            if self._beats is None and not self._stopped.is_set():
                self._beats = threading.Thread(target=self._beat, daemon=True,
                                               name="tidings-rabbit-heartbeat")
                self._beats.start()

    def _beat(self) -> None:
        while not self._stopped.wait(max(0.5, self.settings.heartbeat / 4.0)):
            with self._lock:
                members = list(self._beating)
            for member in members:
                try:
                    member.beat()
                except Exception:
                    LOG.debug("heartbeat for %r failed", member, exc_info=True)
