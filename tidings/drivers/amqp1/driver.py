"""``amqp://``: notifications over AMQP 1.0 (python-qpid-proton), on RabbitMQ's AMQP 1.0 plugin.

URL: ``amqp://user:pass@host:5672[,host2:5672]/vhost?options``; no host means localhost:5672,
no user means guest/guest. The virtual host is selected the way RabbitMQ 3.x's plugin reads it,
as ``vhost:<name>`` in the open frame's hostname. ``ssl=true`` (and the other TLS options, shared
with ``rabbit://`` through :mod:`tidings.drivers._rabbitmq.tls`) connects with TLS, port 5671 by
default, for the AMQP 1.0 connections and the topology's AMQP 0-9-1 declares alike.

What the driver does, and where:

* sends (:mod:`.sending`): ``/exchange/<exchange>/<routing key>``, confirmed (``send()`` returns
  when the broker answers ``accepted``), pipelined across the threads that send at once;
* listeners (:mod:`.receiving`): ``/amq/queue/<queue>`` with credit bounded by prefetch,
  ``accepted`` / ``released`` / ``rejected`` for ack / requeue / reject, reconnect with backoff;
* topology (:mod:`.topology`): the exchange, queues and bindings AMQP 1.0 on RabbitMQ 3.x cannot
  declare, made by a replaceable strategy (AMQP 0-9-1 declares by default);
* one I/O thread (:mod:`.loop`) owns every proton object.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tidings.drivers._rabbitmq.queues import (
    QUEUE_OPTIONS,
    RECONNECT_OPTIONS,
    QueueModel,
    reconnect_backoff,
    seconds,
)
from tidings.drivers._rabbitmq.tls import DEFAULT_TLS_PORT, TLS_OPTIONS, tls_settings
from tidings.drivers.amqp1.connection import ConnectParams
from tidings.drivers.amqp1.loop import EventLoop
from tidings.drivers.amqp1.receiving import AMQP1Listener
from tidings.drivers.amqp1.sending import PendingSend, SendSide
from tidings.drivers.amqp1.topology import (
    TOPOLOGIES,
    BrokerHost,
    Topology,
    TopologySettings,
    plan_queues,
)
from tidings.transports.base import (
    Binding,
    Capabilities,
    Driver,
    Listener,
    Option,
    OutgoingMessage,
)
from tidings.transports.errors import TransportUnreachable
from tidings.transports.url import TransportURL

__all__ = ["AMQP1Driver"]

LOG = logging.getLogger(__name__)

DEFAULT_PORT = 5672


class AMQP1Driver(Driver):
    """AMQP 1.0 driver; see the module docstring, and docs/amqp1.md for the options."""

    name = "amqp"
    capabilities = Capabilities(
        pools=True, requeue=True, requeue_to_other_member=True,
        # oslo.messaging's queue names are per virtual host, so two exchanges with the same
        # routing key share a queue: exchanges are isolated only with isolate_exchanges=true.
        # durable and dead_letter likewise depend on options: set per instance in __init__.
        exchanges=False, at_least_once=True, durable=False, stores_without_listener=True,
        dead_letter=False, prefetch=True, confirmed_send=True)
    # Names and meanings follow the rabbit:// driver's options, so one URL's query carries over.
    options: Mapping[str, Option[Any]] = {
        **QUEUE_OPTIONS,
        "topology": Option(str, "amqp091", "how queues and bindings are made (amqp091: "
                                           "declared over AMQP 0-9-1 on the same port, which "
                                           "RabbitMQ 3.x needs)", choices=tuple(TOPOLOGIES)),
        "connect_timeout": Option(float, 10.0, "seconds to open a connection and attach a "
                                               "listener's links before giving up"),
        "heartbeat": Option(float, 60.0, "AMQP 1.0 idle timeout in seconds, so a dead "
                                         "connection is noticed (0 disables it)"),
        **RECONNECT_OPTIONS,
        **TLS_OPTIONS,
    }

    def __init__(self, url: TransportURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        conf = self.conf
        seconds(conf, "heartbeat")  # checked here: 0 (off) or positive
        self._connect_timeout = seconds(conf, "connect_timeout", positive=True)
        self._reconnect = reconnect_backoff(conf)
        tls = tls_settings(url, conf)  # ssl_* files without ssl=true etc. fail here
        port = DEFAULT_PORT if tls is None else DEFAULT_TLS_PORT
        hosts = tuple(BrokerHost(h.hostname or "localhost", h.port or port,
                                 h.username, h.password) for h in url.hosts) \
            or (BrokerHost("localhost", port),)
        vhost = url.virtual_host or "/"
        queues = QueueModel.from_options(conf)
        self._params = ConnectParams(hosts, vhost, heartbeat=float(conf["heartbeat"]), tls=tls)
        if tls is not None:
            # Files that cannot be loaded fail now, naming the option, not at every connect.
            tls.check_files()
            self._params.ssl_domain()
        self._settings = TopologySettings(hosts, vhost, queues=queues,
                                          connect_timeout=self._connect_timeout, tls=tls)
        self._topology: Topology = TOPOLOGIES[conf["topology"]](self._settings)
        # per instance, from the options: durable, dead_letter and exchanges depend on them
        self.capabilities = queues.capabilities(type(self).capabilities)  # type: ignore[misc]
        self._lock = threading.Lock()
        self._loop: EventLoop | None = None
        self._send_side: SendSide | None = None
        self._closed = threading.Event()

    # -- the I/O thread ---------------------------------------------------------------------
    def _loop_for_use(self) -> EventLoop:
        return self._sender()[0]

    def _sender(self) -> tuple[EventLoop, SendSide]:
        with self._lock:
            if self._closed.is_set():
                raise TransportUnreachable("the AMQP 1.0 driver was cleaned up")
            if self._loop is None or not self._loop.alive or self._send_side is None:
                loop = EventLoop()
                self._send_side = SendSide(loop, self._params, self._connect_timeout,
                                           self._topology.invalidate)
                self._loop = loop
            return self._loop, self._send_side

    # -- the contract -------------------------------------------------------------------------
    def send(self, message: OutgoingMessage, timeout: float | None = None) -> None:
        error = self.send_many([message], timeout)[0]
        if error is not None:
            raise error

    def send_many(self, messages: Sequence[OutgoingMessage],
                  timeout: float | None = None) -> list[BaseException | None]:
        """Hand every message to the I/O thread at once, then wait for their dispositions:
        they are all in flight on the connection together (pipelined)."""
        results: list[BaseException | None] = [None] * len(messages)
        pendings: list[tuple[int, PendingSend]] = []
        for i, message in enumerate(messages):
            try:
                address = self._topology.prepare_send(message.exchange, message.routing_key)
            except Exception as exc:
                results[i] = exc
            else:
                pendings.append((i, PendingSend(address, message)))
        if not pendings:
            return results
        def abort_all(reason: str | None = None) -> None:
            for _, pending in pendings:
                pending.finish(reason)

        try:
            loop, side = self._sender()

            def submit_all() -> None:
                for _, pending in pendings:
                    side.submit(pending)

            loop.call(submit_all, abort=abort_all)
        except TransportUnreachable as exc:
            for i, _ in pendings:
                results[i] = exc
            return results
        wait = timeout if timeout is not None else 30.0
        deadline = time.monotonic() + wait
        for i, pending in pendings:
            message = messages[i]
            if not pending.wait(max(0.0, deadline - time.monotonic())):
                pending.cancelled = True
                results[i] = TransportUnreachable(
                    f"message {message.message_id} to {pending.address} was not confirmed by "
                    f"the broker within {wait:g}s (it may still arrive); check the broker's "
                    f"health and alarms")
            elif pending.error is not None:
                results[i] = TransportUnreachable(f"message {message.message_id} to "
                                                  f"{pending.address}: {pending.error}")
        return results

    def listen(self, bindings: Sequence[Binding], pool: str | None,
               prefetch: int) -> Listener:
        plan_queues(self._settings.queues, bindings, pool)  # bad names fail here
        return AMQP1Listener(
            loop_for_use=self._loop_for_use, topology=self._topology, params=self._params,
            bindings=bindings, pool=pool, prefetch=prefetch,
            connect_timeout=self._connect_timeout, reconnect=self._reconnect,
            closed=self._closed)

    def cleanup(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            loop, side = self._loop, self._send_side
            self._loop = self._send_side = None
        if loop is not None:
            if side is not None:
                try:
                    loop.call(side.close)
                except TransportUnreachable:
                    pass
            loop.stop(timeout=min(5.0, self._connect_timeout))
        self._topology.close()
