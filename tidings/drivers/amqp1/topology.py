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
import socket
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tidings.drivers._rabbitmq.queues import QueueModel, QueuePlan
from tidings.drivers._rabbitmq.tls import TLSSettings, ssl_error_text
from tidings.transports.base import Binding
from tidings.transports.errors import InvalidTransportOption, TransportUnreachable
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

    def _declare(self, plans: Sequence[QueuePlan]) -> None:
        import amqp  # py-amqp, the 0-9-1 client under kombu (the amqp1 extra installs it)

        s = self.settings
        errors: list[str] = []
        tls_failures = 0
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
                conn.connect()
                _declare_on(conn.channel(), s.queues, plans)
                return
            except (OSError, amqp.exceptions.AMQPError) as exc:
                # Refused, dropped, or a refusal such as a missing configure permission.
                if s.tls is not None and isinstance(exc, ssl.SSLError):
                    tls_failures += 1
                    errors.append(s.tls.explain_handshake_failure(where, host.hostname,
                                                                  _describe(exc)))
                else:
                    errors.append(f"{where}: {_describe(exc)}")
            finally:
                try:
                    conn.collect() if not getattr(conn, "connected", False) else conn.close()
                except Exception:  # closing a broken connection: nothing left to do
                    LOG.debug("closing the topology connection failed", exc_info=True)
        advice = ("" if tls_failures == len(errors) else
                  "; check that the broker is up, that the user may log in and configure that "
                  "virtual host")
        raise TransportUnreachable(mask_password(
            f"cannot declare the AMQP 1.0 driver's queues over AMQP 0-9-1 on virtual host "
            f"{s.virtual_host!r} ({'; '.join(errors)}){advice}"))


def _declare_on(channel: Any, model: QueueModel, plans: Sequence[QueuePlan]) -> None:
    durable, dlx, args = model.durable, model.dead_letter_exchange, dict(model.arguments)
    if dlx:  # rejected messages go there and are kept, not silently dropped
        _guard(f"dead-letter exchange {dlx!r} (fanout, durable)", channel.exchange_declare,
               dlx, "fanout", durable=True, auto_delete=False)
        _guard(f"dead-letter queue {dlx!r} (durable)", channel.queue_declare, dlx,
               durable=True, auto_delete=False)
        channel.queue_bind(dlx, dlx, "")
    for exchange in dict.fromkeys(b.exchange for p in plans for b in p.bindings):
        _guard(f"exchange {exchange!r} (topic, durable={durable})", channel.exchange_declare,
               exchange, "topic", durable=durable, auto_delete=False)
    shown = ", ".join(f"{k}={v}" for k, v in args.items()) or "none"
    for plan in plans:
        _guard(f"queue {plan.name!r} (durable={durable}, arguments: {shown})",
               channel.queue_declare, plan.name, durable=durable, auto_delete=False,
               arguments=dict(args) or None)
        for b in plan.bindings:
            channel.queue_bind(plan.name, b.exchange, b.routing_key)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "connect timed out"
    return ssl_error_text(exc) if isinstance(exc, ssl.SSLError) else str(exc) or type(exc).__name__


def _guard(what: str, declare: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    import amqp

    try:
        declare(*args, **kwargs)
    except amqp.exceptions.PreconditionFailed as exc:
        raise InvalidTransportOption(
            f"cannot declare {what}: the broker has it with other arguments ({exc.reply_text}). "
            f"Use the same durable/queue_expiry/message_ttl/dead_letter_exchange options as the "
            f"code that declared it (oslo.messaging: amqp_durable_queues), or delete it so it "
            f"can be declared again") from None


TOPOLOGIES: Mapping[str, type[Topology]] = {"amqp091": Amqp091Topology}
"""Topology strategies by the name the ``topology`` URL option takes."""
