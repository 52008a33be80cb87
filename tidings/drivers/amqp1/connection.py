"""Opening AMQP 1.0 connections to RabbitMQ, and the handler base both sides share.

RabbitMQ's AMQP 1.0 plugin picks the virtual host from the ``hostname`` of the open frame: a
value ``vhost:<name>`` selects ``<name>``; anything else falls back to the plugin's default
virtual host (``/``). proton sends the ``virtual_host`` connect argument as that hostname (and as
the SASL hostname), so the driver passes ``vhost:<name>`` there. Credentials go as separate
arguments, never inside the URL string proton logs.

With TLS (``ssl=true``, the options shared with ``rabbit://`` in :mod:`tidings.drivers._rabbitmq.tls`)
the connection is ``amqps`` with a client :class:`proton.SSLDomain` made from the settings. proton
checks the broker's certificate against the name it also sends as SNI, and that name defaults to
the *virtual host* argument, which here is ``vhost:<name>``: so the URL's host is always passed as
``sni``. proton (0.40, OpenSSL) matches that name against the certificate's DNS names and common
name only, never its IP addresses. A failed handshake is reported by proton as a transport error
whose description starts with ``SSL``; it is turned into a line that names TLS and what to check.
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
from tidings.drivers.amqp1.topology import BrokerHost
from tidings.transports.errors import InvalidTransportOption

__all__ = ["ConnectParams", "ConnectionOwner", "describe_condition"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectParams:
    """Where and how to connect; ``hosts`` are used round-robin, one per attempt."""

    hosts: tuple[BrokerHost, ...]
    virtual_host: str
    heartbeat: float = 60.0
    max_frame_size: int | None = None
    tls: TLSSettings | None = None
    """None: plain AMQP; otherwise the connection is ``amqps`` with these settings."""

    def address(self, attempt: int) -> str:
        return str(self.hosts[attempt % len(self.hosts)])

    def ssl_domain(self) -> SSLDomain:
        """A client SSLDomain for the TLS settings: the broker's certificate is verified always
        (against ssl_ca_file, or the system's CAs), its name unless ssl_verify_hostname=false.

        Made afresh for each connection, in the loop thread: a domain is a proton object with
        a reference count that is not thread-safe, and one costs well under a millisecond.
        Raises InvalidTransportOption when proton cannot load the files (the driver calls it
        once when it is built, so that happens at start-up).
        """
        tls = self.tls
        if tls is None:
            raise ValueError("TLS is off")
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
        host: BrokerHost | None = getattr(conn, "tidings_host", None)
        if self.tls is None or host is None or not desc.startswith("SSL"):
            return reason
        # "SSL Failure: error:0A000086:SSL routines::certificate verify failed" -> the words
        error = _OPENSSL_CODE.sub("", desc.removeprefix("SSL Failure:").strip())
        text = self.tls.explain_handshake_failure(str(host), host.host, error)
        if self.tls.verify_hostname and "verify failed" in error and _is_ip(host.host):
            text += ("; proton never matches an IP address in the URL against the certificate "
                     "(only its DNS names and common name): put a host name it lists in the URL")
        return text

    def connect(self, loop: EventLoop, handler: Handler, attempt: int) -> Connection:
        """Open a connection (loop thread only) to the ``attempt``-th host, round-robin."""
        assert loop.container is not None
        kwargs: dict[str, Any] = {
            "handler": handler,
            "reconnect": False,  # the driver reconnects itself, after redeclaring topology
            "virtual_host": f"vhost:{self.virtual_host}",
        }
        host = self.hosts[attempt % len(self.hosts)]
        kwargs.update(user=host.username or "guest",
                      password=(host.password or "") if host.username else "guest",
                      allowed_mechs="PLAIN")
        if self.heartbeat and self.heartbeat > 0:
            kwargs["heartbeat"] = self.heartbeat
        if self.max_frame_size:
            kwargs["max_frame_size"] = self.max_frame_size
        scheme = "amqp"
        if self.tls is not None:
            scheme = "amqps"
            kwargs["ssl_domain"] = self.ssl_domain()
            # Checked against the certificate and sent as SNI; without it proton would use the
            # virtual_host argument ("vhost:<name>").
            kwargs["sni"] = host.host
        conn = loop.container.connect(f"{scheme}://{self.address(attempt)}", **kwargs)
        conn.tidings_host = host  # kept in proton's record: found again from events
        loop.track(conn)
        return conn


_OPENSSL_CODE = re.compile(r"^error:[0-9A-Fa-f]+:[^:]*::?")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def describe_condition(cond: Any, default: str) -> str:
    """'name: description' of a proton Condition, or ``default`` when there is none."""
    if cond is None:
        return default
    desc = (cond.description or "").strip().splitlines()
    return f"{cond.name}: {desc[0]}" if desc else str(cond.name)


class ConnectionOwner(Handler):
    """Turns proton's many ways of saying "this connection is gone" into one ``lost(reason)``.

    Subclasses own one connection at a time (``self.conn``). Any remote close of the connection,
    a transport error, or the socket closing calls ``lost`` once per connection; a link or
    session closed by the broker calls ``link_failed``, whose default is to give up the whole
    connection (RabbitMQ 3.x ends the session on a failed attach or a bad disposition anyway).
    """

    params: ConnectParams | None = None
    """How the connection was opened; subclasses set it (used to explain transport errors)."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.conn: Connection | None = None
        self._lost_reported: Connection | None = None

    # subclasses implement these ------------------------------------------------------------
    def lost(self, conn: Connection, reason: str) -> None:
        raise NotImplementedError

    def link_failed(self, link: Any, reason: str) -> None:
        if self.conn is None or link.connection == self.conn:
            self._give_up(link.connection, reason)

    # plumbing -------------------------------------------------------------------------------
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
            reason = (self.params.describe_failure(conn, cond) if self.params is not None
                      else describe_condition(cond, "transport error"))
            self._give_up(conn, reason)

    def on_transport_closed(self, event: Any) -> None:
        conn = event.connection
        if conn is None:
            return
        self.loop.untrack(conn)
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
