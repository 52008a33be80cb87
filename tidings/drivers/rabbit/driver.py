"""RabbitDriver: the ``rabbit://`` entry point, tying settings, publisher and listeners together.

The driver owns one publishing connection (shared by every send, confirmations pipelined), one
connection per listener (its poll thread is the only one that reads it), and one heartbeat
thread. Nothing connects until the first send or listen, so building a transport is cheap and
never fails for a broker that is still starting.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from tidings.drivers.rabbit.heartbeat import HeartbeatThread
from tidings.drivers.rabbit.link import LinkRefused
from tidings.drivers.rabbit.listener import RabbitListener
from tidings.drivers.rabbit.options import BASE_CAPABILITIES, OPTIONS, Settings
from tidings.drivers.rabbit.publisher import Publisher
from tidings.drivers.rabbit.topology import Topology
from tidings.transports.base import Binding, Driver, Listener, OutgoingMessage
from tidings.transports.errors import MessageDeliveryFailure
from tidings.transports.url import TransportURL

__all__ = ["RabbitDriver"]

DEFAULT_SEND_TIMEOUT = 30.0


class RabbitDriver(Driver):
    """RabbitMQ, wire-compatible with oslo.messaging's rabbit driver (see the package docs).

    ``capabilities`` is set per instance from the URL: ``durable`` needs ``durable=true`` (or
    quorum queues), ``dead_letter`` needs ``dead_letter_exchange``, and ``exchanges`` needs
    ``isolate_exchanges=true``, since oslo.messaging's queue names are shared across exchanges.
    """

    name = "rabbit"
    capabilities = BASE_CAPABILITIES
    options = OPTIONS

    def __init__(self, url: TransportURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        self.settings = Settings.from_url(url, self.conf)
        self.capabilities = self.settings.capabilities()
        self.topology = Topology(self.settings)
        self._publisher = Publisher(self.settings, self.topology)
        self._listeners: weakref.WeakSet[RabbitListener] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._heartbeats: HeartbeatThread | None = None
        self._publisher_beats = False
        if self.settings.heartbeat:
            self._heartbeats = HeartbeatThread(max(0.5, self.settings.heartbeat / 4.0))

    def send(self, message: OutgoingMessage, timeout: float | None = None) -> None:
        self._start_beats()
        try:
            self._publisher.send(message, DEFAULT_SEND_TIMEOUT if timeout is None else timeout)
        except LinkRefused as exc:
            # Credentials or permissions: waiting will not fix it, so the core must not retry.
            raise MessageDeliveryFailure(str(exc)) from exc

    def send_many(self, messages: Sequence[OutgoingMessage],
                  timeout: float | None = None) -> list[BaseException | None]:
        """Publish them all, then wait for the confirmations together (pipelined)."""
        self._start_beats()
        results = self._publisher.send_many(
            messages, DEFAULT_SEND_TIMEOUT if timeout is None else timeout)
        return [MessageDeliveryFailure(str(exc)) if isinstance(exc, LinkRefused) else exc
                for exc in results]

    def _start_beats(self) -> None:
        if not self._publisher_beats and self._heartbeats is not None:
            self._heartbeats.add(self._publisher)
            self._publisher_beats = True

    def listen(self, bindings: Sequence[Binding], pool: str | None,
               prefetch: int) -> Listener:
        plan = self.topology.plan(bindings, pool)
        label = f"pool {pool!r}" if pool is not None else "group"
        listener = RabbitListener(self.settings, self.topology, plan, prefetch, label)
        with self._lock:
            self._listeners.add(listener)
        if self._heartbeats is not None:
            self._heartbeats.add(listener)
        return listener

    def cleanup(self) -> None:
        """Close the publishing connection and stop heartbeats. Running listeners keep their
        own connections until their poll loops close them (the core stops those)."""
        self._publisher.close()
        if self._heartbeats is not None:
            self._heartbeats.stop()
