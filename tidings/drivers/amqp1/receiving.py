"""Receivers: one AMQP 1.0 connection each, one receiver link (in its own session) per queue.

The loop thread decodes each complete delivery into the receiver's inbox; ``receive()`` (the
core's poll thread) takes what it is asked for and leaves the rest there. ``settle()`` hands the
dispositions to the loop thread: ``accepted``, ``released`` (not ``modified``, which ends the
session on RabbitMQ 3.x and is what proton's ``release()`` sends), ``rejected``. Any failure of
the connection, a session or a link gives up the connection: the broker puts back what was
unsettled, and ``receive()`` and ``settle()`` raise TransportUnreachable so the core listens again.

Credit, per link, is the broker's flow control, and AMQP 1.0 cannot take it back without drain
mode (which crashes the session on RabbitMQ 3.x). A link gets more only once it has used all it
had: RabbitMQ 3.x turns each flow frame into a credit that *replaces* the queue's, not counting
the messages the queue already handed to the session, so a top-up while credit is outstanding
lets it send that many more (measured: 2 beyond a credit of 50 on an idle machine, over a
thousand under load). The links share the window: each may hold 1 (so every queue can deliver)
and beyond that they share ``prefetch - 1``, one busy queue taking all of it; a link's grants
double from 1 while it uses them, so a queue that had one message does not sit on credit the
others need. Credit and unsettled messages together stay within ``prefetch`` for one queue,
``prefetch + queues - 1`` for several.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from proton import Connection, Data, Delivery, Endpoint, Message

from tidings.drivers.amqp1.connection import ConnectionOwner, ConnectParams
from tidings.drivers.amqp1.loop import EventLoop
from tidings.transports.base import ACK, REJECT, REQUEUE, IncomingMessage, Outcome, Receiver
from tidings.transports.errors import TransportUnreachable

__all__ = ["AMQP1Receiver", "credit_to_grant", "sniff_id", "unpack"]

LOG = logging.getLogger(__name__)

_SECTIONS = 64 * 1024  # allowed beyond max_message_size for the other sections (core checks)
_PART = 1024 * 1024  # a delivery still arriving is taken out of proton in parts of this size

_STATES = {ACK: Delivery.ACCEPTED, REQUEUE: Delivery.RELEASED, REJECT: Delivery.REJECTED}
# (body, message id, headers, redelivered, delivery count, what is wrong with it)
Fields = tuple[bytes, "str | None", "dict[str, Any] | None", bool, "int | None", "str | None"]


def credit_to_grant(prefetch: int, credit: int, unsettled: int, last: int,
                    others: Iterable[tuple[int, int]]) -> int:
    """More credit for a link, given its ``credit`` and ``unsettled`` messages, its ``last``
    grant and the (credit, unsettled) of the listener's other links (module docstring)."""
    if credit > 0:
        return 0
    shared = sum(max(0, c + u - 1) for c, u in others)
    return max(0, min(prefetch - shared - unsettled - credit, 2 * last))


def unpack(data: bytes) -> Fields:
    """The fields of an encoded AMQP 1.0 message, decoded in the loop thread, which has the
    bytes (proton's decoder calls into C many times per message, each a chance for another
    thread to take the GIL: the poll thread's side stays pure Python)."""
    msg = Message()
    try:
        msg.decode(data)
    except Exception as exc:
        return b"", None, None, False, None, f"it is not a valid AMQP 1.0 message ({exc})"
    body, problem = msg.body, None
    if isinstance(body, (memoryview, str)) or body is None:
        body = body.encode() if isinstance(body, str) else bytes(body or b"")
    elif not isinstance(body, bytes):
        body, problem = b"", f"its body is an AMQP {type(body).__name__}, not data"
    mid, headers, count = msg.id, msg.properties, msg.delivery_count
    return (body, None if mid is None else str(mid), dict(headers) if headers else None,
            not msg.first_acquirer or bool(count), count + 1 if count else None, problem)


def sniff_id(head: bytes) -> str | None:
    """The message id in the first bytes of an encoded message (the properties section comes
    before the body), or None; for logging a message refused before it is all there."""
    data = Data()
    with contextlib.suppress(Exception):  # a section cut off where the bytes end
        pos = 0
        while pos < len(head):
            pos += data.decode(head[pos:])
    with contextlib.suppress(Exception):
        data.rewind()
        while data.next():
            if not data.is_described():
                continue
            data.enter()
            data.next()
            if data.get_object() == 0x73 and data.next() and data.enter() and data.next():
                found = data.get_object()  # the properties section: the id comes first
                return None if found is None else str(found)
            data.exit()
    return None


@dataclass(slots=True, eq=False)
class _Link:
    address: str
    last: int  # the last credit granted
    unsettled: int = 0
    receiver: Any = None
    parts: list[bytes] | None = None  # a large delivery still arriving (None: refused)
    taken: int = 0  # its bytes so far
    first_id: str | None = None  # its message id


class AMQP1Receiver(ConnectionOwner, Receiver):
    """One listener connection. The loop thread runs its proton side (the ``on_*`` events and
    the ``_in_loop`` methods), the core's poll thread calls receive(), settle() and close().
    Deliveries stay here, by an integer handle (the messages' token): no proton object leaves
    the loop thread, since proton's reference counts are not thread-safe."""

    def __init__(self, loop: EventLoop, params: ConnectParams, attempt: int,
                 addresses: Sequence[str], prefetch: int, close_timeout: float,
                 max_message_size: int = 16 * 1024 * 1024) -> None:
        super().__init__(loop, params)
        self._max_size, self._refuse_above = max_message_size, max_message_size + _SECTIONS
        self.addresses = list(addresses)
        self._attempt = attempt
        self._prefetch = prefetch
        self._close_timeout = close_timeout
        first = prefetch if len(addresses) == 1 else 1
        self._links = [_Link(address, first) for address in addresses]
        self._attached = 0
        # The loop thread's: every delivery not settled yet (given to the core or still in the
        # inbox), what the broker counts as unacknowledged here.
        self._held: dict[int, tuple[Any, _Link]] = {}
        self._handles = itertools.count(1)
        self._dead = False
        self._on_closed: list[Callable[[], None]] = []
        # Shared by both threads, under the condition:
        self._cond = threading.Condition(threading.Lock())
        self._inbox: deque[tuple[Fields, int]] = deque()
        self._state = "connecting"  # then open, and lost or closed
        self._reason = "no answer"
        self._interrupted = False
        loop.call(self._open_in_loop, abort=self._lost)

    def wait_open(self, timeout: float) -> str | None:
        """None once every link is attached, else why not within ``timeout`` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._state != "connecting", max(0.0, timeout))
            return None if self._state == "open" else self._reason

    # -- the contract (the poll thread) --------------------------------------------------------
    def receive(self, max_messages: int, timeout: float) -> Sequence[IncomingMessage]:
        with self._cond:
            if not self._inbox and self._state == "open" and not self._interrupted:
                self._cond.wait(timeout)
            self._interrupted = False
            if self._state == "lost":
                raise self._unreachable()
            inbox = self._inbox
            entries = [inbox.popleft() for _ in range(min(max_messages, len(inbox)))]
        out = []
        for (body, mid, headers, redelivered, count, problem), handle in entries:
            msg = IncomingMessage(body, mid, headers, redelivered, handle, count)
            if problem is not None:
                msg.problem = problem
            out.append(msg)
        return out

    def settle(self, outcomes: Sequence[Outcome]) -> None:
        if self._state == "lost":
            raise self._unreachable()
        items = [(msg.token, _STATES[how]) for msg, how in outcomes]
        self.loop.call(lambda: self._settle_in_loop(items))

    def interrupt(self) -> None:
        with self._cond:
            self._interrupted = True
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            if self._state == "closed":
                return
            wait = self._state == "open"  # for the broker's answer; never for a dead one
            self._state = "closed"
            self._inbox.clear()  # never handed to the core: back to the queue
            self._cond.notify_all()
        done = threading.Event()
        try:
            self.loop.call(lambda: self._close_in_loop(done.set), abort=lambda _: done.set())
        except TransportUnreachable:
            return
        if wait and not done.wait(self._close_timeout):
            LOG.warning("AMQP 1.0 listener on %s: the broker did not confirm the close within "
                        "%.1fs", ", ".join(self.addresses), self._close_timeout)

    def _unreachable(self) -> TransportUnreachable:
        return TransportUnreachable(f"AMQP 1.0 listener on {', '.join(self.addresses)} lost "
                                    f"its connection: {self._reason}")

    # -- the loop thread -----------------------------------------------------------------------
    def _open_in_loop(self) -> None:
        try:
            conn = self.conn = self.params.connect(self.loop, self, self._attempt)
        except Exception as exc:  # e.g. a host name that does not resolve
            self._stopped(f"cannot connect: {exc}")
            return
        self.loop.stop_callbacks[id(self)] = self._stopped
        for link in self._links:
            session = conn.session()
            session.open()
            receiver = link.receiver = session.receiver(f"tidings-recv-{uuid.uuid4().hex[:12]}")
            receiver.source.address = link.address
            receiver.tidings_link = link  # kept in proton's record: found again from events
            receiver.open()
            receiver.flow(link.last)

    def on_link_remote_open(self, event: Any) -> None:
        # No source: the broker refused the attach (a detach with the error follows).
        if not self._dead and event.link.remote_source.address is not None:
            self._attached += 1
            if self._attached == len(self._links):
                with self._cond:
                    if self._state == "connecting":
                        self._state = "open"
                        self._cond.notify_all()

    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        link: _Link | None = getattr(dlv.link, "tidings_link", None)
        if self._dead or link is None:
            return
        receiver = link.receiver
        if dlv.aborted:
            link.parts, link.taken = None, 0
            dlv.settle()
        elif not dlv.readable or (dlv.partial and not link.taken and dlv.pending < _PART):
            return  # the rest of the message is on its way; proton holds what came so far
        elif not dlv.partial and not link.taken and dlv.pending <= self._refuse_above:
            self._hold(dlv, link, unpack(receiver.recv(dlv.pending)))  # the usual case
        else:
            # A large message: taken from proton a part at a time, dropped as it comes once
            # over max_message_size (a link's deliveries come one by one: the link keeps it).
            data = receiver.recv(dlv.pending) or b""
            if not link.taken:
                link.parts, link.first_id = [], sniff_id(data[:65536])
            link.taken += len(data)
            if link.parts is not None:
                link.parts.append(data)
                if link.taken > self._refuse_above:
                    link.parts = None  # refused: what else comes is dropped
            if not dlv.partial:
                parts, taken, link.parts, link.taken = link.parts, link.taken, None, 0
                self._hold(dlv, link, unpack(b"".join(parts)) if parts is not None else (
                    b"", link.first_id, None, False, None,
                    f"it is {taken} bytes encoded, over max_message_size={self._max_size}; "
                    f"dropped as it arrived"))
        self._top_up(link)

    def _hold(self, dlv: Any, link: _Link, fields: Fields) -> None:
        """A complete delivery, for the inbox (it stays unsettled until the core settles it)."""
        link.receiver.advance()
        link.unsettled += 1
        handle = next(self._handles)
        self._held[handle] = (dlv, link)
        with self._cond:
            self._inbox.append((fields, handle))
        # Wake receive() once this I/O cycle is over, with all it received (loop.py).
        self.loop.after_cycle[id(self)] = self._announce

    def _announce(self) -> None:
        with self._cond:
            if self._inbox:
                self._cond.notify()

    def _settle_in_loop(self, items: Sequence[tuple[int, int]]) -> None:
        touched = set()
        for handle, state in items:
            found = self._held.pop(handle, None)
            if found is not None:  # else lost: the broker put it back with the connection
                dlv, link = found
                dlv.update(state)
                dlv.settle()
                link.unsettled -= 1
                touched.add(link)
        for link in touched:
            self._top_up(link)

    def _top_up(self, link: _Link) -> None:
        receiver = link.receiver
        if receiver.state & Endpoint.LOCAL_CLOSED:
            return
        grant = credit_to_grant(self._prefetch, receiver.credit, link.unsettled, link.last,
                                [(lk.receiver.credit, lk.unsettled)
                                 for lk in self._links if lk is not link])
        if grant:
            link.last = grant
            receiver.flow(grant)

    def _close_in_loop(self, on_closed: Callable[[], None]) -> None:
        """Close the connection; ``on_closed`` runs once the broker confirmed (or it broke)."""
        if self._dead or self.conn is None:
            self._stopped("the listener was closed")
            on_closed()
        else:
            self._on_closed.append(on_closed)
            self._give_up(self.conn, "the listener was closed")

    def lost(self, conn: Connection, reason: str) -> None:
        self._lost(reason)
        if conn.state & Endpoint.REMOTE_CLOSED or conn.transport is None:
            self._finish_close()

    def _lost(self, reason: str) -> None:
        """The connection is gone (or never came): the broker puts back whatever was
        unsettled, and the poll thread's next call raises."""
        if not self._dead:
            self._dead = True
            self.loop.stop_callbacks.pop(id(self), None)
            self._held.clear()
        with self._cond:
            if self._state in ("connecting", "open"):
                self._state, self._reason = "lost", reason
                self._inbox.clear()
                self._cond.notify_all()

    def _stopped(self, reason: str) -> None:
        self._lost(reason)
        self._finish_close()

    def on_connection_remote_close(self, event: Any) -> None:
        super().on_connection_remote_close(event)
        self._finish_close()

    def on_transport_closed(self, event: Any) -> None:
        super().on_transport_closed(event)
        self._finish_close()

    def _finish_close(self) -> None:
        """Tell close() it is done, and drop every proton object here, in the loop thread."""
        callbacks, self._on_closed = self._on_closed, []
        for cb in callbacks:
            cb()
        for link in self._links:
            link.receiver = None
        self.conn = None
        self._lost_reported = None
