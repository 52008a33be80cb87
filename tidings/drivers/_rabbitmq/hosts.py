"""Broker hosts from a transport URL, with RabbitMQ's defaults filled in."""

from __future__ import annotations

from tidings.transports.url import TransportHost, TransportURL

__all__ = ["broker_hosts"]


def broker_hosts(url: TransportURL, port: int, *,
                 guest: bool = False) -> tuple[TransportHost, ...]:
    """The URL's hosts in order (``localhost`` when it names none), each with ``port`` when
    it gives none, so every one has a host name and a port. ``guest``: a host without
    credentials logs in as guest/guest, as kombu and oslo.messaging do over AMQP 0-9-1."""
    out = []
    for h in url.hosts or ():
        username, password = h.username, h.password
        if guest and username is None:
            username, password = "guest", "guest" if password is None else password
        elif guest and password is None:
            password = ""
        out.append(TransportHost(h.hostname or "localhost", h.port or port, username, password))
    if not out:
        out.append(TransportHost("localhost", port, *(("guest", "guest") if guest else ())))
    return tuple(out)
