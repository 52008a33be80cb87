"""Opening AMQP 1.0 connections to RabbitMQ, and the handler base both sides share.

RabbitMQ's AMQP 1.0 plugin picks the virtual host from the open frame's ``hostname``: ``vhost:
<name>`` selects ``<name>``, anything else the plugin's default (``/``). proton sends its
``virtual_host`` connect argument as that hostname, so the driver passes ``vhost:<name>`` there;
credentials go as separate arguments, never inside the URL string proton logs.

With TLS the connection is ``amqps`` with a client :class:`proton.SSLDomain`. proton checks the
broker's certificate against the name it sends as SNI, which defaults to the virtual host
argument (``vhost:<name>``), so the URL's host is always passed as ``sni``; proton (0.40) matches
it against the certificate's DNS names and common name only, never its IP addresses. A failed
handshake comes as a transport error starting with ``SSL``, turned into a line that names TLS and
what to check.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import Any

from proton import SSL, Connection, Endpoint, Handler, SSLDomain, SSLException

from tidings.drivers._rabbitmq.tls import TLSSettings
from tidings.drivers.amqp1.loop import EventLoop
from tidings.transports.errors import InvalidTransportOption
from tidings.transports.url import TransportHost

__all__ = ["ConnectParams", "ConnectionOwner", "describe_condition"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectParams:
    """Where and how to connect: ``hosts`` round-robin, one per attempt; ``tls`` None for
    plain AMQP, else ``amqps`` with these settings."""

    hosts: tuple[TransportHost, ...]
    virtual_host: str
    heartbeat: float = 60.0
    tls: TLSSettings | None = None

    def host(self, attempt: int) -> TransportHost:
        return self.hosts[attempt % len(self.hosts)]

    def ssl_domain(self) -> SSLDomain:
        """A client SSLDomain: the broker's certificate is verified always, its name unless
        ssl_verify_hostname=false. Made afresh for each connection, in the loop thread (its
        reference count is not thread-safe); InvalidTransportOption if the files are unusable
        (the driver makes one when it is built, to fail at start-up)."""
        tls = self.tls
        assert tls is not None
        if not SSL.present():
            raise InvalidTransportOption("ssl=true, but this python-qpid-proton was built "
                                         "without TLS support; install a build with OpenSSL "
                                         "(the wheels on PyPI have it)")
        step = "its TLS mode"
        try:
            domain = SSLDomain(SSLDomain.MODE_CLIENT)
            if tls.ca_file:
                step = f"ssl_ca_file={tls.ca_file}"
                domain.set_trusted_ca_db(tls.ca_file)
            step = "the peer verification mode"
            domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME if tls.verify_hostname
                                           else SSLDomain.VERIFY_PEER)
            if tls.cert_file:
                # A PEM file may hold the key after the certificate: then no ssl_key_file.
                step = f"ssl_cert_file={tls.cert_file} / ssl_key_file=" \
                       f"{tls.key_file or tls.cert_file}"
                domain.set_credentials(tls.cert_file, tls.key_file or tls.cert_file, None)
        except SSLException as exc:
            raise InvalidTransportOption(
                f"python-qpid-proton cannot use {step} ({exc}); give readable PEM files (the "
                f"CA bundle; the client certificate and its unencrypted key)") from None
        return domain

    def describe_failure(self, conn: Connection, cond: Any) -> str:
        """What a transport error means, for logs and errors; a failed TLS handshake names
        TLS and what to check."""
        reason = describe_condition(cond, "transport error")
        desc = (getattr(cond, "description", None) or "") if cond is not None else ""
        host: TransportHost | None = getattr(conn, "tidings_host", None)
        if self.tls is None or host is None or not desc.startswith("SSL"):
            return reason
        # "SSL Failure: error:0A000086:SSL routines::certificate verify failed" -> the words
        error = _OPENSSL_CODE.sub("", desc.removeprefix("SSL Failure:").strip())
        text = self.tls.explain_handshake_failure(str(host), host.hostname, error)
        if self.tls.verify_hostname and "verify failed" in error and _is_ip(host.hostname):
            text += ("; proton never matches an IP address in the URL against the certificate "
                     "(only its DNS names and common name): put a host name it lists in the URL")
        return text

    def connect(self, loop: EventLoop, handler: Handler, attempt: int) -> Connection:
        """Open a connection (loop thread only) to the ``attempt``-th host, round-robin."""
        assert loop.container is not None
        host = self.host(attempt)
        # No proton reconnect: a lost listener is reopened by the core, after redeclaring.
        kwargs: dict[str, Any] = {
            "handler": handler, "reconnect": False, "virtual_host": f"vhost:{self.virtual_host}",
            "user": host.username, "password": host.password, "allowed_mechs": "PLAIN"}
        if self.heartbeat > 0:
            kwargs["heartbeat"] = self.heartbeat
        if self.tls is not None:  # sni: else proton would check and send "vhost:<name>"
            kwargs.update(ssl_domain=self.ssl_domain(), sni=host.hostname)
        conn = loop.container.connect(f"amqp{'s' if self.tls else ''}://{host}", **kwargs)
        conn.tidings_host = host  # kept in proton's record: found again from events
        loop.connections.add(conn)
        loop.made.append(conn)
        return conn


_OPENSSL_CODE = re.compile(r"^error:[0-9A-Fa-f]+:[^:]*::?")


def _is_ip(host: str | None) -> bool:
    try:
        return bool(ipaddress.ip_address(host or ""))
    except ValueError:
        return False


def describe_condition(cond: Any, default: str) -> str:
    """'name: description' of a proton Condition, or ``default`` when there is none."""
    if cond is None:
        return default
    desc = (cond.description or "").strip().splitlines()
    return f"{cond.name}: {desc[0]}" if desc else str(cond.name)


class ConnectionOwner(Handler):
    """Turns proton's many ways of saying "this connection is gone" into one ``lost(reason)``,
    once per connection (``self.conn``, one at a time). A link or session closed by the broker
    calls ``link_failed``, which gives up the whole connection by default (RabbitMQ 3.x ends
    the session on a failed attach or a bad disposition anyway)."""

    def __init__(self, loop: EventLoop, params: ConnectParams) -> None:
        self.loop = loop
        self.params = params
        self.conn: Connection | None = None
        self._lost_reported: Connection | None = None

    def lost(self, conn: Connection, reason: str) -> None:
        raise NotImplementedError

    def link_failed(self, link: Any, reason: str) -> None:
        if self.conn is None or link.connection == self.conn:
            self._give_up(link.connection, reason)

    def _give_up(self, conn: Connection, reason: str) -> None:
        if self._lost_reported is not None and self._lost_reported == conn:
            return
        self._lost_reported = conn
        try:
            if not conn.state & Endpoint.LOCAL_CLOSED:
                conn.close()
        except Exception:
            LOG.debug("closing a failed connection raised", exc_info=True)
        self.lost(conn, reason)

    def on_transport_error(self, event: Any) -> None:
        cond = event.transport.condition if event.transport else None
        conn = event.connection
        if conn is not None:
            self._give_up(conn, self.params.describe_failure(conn, cond))

    def on_transport_closed(self, event: Any) -> None:
        conn = event.connection
        if conn is None:
            return
        self.loop.connections.discard(conn)
        self._give_up(conn, "the connection closed")

    def on_connection_remote_close(self, event: Any) -> None:
        conn = event.connection
        reason = describe_condition(conn.remote_condition, "the broker closed the connection")
        self._give_up(conn, reason)

    def on_session_remote_close(self, event: Any) -> None:
        ssn = event.session
        if ssn.state & Endpoint.LOCAL_CLOSED:
            return  # the broker's answer to our own end
        reason = describe_condition(ssn.remote_condition, "the broker ended the session")
        ssn.close()
        for link in _links_of(ssn):
            self.link_failed(link, reason)

    def on_link_remote_close(self, event: Any) -> None:
        link = event.link
        if link.state & Endpoint.LOCAL_CLOSED:
            return  # the broker's answer to our own detach
        reason = describe_condition(link.remote_condition, "the broker detached the link")
        link.close()
        self.link_failed(link, reason)


def _links_of(session: Any) -> list[Any]:
    out = []
    link = session.connection.link_head(0)
    while link is not None:
        if link.session == session:
            out.append(link)
        link = link.next(0)
    return out
