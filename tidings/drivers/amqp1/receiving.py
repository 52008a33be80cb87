"""Listeners: one AMQP 1.0 connection each, one receiver link (in its own session) per queue.

Threads: the listener's ``poll()`` runs in the core's poll thread; everything proton does happens
in the driver's loop thread. The loop thread pulls each complete delivery's bytes off the link and
appends them to the listener's inbox; ``poll()`` takes the inbox, decodes the messages (in the
poll thread, off the busy loop thread) and returns them. ``ack``/``requeue``/``reject`` may come
from any thread: they are queued and the loop thread performs them in batches, as ``accepted``,
``released`` and ``rejected`` dispositions. ``released``, not ``modified``: RabbitMQ 3.x ends the
session on a ``modified`` disposition (proton's own ``release()`` sends ``modified`` by default).

Prefetch: AMQP 1.0 credit is per link and cannot be taken back without drain mode (which crashes
the session on RabbitMQ 3.x), so the listener's prefetch is split into fixed shares, one per link,
and each link is topped up only as its messages are settled: credit plus unsettled messages never
exceed the share. A link needs a share of at least 1 to receive anything, so a listener on more
queues than its prefetch (the no-pool group of an endpoint with all seven priorities consumes
seven queues) may have up to one message per queue on its way; ``poll()`` still never hands the
application more than ``prefetch`` unsettled messages and keeps the rest buffered until a
settlement frees a slot.

Reconnect: any failure (connection, session or link) gives up the whole connection; the broker
puts every unsettled message back. Settlements of messages from the old connection are dropped
(those messages come again, so processing is at-least-once). ``poll()`` notices, and a short-lived
thread redeclares the topology (the queues may be gone after a broker restart) and opens a new
connection, with backoff, while ``poll()`` keeps returning promptly.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from proton import Connection, Delivery, Endpoint, Message

from tidings.drivers.amqp1.connection import ConnectionOwner, ConnectParams
from tidings.drivers.amqp1.loop import EventLoop
from tidings.transports.base import Binding, IncomingMessage, Listener
from tidings.transports.errors import TransportUnreachable

if TYPE_CHECKING:
    from tidings.drivers.amqp1.topology import Topology

__all__ = ["AMQP1Listener", "AMQP1Message", "split_prefetch"]

LOG = logging.getLogger(__name__)


def split_prefetch(prefetch: int, links: int) -> list[int]:
    """Credit shares of ``prefetch`` for ``links`` links, as even as possible, each at least 1
    (so with fewer prefetch than links, every link gets 1)."""
    if links < 1:
        raise ValueError("a listener needs at least one queue")
    if prefetch < 1:
        raise ValueError(f"prefetch={prefetch} must be a positive integer")
    if prefetch < links:
        return [1] * links
    base, extra = divmod(prefetch, links)
    return [base + (1 if i < extra else 0) for i in range(links)]


class _RecvLink:
    __slots__ = ("address", "receiver", "remote_open", "share", "unsettled")

    def __init__(self, address: str, share: int, receiver: Any) -> None:
        self.address = address
        self.share = share
        self.receiver = receiver
        self.unsettled = 0
        self.remote_open = False


class _Entry:
    """A received message as the loop thread hands it over: decoded fields and a handle.

    No proton object travels with it. proton's reference counts are not thread-safe, so a
    Delivery wrapper garbage-collected in an application thread (where messages end up) while
    the loop thread works would corrupt memory; the side keeps the Delivery, by ``handle``.
    """

    __slots__ = ("address", "fields", "handle", "side")

    def __init__(self, fields: tuple[bytes, str | None, dict[str, Any] | None, bool],
                 handle: int, address: str, side: _ReceiveSide) -> None:
        self.fields = fields
        self.handle = handle
        self.address = address
        self.side = side


class _ReceiveSide(ConnectionOwner):
    """One connection of one listener (loop thread only). A reconnect makes a new one."""

    def __init__(self, loop: EventLoop, params: ConnectParams, attempt: int,
                 listener: AMQP1Listener, addresses: Sequence[str],
                 shares: Sequence[int]) -> None:
        super().__init__(loop)
        self.params = params
        self.attempt = attempt
        self.listener = listener
        self.addresses = list(addresses)
        self.shares = list(shares)
        self.links: list[_RecvLink] = []
        self.deliveries: dict[int, tuple[Any, _RecvLink]] = {}
        self._handles = itertools.count(1)
        self.dead = False
        self.closing = False
        self._closed_callbacks: list[Callable[[], None]] = []

    def open(self) -> None:
        if self.dead:
            return
        try:
            conn = self.params.connect(self.loop, self, self.attempt)
        except Exception as exc:  # e.g. a host name that does not resolve
            self.dead = True
            self.listener._side_lost(self, f"cannot connect: {exc}")
            return
        self.conn = conn
        self.loop.add_stop_callback(id(self), self._loop_stopped)
        for address, share in zip(self.addresses, self.shares, strict=True):
            session = conn.session()
            session.open()
            receiver = session.receiver(f"tidings-recv-{uuid.uuid4().hex[:12]}")
            receiver.source.address = address
            receiver.target.address = None
            link = _RecvLink(address, share, receiver)
            receiver.tidings_link = link
            receiver.open()
            receiver.flow(share)
            self.links.append(link)

    def on_link_remote_open(self, event: Any) -> None:
        link: _RecvLink | None = getattr(event.link, "tidings_link", None)
        if link is None or self.dead:
            return
        if event.link.remote_source.address is None:
            # The broker refused the attach (it follows up with a detach and an error).
            return
        link.remote_open = True
        if all(lk.remote_open for lk in self.links):
            self.listener._side_opened(self)

    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        receiver = dlv.link
        if self.dead or not receiver.is_receiver:
            return
        link: _RecvLink = receiver.tidings_link
        if dlv.aborted:
            dlv.settle()
            self._top_up(link)
            return
        if dlv.partial or not dlv.readable:
            return  # the rest of a large message is still on its way
        data = receiver.recv(dlv.pending)
        receiver.advance()
        link.unsettled += 1
        handle = next(self._handles)
        self.deliveries[handle] = (dlv, link)
        self.listener._deliver(_Entry(unpack(data, link.address), handle, link.address, self))

    def settle(self, items: Sequence[tuple[_Entry, int]]) -> None:
        """Send the dispositions (loop thread). Those of an older connection are dropped: the
        broker already put those messages back when the connection went."""
        if self.dead:
            return
        touched: dict[int, _RecvLink] = {}
        for entry, state in items:
            found = self.deliveries.pop(entry.handle, None) if entry.side is self else None
            if found is None:
                continue
            dlv, link = found
            dlv.update(state)
            dlv.settle()
            link.unsettled -= 1
            touched[id(link)] = link
        for link in touched.values():
            self._top_up(link)

    def _top_up(self, link: _RecvLink) -> None:
        receiver = link.receiver
        want = link.share - link.unsettled - receiver.credit
        if want > 0 and not receiver.state & Endpoint.LOCAL_CLOSED:
            receiver.flow(want)

    def close(self, on_closed: Callable[[], None]) -> None:
        """Close the connection; ``on_closed`` runs once the broker confirmed (or it broke)."""
        self.closing = True
        if self.dead or self.conn is None:
            self.dead = True
            self._release()
            on_closed()
            return
        self._closed_callbacks.append(on_closed)
        self._give_up(self.conn, "the listener was closed")

    def abandon(self, reason: str) -> None:
        if self.dead:
            return
        if self.conn is None:
            self.dead = True
            self.listener._side_lost(self, reason)
            return
        self._give_up(self.conn, reason)

    def lost(self, conn: Connection, reason: str) -> None:
        self.loop.remove_stop_callback(id(self))
        if not self.dead:
            self.dead = True
            if not self.closing:
                self.listener._side_lost(self, reason)
        # The broker puts back whatever was unsettled; forget those deliveries here, in the
        # loop thread, rather than leave their wrappers to whichever thread drops this side.
        self.deliveries.clear()
        if conn.state & Endpoint.REMOTE_CLOSED or not _has_transport(conn):
            self._finish_close()

    def _loop_stopped(self, reason: str) -> None:
        if not self.dead:
            self.dead = True
            if not self.closing:
                self.listener._side_lost(self, reason)
        self._finish_close()

    def on_connection_remote_close(self, event: Any) -> None:
        super().on_connection_remote_close(event)
        self._finish_close()

    def on_transport_closed(self, event: Any) -> None:
        super().on_transport_closed(event)
        self._finish_close()

    def _finish_close(self) -> None:
        self._release()
        callbacks, self._closed_callbacks = self._closed_callbacks, []
        for cb in callbacks:
            cb()

    def _release(self) -> None:
        """Drop every proton object this side holds (loop thread), once it is over."""
        if not self.dead:
            return
        self.deliveries.clear()
        for link in self.links:
            link.receiver = None
        self.conn = None
        self._lost_reported = None


def _has_transport(conn: Connection) -> bool:
    try:
        return conn.transport is not None
    except Exception:
        return False


class AMQP1Message(IncomingMessage):
    """A received message; its settlement goes back to the loop thread as a disposition."""

    __slots__ = ("_entry", "_listener")

    def __init__(self, listener: AMQP1Listener, entry: _Entry) -> None:
        body, message_id, headers, redelivered = entry.fields
        super().__init__(body, message_id, headers, redelivered)
        self._listener = listener
        self._entry = entry

    def _ack(self) -> None:
        self._listener._settle(self, Delivery.ACCEPTED)

    def _requeue(self) -> None:
        self._listener._settle(self, Delivery.RELEASED)

    def _reject(self) -> None:
        self._listener._settle(self, Delivery.REJECTED)


def unpack(data: bytes, where: str) -> tuple[bytes, str | None, dict[str, Any] | None, bool]:
    """(body, message id, headers, redelivered) of an encoded AMQP 1.0 message.

    Done in the loop thread, which has the bytes: proton's decoder calls into C many times per
    message, and each call lets another thread take the GIL, so decoding there keeps the poll
    thread's work pure Python and the two threads from trading the GIL back and forth.
    """
    msg = Message()
    try:
        msg.decode(data)
    except Exception as exc:
        # Not a valid AMQP 1.0 message: hand the core an empty body, which it rejects as
        # malformed (logged), and the listener goes on.
        LOG.error("undecodable AMQP 1.0 message on %s (%s); it will be rejected", where, exc)
        return b"", None, None, False
    body = msg.body
    if isinstance(body, memoryview):
        body = body.tobytes()
    elif isinstance(body, str):
        body = body.encode("utf-8")
    elif body is None:
        body = b""
    elif not isinstance(body, bytes):
        # An amqp-value that is not binary (a map, a list): not a tidings notification.
        body = repr(body).encode("utf-8", "replace")
    mid = msg.id
    headers = msg.properties
    return (body, None if mid is None else str(mid), dict(headers) if headers else None,
            not msg.first_acquirer or bool(msg.delivery_count))


class AMQP1Listener(Listener):
    """A listener on one connection; see the module docstring for the threads and reconnects."""

    def __init__(self, *, loop_for_use: Callable[[], EventLoop], topology: Topology,
                 params: ConnectParams, bindings: Sequence[Binding], pool: str | None,
                 prefetch: int, connect_timeout: float, reconnect: tuple[float, float],
                 closed: threading.Event) -> None:
        self._loop_for_use = loop_for_use
        self._topology = topology
        self._params = params
        self._bindings = list(bindings)
        self._pool = pool
        self._prefetch = prefetch
        self._shares: list[int] = []
        self._connect_timeout = connect_timeout
        self._driver_closed = closed
        # One lock for the inbox, the state and the settlement queue: the loop thread, the poll
        # thread and settling threads each hold it only briefly.
        self._cond = threading.Condition(threading.Lock())
        self._inbox: deque[_Entry] = deque()
        self._side: _ReceiveSide | None = None
        self._loop: EventLoop | None = None
        self._state = "new"  # connecting, open, lost, reconnecting, closed
        self._reason = ""
        self._since = time.monotonic()
        self._retry_at = 0.0
        self._backoff_first, self._backoff_max = reconnect
        self._backoff = self._backoff_first
        self._attempt = 0
        self._opened_once = False  # connect failures before that are raised by listen()
        # settlements waiting for the loop thread
        self._settles: list[tuple[_Entry, int]] = []
        self._poll_thread: int | None = None  # settlements from this thread wait for poll()
        self._settle_wake = False
        self._held: dict[int, AMQP1Message] = {}  # id(entry) -> message handed out
        self._closed = False
        self._connect_now()

    # -- connecting ---------------------------------------------------------------------------
    def _connect_now(self) -> None:
        """First connect, in the caller of listen(): fail there if the broker is not usable.

        Attempts go round the URL's hosts, with the reconnect backoff between them, until
        ``connect_timeout`` has passed: a broker that refuses an attach once (RabbitMQ 3.x
        answers a race inside its plugin with an internal error) is not a reason to fail.
        The topology is declared first, so an unreachable broker fails at once.
        """
        deadline = time.monotonic() + self._connect_timeout
        addresses = self._topology.prepare_listen(self._bindings, self._pool)
        failures: list[str] = []
        backoff = self._backoff_first
        while True:
            where = self._params.address(self._attempt)
            side = self._start_side(addresses)
            with self._cond:
                while self._side is side and self._state == "connecting":
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                state, reason = self._state, self._reason
            if state == "open":
                if failures:
                    LOG.info("AMQP 1.0 listener attached after %d failed attempt(s): %s",
                             len(failures), "; ".join(failures))
                return
            self._abandon(side, "gave up attaching")
            failures.append(f"{where}: " + (reason if state == "lost" else "no answer"))
            if time.monotonic() + backoff >= deadline:
                break
            threading.Event().wait(backoff)  # back off before the next attempt
            backoff = min(backoff * 2, self._backoff_max)
            addresses = self._topology.prepare_listen(self._bindings, self._pool)
        self._closed = True
        shown = failures[-3:]
        # A failed TLS handshake carries its own advice; the plugin is not the problem then.
        advice = ("" if all("TLS handshake" in f for f in shown) else
                  "; check that the broker is up and that its AMQP 1.0 plugin is enabled "
                  "(rabbitmq-plugins enable rabbitmq_amqp1_0)")
        raise TransportUnreachable(
            f"cannot consume {', '.join(addresses)} over AMQP 1.0 within connect_timeout="
            f"{self._connect_timeout:g}s ({'; '.join(shown)}){advice}")

    def _start_side(self, addresses: Sequence[str]) -> _ReceiveSide:
        if len(self._shares) != len(addresses):
            self._shares = split_prefetch(self._prefetch, len(addresses))
        loop = self._loop_for_use()
        side = _ReceiveSide(loop, self._params, self._attempt, self, addresses, self._shares)
        self._attempt += 1
        with self._cond:
            if self._closed:  # close() won the race with a reconnect: open nothing
                side.dead = True
                return side
            self._side = side
            self._loop = loop
            self._state = "connecting"
            self._since = time.monotonic()
        loop.call(side.open, abort=lambda reason: self._side_lost(side, reason))
        return side

    def _abandon(self, side: _ReceiveSide, reason: str) -> None:
        try:
            side.loop.call(lambda: side.abandon(reason))
        except TransportUnreachable:
            pass

    def _side_opened(self, side: _ReceiveSide) -> None:  # loop thread
        with self._cond:
            if side is not self._side:
                return
            recovered = self._state == "connecting" and self._attempt > 1
            self._state = "open"
            self._opened_once = True
            self._backoff = self._backoff_first
            self._cond.notify_all()
        if recovered:
            LOG.info("AMQP 1.0 listener on %s is consuming again", ", ".join(side.addresses))

    def _side_lost(self, side: _ReceiveSide, reason: str) -> None:  # loop thread
        with self._cond:
            if side is not self._side or self._state in ("closed", "lost"):
                return
            was = self._state
            self._state = "lost"
            self._reason = reason
            self._retry_at = time.monotonic() + self._backoff
            # Messages not handed out yet go back to the broker with the connection.
            self._inbox = deque(e for e in self._inbox if e.side is not side)
            self._cond.notify_all()
        if self._driver_closed.is_set():
            LOG.debug("AMQP 1.0 listener stopped by the transport's cleanup (%s)", reason)
        elif was == "open":
            LOG.warning("AMQP 1.0 listener on %s lost its connection (%s); unsettled messages "
                        "go back to the queue, reconnecting", ", ".join(side.addresses), reason)
        elif was == "connecting" and "TLS handshake" in reason and self._opened_once:
            # Not transient, and the listener gets nothing until it is fixed: say so each time.
            LOG.warning("AMQP 1.0 listener on %s cannot reconnect: %s", ", ".join(side.addresses),
                        reason)
        else:
            LOG.debug("AMQP 1.0 listener connect failed: %s", reason)

    def _reconnect(self) -> None:
        """Redeclare and reconnect, in a short-lived thread so poll() stays prompt."""
        try:
            if self._closed or self._driver_closed.is_set():
                return
            addresses = self._topology.prepare_listen(self._bindings, self._pool)
            if self._closed or self._driver_closed.is_set():
                return
            self._start_side(addresses)
        except Exception as exc:
            with self._cond:
                if self._state == "reconnecting":
                    self._state = "lost"
                    self._reason = str(exc)
                    self._retry_at = time.monotonic() + self._backoff
            LOG.warning("AMQP 1.0 listener cannot reconnect yet (%s); trying again in %.1fs",
                        exc, self._backoff)

    def _maintain(self) -> None:
        """Start a reconnect when due; give up an attach that hangs (poll thread)."""
        now = time.monotonic()
        start = False
        stale: _ReceiveSide | None = None
        with self._cond:
            if self._state == "lost" and now >= self._retry_at:
                if self._driver_closed.is_set():
                    self._state = "closed"
                    return
                self._state = "reconnecting"
                self._backoff = min(self._backoff * 2, self._backoff_max)
                start = True
            elif self._state == "connecting" and now - self._since > self._connect_timeout:
                stale = self._side
        if start:
            threading.Thread(target=self._reconnect, name="tidings-amqp1-reconnect",
                             daemon=True).start()
        elif stale is not None:
            self._abandon(stale, f"not attached within connect_timeout="
                                 f"{self._connect_timeout:g}s")

    # -- receiving ---------------------------------------------------------------------------
    def _deliver(self, entry: _Entry) -> None:  # loop thread
        with self._cond:
            if entry.side is not self._side or self._state == "closed":
                return
            self._inbox.append(entry)
        # Wake poll() once this I/O cycle is over, with all it received (see loop.py).
        entry.side.loop.after_cycle(id(self), self._announce)

    def _announce(self) -> None:  # loop thread
        with self._cond:
            if self._inbox:
                self._cond.notify()

    def poll(self, timeout: float) -> Sequence[IncomingMessage]:
        if self._closed:
            return []
        self._poll_thread = threading.get_ident()
        if self._settles and not self._settle_wake:
            self._wake_for_settles()  # what the previous batch's handlers settled
        if self._state != "open":
            self._maintain()
        deadline = time.monotonic() + timeout
        with self._cond:
            # Wait for a message, and for room under prefetch to hand it out.
            while not (self._inbox and len(self._held) < self._prefetch) \
                    and self._state in ("open", "connecting"):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            room = self._prefetch - len(self._held)
            if not self._inbox or room <= 0:
                return []
            if len(self._inbox) <= room:
                entries = list(self._inbox)
                self._inbox.clear()
            else:
                entries = [self._inbox.popleft() for _ in range(room)]
            out = [AMQP1Message(self, e) for e in entries]
            for msg in out:
                self._held[id(msg._entry)] = msg
        return out

    # -- settling ----------------------------------------------------------------------------
    def _settle(self, msg: AMQP1Message, state: int) -> None:
        with self._cond:
            if self._closed or id(msg._entry) not in self._held:
                return  # closed: the message already went back to the broker
            del self._held[id(msg._entry)]
            self._settles.append((msg._entry, state))
            if threading.get_ident() == self._poll_thread:
                # Settled by the handler of the batch poll() returned: sent in one go when
                # poll() is called next, so the loop thread is not woken per message.
                return
            if self._inbox:
                self._cond.notify()  # a poll() waiting for room under prefetch may go on
            if self._settle_wake:
                return
        self._wake_for_settles()

    def _wake_for_settles(self) -> None:
        with self._cond:
            if self._settle_wake or not self._settles:
                return
            self._settle_wake = True
            loop = self._loop
        try:
            if loop is None:
                raise TransportUnreachable("no connection yet")
            loop.call(self._flush)
        except TransportUnreachable:
            with self._cond:
                self._settle_wake = False

    def _flush(self) -> None:  # loop thread
        with self._cond:
            items, self._settles = self._settles, []
            self._settle_wake = False
        if not items:
            return
        by_side: dict[int, tuple[_ReceiveSide, list[tuple[_Entry, int]]]] = {}
        for entry, state in items:
            by_side.setdefault(id(entry.side), (entry.side, []))[1].append((entry, state))
        for side, batch in by_side.values():
            side.settle(batch)

    # -- closing -----------------------------------------------------------------------------
    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            held = list(self._held.values())
            self._held.clear()
            side, loop = self._side, self._loop
            self._state = "closed"
            self._inbox.clear()
            self._cond.notify_all()
        done = threading.Event()
        if side is not None and loop is not None:
            def shutdown() -> None:
                self._flush()  # settlements made before close() still count
                side.close(done.set)
            try:
                loop.call(shutdown, abort=lambda _reason: done.set())
            except TransportUnreachable:
                done.set()
            if not done.wait(self._connect_timeout):
                LOG.warning("AMQP 1.0 listener on %s: the broker did not confirm the close "
                            "within %.1fs", ", ".join(side.addresses), self._connect_timeout)
        # What was handed out and not settled went back to the queue with the connection.
        for msg in held:
            msg._claim_for_return()
