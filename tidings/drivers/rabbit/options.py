"""The ``rabbit://`` URL options, checked once into :class:`Settings`, and the capabilities they
imply.

Options are declared as data (tidings ``Option``) so the core rejects unknown or mistyped ones
before the driver runs. Combinations the core cannot judge (an ``ssl_*`` file without
``ssl=true``, a negative expiry) are checked here, when the transport is built, so a bad URL fails
at start-up rather than at the first send.
"""

from __future__ import annotations

import ssl as _ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tidings.transports.base import Capabilities, Option
from tidings.transports.errors import InvalidTransportOption
from tidings.transports.queues import (
    QUEUE_OPTIONS,
    RECONNECT_OPTIONS,
    QueueModel,
    reconnect_backoff,
    seconds,
)
from tidings.transports.url import TransportURL

__all__ = ["BASE_CAPABILITIES", "OPTIONS", "Endpoint", "Settings"]

DEFAULT_PORT = 5672
DEFAULT_SSL_PORT = 5671

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
    "ssl": Option(bool, False, "connect with TLS (default port 5671)"),
    "ssl_ca_file": Option(str, "", "CA bundle that signs the broker's certificate (default: "
                                   "the system's CAs)"),
    "ssl_cert_file": Option(str, "", "client certificate for TLS client authentication"),
    "ssl_key_file": Option(str, "", "private key of ssl_cert_file"),
    "ssl_verify_hostname": Option(bool, True, "check that the broker's certificate names the "
                                              "host in the URL"),
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

    @classmethod
    def from_url(cls, url: TransportURL, options: Mapping[str, Any]) -> Settings:
        use_ssl = bool(options["ssl"])
        files = {k: options[k] for k in ("ssl_ca_file", "ssl_cert_file", "ssl_key_file")}
        if not use_ssl and any(files.values()):
            given = ", ".join(k for k, v in files.items() if v)
            raise InvalidTransportOption(
                f"{given} given in {url.masked()} but TLS is off; add ssl=true to the URL")
        if files["ssl_key_file"] and not files["ssl_cert_file"]:
            raise InvalidTransportOption("ssl_key_file needs ssl_cert_file (the certificate "
                                         "it belongs to); add ssl_cert_file to the URL")
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
        ssl_options: dict[str, Any] | None = None
        if use_ssl:
            ssl_options = {"cert_reqs": _ssl.CERT_REQUIRED}
            if files["ssl_ca_file"]:
                ssl_options["ca_certs"] = files["ssl_ca_file"]
            if files["ssl_cert_file"]:
                ssl_options["certfile"] = files["ssl_cert_file"]
            if files["ssl_key_file"]:
                ssl_options["keyfile"] = files["ssl_key_file"]
            # py-amqp turns hostname checking on exactly when server_hostname is given; kombu
            # fills a None in with the host being connected to.
            if options["ssl_verify_hostname"]:
                ssl_options["server_hostname"] = None
        return cls(endpoints=endpoints, virtual_host=url.virtual_host or "/",
                   heartbeat=heartbeat, connect_timeout=connect_timeout, quorum=quorum,
                   queues=queues, reconnect_interval=interval, reconnect_max_interval=max_interval,
                   ssl_options=ssl_options, shown=url.masked())

    def capabilities(self) -> Capabilities:
        """What this configuration can honestly promise (durability needs durable queues)."""
        return self.queues.capabilities(BASE_CAPABILITIES)
