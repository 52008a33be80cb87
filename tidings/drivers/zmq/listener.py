"""The zmq listener: a ROUTER socket that senders connect to, registered in the matchmaker.

The ROUTER belongs to the thread that calls ``poll()`` (the core's poll loop): pyzmq sockets are
not thread-safe. Settlements may come from any thread, so they are queued and sent by that thread
in its next ``poll()``; a settlement from another thread while ``poll()`` waits writes to a pipe
the wait includes, so an acknowledgement never waits out the poll timeout.

Prefetch is enforced here, where it is exact: whatever senders have already pushed, ``poll()``
never hands over more than ``prefetch`` unsettled messages. Senders keep their share bounded too:
each sends at most ``prefetch`` unacknowledged copies to one listener (the credit in the address
the listener registers), so a listener's backlog stays small and the rest wait in the senders'
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

from tidings.drivers.zmq import protocol
from tidings.drivers.zmq.sender import drain_pipe, note_local_change
from tidings.matchmaker.base import NO_POOL, MatchMaker, Registration
from tidings.transports.base import Binding, IncomingMessage, Listener

__all__ = ["Registrar", "ZmqListener", "ZmqMessage"]

LOG = logging.getLogger(__name__)

KEEPALIVE_INTERVAL = 1.0
"""Seconds between keepalives to a sender whose copies a listener holds while idle, so the
sender's ack_timeout measures silence, not the time a message waits behind others."""

CLOSE_LINGER_MS = 2000
"""How long closing a listener waits for its last acknowledgements and requeues to leave."""


class ZmqMessage(IncomingMessage):
    __slots__ = ("_listener", "sender", "seq")

    def __init__(self, listener: ZmqListener, sender: bytes, seq: int, body: bytes,
                 message_id: str, headers: dict[str, str], redelivered: bool) -> None:
        super().__init__(body, message_id, headers, redelivered)
        self._listener = listener
        self.sender = sender
        self.seq = seq

    def _ack(self) -> None:
        self._listener._settle(self, protocol.ACK)

    def _reject(self) -> None:  # no dead-letter destination: done, like an ack, and logged
        self._listener._settle(self, protocol.ACK)

    def _requeue(self) -> None:
        self._listener._settle(self, protocol.REQUEUE)


class ZmqListener(Listener):
    """Receives copies from any number of senders; see the module docstring."""

    def __init__(self, ctx: zmq.Context, matchmaker: MatchMaker, registrar: Registrar,
                 bindings: Sequence[Binding], pool: str | None, prefetch: int, *,
                 bind_address: str, advertise_address: str | None, port_range: tuple[int, int],
                 on_close: Callable[[ZmqListener], None]) -> None:
        self._matchmaker = matchmaker
        self._registrar = registrar
        self._prefetch = prefetch
        self._on_close = on_close
        self._id = protocol.new_listener_id()
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        self._sock.setsockopt(zmq.RCVHWM, 0)  # senders' credit bounds what can arrive
        self._sock.setsockopt(zmq.SNDHWM, 0)
        # A sender that reconnects (its old connection not yet seen dead) takes its identity
        # over instead of being refused, so acknowledgements keep reaching it.
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if ":" in bind_address:
            self._sock.setsockopt(zmq.IPV6, 1)
        try:
            port = _bind(self._sock, bind_address, port_range)
        except Exception:
            self._sock.close(0)
            raise
        host = advertise_address or bind_address
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.endpoint = f"tcp://{host}:{port}"
        self.address = protocol.format_member(self.endpoint, self._id, prefetch)
        group = NO_POOL if pool is None else pool
        unique = dict.fromkeys((b.exchange, b.routing_key) for b in bindings)
        self.registrations = [Registration(ex, rk, group, self.address) for ex, rk in unique]
        self._buffer: deque[ZmqMessage] = deque()    # received, not yet handed over
        self._held: dict[tuple[bytes, int], ZmqMessage] = {}  # handed over, unsettled
        self._settlements: deque[tuple[ZmqMessage, bytes]] = deque()
        self._holding: dict[bytes, int] = {}          # sender -> copies buffered or held
        self._last_sent: dict[bytes, float] = {}      # sender -> when we last sent it a frame
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._waiting = False
        self._closed = False
        self._owner: int | None = None
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        try:
            # Registered last, once the socket is bound: a sender that finds us can connect.
            registrar.add(self)
        except BaseException:
            self._release()
            raise

    def __repr__(self) -> str:
        return f"<ZmqListener {self.endpoint} id={self._id.hex()[:8]} prefetch={self._prefetch}>"

    # -- settlements (any thread) ------------------------------------------------------------
    def _settle(self, msg: ZmqMessage, kind: bytes) -> None:
        self._settlements.append((msg, kind))
        if self._waiting and threading.get_ident() != self._owner:
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):  # pipe full (already woken) or closed
                pass

    # -- the poll thread ----------------------------------------------------------------------
    def poll(self, timeout: float) -> Sequence[IncomingMessage]:
        if self._closed:
            return []
        self._owner = threading.get_ident()
        deadline = time.monotonic() + max(0.0, timeout)
        self._flush()
        self._drain()
        while not (self._buffer and len(self._held) < self._prefetch):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._waiting = True
            try:
                if self._settlements:  # queued just before _waiting was set: no wakeup came
                    left = 0
                events = dict(self._poller.poll(left * 1000))
            finally:
                self._waiting = False
            if self._wake_r in events:
                drain_pipe(self._wake_r)
            self._flush()
            self._drain()
        out = []
        while self._buffer and len(self._held) < self._prefetch:
            msg = self._buffer.popleft()
            self._held[(msg.sender, msg.seq)] = msg
            out.append(msg)
        self._keepalive()
        return out

    def _drain(self) -> None:
        """Move every copy waiting in the socket into the buffer, without blocking."""
        sock = self._sock
        recv = protocol.recv_frame
        noblock = protocol.NOBLOCK
        parse = protocol.parse_data
        buffer = self._buffer
        holding = self._holding
        me = self._id
        while True:
            try:
                sender = recv(sock, noblock)
            except zmq.Again:
                return
            frame = recv(sock, noblock)  # a ROUTER hands over a whole message at once
            try:
                seq, redelivered, lid, message_id, headers, body = parse(frame)
            except (ValueError, UnicodeDecodeError) as exc:
                LOG.error("%r: dropping a malformed message from sender %s: %s", self,
                          sender.hex()[:8], exc)
                while sock.rcvmore:  # not one of ours: skip the rest of it
                    sock.recv()
                continue
            if lid != me:
                # Meant for a listener that had this port before us: refuse it so the sender
                # gives it to a member of the right group instead.
                self._send(sender, protocol.pack_seqs(protocol.NOT_MINE, [seq]))
                continue
            buffer.append(ZmqMessage(self, sender, seq, body, message_id, headers, redelivered))
            holding[sender] = holding.get(sender, 0) + 1

    def _flush(self) -> None:
        """Send the queued settlements: one frame per sender and kind."""
        if not self._settlements:
            return
        batches: dict[tuple[bytes, bytes], list[int]] = {}
        held = self._held
        holding = self._holding
        while self._settlements:
            msg, kind = self._settlements.popleft()
            if held.pop((msg.sender, msg.seq), None) is None:
                continue  # settled twice, or already handed back by close()
            batches.setdefault((msg.sender, kind), []).append(msg.seq)
            holding[msg.sender] -= 1
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

    # -- closing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Unregister, hand every unsettled and buffered copy back to its sender, close.

        Copies still on the wire are dropped with the socket; their senders see the connection
        close and send them to another member.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._registrar.remove(self)
        except Exception as exc:  # the registry is down: our entries expire after the TTL
            LOG.warning("%r: could not unregister (%s); senders will drop it after the TTL",
                        self, exc)
        try:
            self._flush()
            self._drain()
            back: dict[bytes, list[int]] = {}
            for msg in sorted(self._held.values(), key=lambda m: m.seq):
                msg._claim_for_return()
                back.setdefault(msg.sender, []).append(msg.seq)
            for msg in self._buffer:
                back.setdefault(msg.sender, []).append(msg.seq)
            self._held.clear()
            self._buffer.clear()
            for sender, seqs in back.items():
                self._send(sender, protocol.pack_seqs(protocol.REQUEUE, seqs))
        finally:
            self._release()

    def _release(self) -> None:
        self._closed = True
        self._sock.close(CLOSE_LINGER_MS)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._on_close(self)


def _bind(sock: zmq.Socket, address: str, port_range: tuple[int, int]) -> int:
    host = f"[{address}]" if ":" in address and not address.startswith("[") else address
    low, high = port_range
    if low == 0 and high == 0:
        sock.bind(f"tcp://{host}:*")
        return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
    try:
        return sock.bind_to_random_port(f"tcp://{host}", low, high + 1,
                                        max_tries=min(200, high - low + 1) * 2)
    except zmq.ZMQBindError:
        raise OSError(f"no free port between port_min={low} and port_max={high} on "
                      f"{address}; widen the range or stop what holds those ports") from None
    except zmq.ZMQError as exc:
        raise OSError(f"cannot bind a listener on tcp://{host} ({exc}); check the "
                      f"bind_address URL option") from None


class Registrar:
    """Keeps a driver's listeners registered: one thread refreshing every entry each third of
    the TTL, so an entry outlives a missed refresh or two, and a dead process drops out."""

    def __init__(self, matchmaker: MatchMaker, ttl: float) -> None:
        self._matchmaker = matchmaker
        self._ttl = ttl
        self._lock = threading.Lock()
        self._listeners: list[ZmqListener] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, listener: ZmqListener) -> None:
        self._matchmaker.register(listener.registrations, self._ttl)
        note_local_change(self._matchmaker)
        with self._lock:
            self._listeners.append(listener)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tidings-zmq-registrar",
                                                daemon=True)
                self._thread.start()

    def remove(self, listener: ZmqListener) -> None:
        with self._lock:
            if listener not in self._listeners:
                return
            self._listeners.remove(listener)
        try:
            self._matchmaker.unregister(listener.registrations)
        finally:
            note_local_change(self._matchmaker)

    def stop(self) -> None:
        """Stop refreshing and unregister what is left (the driver is being cleaned up)."""
        self._stop.set()
        with self._lock:
            left, self._listeners = self._listeners, []
        for listener in left:
            try:
                self._matchmaker.unregister(listener.registrations)
            except Exception as exc:
                LOG.warning("could not unregister %r (%s); it expires after the TTL",
                            listener, exc)
            note_local_change(self._matchmaker)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _run(self) -> None:
        interval = self._ttl / 3
        failures = 0
        while not self._stop.wait(interval if not failures else min(interval, 0.5)):
            with self._lock:
                entries = [r for listener in self._listeners for r in listener.registrations]
            if not entries:
                continue
            try:
                added = self._matchmaker.register(entries, self._ttl)
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    LOG.warning("refreshing %d listener registration(s) in %s failed %d time(s) "
                                "in a row (%s); retrying; they expire %.1fs after the last "
                                "success", len(entries), self._matchmaker.describe(), failures,
                                exc, self._ttl)
                continue
            failures = 0
            if added:
                LOG.info("%d listener registration(s) had expired in %s and were renewed; "
                         "was this process paused for longer than the TTL (%.1fs)?", added,
                         self._matchmaker.describe(), self._ttl)
