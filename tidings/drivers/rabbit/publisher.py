"""Confirmed publishing over one connection per driver, on a channel in confirm mode.

A batch is published under a short lock (declarations first, then every message in one socket
write) and its sender then waits for the confirmations. Waiting is shared: the first waiting
thread reads and dispatches every confirmation (one ``basic.ack multiple`` may confirm many
sends) while others keep publishing, and hands the reading over to the oldest waiter once its
own are in; so concurrent notifiers pipeline on one connection with no thread of ours. Messages
go out ``mandatory``: an unroutable one (its queue was deleted since this connection declared
it) comes back as ``basic.return`` and fails, so the core's retry declares the queue again.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import amqp
import amqp.exceptions

from tidings.drivers._rabbitmq.connecting import Connecting
from tidings.drivers.rabbit.link import LINK_ERRORS, Link, LinkRefused, describe_error, open_link
from tidings.drivers.rabbit.options import Settings, Topology
from tidings.transports.base import OutgoingMessage
from tidings.transports.errors import TransportUnreachable

__all__ = ["Publisher"]

LOG = logging.getLogger("tidings.drivers.rabbit")


class _Pending:
    """One published message waiting for its confirmation. ``event`` is made only when its
    sender has to wait for another thread: set after ``done``, checked after it is made, so
    no wake-up is lost."""

    __slots__ = ("done", "error", "event", "message_id")

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self.done = False
        self.error: str | None = None
        self.event: threading.Event | None = None

    def wake(self) -> None:
        event = self.event
        if event is not None:
            event.set()

    def sleep(self, timeout: float) -> None:
        event = self.event
        if event is None:
            event = self.event = threading.Event()
        if not self.done:
            event.wait(timeout)
        event.clear()


class _State:
    """A publisher connection and what was declared and published on it."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.seq = 0
        self.pending: deque[tuple[int, _Pending]] = deque()
        self.returned: dict[str, str] = {}
        self.exchanges: set[str] = set()
        self.queues: set[tuple[str, str]] = set()
        self.declare_channel: Any = None
        self.last_read = time.monotonic()
        #: Why the broker blocks this connection (an alarm), or None. Nothing is published on
        #: it meanwhile: such a message would sit unconfirmed and arrive after the alarm anyway.
        self.blocked: str | None = None
        #: The broker refused a message (basic.nack). RabbitMQ 3.10 keeps a channel's state of
        #: a quorum queue: a channel whose first publish to it found the queue's recorded
        #: leader dead is refused for that queue from then on, even once another node leads.
        #: The next send, once nothing here awaits confirmation, takes a new connection.
        self.nacked = False


class Publisher:
    """Sends with publisher confirms over one shared connection (see the module docstring)."""

    def __init__(self, settings: Settings, topology: Topology,
                 connecting: Connecting | None = None) -> None:
        self._settings = settings
        self._connecting = connecting
        self._topology = topology
        self._io = threading.Lock()        # writes, frame dispatch and state changes
        self._reading = threading.Lock()   # held by the one thread reading the connection
        self._state: _State | None = None
        self._next_host = 0
        self._closed = False
        self._warned: set[str] = set()

    def send_batch(self, messages: Sequence[OutgoingMessage],
                   timeout: float) -> list[BaseException | None]:
        """Publish every message, then wait for their confirmations together."""
        deadline = time.monotonic() + timeout
        results: list[BaseException | None] = [None] * len(messages)
        published: list[tuple[int, _Pending]] = []
        try:
            with self._io:
                st = self._usable_state()
            # Blocked by an alarm: wait (reading, to see connection.unblocked) up to the timeout.
            self._read(st, lambda: st.blocked is None, deadline)
            if st.blocked is not None and st.link.alive:
                raise TransportUnreachable(self._blocked_error(st, timeout))
            with self._io:
                if self._state is not st:
                    st = self._usable_state()
                try:
                    for message in messages:  # declares wait for replies: all before corking
                        self._declare_for(st, message.exchange, message.routing_key)
                except LINK_ERRORS as exc:
                    self._drop(st, exc)
                    raise TransportUnreachable(f"declaring the publisher's topology at "
                                               f"{st.link.endpoint.label} failed: "
                                               f"{describe_error(exc)}") from exc
                try:
                    with st.link.corked():
                        for i, message in enumerate(messages):
                            if not st.link.alive:
                                results[i] = TransportUnreachable(
                                    f"publishing {message.message_id} was abandoned: the "
                                    f"connection to {st.link.endpoint.label} failed earlier "
                                    f"in its batch")
                                continue
                            try:
                                published.append((i, self._publish(st, message, timeout)))
                            except Exception as exc:
                                results[i] = exc
                except LINK_ERRORS as exc:  # writing the batch failed: none of it is confirmed
                    self._drop(st, exc)
        except TransportUnreachable as exc:
            return [exc] * len(messages)
        for i, pending in published:
            self._await(st, pending, deadline, timeout)
            if pending.error is not None:
                results[i] = TransportUnreachable(
                    f"RabbitMQ did not confirm message {messages[i].message_id} sent to "
                    f"{messages[i].exchange}/{messages[i].routing_key}: {pending.error}")
        return results

    def _publish(self, st: _State, message: OutgoingMessage, timeout: float) -> _Pending:
        """Publish one message on ``st`` and register it for its confirmation (I/O lock held,
        its exchange and queue declared)."""
        pending = _Pending(message.message_id)
        props: dict[str, Any] = {
            "content_type": message.content_type, "content_encoding": message.content_encoding,
            "delivery_mode": 2 if message.persistent else 1, "message_id": message.message_id}
        if message.headers:
            props["application_headers"] = dict(message.headers)
        try:
            st.link.set_timeout(max(timeout, 1.0))  # bounds a write; the wait has its own
            st.seq += 1
            st.pending.append((st.seq, pending))
            st.link.channel.basic_publish(amqp.Message(message.body, **props),
                                          exchange=message.exchange,
                                          routing_key=message.routing_key, mandatory=True)
        except LINK_ERRORS as exc:
            self._drop(st, exc)
            raise TransportUnreachable(
                f"publishing {message.message_id} to {message.exchange}/"
                f"{message.routing_key} at {st.link.endpoint.label} failed: "
                f"{describe_error(exc)}") from exc
        except BaseException as exc:
            # Whether the broker got it (and so which sequence number the next confirm
            # carries) is unknown now: start over on a new connection.
            if st.pending and st.pending[-1][1] is pending:
                self._drop(st, exc)
            raise
        return pending

    def _await(self, st: _State, pending: _Pending, deadline: float, timeout: float) -> None:
        self._read(st, lambda: pending.done, deadline, pending)
        with self._io:
            if pending.done:
                return
            if st.blocked is not None:
                # Blocked after reading this message (an alarm): fail it alone. A new connection
                # would only be blocked after its own first publish, one more copy for later.
                for i, (_, other) in enumerate(st.pending):
                    if other is pending:
                        del st.pending[i]
                        break
                self._finish(st, pending, self._blocked_error(st, timeout))
            else:
                # No answer: this connection cannot be trusted with the others' either.
                self._drop(st, TimeoutError(f"no confirmation within {timeout:g}s"))

    def _read(self, st: _State, done: Callable[[], bool], deadline: float,
              pending: _Pending | None = None) -> None:
        """Until ``done()`` or the deadline: read the connection, or sleep while another
        thread reads it (woken when ``pending`` is confirmed). Waits for data without the I/O
        lock, so other threads keep publishing meanwhile."""
        link = st.link
        while not done() and link.alive:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if not self._reading.acquire(blocking=False):
                if pending is not None:
                    pending.sleep(min(left, 0.05))
                else:
                    threading.Event().wait(min(left, 0.05))
                continue
            try:
                while not done() and link.alive:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    frames = link.conn.bytes_recv  # py-amqp counts every frame it dispatches
                    if not link.readable(min(left, 0.05)):
                        continue
                    with self._io:
                        if done() or not link.alive or (link.conn.bytes_recv != frames
                                                        and not link.reader.frame_ready()):
                            continue  # done, or someone (a declare) read it meanwhile
                        try:
                            link.read_frame()
                            while link.reader.frame_ready():
                                link.read_frame()
                            st.last_read = time.monotonic()
                        except LINK_ERRORS as exc:
                            self._drop(st, exc)
            finally:
                self._reading.release()
            if pending is not None:  # wake the oldest waiter: it reads from now on
                with self._io:
                    for _, other in st.pending:
                        if not other.done:
                            other.wake()
                            break

    @staticmethod
    def _blocked_error(st: _State, timeout: float) -> str:
        return (f"RabbitMQ at {st.link.endpoint.label} is blocking publishers ({st.blocked}): "
                f"a memory or disk alarm; waited {timeout:g}s (send_timeout) for it to clear. "
                f"Free memory or disk space on the broker (rabbitmq-diagnostics alarms)")

    # -- confirmations (called by py-amqp while a thread reads under the I/O lock) -------------
    @staticmethod
    def _finish(st: _State, pending: _Pending, error: str | None) -> None:
        if error is None and st.returned:
            error = st.returned.pop(pending.message_id, None)
        pending.error = error
        pending.done = True
        pending.wake()

    def _confirmed(self, st: _State, tag: int, multiple: bool, error: str | None = None) -> None:
        if error is not None:
            st.nacked = True
        queue = st.pending
        if multiple:
            while queue and queue[0][0] <= tag:
                self._finish(st, queue.popleft()[1], error)
        elif queue and queue[0][0] == tag:
            self._finish(st, queue.popleft()[1], error)
        else:
            for i, (seq, pending) in enumerate(queue):
                if seq == tag:
                    del queue[i]
                    self._finish(st, pending, error)
                    break

    def _callbacks(self, st: _State) -> None:
        label = st.link.endpoint.label

        def on_return(exc: Any, exchange: str, routing_key: str, message: Any) -> None:
            message_id = (getattr(message, "properties", None) or {}).get("message_id")
            st.queues.discard((exchange, routing_key))
            if message_id is not None:
                st.returned[message_id] = (
                    f"unroutable: no queue is bound to exchange {exchange!r} with routing key "
                    f"{routing_key!r} ({describe_error(exc)}); the next attempt declares it")

        def on_blocked(reason: str) -> None:
            st.blocked = reason or "connection.blocked"
            LOG.warning("RabbitMQ at %s blocks publishing (%s): a memory or disk alarm; sends "
                        "wait up to send_timeout each, then the retry policy decides", label,
                        st.blocked)

        def on_unblocked() -> None:
            st.blocked = None
            LOG.warning("RabbitMQ at %s publishes again (connection.unblocked)", label)

        st.link.conn.on_blocked = on_blocked
        st.link.conn.on_unblocked = on_unblocked
        events = st.link.channel.events
        events["basic_ack"].add(functools.partial(self._confirmed, st))
        events["basic_nack"].add(functools.partial(
            self._confirmed, st, error="the broker refused it (basic.nack): a queue may be full "
                                       "with x-overflow=reject-publish, or the broker is short "
                                       "of resources"))
        events["basic_return"].add(on_return)

    # -- the connection -----------------------------------------------------------------
    def _usable_state(self) -> _State:
        """The current connection, checked for a close the broker sent while we were idle;
        or a new one. Called under the I/O lock."""
        if self._closed:
            raise TransportUnreachable("the rabbit driver was cleaned up; build a new "
                                       "transport to send")
        st = self._state
        if st is not None and st.link.alive and st.nacked and not st.pending:
            LOG.info("RabbitMQ at %s refused a message (basic.nack); publishing on a new "
                     "connection", st.link.endpoint.label)
            self._state = None
            st.link.close()
        if st is not None and st.link.alive:
            # After a quiet second, look for a close the broker sent meanwhile (a restart), so
            # this send goes to a new connection instead of failing on the dead one.
            if not st.pending and time.monotonic() - st.last_read > 1.0 \
                    and self._reading.acquire(blocking=False):
                try:
                    self._pump(st)
                except LINK_ERRORS as exc:
                    LOG.info("publisher connection to %s was lost while idle (%s); "
                             "reconnecting", st.link.endpoint.label, describe_error(exc))
                    self._drop(st, exc)
                finally:
                    self._reading.release()
            if st.link.alive:
                return st
        link, self._next_host = open_link(self._settings, self._next_host, "publisher",
                                             self._connecting)
        try:
            st = _State(link)
            self._callbacks(st)
            link.channel.confirm_select()
            # py-amqp polls the socket before every publish when the broker may send
            # connection.blocked (two settimeout() and a failing recv()); our reads see it.
            capabilities = link.conn.client_properties.get("capabilities")
            if isinstance(capabilities, dict):
                capabilities["connection.blocked"] = False
            st.declare_channel = link.open_channel()
            self._topology.declare_dead_letter(st.declare_channel)
        except LINK_ERRORS as exc:
            link.abort()
            raise TransportUnreachable(f"setting up the publisher channel on "
                                       f"{link.endpoint.label} failed: "
                                       f"{describe_error(exc)}") from exc
        self._state = st
        LOG.debug("publisher connected to %s", link.endpoint.label)
        return st

    @staticmethod
    def _pump(st: _State) -> None:
        """Dispatch whatever frames are waiting, without blocking (I/O lock held)."""
        link = st.link
        while link.readable(0.0):
            link.read_frame()
        st.last_read = time.monotonic()

    def _drop(self, st: _State, exc: BaseException) -> None:
        """Forget a broken connection; its unconfirmed sends fail (the core retries them)."""
        reason = f"the connection to {st.link.endpoint.label} was lost before the broker " \
                 f"confirmed it ({describe_error(exc)})"
        while st.pending:
            self._finish(st, st.pending.popleft()[1], reason)
        st.link.abort()
        if self._state is st:
            self._state = None

    def _declare_for(self, st: _State, exchange: str, routing_key: str) -> None:
        """Declare the exchange and, like oslo.messaging's notifier, the no-pool group's queue,
        once per connection, so a notification sent before any listener starts is kept."""
        topo = self._topology
        if exchange not in st.exchanges:
            self._declare(st, f"exchange {exchange!r}", topo.declare_exchange, exchange)
            st.exchanges.add(exchange)
        if (exchange, routing_key) not in st.queues:
            queue = topo.model.group_queue(exchange, routing_key)
            self._declare(st, f"queue {queue!r}", topo.declare_queue, queue)
            self._declare(st, f"binding of queue {queue!r} to {exchange!r}", topo.bind, queue,
                          exchange, routing_key)
            st.queues.add((exchange, routing_key))

    def _declare(self, st: _State, what: str, declare: Callable[..., None], *args: str) -> None:
        if st.declare_channel is None or not st.declare_channel.is_open:
            st.declare_channel = st.link.open_channel()
        try:
            declare(st.declare_channel, *args)
        except amqp.exceptions.PreconditionFailed as exc:
            # It exists with other flags or arguments (another service declared it first).
            # Publishing to it as it is loses nothing; insisting would fail every send.
            if what not in self._warned:
                self._warned.add(what)
                LOG.warning("%s already exists with other settings (%s); publishing to it as "
                            "it is. Use the same durable/quorum/queue_expiry/message_ttl/"
                            "dead_letter_exchange options as the services that share it.",
                            what, describe_error(exc))
            st.declare_channel = st.link.open_channel()  # the broker closed that one
            if declare != self._topology.bind:
                declare(st.declare_channel, *args, passive=True)
        except amqp.exceptions.AccessRefused as exc:
            st.declare_channel = None
            raise LinkRefused(f"RabbitMQ refused to declare {what} on {self._settings.shown}: "
                              f"{describe_error(exc)}; grant the user configure and write "
                              f"permissions on the virtual host") from exc

    # -- upkeep -------------------------------------------------------------------------
    def beat(self) -> None:
        """Heartbeat thread: read what the broker sent while idle and answer its heartbeats."""
        st = self._state
        if st is None or not self._reading.acquire(blocking=False):
            return  # not connected, or a sender is reading: the connection is busy, hence alive
        if not self._io.acquire(blocking=False):
            self._reading.release()
            return
        try:
            if self._state is st and st.link.alive:
                self._pump(st)
                st.link.conn.heartbeat_tick(rate=4)
        except LINK_ERRORS as exc:
            LOG.info("publisher connection to %s failed its heartbeat (%s); the next send "
                     "reconnects", st.link.endpoint.label, describe_error(exc))
            self._drop(st, exc)
        finally:
            self._io.release()
            self._reading.release()

    def close(self) -> None:
        self._closed = True  # a send connecting now (the driver aborted it) gives up
        with self._io:
            st, self._state = self._state, None
            if st is not None:
                while st.pending:
                    self._finish(st, st.pending.popleft()[1], "the driver was cleaned up")
                st.link.close()
