"""The zmq sender: the window of unacknowledged copies, and the one thread that owns the sockets.

``send_batch()`` runs in the caller's thread: it looks the groups up, waits for room in the
window and queues one copy per group. The I/O thread owns one DEALER per registered listener,
watched by a socket monitor for handshakes and disconnects. It gives each copy to one member of
its group, rotating over those connected and holding fewer than their credit (prefetch) of our
copies, and keeps the rest in the group's queue, in order. Why a copy moves to another member,
or is dropped: the driver's docstring and docs/zmq.md.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from tidings.drivers.zmq import protocol
from tidings.drivers.zmq.curve import REFUSALS, Curve
from tidings.matchmaker.base import NoListener
from tidings.matchmaker.client import Directory, Route
from tidings.transports.base import OutgoingMessage
from tidings.transports.errors import MessageDeliveryFailure, TransportUnreachable

__all__ = ["Sender", "drain_pipe"]

LOG = logging.getLogger(__name__)

TICK, IDLE_TICK = 0.1, 1.0  # seconds between housekeeping rounds, with and without copies out
_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | sum(REFUSALS)


@dataclass(eq=False, slots=True)
class _Copy:
    seq: int
    message_id: bytes
    headers: bytes
    body: bytes
    group: _Group | None = None
    member: _Member | None = None
    avoid: str | None = None  # the member that handed it back, tried last
    redelivered: bool = False


@dataclass(eq=False, slots=True)
class _Member:
    """A registered listener (address: endpoint, listener id, credit) and our DEALER to it."""

    address: str
    endpoint: str
    lid: bytes
    credit: int
    sock: zmq.Socket
    monitor: zmq.Socket
    # Until then, while its connection is still handshaking, copies wait for its turn rather
    # than going to another member (see connect_grace); 0: no more waiting.
    grace_until: float = 0.0
    connected: bool = False
    last_heard: float = field(default_factory=time.monotonic)
    in_flight: dict[int, _Copy] = field(default_factory=dict)
    groups: set[_Group] = field(default_factory=set)
    dead: bool = False
    busy_since: float = 0.0
    suspended_until: float = 0.0


@dataclass(eq=False, slots=True)
class _Group:
    key: tuple[str, str, str]
    nodes: tuple[_Member, ...] = ()  # in the registry's order
    stamp: int = 0
    next: int = 0
    pending: deque[_Copy] = field(default_factory=deque)
    empty_since: float | None = None
    touched: float = field(default_factory=time.monotonic)


class Sender:
    """One driver's sending side; see the module docstring."""

    def __init__(self, ctx: zmq.Context, directory: Directory, *, window: int,
                 ack_timeout: float, orphan_timeout: float, name: str,
                 connect_grace: float = 1.0, curve: Curve | None = None) -> None:
        self._ctx, self._directory, self._name, self._curve = ctx, directory, name, curve
        self._refused: set[str] = set()  # addresses of listeners we will not send to (logged)
        self._ack_timeout, self._orphan_timeout = ack_timeout, orphan_timeout
        self._connect_grace = connect_grace
        self._window, self._used = window, 0  # copies unacknowledged: at most the window
        self._room = threading.Condition(threading.Lock())
        self._seqs = itertools.count(1)
        self._inbox: deque[tuple[Route, list[_Copy]]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._idle = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._flush_deadline = 0.0
        self._broken: str | None = None
        # I/O thread only:
        self._copies: dict[int, _Copy] = {}
        self._groups: dict[tuple[str, str, str], _Group] = {}
        self._members: dict[str, _Member] = {}
        self._by_socket: dict[zmq.Socket, tuple[_Member, bool]] = {}  # -> (member, monitor?)
        self._poller = zmq.Poller()
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._dirty: set[_Group] = set()
        # When the first connect grace that copies wait for runs out: the loop wakes up then
        # and pumps the groups with waiting copies, skipping the member if still unconnected.
        self._grace_wake = math.inf
        self._next_tick = 0.0
        self._now = time.monotonic()  # refreshed once per loop round: close enough, cheaper
        self._quiet_until = 0.0

    def send_batch(self, messages: Sequence[OutgoingMessage],
                   timeout: float | None) -> list[BaseException | None]:
        """Queue one copy of each message per group registered now (none: not delivered);
        one result per message. ``timeout`` bounds the wait for room in the window."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[BaseException | None] = []
        for message in messages:
            try:
                self._send(message, deadline, timeout)
                results.append(None)
            except Exception as exc:
                results.append(exc)
        return results

    def _send(self, message: OutgoingMessage, deadline: float | None,
              timeout: float | None) -> None:
        if self._stopping.is_set():
            raise TransportUnreachable(f"{self._name}: the transport is being cleaned up")
        if self._broken is not None:
            raise MessageDeliveryFailure(
                f"{self._name}: the sender thread failed ({self._broken}); this transport "
                f"cannot send any more: build a new one and report the bug with the log")
        route = self._directory.route(message.exchange, message.routing_key)
        n = len(route.groups)
        if not n:
            raise NoListener(message.exchange, message.routing_key, message.message_id,
                             self._directory.registry)
        mid = message.message_id.encode("utf-8")
        if len(mid) > 0xFFFF:
            raise ValueError(f"message id of {len(mid)} bytes: the zmq wire format allows at "
                             f"most 65535; use a shorter message_id")
        headers = protocol.encode_headers(message.headers) if message.headers else b""
        with self._room:
            # A copy count above the whole window still goes when the window is empty.
            while self._used and self._used + n > self._window:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TransportUnreachable(
                        f"{self._name}: {self._used} copies are still unacknowledged (ack_window="
                        f"{self._window}) after waiting {timeout}s to send {message.message_id}; "
                        f"the listeners of {message.exchange}/{message.routing_key} are slow or "
                        f"stuck, or raise the ack_window URL option")
                self._room.wait(left)
            self._used += n
        seqs, body = self._seqs, message.body
        self._inbox.append((route, [_Copy(next(seqs), mid, headers, body) for _ in range(n)]))
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    thread = threading.Thread(target=self._run, name="tidings-zmq-sender",
                                              daemon=True)
                    thread.start()
                    self._thread = thread
        if self._idle:
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # full (a wake-up is already waiting) or closed
            pass

    @property
    def unacknowledged(self) -> int:
        return self._used

    def _release(self, n: int) -> None:
        with self._room:  # once per batch of acknowledgements, not per copy
            self._used -= n
            self._room.notify_all()

    def close(self, flush_timeout: float) -> None:
        """Wait up to ``flush_timeout`` for unacknowledged copies that still have somewhere to
        go, then close every socket. Copies of groups without members are dropped at once."""
        self._flush_deadline = time.monotonic() + max(0.0, flush_timeout)
        self._stopping.set()
        with self._lock:  # no new thread from now on
            thread, self._thread = self._thread, threading.current_thread()
        if thread is not None:
            self._wake()
            thread.join(flush_timeout + 10.0)
            if thread.is_alive():
                LOG.error("%s: the sender thread did not stop; sockets left open", self._name)
                return
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug: say so on every later send rather than hang
            self._broken = f"{type(exc).__name__}: {exc}"
            LOG.exception("%s: the sender thread failed; %d unacknowledged copies are lost",
                          self._name, len(self._copies))
        finally:
            for member in list(self._members.values()):
                self._close(member)

    def _loop(self) -> None:
        poller = self._poller
        while not (self._stopping.is_set() and self._flushed()):
            busy = bool(self._copies)
            now = time.monotonic()
            wait = 0.0 if self._dirty else max(0.0, min(self._next_tick, self._grace_wake) - now)
            self._idle = True
            if self._inbox:  # checked once idle is set: a send after this wakes us up
                wait = 0.0
            try:
                # Rounded up: pyzmq truncates to whole milliseconds, which would wake the loop
                # just before a deadline and spin until it.
                events = poller.poll(math.ceil(wait * 1000))
            finally:
                self._idle = False
            now = self._now = time.monotonic()
            if now >= self._grace_wake:
                self._grace_wake = math.inf
                self._dirty.update(g for g in self._groups.values() if g.pending)
            for sock, _ in events:
                if sock == self._wake_r:
                    drain_pipe(self._wake_r)
                elif (found := self._by_socket.get(sock)) is not None:
                    self._monitor_events(found[0]) if found[1] else self._read(found[0])
            self._take_inbox()
            if self._dirty:
                dirty, self._dirty = self._dirty, set()
                for group in dirty:  # send what waits, in order, while members take it
                    while group.pending and self._assign(group.pending[0]):
                        group.pending.popleft()
            if now >= self._next_tick:
                self._check_silence(now)
                self._refresh_groups(now)
                self._collect(now)
                self._next_tick = now + (TICK if busy or self._copies else IDLE_TICK)

    def _flushed(self) -> bool:
        if (self._copies or self._inbox) and time.monotonic() < self._flush_deadline:
            return False
        if self._copies:
            LOG.warning("%s: cleaned up with %d copies still unacknowledged after the flush "
                        "timeout; they are not delivered", self._name, len(self._copies))
        return True

    def _take_inbox(self) -> None:
        inbox, copies_by_seq, assign = self._inbox, self._copies, self._assign
        last: Route | None = None
        groups: list[_Group] = []
        while inbox:
            route, copies = inbox.popleft()
            if route is not last:  # most sends in a row share one cached route
                last = route
                exchange, routing_key = route.key
                groups = [self._update_group((exchange, routing_key, name), route.stamp, members)
                          for name, members in route.groups.items()]
            for group, copy in zip(groups, copies, strict=True):
                copy.group = group
                copies_by_seq[copy.seq] = copy
                if group.pending or not assign(copy):
                    group.pending.append(copy)

    def _update_group(self, key: tuple[str, str, str], stamp: int,
                      members: tuple[str, ...]) -> _Group:
        """The group of ``key``, its members updated from a lookup newer than its last."""
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(key)
        if stamp <= group.stamp:
            return group
        group.stamp = stamp
        group.touched = time.monotonic()
        if members == tuple(m.address for m in group.nodes):
            return group
        for old in group.nodes:
            if old.address not in members:
                old.groups.discard(group)
        nodes = [m for a in members if (m := self._members.get(a) or self._new_member(a))]
        for member in nodes:
            member.groups.add(group)
        group.nodes = tuple(nodes)
        group.empty_since = None if nodes else group.empty_since or time.monotonic()
        self._dirty.add(group)
        return group

    def _new_member(self, address: str) -> _Member | None:
        try:
            endpoint, lid, credit, key = protocol.parse_member(address)
        except ValueError:
            LOG.error("%s: ignoring registry entry %r: not a zmq listener address", self._name,
                      address)
            return None
        curve, why = self._curve, None
        if curve is None and key is not None:
            why = "it requires CURVE (give this URL curve_secret_key)"
        elif curve is not None and key not in curve.trusted:
            why = ("its key is in neither curve_public_keys_dir nor curve_server_key" if key
                   else "it does not use CURVE, and this transport sends only over CURVE")
        if why is not None:
            if address not in self._refused:  # once per address, not once per lookup
                self._refused.add(address)
                LOG.error("%s: not sending to the listener at %s: %s", self._name, endpoint, why)
            return None
        sock = self._ctx.socket(zmq.DEALER)
        if curve is not None and key is not None:
            curve.connect(sock, key)
        # No high-water marks: credits bound what is queued. Not ZMQ_IMMEDIATE: with it, a
        # disconnect terminates the pipe at once and drops the acknowledgements that arrived
        # just before it; copies are only sent once the monitor has seen the handshake, so
        # nothing is queued towards a listener never reached. ZMTP heartbeats turn a peer that
        # vanished without closing its connection (a dead host, a frozen process) into a
        # disconnect.
        for option, value in ((zmq.ROUTING_ID, protocol.new_listener_id()), (zmq.LINGER, 0),
                              (zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.RECONNECT_IVL, 100),
                              (zmq.RECONNECT_IVL_MAX, 2000), (zmq.HEARTBEAT_IVL, 1000),
                              (zmq.HEARTBEAT_TIMEOUT, 5000),
                              (zmq.IPV6, int(endpoint.startswith("tcp://[")))):
            sock.setsockopt(option, value)
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        sock.connect(endpoint)
        grace = time.monotonic() + self._connect_grace if self._connect_grace > 0 else 0.0
        member = self._members[address] = _Member(address, endpoint, lid, credit, sock, monitor,
                                                  grace)
        for watched, is_monitor in ((sock, False), (monitor, True)):
            self._by_socket[watched] = (member, is_monitor)
            self._poller.register(watched, zmq.POLLIN)
        return member

    def _close(self, member: _Member) -> None:
        for sock in (member.sock, member.monitor):
            del self._by_socket[sock]
            self._poller.unregister(sock)
        with contextlib.suppress(zmq.ZMQError):
            member.sock.disable_monitor()
        member.monitor.close(0)
        member.sock.close(0)
        del self._members[member.address]

    def _assign(self, copy: _Copy) -> bool:
        """Send ``copy`` to the next usable member of its group; False if none can take it."""
        group = copy.group
        assert group is not None
        nodes = group.nodes
        n = len(nodes)
        now = self._now
        fallback: _Member | None = None
        start = group.next
        for i in range(n):
            member = nodes[(start + i) % n]
            if not member.connected and not member.dead:
                if member.grace_until > now:
                    # Registered, still handshaking, and its turn: the copy waits for it (in
                    # the group's queue) rather than going to whoever connected first.
                    self._grace_wake = min(self._grace_wake, member.grace_until)
                    return False
                member.grace_until = 0.0
                continue
            if (member.dead or len(member.in_flight) >= member.credit
                    or member.suspended_until > now):
                continue
            if copy.avoid is not None and member.address == copy.avoid and n > 1:
                fallback = fallback or member
                continue
            if self._transmit(copy, member):
                group.next = (start + i + 1) % n
                return True
        return fallback is not None and self._transmit(copy, fallback)

    def _transmit(self, copy: _Copy, member: _Member) -> bool:
        frame = protocol.data_frame(copy.seq, copy.redelivered, member.lid, copy.message_id,
                                    copy.headers, copy.body)
        try:
            protocol.send_frame(member.sock, frame, protocol.NOBLOCK)
        except zmq.Again:  # cannot queue it there now: try another member
            return False
        if not member.in_flight:
            member.busy_since = self._now
        member.in_flight[copy.seq] = copy
        copy.member = member
        return True

    def _hand_back(self, copy: _Copy, member: _Member) -> None:
        """Take ``copy`` from ``member`` and queue it, first in line, for another member."""
        member.in_flight.pop(copy.seq, None)
        copy.member = None
        copy.avoid = member.address
        copy.redelivered = True
        if copy.group is not None:
            copy.group.pending.appendleft(copy)
            self._dirty.add(copy.group)

    def _hand_back_all(self, member: _Member, why: str) -> None:
        if member.in_flight:
            LOG.info("%s: %s; sending its %d unacknowledged copies to other members",
                     self._name, why, len(member.in_flight))
            for copy in sorted(member.in_flight.values(), key=lambda c: c.seq, reverse=True):
                self._hand_back(copy, member)
        self._dirty.update(member.groups)

    def _read(self, source: _Member) -> None:
        sock, copies, recv = source.sock, self._copies, protocol.recv_frame
        released = 0
        freed: set[_Member] = set()
        while True:
            try:
                frame = recv(sock, protocol.NOBLOCK)
            except zmq.Again:
                break
            freed.add(source)
            kind, seqs = protocol.unpack_seqs(frame)
            if kind == protocol.ACK:
                for seq in seqs:
                    copy = copies.pop(seq, None)
                    if copy is None:
                        continue  # acknowledged twice (it was resent meanwhile): fine
                    released += 1
                    member = copy.member
                    if member is not None:
                        del member.in_flight[seq]
                        freed.add(member)
                    elif copy.group is not None:  # handed back, then acknowledged anyway
                        with contextlib.suppress(ValueError):
                            copy.group.pending.remove(copy)
            elif kind in (protocol.REQUEUE, protocol.NOT_MINE):
                for seq in reversed(seqs):  # the first ends up first in line again
                    copy = copies.get(seq)
                    if copy is None or copy.member is not source:
                        continue  # already elsewhere
                    if kind == protocol.REQUEUE:
                        self._hand_back(copy, source)
                    elif not source.dead:
                        source.dead = True
                        self._hand_back_all(source, f"{source.endpoint} is now another listener")
        if source in freed:  # heard from: alive
            source.last_heard = time.monotonic()
            source.suspended_until = 0.0
        for member in freed:
            self._dirty.update(member.groups)
        if released:
            self._release(released)

    def _monitor_events(self, member: _Member) -> None:
        while True:
            try:
                event = recv_monitor_message(member.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            member.grace_until = 0.0  # reached once (or refused): no more waiting for it
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                member.connected = True
                member.last_heard = time.monotonic()
                self._dirty.update(member.groups)
            elif event in REFUSALS and member.address not in self._refused:
                self._refused.add(member.address)
                LOG.error("%s: the listener at %s refused our handshake (CURVE: is our public "
                          "key in its curve_public_keys_dir?)", self._name, member.endpoint)
            elif event == zmq.EVENT_DISCONNECTED:
                # Frames the listener sent before going are already queued on the socket:
                # read them first, so a copy it acknowledged is not sent again.
                self._read(member)
                member.connected = False
                self._hand_back_all(member, f"lost the connection to {member.endpoint}")

    def _check_silence(self, now: float) -> None:
        for member in list(self._members.values()):
            quiet = now - max(member.last_heard, member.busy_since)
            if member.in_flight and quiet > self._ack_timeout:
                member.suspended_until = now + self._ack_timeout
                self._hand_back_all(member, f"{member.endpoint} sent nothing for "
                                            f"{quiet:.1f}s (ack_timeout={self._ack_timeout}s)")

    @staticmethod
    def _busy(group: _Group) -> bool:
        return bool(group.pending) or any(m.in_flight for m in group.nodes)

    def _refresh_groups(self, now: float) -> None:
        routes: dict[tuple[str, str], Route | None] = {}
        stopping = self._stopping.is_set()
        for group in list(self._groups.values()):
            if not self._busy(group):
                continue
            key = group.key[:2]
            if key not in routes:
                try:
                    routes[key] = self._directory.route(*key)
                except Exception as exc:  # keep what we know while the registry is away
                    if now >= self._quiet_until:  # once per 5 s, not once per tick
                        self._quiet_until = now + 5.0
                        LOG.warning("%s: cannot refresh listeners of %s/%s, keeping the last "
                                    "known ones: %s", self._name, key[0], key[1], exc)
                    routes[key] = None
            if (route := routes[key]) is None:
                continue
            self._update_group(group.key, route.stamp, route.groups.get(group.key[2], ()))
            if group.nodes:
                group.empty_since = None
                continue
            since = group.empty_since = group.empty_since or now
            if group.pending and (stopping or now - since >= self._orphan_timeout):
                for copy in group.pending:
                    self._copies.pop(copy.seq, None)
                self._release(len(group.pending))
                LOG.warning("%s: dropped %d undelivered copies for group %r of %s/%s: it has had "
                            "no registered listener for %.1fs", self._name, len(group.pending),
                            group.key[2] or "(no pool)", key[0], key[1], now - since)
                group.pending.clear()

    def _collect(self, now: float) -> None:
        """Forget idle groups and close the connections of members no group has any more."""
        for key, group in list(self._groups.items()):
            if now - group.touched > 60.0 and not self._busy(group):
                for member in group.nodes:
                    member.groups.discard(group)
                del self._groups[key]
        for member in list(self._members.values()):
            if not member.groups and not member.in_flight:
                self._close(member)


def drain_pipe(fd: int) -> None:
    """Empty a non-blocking wake-up pipe (the sender's and every receiver's)."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
