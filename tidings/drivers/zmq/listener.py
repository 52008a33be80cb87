"""The zmq receiver: a ROUTER socket that senders connect to, registered in the matchmaker.

The ROUTER belongs to the core's poll thread, which makes every call but ``interrupt()``
(pyzmq sockets are not thread-safe); ``interrupt()`` writes to a pipe the wait includes.
Senders keep a receiver's backlog small: each sends at most ``prefetch`` unacknowledged copies
to one listener (the credit in the address it registers), so the rest wait in the senders'
windows, where they can still go to another member.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from tidings.drivers.zmq import protocol
from tidings.drivers.zmq.curve import REFUSALS, Curve
from tidings.drivers.zmq.sender import drain_pipe
from tidings.matchmaker.base import NO_POOL, Registration
from tidings.matchmaker.client import Registrar
from tidings.transports.base import REQUEUE, Binding, IncomingMessage, Outcome, Receiver

__all__ = ["ZmqReceiver"]

LOG = logging.getLogger(__name__)

# Seconds between keepalives to a sender whose copies a receiver holds while idle, so the
# sender's ack_timeout measures silence, not the time a message waits behind others.
KEEPALIVE_INTERVAL = 1.0
CLOSE_LINGER_MS = 2000  # how long closing waits for the last acknowledgements to leave


class ZmqReceiver(Receiver):
    """Receives copies from any number of senders; see the module docstring."""

    def __init__(self, ctx: zmq.Context, registrar: Registrar, bindings: Sequence[Binding],
                 pool: str | None, prefetch: int, *, bind_address: str,
                 advertise_address: str | None, port_range: tuple[int, int],
                 on_close: Callable[[ZmqReceiver | None], None], curve: Curve | None) -> None:
        self._registrar = registrar
        self._on_close = on_close
        self._id = protocol.new_listener_id()
        sock = self._sock = ctx.socket(zmq.ROUTER)
        # No high-water marks: senders' credit bounds what can arrive. ROUTER_HANDOVER: a
        # sender that reconnects (its old connection not yet seen dead) takes its identity
        # over instead of being refused, so acknowledgements keep reaching it.
        for option, value in ((zmq.LINGER, CLOSE_LINGER_MS), (zmq.RCVHWM, 0), (zmq.SNDHWM, 0),
                              (zmq.ROUTER_HANDOVER, 1), (zmq.IPV6, int(":" in bind_address))):
            sock.setsockopt(option, value)
        if curve is not None:
            curve.serve(sock)
        try:
            port = _bind(sock, bind_address, port_range)
        except Exception:
            sock.close(0)
            raise
        # With CURVE, a monitor: the senders it refuses are logged.
        self._monitor: zmq.Socket | None = \
            sock.get_monitor_socket(sum(REFUSALS)) if curve is not None else None
        self._refused, self._quiet_until = 0, 0.0
        host = advertise_address or bind_address
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.endpoint = f"tcp://{host}:{port}"
        self.address = protocol.format_member(self.endpoint, self._id, prefetch,
                                              curve.public if curve is not None else None)
        group = NO_POOL if pool is None else pool
        unique = dict.fromkeys((b.exchange, b.routing_key) for b in bindings)
        self.registrations = [Registration(ex, rk, group, self.address) for ex, rk in unique]
        self._buffer: deque[IncomingMessage] = deque()  # received, not yet handed over
        self._holding: dict[bytes, int] = {}     # sender -> its copies buffered or held
        self._last_sent: dict[bytes, float] = {}  # sender -> when we last sent it a frame
        self._lock = threading.Lock()  # interrupt() against close() of the pipe
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        if self._monitor is not None:
            self._poller.register(self._monitor, zmq.POLLIN)
        try:
            # Registered last, once the socket is bound: a sender that finds us can connect.
            registrar.add(self.registrations)
        except BaseException:
            self._release()
            raise

    def __repr__(self) -> str:
        return f"<ZmqReceiver {self.endpoint} id={self._id.hex()[:8]}>"

    def receive(self, max_messages: int, timeout: float) -> Sequence[IncomingMessage]:
        buffer = self._buffer
        self._drain()
        if not buffer and timeout > 0 and self._poller.poll(int(timeout * 1000)):
            drain_pipe(self._wake_r)
            self._drain()
        if self._monitor is not None:
            self._log_refusals(self._monitor)
        out = [buffer.popleft() for _ in range(min(max_messages, len(buffer)))]
        self._keepalive()
        return out

    def interrupt(self) -> None:
        with self._lock:
            if not self._closed:
                try:
                    os.write(self._wake_w, b"\0")
                except OSError:  # the pipe is full: a wake-up is already waiting
                    pass

    def _drain(self) -> None:
        """Move every copy waiting in the socket into the buffer, without blocking.

        Whatever a peer sends (an extra frame, headers that are not a JSON object, nesting
        too deep to parse) never raises: a copy that names its sequence number is buffered
        with ``problem`` set, so the core rejects it and its sender hears back; anything else
        is dropped with a log line."""
        sock, recv, noblock = self._sock, protocol.recv_frame, protocol.NOBLOCK
        buffer, holding, me = self._buffer, self._holding, self._id
        while True:
            try:
                sender = recv(sock, noblock)
            except zmq.Again:
                return
            frame = recv(sock, noblock)  # a ROUTER hands over a whole message at once
            more = 0
            while protocol.get_option(sock, protocol.RCVMORE):
                recv(sock, noblock)
                more += 1
            try:
                seq, redelivered, lid, mid, headers, body, problem = protocol.parse_data(frame)
            except ValueError as exc:
                LOG.error("%r: dropping a malformed message from sender %s: %s", self,
                          sender.hex()[:8], exc)
                continue
            if lid != me:
                # Meant for a listener that had this port before us: refuse it so the sender
                # gives it to a member of the right group instead.
                self._send(sender, protocol.pack_seqs(protocol.NOT_MINE, [seq]))
                continue
            msg = IncomingMessage(body, mid, headers, redelivered, (sender, seq))
            if problem or more:
                msg.problem = problem or f"{more} frame(s) more than the one a copy has"
            buffer.append(msg)
            holding[sender] = holding.get(sender, 0) + 1

    def _log_refusals(self, monitor: zmq.Socket) -> None:
        """Log senders refused by CURVE: the first at once, then at most one line per 10 s."""
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            self._refused += 1
            if (now := time.monotonic()) >= self._quiet_until:
                self._quiet_until = now + 10.0
                LOG.warning("%r refused a sender (%d so far): %s; a sender needs "
                            "curve_secret_key=<its .key_secret> whose .key is in this "
                            "listener's curve_public_keys_dir, and must trust this listener's "
                            "key", self, self._refused, REFUSALS.get(event, event))

    def settle(self, outcomes: Sequence[Outcome]) -> None:
        """One frame per sender and kind: done (acknowledged or rejected: there is no
        dead-letter destination) or requeued, which the sender gives to another member."""
        batches: dict[tuple[bytes, bytes], list[int]] = {}
        holding = self._holding
        for msg, how in outcomes:
            sender, seq = msg.token
            kind = protocol.REQUEUE if how == REQUEUE else protocol.ACK
            batches.setdefault((sender, kind), []).append(seq)
            holding[sender] -= 1
        for (sender, kind), seqs in batches.items():
            self._send(sender, protocol.pack_seqs(kind, seqs))

    def _send(self, sender: bytes, frame: bytes) -> None:
        # A ROUTER drops a frame for a sender that is gone: nobody is left to resend to.
        protocol.send_frame(self._sock, sender, protocol.NOBLOCK | protocol.SNDMORE)
        protocol.send_frame(self._sock, frame, protocol.NOBLOCK)
        self._last_sent[sender] = time.monotonic()

    def _keepalive(self) -> None:
        now = time.monotonic()
        for sender, count in list(self._holding.items()):
            if count <= 0:
                del self._holding[sender]
                self._last_sent.pop(sender, None)
            elif now - self._last_sent.get(sender, 0.0) >= KEEPALIVE_INTERVAL:
                self._send(sender, protocol.KEEPALIVE)

    def close(self) -> None:
        """Unregister, hand every copy the core never received back to its sender, close.

        Copies still on the wire are dropped with the socket; their senders see the connection
        close and send them to another member."""
        if self._closed:
            return
        try:
            self._registrar.remove(self.registrations)
        except Exception as exc:  # the registry is down: our entries expire after the TTL
            LOG.warning("%r: could not unregister (%s); senders will drop it after the TTL",
                        self, exc)
        try:
            self._drain()
            self.settle([(msg, REQUEUE) for msg in self._buffer])
            self._buffer.clear()
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._closed = True
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(0)
        self._sock.close(CLOSE_LINGER_MS)
        self._on_close(self)


def _bind(sock: zmq.Socket, address: str, port_range: tuple[int, int]) -> int:
    host = f"[{address}]" if ":" in address and not address.startswith("[") else address
    low, high = port_range
    try:
        if low == 0 and high == 0:
            sock.bind(f"tcp://{host}:*")
            return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        return sock.bind_to_random_port(f"tcp://{host}", low, high + 1,
                                        max_tries=min(200, high - low + 1) * 2)
    except zmq.ZMQBindError:
        raise OSError(f"no free port between port_min={low} and port_max={high} on "
                      f"{address}; widen the range or stop what holds those ports") from None
    except zmq.ZMQError as exc:
        raise OSError(f"cannot bind a listener on tcp://{host} ({exc}); check the "
                      f"bind_address URL option") from None
