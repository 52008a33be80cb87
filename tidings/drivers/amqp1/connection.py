"""Opening AMQP 1.0 connections to RabbitMQ, and the handler base both sides share.

RabbitMQ's AMQP 1.0 plugin picks the virtual host from the ``hostname`` of the open frame: a
value ``vhost:<name>`` selects ``<name>``; anything else falls back to the plugin's default
virtual host (``/``). proton sends the ``virtual_host`` connect argument as that hostname (and as
the SASL hostname), so the driver passes ``vhost:<name>`` there. Credentials go as separate
arguments, never inside the URL string proton logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from proton import Connection, Endpoint, Handler

from tidings.drivers.amqp1.loop import EventLoop
from tidings.drivers.amqp1.topology import BrokerHost

__all__ = ["ConnectParams", "ConnectionOwner", "describe_condition"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectParams:
    """Where and how to connect; ``hosts`` are used round-robin, one per attempt."""

    hosts: tuple[BrokerHost, ...]
    virtual_host: str
    heartbeat: float = 60.0
    max_frame_size: int | None = None

    def address(self, attempt: int) -> str:
        return str(self.hosts[attempt % len(self.hosts)])

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
        conn = loop.container.connect(f"amqp://{self.address(attempt)}", **kwargs)
        loop.track(conn)
        return conn


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
        if event.connection is not None:
            self._give_up(event.connection, describe_condition(cond, "transport error"))

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
