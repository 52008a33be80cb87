"""Confirmed sends: one sender connection, one link per address, each link in its own session.

``send_batch()`` queues a :class:`PendingSend` per message for the loop thread and waits on
them. The loop thread encodes each message (proton's encoder calls into C many times, each a
chance for the sending threads to take the GIL from the loop), streams it on the address's link
and completes it when the broker's disposition arrives: ``accepted`` means RabbitMQ confirmed
it; anything else, or a link, session or connection that went away first, fails it. A batch, and
threads sending at once, keep many messages in flight on the one connection. One session per
link, because on RabbitMQ 3.x a failed attach (an exchange deleted under us) ends the session:
then only that address's messages fail.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from proton import Connection, Delivery, Endpoint, Message

from tidings.drivers.amqp1.connection import ConnectionOwner, ConnectParams, describe_condition
from tidings.drivers.amqp1.loop import EventLoop
from tidings.transports.base import OutgoingMessage

__all__ = ["PendingSend", "SendSide", "encode"]

LOG = logging.getLogger(__name__)

_OUTCOMES = {Delivery.REJECTED: "rejected", Delivery.RELEASED: "released",
             Delivery.MODIFIED: "modified"}


def encode(message: OutgoingMessage, msg: Message) -> bytes:
    """The AMQP 1.0 encoding of one message (``msg`` reused, every field set each time): the
    body as one data section, which RabbitMQ hands to AMQP 0-9-1 consumers (oslo.messaging,
    ``rabbit://``) as the plain JSON body, and the headers as application properties."""
    msg.inferred = True
    msg.body = message.body
    msg.id = message.message_id
    msg.content_type = message.content_type
    msg.content_encoding = message.content_encoding
    msg.durable = message.persistent
    msg.properties = dict(message.headers) if message.headers else None  # type: ignore[assignment]
    return msg.encode()


class PendingSend:
    """One message on its way: the caller waits on it, the loop thread completes it once."""

    __slots__ = ("_done", "address", "cancelled", "error", "finished", "message", "tag")

    def __init__(self, address: str, message: OutgoingMessage) -> None:
        self.address = address
        self.message = message
        self.tag = ""
        self.cancelled = False  # set by the caller on timeout: do not send it after all
        self.error: str | None = None
        self.finished = False
        self._done = threading.Lock()
        self._done.acquire()

    def finish(self, error: str | None = None) -> None:
        if not self.finished:
            self.finished = True
            self.error = error
            self._done.release()

    @staticmethod
    def fail_all(pendings: Iterable[PendingSend], reason: str) -> None:
        for pending in pendings:
            pending.finish(reason)

    def wait(self, timeout: float) -> bool:
        return self._done.acquire(timeout=max(0.0, timeout))


@dataclass(slots=True, eq=False)
class _SendLink:
    """Per-address state: the link and what was streamed on it and not yet settled (by tag)."""

    address: str
    exchange: str
    sender: Any
    inflight: dict[str, PendingSend] = field(default_factory=dict)


class SendSide(ConnectionOwner):
    """The sender connection, loop thread only (apart from construction)."""

    def __init__(self, loop: EventLoop, params: ConnectParams, connect_timeout: float,
                 on_lost: Callable[[str | None], None]) -> None:
        super().__init__(loop, params)
        self.connect_timeout = connect_timeout
        self._on_lost = on_lost  # told the exchange (or None: all) whose topology may be gone
        self.links: dict[str, _SendLink] = {}
        self._attempt = 0
        self._opened_at = 0.0
        self._closing = False
        loop.stop_callbacks[id(self)] = self._stopped
        self._finished: list[tuple[PendingSend, str | None]] = []
        self._open_conn: Connection | None = None  # self.conn once the broker opened it
        self._message: Message | None = None  # reused by encode(), made in the loop thread
        self._tags = itertools.count(1)

    def submit(self, pendings: Sequence[PendingSend]) -> None:
        """Encode and stream messages (loop thread)."""
        if self._message is None:
            self._message = Message()
        for pending in pendings:
            if pending.cancelled:
                continue
            if self._closing:
                pending.finish("the transport is being cleaned up")
                continue
            try:
                data = encode(pending.message, self._message)
            except Exception as exc:  # e.g. a header value proton cannot encode
                pending.finish(f"cannot encode the message as AMQP 1.0: {exc}")
                continue
            conn = self.conn if self.conn is not None and self.conn is self._open_conn \
                else self._connection()
            link = self.links.get(pending.address)
            if link is None:
                link = self._open_link(conn, pending.address, pending.message.exchange)
            sender = link.sender
            tag = pending.tag = str(next(self._tags))
            dlv = sender.delivery(tag)
            dlv.tidings_pending = pending  # kept in proton's record: found again from events
            sender.stream(data)
            sender.advance()
            link.inflight[tag] = pending

    def on_connection_remote_open(self, event: Any) -> None:
        if self.conn is not None and event.connection == self.conn:
            self._open_conn = self.conn  # from now on submit() skips the state check

    def _connection(self) -> Connection:
        conn = self.conn
        if conn is not None and not conn.state & Endpoint.REMOTE_ACTIVE \
                and time.monotonic() - self._opened_at > self.connect_timeout:
            # Still not open after connect_timeout (a host that drops SYNs): give it up so the
            # next attempt tries afresh, on the next host if there are several.
            self._give_up(conn, f"not open after connect_timeout={self.connect_timeout:g}s")
            conn = None
        if conn is None:
            conn = self.params.connect(self.loop, self, self._attempt)
            self._attempt += 1
            self._opened_at = time.monotonic()
            self.conn = conn
        return conn

    def _open_link(self, conn: Connection, address: str, exchange: str) -> _SendLink:
        session = conn.session()
        session.open()
        sender = session.sender(f"tidings-send-{uuid.uuid4().hex[:12]}")
        sender.target.address = address
        sender.open()
        link = _SendLink(address, exchange, sender)
        sender.tidings_link = link  # stored in proton's record, found again from events
        self.links[address] = link
        return link

    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        state = dlv.remote_state if dlv.updated else None
        if not state:
            return
        pending: PendingSend | None = getattr(dlv, "tidings_pending", None)
        link: _SendLink | None = getattr(event.link, "tidings_link", None)
        dlv.settle()
        if pending is None or link is None or link.inflight.pop(pending.tag, None) is None:
            return  # already failed with its link or connection
        error = None
        if state != Delivery.ACCEPTED:
            cond = describe_condition(getattr(dlv.remote, "condition", None), "")
            error = (f"the broker answered {_OUTCOMES.get(state, f'state {state}')} for a "
                     f"message to {link.address}" + (f" ({cond})" if cond else ""))
        # Woken together once this I/O cycle is over, not one by one mid-cycle (loop.py).
        if not self._finished:
            self.loop.after_cycle[id(self)] = self._release_finished
        self._finished.append((pending, error))

    def _release_finished(self) -> None:
        finished, self._finished = self._finished, []
        for pending, error in finished:
            pending.finish(error)

    def link_failed(self, link: Any, reason: str) -> None:
        state: _SendLink | None = getattr(link, "tidings_link", None)
        if state is None:
            return
        if self.links.get(state.address) is state:
            del self.links[state.address]
        try:
            if not link.session.state & Endpoint.LOCAL_CLOSED:
                link.session.close()
        except Exception:
            LOG.debug("closing a failed sender session raised", exc_info=True)
        self._fail_link(state, f"sending to {state.address} failed: {reason}")
        # An exchange that vanished (a broker restart, an operator) must be declared again.
        self._on_lost(state.exchange)

    def lost(self, conn: Connection, reason: str) -> None:
        if self.conn is not None and conn != self.conn:
            return
        was_open = self._open_conn is not None
        self.conn = self._open_conn = None
        links, self.links = self.links, {}
        what = ("the AMQP 1.0 connection to the broker was lost" if was_open else
                "cannot open an AMQP 1.0 connection to the broker")
        for link in links.values():
            self._fail_link(link, f"{what}: {reason}")
        if not self._closing:
            if links:
                LOG.warning("AMQP 1.0 sender connection %s (%s); the next send reconnects",
                            "lost" if was_open else "failed", reason)
            self._on_lost(None)

    def _fail_link(self, link: _SendLink, reason: str) -> None:
        inflight, link.inflight = link.inflight, {}
        PendingSend.fail_all(inflight.values(), reason)

    def close(self) -> None:
        """Close the connection; in-flight sends fail (loop thread)."""
        self._closing = True
        if self.conn is not None:
            self._give_up(self.conn, "the transport was cleaned up")

    def _stopped(self, reason: str) -> None:
        """The loop is ending: fail what is in flight and drop every proton object here, in
        the loop thread (proton's reference counts are not thread-safe)."""
        self._closing = True
        self._release_finished()
        links, self.links = self.links, {}
        for link in links.values():
            self._fail_link(link, reason)
            link.sender = None
        self.conn = self._open_conn = None
        self._lost_reported = None
        self._message = None
