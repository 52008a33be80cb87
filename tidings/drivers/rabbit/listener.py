"""Consumption: one connection and channel per receiver, driven by the core's poll thread.

``receive()`` reads frames until a delivery has arrived, then whatever else is already buffered,
and returns up to what the core asked for; the rest stays buffered for the next call
(``basic.qos`` bounds it). ``settle()`` sends requeues and rejections as ``basic.reject`` and a
batch's acknowledgements as one ``basic.ack multiple``, up to the highest tag below which every
delivery is settled (singly for the few beyond it). A delivery tag only means something on its
channel, so a receiver never outlives its connection: on a connection error it raises
``TransportUnreachable`` and the core opens a new one (the broker redelivers what was unsettled).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import amqp.exceptions

from tidings.drivers._rabbitmq.connecting import Connecting
from tidings.drivers.rabbit.link import LINK_ERRORS, Link, LinkRefused, describe_error, open_link
from tidings.drivers.rabbit.options import QueuePlan, Settings, Topology
from tidings.transports.base import ACK, REQUEUE, IncomingMessage, Outcome, Receiver
from tidings.transports.errors import TransportUnreachable

__all__ = ["QueueMismatch", "RabbitReceiver"]

LOG = logging.getLogger("tidings.drivers.rabbit")

#: Longest single wait on the socket. A fixed slice keeps the socket timeout unchanged from
#: one wait to the next (see Link.set_timeout); only a receive's last slice is shorter.
_SLICE = 0.05
_AFTER_ALL = float("inf")  # "no delivery is unsettled": every acknowledged tag is below it


class QueueMismatch(TransportUnreachable):
    """A queue exists with other arguments than this listener would declare."""


class RabbitReceiver(Receiver):
    """Consumes the planned queues on its own connection (see the module docstring)."""

    def __init__(self, settings: Settings, topology: Topology, plan: list[QueuePlan],
                 prefetch: int, label: str, first_host: int = 0,
                 max_message_size: int = 16 * 1024 * 1024,
                 connecting: Connecting | None = None) -> None:
        self._label = label
        self._plan = plan
        self._heartbeat = settings.heartbeat
        self._next_tick = 0.0
        self._beat_mark = -1
        # The poll thread (receive, settle, close) and the heartbeat thread share the socket.
        self._io = threading.Lock()
        self._ready: list[IncomingMessage] = []  # delivered, not yet handed to the core
        # Every delivery tag not settled yet (handed to the core or still buffered), oldest
        # first: what the broker counts as unacknowledged here.
        self._held: dict[int, None] = {}
        link, self.host_index = open_link(settings, first_host, f"listener {label}",
                                            connecting)
        self._screen = link.screen_deliveries(max_message_size)  # tells _on_delivery
        try:
            self._consume(link, settings, topology, prefetch)
        except LINK_ERRORS as exc:
            link.abort()
            if isinstance(exc, amqp.exceptions.PreconditionFailed):
                raise QueueMismatch(
                    f"cannot declare the listener's queues on {settings.shown}: "
                    f"{describe_error(exc)}. A queue of that name exists with other flags or "
                    f"arguments; use the same durable/quorum/queue_expiry/message_ttl/"
                    f"dead_letter_exchange options as whoever declared it, or delete it "
                    f"(rabbitmqctl delete_queue -p <vhost> <name>)") from exc
            if isinstance(exc, amqp.exceptions.AccessRefused):
                raise LinkRefused(f"RabbitMQ refused the listener's declarations on "
                                  f"{settings.shown}: {describe_error(exc)}; grant the user "
                                  f"configure, write and read permissions") from exc
            raise TransportUnreachable(f"setting up the listener on {link.endpoint.label} "
                                       f"failed: {describe_error(exc)}") from exc
        self._link: Link | None = link
        LOG.debug("listener %s consuming %s on %s", label, [q.name for q in plan],
                  link.endpoint.label)

    def __repr__(self) -> str:
        return f"<RabbitReceiver {self._label} queues={[q.name for q in self._plan]}>"

    def _consume(self, link: Link, settings: Settings, topology: Topology,
                 prefetch: int) -> None:
        channel = link.channel
        topology.declare_dead_letter(channel)
        for queue in self._plan:
            topology.declare_queue(channel, queue.name)
            for binding in queue.bindings:
                try:
                    topology.declare_exchange(channel, binding.exchange)
                except amqp.exceptions.PreconditionFailed as exc:
                    # It exists with other flags: bind to it as it is (oslo.messaging falls
                    # back the same way), on a fresh channel since the broker closed this one.
                    LOG.warning("exchange %r already exists with other settings (%s); "
                                "binding to it as it is", binding.exchange,
                                describe_error(exc))
                    channel = link.channel = link.open_channel()
                    topology.declare_exchange(channel, binding.exchange, passive=True)
                topology.bind(channel, queue.name, binding.exchange, binding.routing_key)
        if len(self._plan) > 1 and not settings.quorum:
            # One bound for the whole channel, across its consumers (RabbitMQ's global=True).
            channel.basic_qos(0, prefetch, True)
        else:
            # Quorum queues refuse a channel-wide bound: split it between the consumers.
            channel.basic_qos(0, max(1, prefetch // len(self._plan)), False)
        for queue in self._plan:
            channel.basic_consume(queue.name, consumer_tag=f"tidings-{uuid.uuid4().hex[:12]}",
                                  callback=self._on_delivery, on_cancel=self._on_cancel)

    # -- callbacks from py-amqp, while receive() reads ------------------------------------
    def _on_delivery(self, message: Any) -> None:
        info = message.delivery_info
        tag = info["delivery_tag"]
        props = message.properties
        self._held[tag] = None
        problem = self._screen.problem
        if problem is not None:  # refused by the screen: the core rejects it
            incoming = IncomingMessage(b"", props.get("message_id") or self._screen.raw_id,
                                       None, info["redelivered"], tag)
            incoming.problem = problem
            self._ready.append(incoming)
            return
        headers = props.get("application_headers")
        # Quorum queues count earlier deliveries in x-delivery-count: the core's redelivery
        # limit then holds across listeners and restarts.
        earlier = headers.get("x-delivery-count") if isinstance(headers, dict) else None
        self._ready.append(IncomingMessage(
            message.body, props.get("message_id"), headers, info["redelivered"], tag,
            earlier + 1 if isinstance(earlier, int) else None, info["exchange"],
            info["routing_key"]))

    @staticmethod
    def _on_cancel(consumer_tag: str) -> None:
        # The broker cancelled us (queue deleted, node down): a new receiver declares it again.
        raise amqp.exceptions.ConsumerCancelled(
            f"the broker cancelled consumer {consumer_tag} (was its queue deleted?)")

    # -- the Receiver contract -----------------------------------------------------------
    def receive(self, max_messages: int, timeout: float) -> Sequence[IncomingMessage]:
        with self._io:
            if (link := self._link) is None:
                raise TransportUnreachable(f"listener {self._label} has no connection")
            ready = self._ready  # a delivery appends here
            try:
                deadline = time.monotonic() + timeout
                while not ready:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    if not link.reader.frame_ready():
                        link.set_timeout(_SLICE if left >= _SLICE else max(left, 0.001))
                    try:
                        link.read_frame()
                    except TimeoutError:
                        continue
                while len(ready) < max_messages and link.reader.frame_ready():
                    link.read_frame()
                # After reading, so frames that waited while a handler was busy count as signs
                # of life before py-amqp judges the broker's heartbeats.
                if self._heartbeat and time.monotonic() >= self._next_tick:
                    self._next_tick = time.monotonic() + self._heartbeat / 4.0
                    link.conn.heartbeat_tick(rate=4)
            except LINK_ERRORS as exc:
                raise self._lost(link, exc) from exc
            self._ready = ready[max_messages:]
            return ready[:max_messages]

    def settle(self, outcomes: Sequence[Outcome]) -> None:
        with self._io:
            if (link := self._link) is None:
                raise TransportUnreachable(f"listener {self._label} has no connection")
            channel = link.channel
            held = self._held
            acks: list[int] = []
            try:
                for msg, how in outcomes:
                    tag = msg.token
                    held.pop(tag, None)
                    if how == ACK:
                        acks.append(tag)
                    else:  # before any multiple ack, which must not cover it
                        channel.basic_reject(tag, requeue=how == REQUEUE)
                oldest = next(iter(held), _AFTER_ALL)  # the oldest delivery still unsettled
                below = [tag for tag in acks if tag < oldest]
                if below:
                    channel.basic_ack(max(below), multiple=True)
                for tag in acks:
                    if tag > oldest:
                        channel.basic_ack(tag)
            except LINK_ERRORS as exc:
                raise self._lost(link, exc) from exc

    def close(self) -> None:
        """Close the connection: the broker requeues what was not acknowledged, including
        deliveries still buffered here."""
        with self._io:
            link, self._link = self._link, None
            self._ready = []
            self._held.clear()
            if link is not None:
                link.close()

    def _lost(self, link: Link, exc: BaseException) -> TransportUnreachable:
        """Drop the connection without the closing handshake; the error to raise."""
        self._link = None
        self._ready = []
        self._held.clear()
        link.abort()
        return TransportUnreachable(f"listener {self._label}: the connection to "
                                    f"{link.endpoint.label} failed: {describe_error(exc)}")

    def beat(self) -> None:
        """Heartbeat thread: while the poll thread is away (a slow handler), say we are alive.
        Only sends: deliveries stay for the poll thread to read in order."""
        if not self._io.acquire(blocking=False):
            return  # the poll thread is here, and py-amqp's heartbeat_tick speaks for it
        try:
            link = self._link
            if link is None:
                return
            conn = link.conn
            if conn.bytes_sent == self._beat_mark:
                link.set_timeout(5.0)
                conn.send_heartbeat()
            self._beat_mark = conn.bytes_sent
        except LINK_ERRORS as exc:
            LOG.debug("listener %s heartbeat failed: %s", self._label, describe_error(exc))
        finally:
            self._io.release()
