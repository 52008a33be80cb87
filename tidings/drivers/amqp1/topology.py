"""Topology for the AMQP 1.0 driver: which queues exist, and the step that makes them exist.

RabbitMQ 3.x's AMQP 1.0 plugin can publish to an existing exchange and consume from an existing
queue, but cannot declare a named queue bound to an exchange: ``/exchange/...`` and ``/topic/...``
sources each make a private queue per receiver (a copy per pool member, never deleted) and dynamic
sources are refused. Pools need one named queue their members compete on, so something outside
AMQP 1.0 has to declare it. That step sits behind :class:`Topology`, a small strategy with two
jobs (say where to send and where to receive; make sure the nodes behind those addresses exist),
so that a broker with AMQP 1.0 management (RabbitMQ 4's ``/queues`` API, Artemis, Qpid) can get
its own strategy without touching the rest of the driver. :class:`Amqp091Topology` is the one for
RabbitMQ 3.x: an idempotent declare over AMQP 0-9-1 with py-amqp, on the same port.

Queue names are those of oslo.messaging and of the ``rabbit://`` driver by default, so the three
can share a broker: the no-pool group consumes queue ``<routing key>``, a pool consumes a queue
named after the pool, bound to every routing key it listens to. Those names are per virtual host,
not per exchange, so two exchanges carrying the same routing key feed the same queue (as they do
under oslo.messaging). ``isolate_exchanges=true`` prefixes every queue with its exchange
(``<exchange>.<routing key>``, ``<exchange>.<pool>``, as the ``rabbit://`` driver's option of the
same name does) for listeners that must never see another exchange's notifications.
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
from tidings.transports.url import mask_password

__all__ = [
    "TOPOLOGIES",
    "Amqp091Topology",
    "BrokerHost",
    "QueuePlan",
    "Topology",
    "TopologySettings",
    "plan_queues",
]

LOG = logging.getLogger(__name__)

@dataclass(frozen=True)
class BrokerHost:
    """One broker address of the URL with its credentials; the password never shows in a repr."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TopologySettings:
    """What a topology strategy needs to reach the broker and shape the queues.

    ``hosts`` are tried in order.
    """

    hosts: tuple[BrokerHost, ...]
    virtual_host: str
    queues: QueueModel = field(default_factory=QueueModel)
    """Names, flags and arguments of the queues (the core's oslo.messaging queue model)."""
    connect_timeout: float = 10.0
    tls: TLSSettings | None = None
    """TLS for the declaring connection too: RabbitMQ's TLS listener serves both protocols."""


def _check_name(kind: str, name: str) -> str:
    # A '/' would be read as an address separator in /exchange/<name>/<key> and
    # /amq/queue/<name>, so such a name cannot be reached over AMQP 1.0 on RabbitMQ 3.x.
    if "/" in name:
        raise ValueError(f"{kind} name {name!r} contains '/', which RabbitMQ's AMQP 1.0 "
                         f"addresses cannot carry; choose a name without '/'")
    if len(name.encode("utf-8")) > 255:
        raise ValueError(f"{kind} name {name[:40]!r}... is longer than the 255 bytes AMQP "
                         f"allows; choose a shorter name")
    return name


def plan_queues(model: QueueModel, bindings: Sequence[Binding],
                pool: str | None) -> list[QueuePlan]:
    """The core's queue plan, with every name checked for what AMQP 1.0 addresses can carry."""
    for b in bindings:
        _check_name("exchange", b.exchange)
    plans = model.plan(bindings, pool)
    for plan in plans:
        _check_name("queue", plan.name)
    return plans


class Topology(abc.ABC):
    """Where messages go and come from, and the step that makes those nodes exist.

    The driver calls ``prepare_send`` before each send (implementations cache what they
    declared, so the steady state costs a set lookup) and ``prepare_listen`` every time a listener
    (re)connects (never cached: a broker restart may have dropped non-durable queues).
    ``invalidate`` drops the cache after the driver saw something that suggests the broker lost
    its state (a dropped connection, an address that stopped resolving). All methods may be
    called from any thread.
    """

    def __init__(self, settings: TopologySettings) -> None:
        self.settings = settings

    @abc.abstractmethod
    def send_address(self, exchange: str, routing_key: str) -> str:
        """The AMQP 1.0 target address of (exchange, routing key)."""

    @abc.abstractmethod
    def receive_address(self, queue: str) -> str:
        """The AMQP 1.0 source address of a named queue."""

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
    """Declares topic exchanges, queues and bindings over AMQP 0-9-1 (py-amqp), idempotently.

    RabbitMQ serves AMQP 0-9-1 and 1.0 on the same port, so the URL's hosts and credentials reach
    both; that holds for its TLS listener too, so with ``ssl=true`` this connection uses the same
    TLS settings as the AMQP 1.0 ones (and, being the first to connect, usually reports a failed
    handshake, with Python's ssl module's more precise reason). Each declare opens a short
    connection and closes it: declares are rare (cached for
    sends, once per connect for listeners) and a fresh connection needs no heartbeat upkeep and
    cannot go stale across a broker restart. Exchanges and queues get oslo.messaging's arguments
    (topic, not auto-deleted, durable only with ``durable``), plus the extra queue arguments of
    the options (``x-expires`` from ``queue_expiry``, so the queues of pools that went away do
    not grow without bound; ``x-message-ttl``; ``x-dead-letter-exchange``).
    """

    def __init__(self, settings: TopologySettings) -> None:
        super().__init__(settings)
        self._lock = threading.Lock()
        self._sent_to: set[tuple[str, str]] = set()
        self._queue_args = dict(settings.queues.arguments)

    # -- addresses (RabbitMQ 3.x AMQP 1.0 plugin) ------------------------------------------
    def send_address(self, exchange: str, routing_key: str) -> str:
        return f"/exchange/{exchange}/{routing_key}"

    def receive_address(self, queue: str) -> str:
        return f"/amq/queue/{queue}"

    # -- declares ---------------------------------------------------------------------------
    def prepare_send(self, exchange: str, routing_key: str) -> str:
        key = (exchange, routing_key)
        if key not in self._sent_to:
            (plan,) = plan_queues(self.settings.queues, [Binding(exchange, routing_key)], None)
            with self._lock:
                if key not in self._sent_to:
                    self._declare([plan])
                    self._sent_to = self._sent_to | {key}
        return self.send_address(exchange, routing_key)

    def prepare_listen(self, bindings: Sequence[Binding], pool: str | None) -> list[str]:
        plans = plan_queues(self.settings.queues, bindings, pool)
        with self._lock:
            self._declare(plans)
        return [self.receive_address(p.name) for p in plans]

    def invalidate(self, exchange: str | None = None) -> None:
        # Rebinding the name is atomic, so the I/O thread can call this without the lock (which a
        # slow declare may be holding).
        if exchange is None:
            self._sent_to = set()
        else:
            self._sent_to = {k for k in self._sent_to if k[0] != exchange}

    def _declare(self, plans: Sequence[QueuePlan]) -> None:
        durable = self.settings.queues.durable
        dlx = self.settings.queues.dead_letter_exchange
        shown_args = ", ".join(f"{k}={v}" for k, v in self._queue_args.items())

        def work(channel: Any) -> None:
            if dlx:
                # Rejected messages go here and are kept, not silently dropped.
                _guard(f"dead-letter exchange {dlx!r} (fanout, durable)",
                       lambda: channel.exchange_declare(dlx, "fanout", durable=True,
                                                        auto_delete=False))
                _guard(f"dead-letter queue {dlx!r} (durable)",
                       lambda: channel.queue_declare(dlx, durable=True, auto_delete=False))
                channel.queue_bind(dlx, dlx, "")
            exchanges = list(dict.fromkeys(b.exchange for p in plans for b in p.bindings))
            for exchange in exchanges:
                what = f"exchange {exchange!r} (topic, durable={durable})"
                _guard(what, lambda e=exchange: channel.exchange_declare(
                    e, "topic", durable=durable, auto_delete=False))
            for plan in plans:
                what = f"queue {plan.name!r} (durable={durable}, arguments: {shown_args or 'none'})"
                _guard(what, lambda p=plan: channel.queue_declare(
                    p.name, durable=durable, auto_delete=False,
                    arguments=dict(self._queue_args) or None))
                for b in plan.bindings:
                    channel.queue_bind(plan.name, b.exchange, b.routing_key)

        self._with_channel(work)

    def _with_channel(self, work: Callable[[Any], None]) -> None:
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
                    ssl_opts["server_hostname"] = host.host  # checked, and sent as SNI
            conn = amqp.Connection(where, userid=host.username or "guest",
                                   password=host.password if host.username else "guest",
                                   virtual_host=s.virtual_host, ssl=ssl_opts,
                                   connect_timeout=s.connect_timeout, heartbeat=0)
            try:
                conn.connect()
            except (OSError, amqp.exceptions.AMQPError) as exc:
                if s.tls is not None and isinstance(exc, ssl.SSLError):
                    tls_failures += 1
                    errors.append(s.tls.explain_handshake_failure(where, host.host,
                                                                  _describe(exc)))
                else:
                    errors.append(f"{where}: {_describe(exc)}")
                _close_quietly(conn)
                continue
            try:
                channel = conn.channel()
                work(channel)
                return
            except (OSError, amqp.exceptions.AMQPError) as exc:
                # A dropped connection, or a refusal such as missing configure permission.
                errors.append(f"{where}: {_describe(exc)}")
            finally:
                _close_quietly(conn)
        advice = ("" if tls_failures == len(errors) else
                  "; check that the broker is up, that the user may log in and configure that "
                  "virtual host")
        raise TransportUnreachable(mask_password(
            f"cannot declare the AMQP 1.0 driver's queues over AMQP 0-9-1 on virtual host "
            f"{s.virtual_host!r} ({'; '.join(errors)}){advice}"))


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, socket.timeout):
        text = "connect timed out"
    elif isinstance(exc, ssl.SSLError):
        text = ssl_error_text(exc)
    return text


def _guard(what: str, declare: Callable[[], Any]) -> None:
    import amqp

    try:
        declare()
    except amqp.exceptions.PreconditionFailed as exc:
        raise InvalidTransportOption(
            f"cannot declare {what}: the broker has it with other arguments ({exc.reply_text}). "
            f"Use the same durable/queue_expiry/message_ttl/dead_letter_exchange options as the "
            f"code that declared it (oslo.messaging: amqp_durable_queues), or delete it so it "
            f"can be declared again") from None


def _close_quietly(conn: Any) -> None:
    try:
        conn.collect() if not getattr(conn, "connected", False) else conn.close()
    except Exception:  # closing a broken connection: nothing left to do
        LOG.debug("closing the topology connection failed", exc_info=True)


TOPOLOGIES: Mapping[str, type[Topology]] = {"amqp091": Amqp091Topology}
"""Topology strategies by the name the ``topology`` URL option takes."""
