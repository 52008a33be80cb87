"""The ``rabbit://`` URL options, checked once into :class:`Settings`, and the capabilities they
imply.

Options are declared as data (tidings ``Option``) so the core rejects unknown or mistyped ones
before the driver runs. Combinations the core cannot judge (an ``ssl_*`` file without
``ssl=true``, a negative expiry) are checked here, when the transport is built, so a bad URL fails
at start-up rather than at the first send. The TLS options and their checks are the core's
(:mod:`tidings.drivers._rabbitmq.tls`, shared with ``amqp://``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tidings.drivers._rabbitmq.queues import (
    QUEUE_OPTIONS,
    RECONNECT_OPTIONS,
    QueueModel,
    reconnect_backoff,
    seconds,
)
from tidings.drivers._rabbitmq.tls import DEFAULT_TLS_PORT, TLS_OPTIONS, TLSSettings, tls_settings
from tidings.transports.base import Capabilities, Option
from tidings.transports.errors import InvalidTransportOption
from tidings.transports.url import TransportURL

__all__ = ["BASE_CAPABILITIES", "OPTIONS", "Endpoint", "Settings"]

DEFAULT_PORT = 5672
DEFAULT_SSL_PORT = DEFAULT_TLS_PORT

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
    **RECONNECT_OPTIONS,
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
class Endpoint:
    """One broker address with its credentials; ``repr`` never shows the password."""

    host: str
    port: int
    userid: str
    password: str = field(repr=False)

    @property
    def label(self) -> str:
        return f"{self.userid}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    """Everything the driver's parts need, derived once from the URL and its options."""

    endpoints: tuple[Endpoint, ...]
    virtual_host: str
    heartbeat: int
    connect_timeout: float
    quorum: bool
    queues: QueueModel
    reconnect_interval: float
    reconnect_max_interval: float
    ssl_options: dict[str, Any] | None
    shown: str
    """The URL with passwords masked: what log lines and errors show."""
    tls: TLSSettings | None = None
    """TLS settings (shared with amqp://); None when TLS is off. ``ssl_options`` is their
    kombu form."""

    @classmethod
    def from_url(cls, url: TransportURL, options: Mapping[str, Any]) -> Settings:
        tls = tls_settings(url, options)  # ssl_* without ssl=true etc. fail here
        use_ssl = tls is not None
        heartbeat = int(options["heartbeat"])
        if heartbeat < 0:
            raise InvalidTransportOption(f"URL option heartbeat={heartbeat} must be 0 (off) "
                                         f"or a positive number of seconds")
        connect_timeout = seconds(options, "connect_timeout", positive=True)
        interval, max_interval = reconnect_backoff(options)
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
        port = DEFAULT_SSL_PORT if use_ssl else DEFAULT_PORT
        endpoints = tuple(
            Endpoint(host=h.hostname or "localhost", port=h.port or port,
                     userid=h.username if h.username is not None else "guest",
                     password=(h.password if h.password is not None
                               else ("guest" if h.username is None else "")))
            for h in url.hosts) or (Endpoint("localhost", port, "guest", "guest"),)
        return cls(endpoints=endpoints, virtual_host=url.virtual_host or "/",
                   heartbeat=heartbeat, connect_timeout=connect_timeout, quorum=quorum,
                   queues=queues, reconnect_interval=interval, reconnect_max_interval=max_interval,
                   ssl_options=tls.ssl_options() if tls is not None else None,
                   shown=url.masked(), tls=tls)

    def capabilities(self) -> Capabilities:
        """What this configuration can honestly promise (durability needs durable queues)."""
        return self.queues.capabilities(BASE_CAPABILITIES)
