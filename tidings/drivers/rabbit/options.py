"""The ``rabbit://`` URL options, checked once into :class:`Settings` when the transport is
built (so a bad URL fails at start-up, not at the first send), the capabilities they imply, and
the exchanges and queues they shape (:class:`Topology`). Queue and TLS options are the family's
(:mod:`tidings.drivers._rabbitmq`, shared with ``amqp://``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kombu

from tidings.drivers._rabbitmq.hosts import broker_hosts
from tidings.drivers._rabbitmq.queues import QUEUE_OPTIONS, QueueModel, QueuePlan, seconds
from tidings.drivers._rabbitmq.tls import DEFAULT_TLS_PORT, TLS_OPTIONS, TLSSettings, tls_settings
from tidings.transports.base import Capabilities, Option
from tidings.transports.errors import InvalidTransportOption
from tidings.transports.url import TransportHost, TransportURL

__all__ = ["BASE_CAPABILITIES", "OPTIONS", "QueuePlan", "Settings", "Topology"]

DEFAULT_PORT = 5672

OPTIONS: dict[str, Option[Any]] = {
    "heartbeat": Option(int, 60, "AMQP heartbeat timeout in seconds (0 disables heartbeats); "
                                 "a dead peer is noticed after about this long"),
    "connect_timeout": Option(float, 5.0, "seconds to open one connection (TCP, TLS and AMQP "
                                          "handshakes) before trying the next host"),
    "quorum": Option(bool, False, "declare queues as quorum queues (x-queue-type=quorum, "
                                  "implies durable; oslo.messaging's rabbit_quorum_queue)"),
    "quorum_delivery_limit": Option(int, 0, "quorum queues only: drop or dead-letter a message "
                                            "after this many redeliveries (0: no limit)"),
    **QUEUE_OPTIONS,
    **TLS_OPTIONS,
}

BASE_CAPABILITIES = Capabilities(
    pools=True, requeue=True, requeue_to_other_member=True,
    # oslo.messaging names the no-pool group's queue after the routing key alone, so two
    # exchanges with the same topic share it; isolate_exchanges=true turns isolation on.
    exchanges=False,
    at_least_once=True, durable=False, stores_without_listener=True, dead_letter=False,
    prefetch=True, confirmed_send=True)


@dataclass(frozen=True)
class Settings:
    """Everything the driver's parts need, derived once from the URL and its options."""

    endpoints: tuple[TransportHost, ...]
    """The URL's hosts in failover order; without credentials a host logs in as guest."""
    virtual_host: str
    heartbeat: int
    connect_timeout: float
    quorum: bool
    queues: QueueModel
    ssl_options: dict[str, Any] | None
    """The TLS settings in kombu's form; None when TLS is off."""
    shown: str
    """The URL with passwords masked: what log lines and errors show."""
    tls: TLSSettings | None = None

    @classmethod
    def from_url(cls, url: TransportURL, options: Mapping[str, Any]) -> Settings:
        tls = tls_settings(url, options)  # ssl_* without ssl=true etc. fail here
        heartbeat = int(options["heartbeat"])
        if heartbeat < 0:
            raise InvalidTransportOption(f"URL option heartbeat={heartbeat} must be 0 (off) "
                                         f"or a positive number of seconds")
        connect_timeout = seconds(options, "connect_timeout", positive=True)
        limit = int(options["quorum_delivery_limit"])
        if limit < 0:
            raise InvalidTransportOption("URL option quorum_delivery_limit must be 0 (no "
                                         "limit) or a positive number of deliveries")
        quorum = bool(options["quorum"])
        if limit and not quorum:
            raise InvalidTransportOption("quorum_delivery_limit only applies to quorum queues; "
                                         "add quorum=true to the URL")
        arguments: dict[str, Any] = {}
        if quorum:
            arguments["x-queue-type"] = "quorum"
            if limit:
                arguments["x-delivery-limit"] = limit
        queues = QueueModel.from_options(options, arguments=arguments, durable=quorum)
        port = DEFAULT_TLS_PORT if tls is not None else DEFAULT_PORT
        return cls(endpoints=broker_hosts(url, port, guest=True),
                   virtual_host=url.virtual_host or "/", heartbeat=heartbeat,
                   connect_timeout=connect_timeout, quorum=quorum, queues=queues,
                   ssl_options=tls.ssl_options() if tls is not None else None,
                   shown=url.masked(), tls=tls)


class Topology:
    """Declares exchanges and queues as oslo.messaging 18 (``impl_rabbit``) does: ``topic``
    exchanges, durable only with ``durable`` (its ``amqp_durable_queues``) or quorum queues,
    never auto-deleted; queues named by the family's :class:`QueueModel`. Both libraries must
    use the same flags and arguments: RabbitMQ refuses (406) a declaration that differs."""

    def __init__(self, settings: Settings) -> None:
        self.model = settings.queues

    def queue(self, name: str) -> kombu.Queue:
        return kombu.Queue(name, durable=self.model.durable, auto_delete=False,
                           queue_arguments=dict(self.model.arguments) or None)

    def declare_exchange(self, channel: Any, name: str, passive: bool = False) -> None:
        kombu.Exchange(name, type="topic", durable=self.model.durable, auto_delete=False)(
            channel).declare(passive=passive)

    def declare_queue(self, channel: Any, name: str, passive: bool = False) -> None:
        self.queue(name)(channel).queue_declare(passive=passive)

    def bind(self, channel: Any, queue: str, exchange: str, routing_key: str) -> None:
        self.queue(queue)(channel).bind_to(exchange=exchange, routing_key=routing_key)

    def declare_dead_letter(self, channel: Any) -> None:
        """The dead-letter exchange (fanout, durable) and a queue of its name that keeps what
        arrives, so rejected messages are stored rather than silently dropped."""
        name = self.model.dead_letter_exchange
        if not name:
            return
        kombu.Exchange(name, type="fanout", durable=True, auto_delete=False)(channel).declare()
        q = kombu.Queue(name, durable=True, auto_delete=False)(channel)
        q.queue_declare()
        q.bind_to(exchange=name, routing_key="")
