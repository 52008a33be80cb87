"""Broker hosts from a transport URL, with RabbitMQ's defaults filled in."""

from __future__ import annotations

from dataclasses import dataclass, field

from tidings.transports.url import TransportURL

__all__ = ["BrokerHost", "broker_hosts"]


@dataclass(frozen=True)
class BrokerHost:
    """One broker address with its credentials; ``repr`` never shows the password."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """``user@host:port`` for logs and errors (no password)."""
        return f"{self.username}@{self}" if self.username else str(self)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def broker_hosts(url: TransportURL, port: int, *,
                 guest: bool = False) -> tuple[BrokerHost, ...]:
    """The URL's hosts in order (``localhost`` when it names none), each with ``port`` when
    it gives none. ``guest``: a host without credentials logs in as guest/guest, as kombu
    and oslo.messaging do over AMQP 0-9-1."""
    hosts = url.hosts or ()
    out = []
    for h in hosts:
        username, password = h.username, h.password
        if guest and username is None:
            username, password = "guest", "guest" if password is None else password
        elif guest and password is None:
            password = ""
        out.append(BrokerHost(h.hostname or "localhost", h.port or port, username, password))
    if not out:
        out.append(BrokerHost("localhost", port, *(("guest", "guest") if guest else ())))
    return tuple(out)
