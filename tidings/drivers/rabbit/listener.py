"""Consumption: one connection and channel per listener, driven by the core's poll thread.

``poll()`` reads frames until at least one delivery has arrived, then everything already
buffered (up to ``prefetch``), and returns those messages: no thread of our own, no hop per
message. Settlements are recorded (from any thread) and sent by the poll thread that owns the
channel: rejections and requeues at once, acknowledgements in groups, as one
``basic.ack multiple`` up to the highest tag below which everything is settled (singly for the
few beyond it). A group goes out when it reaches a quarter of the prefetch window (even in the
middle of the core handling a batch, so the broker refills the window as we go), when the window
is full, when the oldest acknowledgement has waited 5 ms, and in ``close()``. A poll waits in
slices of at most 50 ms, so settlements made from another thread go out promptly.

A delivery tag only means something on the channel that delivered it. Every connection has a
generation; when a connection is lost the generation changes, settlements of messages from the
old one are dropped (the broker redelivers those messages: at least once, never an ack on the
wrong channel), and the next poll reconnects with backoff, declares the topology again and
resumes consuming.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import amqp.exceptions

from tidings.drivers.rabbit.link import (
    LINK_ERRORS,
    Link,
    LinkRefused,
    describe_error,
    open_link,
)
from tidings.drivers.rabbit.options import Settings
from tidings.drivers.rabbit.topology import QueuePlan, Topology
from tidings.transports.base import IncomingMessage, Listener
from tidings.transports.errors import TransportUnreachable

__all__ = ["RabbitListener", "RabbitMessage"]

LOG = logging.getLogger("tidings.drivers.rabbit")

_ACK, _REQUEUE, _REJECT = 0, 1, 2
_SLICE = 0.05
#: How long an acknowledgement may wait to share a basic.ack with the next ones. Each one sent
#: costs a system call and a broker wake-up; a few milliseconds cost nothing to a notification.
_ACK_DELAY = 0.005


class RabbitMessage(IncomingMessage):
    """A delivery; settling it queues the settlement for the listener's poll thread."""

    __slots__ = ("_generation", "_listener", "tag")

    def __init__(self, body: bytes, message_id: str | None, headers: Mapping[str, Any] | None,
                 redelivered: bool, listener: RabbitListener, generation: int,
                 tag: int) -> None:
        super().__init__(body, message_id, headers, redelivered)
        self._listener = listener
        self._generation = generation
        self.tag = tag

    def _ack(self) -> None:
        self._listener._record(self._generation, self.tag, _ACK)

    def _requeue(self) -> None:
        self._listener._record(self._generation, self.tag, _REQUEUE)

    def _reject(self) -> None:
        self._listener._record(self._generation, self.tag, _REJECT)


class QueueMismatch(TransportUnreachable):
    """A queue exists with other arguments than this listener would declare."""


class RabbitListener(Listener):
    """Consumes the planned queues on its own connection (see the module docstring)."""

    def __init__(self, settings: Settings, topology: Topology, plan: list[QueuePlan],
                 prefetch: int, label: str) -> None:
        self._settings = settings
        self._topology = topology
        self._plan = plan
        self._prefetch = prefetch
        self._label = label
        self._io = threading.Lock()  # the poll thread, close() and the heartbeat thread
        self._settlements: deque[tuple[int, int, int]] = deque()
        self._link: Link | None = None
        self._generation = 0
        self._ready: list[RabbitMessage] = []
        self._held: dict[int, RabbitMessage] = {}
        self._outstanding: deque[int] = deque()   # unsettled delivery tags, in order
        self._settled_ahead: set[int] = set()     # settled, still behind an unsettled tag
        self._consumer_tags: list[str] = []
        self._next_host = 0
        self._delay = settings.reconnect_interval
        self._next_attempt = 0.0
        self._failures = 0
        self._next_heartbeat_check = 0.0
        self._hb_mark = -1
        self._closed = False
        # Settlements made in the poll thread go out in groups of this many while the core is
        # still handling a batch, so the broker refills the prefetch window as we go instead
        # of waiting for the next poll.
        self._eager = max(1, prefetch // 4)
        self._pending_since = 0.0
        self._owner: int | None = None  # the poll thread
        self._connect()  # the first connection fails loudly, in the caller of listen()

    def __repr__(self) -> str:
        return f"<RabbitListener {self._label} queues={[q.name for q in self._plan]}>"

    # -- connecting ---------------------------------------------------------------------
    def _connect(self) -> None:
        link, index = open_link(self._settings, self._next_host, f"listener {self._label}")
        try:
            self._declare(link)
            channel = link.channel
            many = len(self._plan) > 1
            if many and not self._settings.quorum:
                # One bound for the whole channel, across its consumers (RabbitMQ's global=True).
                channel.basic_qos(0, self._prefetch, True)
            else:
                # Quorum queues refuse a channel-wide bound: split it between the consumers.
                channel.basic_qos(0, max(1, self._prefetch // len(self._plan)), False)
            self._generation += 1
            tags = []
            for queue in self._plan:
                tags.append(channel.basic_consume(
                    queue.name, consumer_tag=f"tidings-{uuid.uuid4().hex[:12]}",
                    callback=self._on_delivery, on_cancel=self._on_cancel))
        except LINK_ERRORS as exc:
            link.abort()
            # Deliveries may have arrived before the failure: they belong to no one now.
            self._generation += 1
            self._ready.clear()
            self._held.clear()
            self._outstanding.clear()
            self._settled_ahead.clear()
            if isinstance(exc, amqp.exceptions.PreconditionFailed):
                raise QueueMismatch(
                    f"cannot declare the listener's queues on {self._settings.shown}: "
                    f"{describe_error(exc)}. A queue of that name exists with other flags or "
                    f"arguments; use the same durable/quorum/queue_expiry/message_ttl/"
                    f"dead_letter_exchange options as whoever declared it, or delete it "
                    f"(rabbitmqctl delete_queue -p <vhost> <name>)") from exc
            if isinstance(exc, amqp.exceptions.AccessRefused):
                raise LinkRefused(f"RabbitMQ refused the listener's declarations on "
                                  f"{self._settings.shown}: {describe_error(exc)}; grant the "
                                  f"user configure, write and read permissions") from exc
            raise TransportUnreachable(f"setting up the listener on {link.endpoint.label} "
                                       f"failed: {describe_error(exc)}") from exc
        self._link = link
        self._next_host = index
        self._consumer_tags = tags
        self._hb_mark = -1

    def _declare(self, link: Link) -> None:
        topo = self._topology
        channel = link.channel
        topo.declare_dead_letter(channel)
        for queue in self._plan:
            topo.declare_queue(channel, queue.name)
            for binding in queue.bindings:
                try:
                    topo.declare_exchange(channel, binding.exchange)
                except amqp.exceptions.PreconditionFailed as exc:
                    # It exists with other flags: bind to it as it is (oslo.messaging falls
                    # back the same way), on a fresh channel since the broker closed this one.
                    LOG.warning("exchange %r already exists with other settings (%s); "
                                "binding to it as it is", binding.exchange,
                                describe_error(exc))
                    channel = link.new_channel()
                    topo.declare_exchange(channel, binding.exchange, passive=True)
                topo.bind(channel, queue.name, binding.exchange, binding.routing_key)

    def _lost(self, exc: BaseException) -> None:
        """Forget the connection; the next poll reconnects. Settlements of its messages are
        dropped from now on (the broker gives those messages to a consumer again)."""
        link, self._link = self._link, None
        if link is not None:
            LOG.warning("listener %s lost its connection to %s (%s); reconnecting. The "
                        "broker redelivers what it had not seen acknowledged (%d message(s) "
                        "were still unsettled here)", self._label, link.endpoint.label,
                        describe_error(exc), len(self._held))
            link.abort()
        self._generation += 1
        self._ready.clear()
        self._held.clear()
        self._outstanding.clear()
        self._settled_ahead.clear()
        self._next_attempt = time.monotonic()
        self._delay = self._settings.reconnect_interval

    def _reconnect(self, deadline: float) -> bool:
        now = time.monotonic()
        if now < self._next_attempt:
            time.sleep(max(0.0, min(deadline, self._next_attempt) - now))
            if time.monotonic() < self._next_attempt:
                return False
        try:
            self._connect()
        except (TransportUnreachable, *LINK_ERRORS) as exc:
            self._failures += 1
            self._next_attempt = time.monotonic() + self._delay
            level = logging.ERROR if isinstance(exc, (LinkRefused, QueueMismatch)) else \
                logging.WARNING
            if self._failures <= 3 or self._failures % 20 == 0:
                LOG.log(level, "listener %s cannot reconnect (attempt %d): %s; next attempt in "
                        "%.1fs", self._label, self._failures, exc, self._delay)
            self._delay = min(self._delay * 2, self._settings.reconnect_max_interval)
            return False
        if self._failures:
            LOG.info("listener %s reconnected to %s after %d failed attempt(s)", self._label,
                     self._link.endpoint.label if self._link else "?", self._failures)
        else:
            LOG.info("listener %s reconnected to %s", self._label,
                     self._link.endpoint.label if self._link else "?")
        self._failures = 0
        self._delay = self._settings.reconnect_interval
        return True

    # -- callbacks from py-amqp (in the poll thread) ------------------------------------
    def _on_delivery(self, message: Any) -> None:
        info = message.delivery_info
        tag = info["delivery_tag"]
        props = message.properties
        msg = RabbitMessage(message.body, props.get("message_id"),
                            props.get("application_headers"), info["redelivered"], self,
                            self._generation, tag)
        self._held[tag] = msg
        self._outstanding.append(tag)
        self._ready.append(msg)

    def _on_cancel(self, consumer_tag: str) -> None:
        # The broker cancelled us (queue deleted, node down): start over on a new connection,
        # which declares the queue again.
        raise amqp.exceptions.ConsumerCancelled(
            f"the broker cancelled consumer {consumer_tag} (was its queue deleted?)")

    # -- settling -----------------------------------------------------------------------
    def _record(self, generation: int, tag: int, how: int) -> None:
        pending = self._settlements
        pending.append((generation, tag, how))
        if len(pending) == 1:
            self._pending_since = time.monotonic()
        # Requeues and rejections go out at once (a requeued message should be back in the
        # queue for the others now, not at this listener's next poll); acknowledgements wait
        # for a group. Only the poll thread may write to the channel.
        if (how != _ACK or len(pending) >= self._eager) \
                and threading.get_ident() == self._owner and self._io.acquire(blocking=False):
            try:
                if not self._closed and self._link is not None:
                    self._flush()
            except LINK_ERRORS as exc:
                self._lost(exc)  # the next poll reconnects
            finally:
                self._io.release()

    # -- polling ------------------------------------------------------------------------
    def poll(self, timeout: float) -> Sequence[IncomingMessage]:
        deadline = time.monotonic() + max(0.0, timeout)
        self._owner = threading.get_ident()
        with self._io:
            if self._closed:
                return []
            if self._link is None and not self._reconnect(deadline):
                return []
            try:
                if self._settlements and self._flush_due():
                    self._flush()
                got = self._receive(deadline)
                # After reading, so frames that waited in the socket while an endpoint was busy
                # count as signs of life before py-amqp judges the broker's heartbeats.
                self._check_heartbeat()
                return got
            except LINK_ERRORS as exc:
                self._lost(exc)
                return []
            except Exception as exc:
                # Our state and the channel may disagree now; start over on a new connection
                # rather than risk acknowledging the wrong tags.
                self._lost(exc)
                raise

    def _receive(self, deadline: float) -> list[IncomingMessage]:
        link = self._link
        assert link is not None
        ready = self._ready
        while not ready:
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            if not link.reader.frame_ready():
                if self._settlements and self._flush_due(idle=True):
                    self._flush()
                # A fixed slice, so the timeout rarely changes (see Link.set_timeout); only
                # the last slice of a poll is shorter, to end it on time.
                link.set_timeout(_SLICE if left >= _SLICE else max(left, 0.001))
            try:
                link.read_frame()
            except TimeoutError:
                continue
        limit = self._prefetch
        while len(ready) < limit and link.reader.frame_ready():
            link.read_frame()
        out: list[IncomingMessage] = list(ready)
        ready.clear()
        return out

    def _flush_due(self, idle: bool = False) -> bool:
        """Whether waiting settlements should go out now rather than with later ones.

        ``idle``: about to wait for the broker; then the group goes out if it is old enough,
        since nothing else may come to join it before the wait ends.
        """
        return (len(self._settlements) >= self._eager
                or len(self._outstanding) >= self._prefetch  # the broker waits for acks
                or time.monotonic() - self._pending_since >= (_ACK_DELAY if idle else _SLICE))

    def _flush(self) -> None:
        """Send recorded settlements of this connection's messages (see the module docstring)."""
        pending = self._settlements
        if not pending:
            return
        link = self._link
        generation = self._generation
        held = self._held
        acks: set[int] = set()
        dropped = 0
        channel = link.channel if link is not None else None
        while pending:
            gen, tag, how = pending.popleft()
            if gen != generation or channel is None or held.pop(tag, None) is None:
                dropped += 1
                continue
            if how == _ACK:
                acks.add(tag)
            else:
                channel.basic_reject(tag, requeue=how == _REQUEUE)
                self._settled_ahead.add(tag)
        if dropped:
            LOG.debug("listener %s dropped %d settlement(s) of messages from a closed "
                      "connection; the broker redelivers them", self._label, dropped)
        if not acks or channel is None:
            self._trim()
            return
        last = 0
        outstanding, ahead = self._outstanding, self._settled_ahead
        while outstanding:
            tag = outstanding[0]
            if tag in acks:
                acks.discard(tag)
                last = tag
            elif tag in ahead:
                ahead.discard(tag)
            else:
                break
            outstanding.popleft()
        if last:
            channel.basic_ack(last, multiple=True)
        for tag in acks:  # beyond an unsettled message: one by one
            channel.basic_ack(tag)
            ahead.add(tag)

    def _trim(self) -> None:
        outstanding, ahead = self._outstanding, self._settled_ahead
        while outstanding and outstanding[0] in ahead:
            ahead.discard(outstanding.popleft())

    def _check_heartbeat(self) -> None:
        hb = self._settings.heartbeat
        if not hb or self._link is None:
            return
        now = time.monotonic()
        if now >= self._next_heartbeat_check:
            self._next_heartbeat_check = now + hb / 4.0
            self._link.conn.heartbeat_tick(rate=4)

    def beat(self) -> None:
        """Heartbeat thread: when the poll thread is away (a slow endpoint), say we are alive.

        Only sends; it never reads, so deliveries stay for the poll thread to take in order.
        """
        if not self._io.acquire(blocking=False):
            return
        try:
            link = self._link
            if link is None or self._closed:
                return
            conn = link.conn
            if conn.bytes_sent == self._hb_mark:
                link.set_timeout(5.0)
                conn.send_heartbeat()
            self._hb_mark = conn.bytes_sent
        except LINK_ERRORS as exc:
            LOG.debug("listener %s heartbeat failed: %s", self._label, describe_error(exc))
        finally:
            self._io.release()

    # -- closing ------------------------------------------------------------------------
    def close(self) -> None:
        with self._io:
            if self._closed:
                return
            self._closed = True
            link, self._link = self._link, None
            if link is not None:
                try:
                    self._link = link
                    self._flush()
                    link.set_timeout(2.0)
                    for tag in self._consumer_tags:
                        link.channel.basic_cancel(tag)
                except LINK_ERRORS as exc:
                    LOG.debug("listener %s: cancelling consumers failed: %s", self._label,
                              describe_error(exc))
                finally:
                    self._link = None
                    # Closing the channel hands every unacknowledged message back.
                    link.close()
            for msg in self._held.values():
                msg._claim_for_return()
            self._generation += 1
            self._held.clear()
            self._ready.clear()
            self._outstanding.clear()
            self._settled_ahead.clear()
            self._settlements.clear()
