"""``amqp://``: notifications over AMQP 1.0 (python-qpid-proton) on RabbitMQ's AMQP 1.0 plugin.

URL: ``amqp://user:pass@host:5672[,host2:5672]/vhost?options`` (no host: localhost:5672; no user:
guest/guest; ``ssl=true``: TLS, port 5671 by default, for the AMQP 1.0 connections and the
topology's AMQP 0-9-1 declares alike). Confirmed sends in :mod:`.sending`, receivers with credit
bounded by prefetch in :mod:`.receiving`, the queues AMQP 1.0 on RabbitMQ 3.x cannot declare in
:mod:`.topology`, and one I/O thread (:mod:`.loop`) owns every proton object.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from tidings.drivers._rabbitmq.declare import LoginRefused
from tidings.drivers._rabbitmq.hosts import broker_hosts
from tidings.drivers._rabbitmq.queues import QUEUE_OPTIONS, QueueModel, seconds
from tidings.drivers._rabbitmq.tls import DEFAULT_TLS_PORT, TLS_OPTIONS, tls_settings
from tidings.drivers.amqp1.connection import ConnectParams
from tidings.drivers.amqp1.loop import EventLoop
from tidings.drivers.amqp1.receiving import AMQP1Receiver
from tidings.drivers.amqp1.sending import PendingSend, SendSide
from tidings.drivers.amqp1.topology import TOPOLOGIES, Topology, TopologySettings
from tidings.transports.base import Binding, Capabilities, Driver, Option, OutgoingMessage
from tidings.transports.errors import TransportUnreachable
from tidings.transports.url import TransportURL

__all__ = ["AMQP1Driver"]

LOG = logging.getLogger(__name__)


class AMQP1Driver(Driver):
    """AMQP 1.0 driver; docs/amqp1.md describes the options."""

    name = "amqp"
    capabilities = Capabilities(
        pools=True, requeue=True, requeue_to_other_member=True,
        # oslo.messaging's queue names are per virtual host, so two exchanges with the same
        # routing key share a queue: exchanges are isolated only with isolate_exchanges=true.
        # durable and dead_letter likewise depend on options: set per instance in __init__.
        exchanges=False, at_least_once=True, durable=False, stores_without_listener=True,
        dead_letter=False, prefetch=True, confirmed_send=True)
    # Names and meanings follow the rabbit:// driver's options, so one URL's query carries over.
    options: ClassVar[Mapping[str, Option[Any]]] = {
        **QUEUE_OPTIONS,
        "topology": Option(str, "amqp091", "how queues and bindings are made (amqp091: "
                                           "declared over AMQP 0-9-1 on the same port, which "
                                           "RabbitMQ 3.x needs)", choices=tuple(TOPOLOGIES)),
        "connect_timeout": Option(float, 10.0, "seconds to open a connection and attach a "
                                               "listener's links before giving up"),
        "heartbeat": Option(float, 60.0, "AMQP 1.0 idle timeout in seconds, so a dead "
                                         "connection is noticed (0 disables it)"),
        **TLS_OPTIONS,
    }

    def __init__(self, url: TransportURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        conf = self.conf
        heartbeat = seconds(conf, "heartbeat")  # checked here: 0 (off) or positive
        self._connect_timeout = seconds(conf, "connect_timeout", positive=True)
        tls = tls_settings(url, conf)  # ssl_* files without ssl=true etc. fail here
        hosts = broker_hosts(url, 5672 if tls is None else DEFAULT_TLS_PORT, guest=True)
        vhost = url.virtual_host or "/"
        queues = QueueModel.from_options(conf)
        self._params = ConnectParams(hosts, vhost, heartbeat=heartbeat, tls=tls)
        if tls is not None:
            # Files that cannot be loaded fail now, naming the option, not at every connect.
            tls.check_files()
            self._params.ssl_domain()
        self._settings = TopologySettings(hosts, vhost, queues=queues,
                                          connect_timeout=self._connect_timeout, tls=tls)
        self._topology: Topology = TOPOLOGIES[conf["topology"]](self._settings)
        # per instance, from the options: durable, dead_letter and exchanges depend on them
        self.capabilities = queues.capabilities(type(self).capabilities)
        self._lock = threading.Lock()
        self._loop: EventLoop | None = None
        self._send_side: SendSide | None = None
        self._closed = False
        self._attempts = itertools.count()  # listeners go round the hosts, one per attempt

    def _sender(self) -> tuple[EventLoop, SendSide]:
        """The I/O thread and the send connection, made on first use (again if it died)."""
        with self._lock:
            if self._closed:
                raise TransportUnreachable("the AMQP 1.0 driver was cleaned up")
            if self._loop is None or not self._loop.alive or self._send_side is None:
                self._loop = EventLoop()
                self._send_side = SendSide(self._loop, self._params, self._connect_timeout,
                                           self._topology.invalidate)
            return self._loop, self._send_side

    def retryable(self, exc: BaseException) -> bool:
        # A refused login: waiting will not fix it.
        return isinstance(exc, TransportUnreachable) and not isinstance(exc, LoginRefused)

    def send_batch(self, messages: Sequence[OutgoingMessage],
                   timeout: float | None) -> list[BaseException | None]:
        """Hand every message to the I/O thread at once, then wait for their dispositions:
        they are all in flight on the connection together (pipelined)."""
        results: list[BaseException | None] = [None] * len(messages)
        pendings: dict[int, PendingSend] = {}
        for i, m in enumerate(messages):
            try:
                pendings[i] = PendingSend(self._topology.prepare_send(m.exchange, m.routing_key), m)
            except Exception as exc:
                results[i] = exc
        batch = list(pendings.values())
        try:
            loop, side = self._sender()
            loop.call(lambda: side.submit(batch),
                      abort=lambda reason: PendingSend.fail_all(batch, reason))
        except TransportUnreachable as exc:
            return [exc if i in pendings else r for i, r in enumerate(results)]
        wait = timeout if timeout is not None else 30.0
        deadline = time.monotonic() + wait
        for i, pending in pendings.items():
            mid = messages[i].message_id
            if not pending.wait(deadline - time.monotonic()):
                pending.cancelled = True
                results[i] = TransportUnreachable(
                    f"message {mid} to {pending.address} was not confirmed by the broker "
                    f"within {wait:g}s (it may still arrive); check the broker's health and "
                    f"alarms")
            elif pending.error is not None:
                results[i] = TransportUnreachable(f"message {mid} to {pending.address}: "
                                                  f"{pending.error}")
        return results

    def listen(self, bindings: Sequence[Binding], pool: str | None,
               prefetch: int) -> AMQP1Receiver:
        """Declare the queues and attach, going round the hosts until every link is attached
        or ``connect_timeout`` has passed: a broker that refuses an attach once (RabbitMQ 3.x
        answers a race inside its plugin with an internal error) is not a reason to fail."""
        deadline = time.monotonic() + self._connect_timeout
        failures: list[str] = []
        pause = 0.1
        while True:
            addresses = self._topology.prepare_listen(bindings, pool)  # fails fast if down
            attempt = next(self._attempts)
            receiver = AMQP1Receiver(self._sender()[0], self._params, attempt, addresses,
                                     prefetch, self._connect_timeout, self.max_message_size)
            reason = receiver.wait_open(deadline - time.monotonic())
            if reason is None:
                if failures:
                    LOG.info("AMQP 1.0 listener attached after %d failed attempt(s): %s",
                             len(failures), "; ".join(failures))
                return receiver
            receiver.close()
            failures.append(f"{self._params.host(attempt)}: {reason}")
            if time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)
            pause = min(2 * pause, 1.0)
        shown = failures[-3:]
        # A failed TLS handshake carries its own advice; the plugin is not the problem then.
        advice = ("" if all("TLS handshake" in f for f in shown) else
                  "; check that the broker is up and that its AMQP 1.0 plugin is enabled "
                  "(rabbitmq-plugins enable rabbitmq_amqp1_0)")
        raise TransportUnreachable(
            f"cannot consume {', '.join(addresses)} over AMQP 1.0 within connect_timeout="
            f"{self._connect_timeout:g}s ({'; '.join(shown)}){advice}")

    def cleanup(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, side = self._loop, self._send_side
            self._loop = self._send_side = None
        if loop is not None:
            with contextlib.suppress(TransportUnreachable):
                loop.call(side.close if side is not None else lambda: None)
            loop.stop(timeout=min(5.0, self._connect_timeout))
        self._topology.close()
