"""Topology for the AMQP 1.0 driver: which queues exist, and the step that makes them exist.

RabbitMQ 3.x's AMQP 1.0 plugin can publish to an existing exchange and consume from an existing
queue, but cannot declare a named queue bound to an exchange: ``/exchange/...`` and ``/topic/...``
sources each make a private queue per receiver (a copy per pool member, never deleted) and
dynamic sources are refused. Pools need one named queue their members compete on, so something
outside AMQP 1.0 has to declare it. That step sits behind :class:`Topology`, a small strategy
(where to send and receive; make the nodes behind those addresses exist), so that a broker with
AMQP 1.0 management (RabbitMQ 4's ``/queues`` API, Artemis, Qpid) can get its own without
touching the rest of the driver. :class:`Amqp091Topology`, for RabbitMQ 3.x, declares over AMQP
0-9-1 with py-amqp on the same port.

Queue names are oslo.messaging's and the ``rabbit://`` driver's (see
:mod:`tidings.drivers._rabbitmq.queues`), so the three can share a broker.
"""

from __future__ import annotations

import abc
import logging
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tidings.drivers._rabbitmq import declare as amqp091
from tidings.drivers._rabbitmq.connecting import Connecting
from tidings.drivers._rabbitmq.queues import QueueModel, QueuePlan
from tidings.drivers._rabbitmq.tls import TLSSettings
from tidings.transports.base import Binding
from tidings.transports.errors import TransportUnreachable
from tidings.transports.url import TransportHost, mask_password

__all__ = ["TOPOLOGIES", "Amqp091Topology", "QueuePlan", "Topology", "TopologySettings",
           "plan_queues"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopologySettings:
    """What a topology strategy needs to reach the broker (``hosts`` in order) and shape the
    queues."""

    hosts: tuple[TransportHost, ...]
    virtual_host: str
    queues: QueueModel = field(default_factory=QueueModel)
    connect_timeout: float = 10.0
    tls: TLSSettings | None = None


def _check_name(kind: str, name: str) -> None:
    # A '/' would be read as an address separator in /exchange/<name>/<key> and
    # /amq/queue/<name>, so such a name cannot be reached over AMQP 1.0 on RabbitMQ 3.x.
    if "/" in name:
        raise ValueError(f"{kind} name {name!r} contains '/', which RabbitMQ's AMQP 1.0 "
                         f"addresses cannot carry; choose a name without '/'")
    if len(name.encode("utf-8")) > 255:
        raise ValueError(f"{kind} name {name[:40]!r}... is longer than the 255 bytes AMQP "
                         f"allows; choose a shorter name")


def plan_queues(model: QueueModel, bindings: Sequence[Binding],
                pool: str | None) -> list[QueuePlan]:
    """The family's queue plan, every name checked for what AMQP 1.0 addresses can carry."""
    for b in bindings:
        _check_name("exchange", b.exchange)
    plans = model.plan(bindings, pool)
    for plan in plans:
        _check_name("queue", plan.name)
    return plans


class Topology(abc.ABC):
    """Where messages go and come from, and the step that makes those nodes exist.

    ``prepare_send`` comes before each send (implementations cache what they declared, so the
    steady state costs a set lookup), ``prepare_listen`` every time a listener connects (never
    cached: a broker restart may have dropped non-durable queues), ``invalidate`` when the
    broker may have lost its state (a dropped connection, an address that stopped resolving).
    Any thread may call any method.
    """

    def __init__(self, settings: TopologySettings) -> None:
        self.settings = settings

    @abc.abstractmethod
    def prepare_send(self, exchange: str, routing_key: str) -> str:
        """Make sure ``exchange`` and the no-pool group's queue for ``routing_key`` exist (so a
        notification sent before its listeners start waits for them); return the target
        address. Raise TransportUnreachable if the broker cannot be reached."""

    @abc.abstractmethod
    def prepare_listen(self, bindings: Sequence[Binding], pool: str | None) -> list[str]:
        """Declare the listener's queues and bindings; return their source addresses."""

    def invalidate(self, exchange: str | None = None) -> None:  # noqa: B027 - optional hook
        """Forget what was declared (for one exchange, or all), so it is declared again."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections the strategy holds."""


class Amqp091Topology(Topology):
    """Declares topic exchanges, queues and bindings over AMQP 0-9-1 (py-amqp), idempotently,
    with oslo.messaging's arguments plus the options' queue arguments.

    RabbitMQ serves both protocols on the same port (TLS listener included), so the URL's
    hosts, credentials and TLS settings reach both. Each declare opens a short connection:
    declares are rare (cached for sends, once per connect for listeners), and a fresh
    connection needs no heartbeats and cannot go stale across a broker restart.
    """

    def __init__(self, settings: TopologySettings) -> None:
        super().__init__(settings)
        self._lock = threading.Lock()
        self._sent_to: set[tuple[str, str]] = set()
        self._connecting = Connecting()  # close() ends a declare's connect in progress

    def prepare_send(self, exchange: str, routing_key: str) -> str:
        key = (exchange, routing_key)
        if key not in self._sent_to:
            plans = plan_queues(self.settings.queues, [Binding(exchange, routing_key)], None)
            with self._lock:
                if key not in self._sent_to:
                    self._declare(plans)
                    self._sent_to = self._sent_to | {key}
        return f"/exchange/{exchange}/{routing_key}"

    def prepare_listen(self, bindings: Sequence[Binding], pool: str | None) -> list[str]:
        plans = plan_queues(self.settings.queues, bindings, pool)
        with self._lock:
            self._declare(plans)
        return [f"/amq/queue/{p.name}" for p in plans]

    def invalidate(self, exchange: str | None = None) -> None:
        # Rebinding the name is atomic: the I/O thread calls this without the lock (which a
        # slow declare may be holding).
        self._sent_to = {k for k in self._sent_to if exchange is not None and k[0] != exchange}

    def close(self) -> None:
        self._connecting.abort()  # a declare connecting now ends at once; no more start

    def _declare(self, plans: Sequence[QueuePlan]) -> None:
        import amqp  # py-amqp, the 0-9-1 client under kombu (the amqp1 extra installs it)

        s = self.settings
        errors: list[str] = []
        tls_failures = refused = 0
        for host in s.hosts:
            where = str(host)
            ssl_opts: Any = False
            if s.tls is not None:
                ssl_opts = s.tls.ssl_options()
                if "server_hostname" in ssl_opts:
                    ssl_opts["server_hostname"] = host.hostname  # checked, and sent as SNI
            conn = amqp.Connection(where, userid=host.username, password=host.password,
                                   virtual_host=s.virtual_host, ssl=ssl_opts,
                                   connect_timeout=s.connect_timeout, heartbeat=0)
            try:
                with self._connecting.watch(conn):
                    conn.connect()
                amqp091.declare_on(conn.channel(), s.queues, plans)
                return
            except (OSError, amqp.exceptions.AMQPError) as exc:
                # Refused, dropped, or a refusal such as a missing configure permission.
                if isinstance(exc, amqp.exceptions.AccessRefused) and not conn.connected:
                    refused += 1  # the login itself: no declare was tried
                    errors.append(f"{host.username}@{where}: {amqp091.describe(exc)}")
                elif s.tls is not None and isinstance(exc, ssl.SSLError):
                    tls_failures += 1
                    errors.append(s.tls.explain_handshake_failure(where, host.hostname,
                                                                  amqp091.describe(exc)))
                else:
                    errors.append(f"{where}: {amqp091.describe(exc)}")
            finally:
                try:
                    conn.collect() if not getattr(conn, "connected", False) else conn.close()
                except Exception:  # closing a broken connection: nothing left to do
                    LOG.debug("closing the topology connection failed", exc_info=True)
        advice = ("" if tls_failures == len(errors) else
                  "; check that the broker is up, that the user may log in and configure that "
                  "virtual host")
        if self._connecting.aborted:
            raise TransportUnreachable("the AMQP 1.0 driver was cleaned up while declaring")
        if refused == len(errors):
            raise amqp091.LoginRefused(mask_password(
                f"RabbitMQ refused the login to virtual host {s.virtual_host!r} "
                f"({'; '.join(errors)}); check the user and password in the URL and that the "
                f"user has permissions on the virtual host"))
        raise TransportUnreachable(mask_password(
            f"cannot declare the AMQP 1.0 driver's queues over AMQP 0-9-1 on virtual host "
            f"{s.virtual_host!r} ({'; '.join(errors)}){advice}"))


TOPOLOGIES: Mapping[str, type[Topology]] = {"amqp091": Amqp091Topology}
"""Topology strategies by the name the ``topology`` URL option takes."""
