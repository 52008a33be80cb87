"""``amqp://``: notifications over AMQP 1.0 (python-qpid-proton), on RabbitMQ's AMQP 1.0 plugin.

URL: ``amqp://user:pass@host:5672[,host2:5672]/vhost?options``; no host means localhost:5672,
no user means guest/guest. The virtual host is selected the way RabbitMQ 3.x's plugin reads it,
as ``vhost:<name>`` in the open frame's hostname.

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
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

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
from tidings.transports.errors import InvalidTransportOption, TransportUnreachable
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
        # durable and dead_letter likewise depend on options; see _capabilities().
        exchanges=False, at_least_once=True, durable=False, stores_without_listener=True,
        dead_letter=False, prefetch=True, confirmed_send=True)
    # Names and meanings follow the rabbit:// driver's options, so one URL's query carries over.
    options: Mapping[str, Option[Any]] = {
        "durable": Option(bool, False, "declare exchanges and queues durable (oslo.messaging's "
                                       "amqp_durable_queues); with persistent messages they "
                                       "survive a broker restart"),
        "queue_expiry": Option(float, 0.0, "delete a queue nobody has consumed for this many "
                                           "seconds (x-expires; 0: never), so the queues of "
                                           "pools that went away stop growing"),
        "message_ttl": Option(float, 0.0, "drop (or dead-letter) messages older than this many "
                                          "seconds (x-message-ttl; 0: keep them)"),
        "dead_letter_exchange": Option(str, "", "send rejected and expired messages to this "
                                                "exchange (x-dead-letter-exchange), declared as "
                                                "a durable fanout exchange with a queue of the "
                                                "same name, so they are kept"),
        "isolate_exchanges": Option(bool, False, "name queues after their exchange too, so a "
                                                 "listener on exchange A never sees exchange "
                                                 "B's messages on the same topic (not shared "
                                                 "with oslo.messaging, which names queues by "
                                                 "topic only)"),
        "topology": Option(str, "amqp091", "how queues and bindings are made (amqp091: "
                                           "declared over AMQP 0-9-1 on the same port, which "
                                           "RabbitMQ 3.x needs)", choices=tuple(TOPOLOGIES)),
        "connect_timeout": Option(float, 10.0, "seconds to open a connection and attach a "
                                               "listener's links before giving up"),
        "heartbeat": Option(float, 60.0, "AMQP 1.0 idle timeout in seconds, so a dead "
                                         "connection is noticed (0 disables it)"),
        "reconnect_interval": Option(float, 0.2, "first delay before a listener reconnects "
                                                 "after losing its connection, doubling each "
                                                 "failure"),
        "reconnect_max_interval": Option(float, 5.0, "longest delay between a listener's "
                                                     "reconnection attempts"),
    }

    def __init__(self, url: TransportURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        conf = self.conf
        for key in ("queue_expiry", "message_ttl", "heartbeat"):
            if conf[key] < 0:
                raise InvalidTransportOption(f"URL option {key}={conf[key]:g} must be 0 (off) "
                                             f"or a positive number of seconds")
        for key in ("connect_timeout", "reconnect_interval"):
            if conf[key] <= 0:
                raise InvalidTransportOption(f"URL option {key}={conf[key]:g} must be a "
                                             f"positive number of seconds")
        if conf["reconnect_max_interval"] < conf["reconnect_interval"]:
            raise InvalidTransportOption(
                f"reconnect_max_interval={conf['reconnect_max_interval']:g} must be at least "
                f"reconnect_interval={conf['reconnect_interval']:g}")
        hosts = tuple(BrokerHost(h.hostname or "localhost", h.port or DEFAULT_PORT,
                                 h.username, h.password) for h in url.hosts) \
            or (BrokerHost("localhost", DEFAULT_PORT),)
        vhost = url.virtual_host or "/"
        arguments: dict[str, Any] = {}
        if conf["queue_expiry"]:
            arguments["x-expires"] = max(1, int(conf["queue_expiry"] * 1000))
        if conf["message_ttl"]:
            arguments["x-message-ttl"] = max(0, int(conf["message_ttl"] * 1000))
        dlx = str(conf["dead_letter_exchange"] or "")
        if dlx:
            arguments["x-dead-letter-exchange"] = dlx
        self._connect_timeout = float(conf["connect_timeout"])
        self._reconnect = (float(conf["reconnect_interval"]),
                           float(conf["reconnect_max_interval"]))
        self._params = ConnectParams(hosts, vhost, heartbeat=float(conf["heartbeat"]))
        self._settings = TopologySettings(
            hosts, vhost, durable=bool(conf["durable"]), queue_arguments=arguments,
            dead_letter_exchange=dlx, isolate_exchanges=bool(conf["isolate_exchanges"]),
            connect_timeout=self._connect_timeout)
        self._topology: Topology = TOPOLOGIES[conf["topology"]](self._settings)
        self.capabilities = replace(  # type: ignore[misc]  # per instance, from the options
            type(self).capabilities, exchanges=self._settings.isolate_exchanges,
            durable=self._settings.durable, dead_letter=bool(dlx))
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
        address = self._topology.prepare_send(message.exchange, message.routing_key)
        pending = PendingSend(address, message)
        loop, side = self._sender()
        loop.call(lambda: side.submit(pending), abort=pending.finish)
        wait = timeout if timeout is not None else 30.0
        if not pending.wait(wait):
            pending.cancelled = True
            raise TransportUnreachable(
                f"message {message.message_id} to {address} was not confirmed by the broker "
                f"within {wait:g}s (it may still arrive); check the broker's health and alarms")
        if pending.error is not None:
            raise TransportUnreachable(f"message {message.message_id} to {address}: "
                                       f"{pending.error}")

    def listen(self, bindings: Sequence[Binding], pool: str | None,
               prefetch: int) -> Listener:
        plan_queues(self._settings.isolate_exchanges, bindings, pool)  # bad names fail here
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
