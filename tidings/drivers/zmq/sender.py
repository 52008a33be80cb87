"""The zmq sender: the window of unacknowledged copies, and the one thread that owns the sockets.

``send()`` runs in the caller's thread: it looks the (exchange, routing key) up in the
:class:`Directory`, makes one copy per registered group, waits for room in the window (raising
``TransportUnreachable`` after the send timeout if the window stays full) and queues the copies.
Everything else happens in the sender's I/O thread, the only thread that touches its sockets:

* one DEALER per listener endpoint, watched by a socket monitor for handshakes and
  disconnects; copies go only to endpoints whose handshake succeeded and that are still up;
* each copy goes to one member of its group, rotating, skipping members that are not connected
  or already hold their credit (their prefetch) of this sender's copies; if none can take it now,
  it waits in the group's queue;
* a member discovered less than ``connect_grace`` seconds ago whose handshake has not completed
  yet is not skipped: when it is its turn, the group's copies wait in the queue for it (pumped
  when the handshake succeeds, or when the grace runs out and it is skipped like any member that
  is not connected). Without this, the member that connects first would take copies up to its
  credit while the others, registered just as long, are still handshaking;
* a copy is forgotten when acknowledged (or rejected); it goes to another member of its group
  when the listener requeued it, refused it (wrong listener id), disconnected (after the frames it
  sent before disconnecting have been read, so nothing acknowledged is sent again), or fell
  silent for ``ack_timeout`` seconds while holding copies;
* copies of a group that has had no registered member for ``ttl`` seconds are dropped (logged):
  with no broker, nobody else would ever deliver them.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from tidings.drivers.zmq import protocol
from tidings.matchmaker.base import MatchMaker
from tidings.transports.base import OutgoingMessage
from tidings.transports.errors import MessageDeliveryFailure, TransportUnreachable

__all__ = ["Directory", "Route", "Sender", "drain_pipe", "note_local_change"]

LOG = logging.getLogger(__name__)

TICK = 0.1
"""Seconds between housekeeping rounds (membership checks, silence, orphans) while busy."""

IDLE_TICK = 1.0
"""Seconds between housekeeping rounds when nothing is in flight."""

_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


# -- membership cache --------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    """A validated lookup: group -> member addresses, for one (exchange, routing key)."""

    key: tuple[str, str]
    groups: dict[str, tuple[str, ...]]
    stamp: int
    valid_until: float


_LOCAL_CHANGES: dict[str, int] = {}
_LOCAL_LOCK = threading.Lock()


def note_local_change(matchmaker: MatchMaker) -> None:
    """Record that this process added or removed a registration in ``matchmaker``'s registry,
    so every sender of the process sees it on its next send, without asking the registry."""
    key = matchmaker.describe()
    with _LOCAL_LOCK:
        _LOCAL_CHANGES[key] = _LOCAL_CHANGES.get(key, 0) + 1


class Directory:
    """Lookups cached until the registry changes or an entry's TTL runs out.

    A send must see a listener that has just registered, but a full lookup per send would cost
    a Redis round trip or an sqlite query each time. So: changes made by this process (its own
    listeners registering or leaving) invalidate the cache at once, through a process-wide
    counter; changes made by other processes are noticed through the registry's generation,
    read at most once per ``check_interval`` seconds (0: on every send); and no cached lookup
    outlives the shortest TTL in it.
    """

    def __init__(self, matchmaker: MatchMaker, max_age: float,
                 check_interval: float = 0.0) -> None:
        self._mm = matchmaker
        self._key = matchmaker.describe()
        self._max_age = max_age
        self._check_interval = check_interval
        self._lock = threading.Lock()
        self._routes: dict[tuple[str, str], Route] = {}
        self._generation: int | None = None
        self._local = -1
        self._next_check = 0.0
        self._stamps = itertools.count(1)

    def route(self, exchange: str, routing_key: str) -> Route:
        """The current groups of (exchange, routing key); raises TransportUnreachable."""
        now = time.monotonic()
        local = _LOCAL_CHANGES.get(self._key, 0)
        if local != self._local or now >= self._next_check:
            gen = self._mm.generation()
            with self._lock:
                if gen != self._generation or local != self._local:
                    self._routes.clear()
                    self._generation = gen
                    self._local = local
                self._next_check = now + self._check_interval
        key = (exchange, routing_key)
        cached = self._routes.get(key)
        if cached is not None and cached.valid_until > now:
            return cached
        gen = self._generation
        found = self._mm.lookup(exchange, routing_key)
        now = time.monotonic()
        life = min((m.expires_in for ms in found.values() for m in ms), default=self._max_age)
        route = Route(key, {g: tuple(m.address for m in ms) for g, ms in found.items()},
                      next(self._stamps), now + max(0.0, min(life, self._max_age)))
        with self._lock:
            if self._generation == gen:
                if len(self._routes) >= 10_000:  # endless distinct topics: start afresh
                    self._routes.clear()
                self._routes[key] = route
        return route


# -- the window --------------------------------------------------------------------------------
class _Window:
    """At most ``size`` copies unacknowledged per sender; ``send()`` waits for room."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiters = 0

    def acquire(self, n: int, timeout: float | None) -> bool:
        with self._lock:  # the common case, without the Condition's Python-level overhead
            # A copy count above the whole window still goes when the window is empty.
            if self.used + n <= self.size or self.used == 0:
                self.used += n
                return True
        with self._cond:
            if self.used + n <= self.size or self.used == 0:
                self.used += n
                return True
            deadline = None if timeout is None else time.monotonic() + timeout
            self._waiters += 1
            try:
                while not (self.used + n <= self.size or self.used == 0):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(left)
                self.used += n
                return True
            finally:
                self._waiters -= 1

    def release(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.used -= n
            if self._waiters:
                self._cond.notify_all()


# -- the I/O thread's state ----------------------------------------------------------------------
class _Copy:
    __slots__ = ("avoid", "body", "group", "headers", "member", "message_id", "redelivered",
                 "seq")

    def __init__(self, seq: int, group: _Group | None, message_id: bytes, headers: bytes,
                 body: bytes) -> None:
        self.seq = seq
        self.group = group
        self.message_id = message_id
        self.headers = headers
        self.body = body
        self.member: _Member | None = None
        self.avoid: str | None = None     # the member that handed it back, tried last
        self.redelivered = False


class _Conn:
    """One DEALER to one listener endpoint, shared by the members registered there."""

    def __init__(self, endpoint: str, sock: zmq.Socket, monitor: zmq.Socket) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.monitor = monitor
        self.connected = False
        self.last_heard = time.monotonic()
        self.members: dict[str, _Member] = {}


class _Member:
    __slots__ = ("address", "busy_since", "conn", "credit", "dead", "grace_until", "groups",
                 "in_flight", "lid", "suspended_until")

    def __init__(self, address: str, conn: _Conn, lid: bytes, credit: int,
                 grace_until: float = 0.0) -> None:
        self.address = address
        self.conn = conn
        self.lid = lid
        self.credit = credit
        self.in_flight: dict[int, _Copy] = {}
        self.groups: set[_Group] = set()
        self.dead = False
        self.busy_since = 0.0
        self.suspended_until = 0.0
        # Until then, while its connection is still handshaking, copies wait for its turn
        # rather than going to another member (see connect_grace); 0: no more waiting.
        self.grace_until = grace_until


class _Group:
    __slots__ = ("empty_since", "key", "members", "next", "nodes", "pending", "stamp",
                 "touched")

    def __init__(self, key: tuple[str, str, str]) -> None:
        self.key = key
        self.members: tuple[str, ...] = ()
        self.nodes: tuple[_Member, ...] = ()  # the members' state, in the same order
        self.stamp = 0
        self.next = 0
        self.pending: deque[_Copy] = deque()
        self.empty_since: float | None = None
        self.touched = time.monotonic()


class Sender:
    """One driver's sending side; see the module docstring."""

    def __init__(self, ctx: zmq.Context, directory: Directory, *, window: int,
                 ack_timeout: float, orphan_timeout: float, name: str,
                 connect_grace: float = 1.0) -> None:
        self._ctx = ctx
        self._directory = directory
        self._window = _Window(window)
        self._ack_timeout = ack_timeout
        self._connect_grace = connect_grace
        self._orphan_timeout = orphan_timeout
        self._name = name
        self._identity = protocol.new_listener_id()
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
        self._conns: dict[str, _Conn] = {}
        self._by_socket: dict[zmq.Socket, tuple[_Conn, bool]] = {}
        self._poller = zmq.Poller()
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._dirty: set[_Group] = set()
        # Groups whose next copy waits for a member still in its connect grace -> when that
        # grace runs out: the loop wakes up then and pumps them (skipping that member).
        self._grace_waits: dict[_Group, float] = {}
        self._next_tick = 0.0
        self._now = time.monotonic()  # refreshed once per loop round: close enough, cheaper
        self._quiet_until = 0.0

    # -- caller threads ----------------------------------------------------------------------
    def send(self, message: OutgoingMessage, timeout: float | None) -> int:
        """Queue one copy per group registered now; returns how many copies (0: no listener)."""
        if self._stopping.is_set():
            raise TransportUnreachable(f"{self._name}: the transport is being cleaned up")
        if self._broken is not None:
            raise MessageDeliveryFailure(
                f"{self._name}: the sender thread failed ({self._broken}); this transport "
                f"cannot send any more: build a new one and report the bug with the log")
        route = self._directory.route(message.exchange, message.routing_key)
        n = len(route.groups)
        if not n:
            LOG.debug("%s: no listener registered for %s/%s; message %s not delivered",
                      self._name, message.exchange, message.routing_key, message.message_id)
            return 0
        mid = message.message_id.encode("utf-8")
        if len(mid) > 0xFFFF:
            raise ValueError(f"message id of {len(mid)} bytes: the zmq wire format allows at "
                             f"most 65535; use a shorter message_id")
        headers = protocol.encode_headers(message.headers) if message.headers else b""
        if not self._window.acquire(n, timeout):
            raise TransportUnreachable(
                f"{self._name}: {self._window.used} copies are still unacknowledged (ack_window="
                f"{self._window.size}) after waiting {timeout}s to send {message.message_id}; "
                f"the listeners of {message.exchange}/{message.routing_key} are slow or stuck, "
                f"or raise the ack_window URL option")
        body = message.body
        seqs = self._seqs
        if n == 1:
            self._inbox.append((route, [_Copy(next(seqs), None, mid, headers, body)]))
        else:
            self._inbox.append((route, [_Copy(next(seqs), None, mid, headers, body)
                                        for _ in range(n)]))
        if self._thread is None:
            self._ensure_thread()
        if self._idle:
            self._wake()
        return n

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="tidings-zmq-sender",
                                          daemon=True)
                thread.start()
                self._thread = thread

    @property
    def unacknowledged(self) -> int:
        return self._window.used

    def close(self, flush_timeout: float) -> None:
        """Wait up to ``flush_timeout`` for unacknowledged copies that still have somewhere to
        go, then close every socket. Copies of groups without members are dropped at once."""
        self._flush_deadline = time.monotonic() + max(0.0, flush_timeout)
        self._stopping.set()
        with self._lock:
            thread = self._thread
            self._thread = threading.current_thread()  # no new thread from now on
        if thread is None:
            self._close_fds()
            return
        self._wake()
        thread.join(flush_timeout + 10.0)
        if thread.is_alive():
            LOG.error("%s: the sender thread did not stop; sockets left open", self._name)
        else:
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- the I/O thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug: say so on every later send rather than hang
            self._broken = f"{type(exc).__name__}: {exc}"
            LOG.exception("%s: the sender thread failed; %d unacknowledged copies are lost",
                          self._name, len(self._copies))
        finally:
            for conn in list(self._conns.values()):
                self._close_conn(conn)

    def _loop(self) -> None:
        poller = self._poller
        while True:
            if self._stopping.is_set() and self._finished_flushing():
                return
            busy = bool(self._copies)
            now = time.monotonic()
            wait = max(0.0, self._next_tick - now)
            if self._dirty:
                wait = 0.0
            grace_waits = self._grace_waits
            if grace_waits:
                wait = min(wait, max(0.0, min(grace_waits.values()) - now))
            self._idle = True
            if self._inbox:
                wait = 0.0
            try:
                # Rounded up: pyzmq truncates to whole milliseconds, which would wake the loop
                # just before a deadline and spin until it.
                events = poller.poll(math.ceil(wait * 1000))
            finally:
                self._idle = False
            self._now = time.monotonic()
            if grace_waits:
                for group, until in list(grace_waits.items()):
                    if until <= self._now:
                        del grace_waits[group]
                        self._dirty.add(group)
            for sock, _ in events:
                if sock == self._wake_r:
                    drain_pipe(self._wake_r)
                    continue
                conn, is_monitor = self._by_socket.get(sock, (None, False))
                if conn is None:
                    continue
                if is_monitor:
                    self._monitor_events(conn)
                else:
                    self._read(conn)
            self._take_inbox()
            if self._dirty:
                dirty, self._dirty = self._dirty, set()
                for group in dirty:
                    self._pump(group)
            now = self._now
            if now >= self._next_tick:
                self._tick(now)
                self._next_tick = now + (TICK if busy or self._copies else IDLE_TICK)

    def _finished_flushing(self) -> bool:
        if not self._copies and not self._inbox:
            return True
        if time.monotonic() >= self._flush_deadline:
            LOG.warning("%s: cleaned up with %d copies still unacknowledged after the flush "
                        "timeout; they are not delivered", self._name, len(self._copies))
            return True
        return False

    def _take_inbox(self) -> None:
        inbox = self._inbox
        copies_by_seq = self._copies
        assign = self._assign
        last: Route | None = None
        groups: list[_Group] = []
        while inbox:
            route, copies = inbox.popleft()
            if route is not last:  # most sends in a row share one cached route
                last = route
                exchange, routing_key = route.key
                groups = []
                for name, members in route.groups.items():
                    group = self._group((exchange, routing_key, name))
                    self._update_group(group, route.stamp, members)
                    groups.append(group)
            for group, copy in zip(groups, copies, strict=True):
                copy.group = group
                copies_by_seq[copy.seq] = copy
                if group.pending or not assign(copy):
                    group.pending.append(copy)

    def _group(self, key: tuple[str, str, str]) -> _Group:
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(key)
        return group

    def _update_group(self, group: _Group, stamp: int, members: tuple[str, ...]) -> None:
        if stamp <= group.stamp:
            return
        group.stamp = stamp
        group.touched = time.monotonic()
        if members == group.members:
            return
        for address in group.members:
            if address not in members:
                old = self._members.get(address)
                if old is not None:
                    old.groups.discard(group)
        nodes = []
        for address in members:
            member = self._members.get(address) or self._new_member(address)
            if member is not None:
                member.groups.add(group)
                nodes.append(member)
        group.nodes = tuple(nodes)
        group.members = tuple(m.address for m in nodes)
        group.empty_since = None if nodes else group.empty_since or time.monotonic()
        self._dirty.add(group)

    def _new_member(self, address: str) -> _Member | None:
        try:
            endpoint, lid, credit = protocol.parse_member(address)
        except ValueError:
            LOG.error("%s: ignoring registry entry %r: not a zmq listener address", self._name,
                      address)
            return None
        conn = self._conns.get(endpoint) or self._open_conn(endpoint)
        grace_until = time.monotonic() + self._connect_grace if self._connect_grace > 0 else 0.0
        member = self._members[address] = _Member(address, conn, lid, credit, grace_until)
        conn.members[address] = member
        return member

    def _open_conn(self, endpoint: str) -> _Conn:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self._identity)
        # Not ZMQ_IMMEDIATE: with it, a disconnect terminates the pipe at once and drops the
        # acknowledgements that arrived just before it. Copies are only sent once the monitor
        # has seen the handshake, so nothing is queued towards a listener never reached.
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # credits bound what is queued
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        # ZMTP heartbeats notice a peer that vanished without closing its connection (a host
        # that died, a frozen process) and turn it into a disconnect.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        if endpoint.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        sock.connect(endpoint)
        conn = self._conns[endpoint] = _Conn(endpoint, sock, monitor)
        self._by_socket[sock] = (conn, False)
        self._by_socket[monitor] = (conn, True)
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(monitor, zmq.POLLIN)
        return conn

    def _close_conn(self, conn: _Conn) -> None:
        for sock in (conn.sock, conn.monitor):
            self._by_socket.pop(sock, None)
            try:
                self._poller.unregister(sock)
            except KeyError:
                pass
        try:
            conn.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        conn.monitor.close(0)
        conn.sock.close(0)
        self._conns.pop(conn.endpoint, None)
        for address in conn.members:
            self._members.pop(address, None)
        conn.members.clear()

    # -- choosing a member ---------------------------------------------------------------------
    def _assign(self, copy: _Copy) -> bool:
        """Send ``copy`` to the next usable member of its group; False if none can take it."""
        group = copy.group
        assert group is not None
        nodes = group.nodes
        n = len(nodes)
        if not n:
            return False
        now = self._now
        fallback: _Member | None = None
        start = group.next
        for i in range(n):
            member = nodes[(start + i) % n]
            if not member.conn.connected and not member.dead:
                if member.grace_until > now:
                    # Registered, still handshaking, and its turn: the copy waits for it (in
                    # the group's queue) rather than going to whoever connected first.
                    until = self._grace_waits.get(group)
                    if until is None or member.grace_until < until:
                        self._grace_waits[group] = member.grace_until
                    return False
                member.grace_until = 0.0
                continue
            if (member.dead or len(member.in_flight) >= member.credit
                    or (member.suspended_until and member.suspended_until > now)):
                continue
            if copy.avoid is not None and member.address == copy.avoid and n > 1:
                fallback = fallback or member
                continue
            if self._transmit(copy, member):
                group.next = (start + i + 1) % n
                return True
        if fallback is not None:
            return self._transmit(copy, fallback)
        return False

    def _transmit(self, copy: _Copy, member: _Member) -> bool:
        frame = protocol.data_frame(copy.seq, copy.redelivered, member.lid, copy.message_id,
                                    copy.headers, copy.body)
        try:
            protocol.send_frame(member.conn.sock, frame, protocol.NOBLOCK)
        except zmq.Again:  # cannot queue it there now: try another member
            return False
        if not member.in_flight:
            member.busy_since = self._now
        member.in_flight[copy.seq] = copy
        copy.member = member
        return True

    def _pump(self, group: _Group) -> None:
        self._grace_waits.pop(group, None)  # _assign records it again if it still applies
        pending = group.pending
        while pending:
            if not self._assign(pending[0]):
                return
            pending.popleft()

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
        if not member.in_flight:
            return
        LOG.info("%s: %s; sending its %d unacknowledged copies to other members", self._name,
                 why, len(member.in_flight))
        for copy in sorted(member.in_flight.values(), key=lambda c: c.seq, reverse=True):
            self._hand_back(copy, member)

    def _free(self, member: _Member) -> None:
        self._dirty.update(member.groups)

    # -- what comes back ---------------------------------------------------------------------
    def _read(self, conn: _Conn) -> None:
        sock = conn.sock
        copies = self._copies
        released = 0
        freed: set[_Member] = set()
        heard = False
        recv = protocol.recv_frame
        noblock = protocol.NOBLOCK
        while True:
            try:
                frame = recv(sock, noblock)
            except zmq.Again:
                break
            heard = True
            kind = frame[:1]
            if kind == protocol.KEEPALIVE:
                continue
            try:
                kind, seqs = protocol.unpack_seqs(frame)
            except Exception:
                LOG.error("%s: malformed frame from %s dropped", self._name, conn.endpoint)
                continue
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
                        try:
                            copy.group.pending.remove(copy)
                        except ValueError:
                            pass
            elif kind in (protocol.REQUEUE, protocol.NOT_MINE):
                for seq in seqs:
                    copy = copies.get(seq)
                    member = copy.member if copy is not None else None
                    if member is None or member.conn is not conn:
                        continue  # already elsewhere
                    if kind == protocol.NOT_MINE and not member.dead:
                        member.dead = True
                        self._hand_back_all(member, f"{member.conn.endpoint} is now another "
                                                    f"listener")
                    else:
                        self._hand_back(copy, member)
                    freed.add(member)
        if heard:
            conn.last_heard = time.monotonic()
            for member in conn.members.values():
                member.suspended_until = 0.0
        for member in freed:
            self._dirty.update(member.groups)
        if released:
            self._window.release(released)

    def _monitor_events(self, conn: _Conn) -> None:
        while True:
            try:
                event = recv_monitor_message(conn.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                conn.connected = True
                conn.last_heard = time.monotonic()
                for member in conn.members.values():
                    member.grace_until = 0.0
                    self._free(member)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                # Frames the listener sent before going are already queued on the socket:
                # read them first, so a copy it acknowledged is not sent again.
                self._read(conn)
                conn.connected = False
                for member in conn.members.values():
                    member.grace_until = 0.0  # it was reached once: no more waiting for it
                    self._hand_back_all(member, f"lost the connection to {conn.endpoint}")
                    self._free(member)

    # -- housekeeping ---------------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        self._check_silence(now)
        self._refresh_groups(now)
        self._collect(now)

    def _check_silence(self, now: float) -> None:
        for member in list(self._members.values()):
            if not member.in_flight:
                continue
            quiet = now - max(member.conn.last_heard, member.busy_since)
            if quiet > self._ack_timeout:
                member.suspended_until = now + self._ack_timeout
                self._hand_back_all(member, f"{member.conn.endpoint} sent nothing for "
                                            f"{quiet:.1f}s (ack_timeout={self._ack_timeout}s)")
                self._free(member)

    def _refresh_groups(self, now: float) -> None:
        routes: dict[tuple[str, str], Route | None] = {}
        stopping = self._stopping.is_set()
        for group in list(self._groups.values()):
            if not group.pending and not any(
                    (m := self._members.get(a)) is not None and m.in_flight
                    for a in group.members):
                continue
            key = (group.key[0], group.key[1])
            if key not in routes:
                try:
                    routes[key] = self._directory.route(*key)
                except Exception as exc:  # keep what we know while the registry is away
                    if now >= self._quiet_until:  # once per 5 s, not once per tick
                        self._quiet_until = now + 5.0
                        LOG.warning("%s: cannot refresh listeners of %s/%s, keeping the last "
                                    "known ones: %s", self._name, key[0], key[1], exc)
                    routes[key] = None
            route = routes[key]
            if route is None:
                continue
            self._update_group(group, route.stamp, route.groups.get(group.key[2], ()))
            if group.members:
                group.empty_since = None
                continue
            if group.empty_since is None:
                group.empty_since = now
            if group.pending and (stopping or now - group.empty_since >= self._orphan_timeout):
                self._drop(group, "it has had no registered listener for "
                                  f"{now - group.empty_since:.1f}s")

    def _drop(self, group: _Group, why: str) -> None:
        dropped = list(group.pending)
        group.pending.clear()
        for copy in dropped:
            self._copies.pop(copy.seq, None)
        self._window.release(len(dropped))
        exchange, routing_key, name = group.key
        LOG.warning("%s: dropped %d undelivered copies for group %r of %s/%s: %s", self._name,
                    len(dropped), name or "(no pool)", exchange, routing_key, why)

    def _collect(self, now: float) -> None:
        """Forget idle groups and close connections no group needs any more."""
        for key, group in list(self._groups.items()):
            if not group.pending and now - group.touched > 60.0 and not any(
                    (m := self._members.get(a)) is not None and m.in_flight
                    for a in group.members):
                for address in group.members:
                    member = self._members.get(address)
                    if member is not None:
                        member.groups.discard(group)
                del self._groups[key]
        for conn in list(self._conns.values()):
            if all(not m.groups and not m.in_flight for m in conn.members.values()):
                self._close_conn(conn)


def drain_pipe(fd: int) -> None:
    """Empty a non-blocking wake-up pipe (the sender's and every listener's)."""
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass
