"""``redisstreams://``: a tidings driver on Redis Streams, written as a third party would.

It imports only the driver contract (``tidings.transports.*``) and ``redis``; the core does
the rest (URLs, option checks, capability checks, envelopes, dispatch, retry policy, the
once-only settlement of each message).

The model, in Redis terms:

* every (exchange, routing key) is one stream, ``<namespace>:stream:<exchange>:<routing key>``
  (names %-encoded, so ``a:b`` / ``c`` and ``a`` / ``b:c`` never collide); the namespace is the
  URL's virtual host (``redisstreams://host:6379/myapp``), ``tidings`` when there is none;
* the no-pool group is the consumer group ``group``, created by the first send (so nothing sent
  before its listeners start is lost); each pool is the consumer group ``pool:<name>``,
  created when its first member listens and reading from then on;
* every listener is one consumer of its group; ``XREADGROUP`` hands each entry to one consumer
  of each group, which is the "one copy per pool, split inside a pool" rule for free;
* ack and reject are ``XACK`` (reject drops: there is no dead-letter stream);
* requeue, and close() with unsettled messages, *park* the entry: ``XCLAIM`` it to the
  reserved consumer ``__parked__`` with an idle time of a year. Every member's poll starts with
  ``XAUTOCLAIM`` for entries idle longer than ``claim_idle``, which takes parked entries at
  once and, after ``claim_idle`` seconds, entries of a consumer that died without closing;
* prefetch is the ``COUNT`` of each read, never more than the listener's free slots.

Redis keeps streams until they are deleted: ``maxlen`` trims them, at the price of dropping
the oldest entries whether or not every group has read them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import redis

from tidings.transports.base import (
    Binding,
    Capabilities,
    Driver,
    IncomingMessage,
    Listener,
    Option,
    OutgoingMessage,
)
from tidings.transports.errors import InvalidTransportURL, TransportUnreachable
from tidings.transports.url import TransportURL

__all__ = ["RedisStreamsDriver"]

LOG = logging.getLogger(__name__)

NO_POOL_GROUP = "group"
PARKED = "__parked__"
#: The idle time given to parked entries: far beyond any claim_idle, so the next XAUTOCLAIM
#: of any member takes them, while entries a live consumer is working on are never stolen.
PARKED_IDLE_MS = 365 * 24 * 3600 * 1000
MAX_CLAIM_IDLE = 24 * 3600.0
_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def _claim_idle(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= MAX_CLAIM_IDLE:
        raise ValueError(raw)
    return value


def _non_negative(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


class _StreamMessage(IncomingMessage):
    __slots__ = ("_entry", "_key", "_listener")

    def __init__(self, listener: _StreamsListener, key: bytes, entry: bytes,
                 fields: dict[bytes, bytes], redelivered: bool) -> None:
        headers_raw = fields.get(b"h")
        headers = json.loads(headers_raw) if headers_raw else {}
        message_id = fields.get(b"id", b"").decode("utf-8", "replace") or None
        super().__init__(fields.get(b"body", b""), message_id, headers, redelivered)
        self._listener = listener
        self._key = key
        self._entry = entry

    def _ack(self) -> None:
        self._listener._settle(self, park=False)

    def _reject(self) -> None:
        self._listener._settle(self, park=False)

    def _requeue(self) -> None:
        self._listener._settle(self, park=True)


class _StreamsListener(Listener):
    """One consumer of one consumer group, reading every stream of its bindings."""

    def __init__(self, driver: RedisStreamsDriver, keys: list[bytes], group: str, start: str,
                 prefetch: int) -> None:
        self._driver = driver
        self._client = driver._client
        self._keys = keys
        self._group = group
        self._start = start
        self._prefetch = prefetch
        self._claim_idle_ms = int(driver.conf["claim_idle"] * 1000)
        self._consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._cursors = dict.fromkeys(keys, b"0-0")
        self._held: dict[tuple[bytes, bytes], _StreamMessage] = {}
        self._queued: list[tuple[bytes, bytes, bool]] = []  # (key, entry, park) to send
        self._cond = threading.Condition()
        self._closed = False
        self._ensure_groups()

    def _ensure_groups(self) -> None:
        for key in self._keys:
            self._driver._create_group(key, self._group, self._start)

    # -- settlement (any thread) ------------------------------------------------------
    def _settle(self, msg: _StreamMessage, park: bool) -> None:
        """Free the prefetch slot now; send the XACK / park with the next poll's round trip.

        Batching settlements into the pipeline every poll sends anyway costs one round trip per
        poll instead of one per message. If the process dies first, the entry is still pending
        and another member takes it over after claim_idle: at least once, never lost.
        """
        with self._cond:
            if self._held.pop((msg._key, msg._entry), None) is None:
                return  # already handed back by close()
            self._queued.append((msg._key, msg._entry, park))
            self._cond.notify_all()

    def _queue_settlements(self, pipe: Any) -> list[tuple[bytes, bytes, bool]]:
        with self._cond:
            queued, self._queued = self._queued, []
        acks: dict[bytes, list[bytes]] = {}
        parks: dict[bytes, list[bytes]] = {}
        for key, entry, park in queued:
            (parks if park else acks).setdefault(key, []).append(entry)
        for key, entries in acks.items():
            pipe.xack(key, self._group, *entries)
        for key, entries in parks.items():
            pipe.xclaim(key, self._group, PARKED, 0, entries, idle=PARKED_IDLE_MS, justid=True)
        return queued

    def _requeue_settlements(self, queued: list[tuple[bytes, bytes, bool]]) -> None:
        with self._cond:
            self._queued[:0] = queued

    def _park(self, entries: Sequence[tuple[bytes, bytes]]) -> None:
        by_key: dict[bytes, list[bytes]] = {}
        for key, entry in entries:
            by_key.setdefault(key, []).append(entry)
        for key, ids in by_key.items():
            self._client.xclaim(key, self._group, PARKED, 0, ids, idle=PARKED_IDLE_MS,
                                justid=True)

    # -- receiving (the poll thread) ----------------------------------------------------
    def poll(self, timeout: float) -> Sequence[IncomingMessage]:
        if self._closed:
            return []
        if self._driver._shut.is_set():
            self.close()
            return []
        try:
            return self._poll(timeout)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            LOG.warning("redisstreams: consumer group %s vanished (Redis restarted or keys "
                        "deleted); recreating it", self._group)
            self._ensure_groups()
            return []
        except _CONNECTION_ERRORS as exc:
            LOG.warning("redisstreams: lost %s (%s); reconnecting on the next poll",
                        self._driver.url.masked(), exc)
            self._driver._shut.wait(min(timeout, 1.0))
            return []

    def _room(self, timeout: float) -> int:
        with self._cond:
            if len(self._held) >= self._prefetch:
                self._cond.wait_for(lambda: len(self._held) < self._prefetch or self._closed,
                                    timeout)
            return self._prefetch - len(self._held)

    def _poll(self, timeout: float) -> list[IncomingMessage]:
        began = time.monotonic()
        room = self._room(timeout)
        pipe = self._client.pipeline(transaction=False)
        queued = self._queue_settlements(pipe)
        # Parked (requeued) entries first, and those of consumers that vanished: one
        # XAUTOCLAIM per stream, in the same round trip as the settlements.
        claim_keys = self._keys if room > 0 and not self._closed else []
        for key in claim_keys:
            pipe.xautoclaim(key, self._group, self._consumer, self._claim_idle_ms,
                            start_id=self._cursors[key], count=room)
        try:
            replies = pipe.execute() if len(pipe) else []
        except _CONNECTION_ERRORS:
            self._requeue_settlements(queued)
            raise
        out: list[_StreamMessage] = []
        claims = replies[len(replies) - len(claim_keys):]
        for key, reply in zip(claim_keys, claims, strict=True):
            cursor, claimed, *_ = reply
            self._cursors[key] = cursor
            out += [_StreamMessage(self, key, entry, fields, True)
                    for entry, fields in claimed if fields is not None]
        if room <= 0 or self._closed:
            return []
        if len(out) < room:
            per_stream = max(1, (room - len(out)) // len(self._keys))
            left = timeout - (time.monotonic() - began)
            block = None if out else max(1, int(left * 1000))
            reply = self._client.xreadgroup(self._group, self._consumer,
                                            dict.fromkeys(self._keys, ">"), count=per_stream,
                                            block=block)
            for key, entries in reply or ():
                out += [_StreamMessage(self, key, entry, fields, False)
                        for entry, fields in entries]
        # Several streams may answer at once, or claims overlap: give back what is over.
        self._park([(m._key, m._entry) for m in out[room:]])
        out = out[:room]
        with self._cond:
            for msg in out:
                self._held[(msg._key, msg._entry)] = msg
        return out

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            held, self._held = self._held, {}
            self._cond.notify_all()
        try:
            pipe = self._client.pipeline(transaction=False)
            self._queue_settlements(pipe)
            if len(pipe):
                pipe.execute()
            self._park(list(held))
            for key in self._keys:
                # Anything else still pending for this consumer (a reply lost mid-read) goes
                # back too; then the consumer is removed so groups do not collect dead names.
                pending = self._client.xpending_range(key, self._group, "-", "+", 10_000,
                                                      consumername=self._consumer)
                self._park([(key, p["message_id"]) for p in pending])
                self._client.xgroup_delconsumer(key, self._group, self._consumer)
        except (*_CONNECTION_ERRORS, redis.ResponseError) as exc:
            # Unreachable Redis: the entries stay pending under this consumer, and another
            # member takes them over after claim_idle seconds. Nothing is lost.
            LOG.warning("redisstreams: could not hand back %d message(s) on close (%s); other "
                        "members will claim them after claim_idle", len(held), exc)
        finally:
            self._driver._forget(self)


class RedisStreamsDriver(Driver):
    """Redis Streams with consumer groups; see the module docstring for the model."""

    name = "redisstreams"
    capabilities = Capabilities(
        pools=True, requeue=True, requeue_to_other_member=True, exchanges=True,
        at_least_once=True, durable=False, stores_without_listener=True, dead_letter=False,
        prefetch=True, confirmed_send=True)
    options = {
        "db": Option(_non_negative, 0, "Redis database number"),
        "claim_idle": Option(_claim_idle, 60.0,
                             "seconds after which messages held by a consumer that vanished "
                             "without closing are taken over by another member (0 < s <= 1 day)"),
        "maxlen": Option(_non_negative, 0,
                         "approximate cap on each stream's length; 0 keeps every entry "
                         "(trimming drops the oldest entries even if a group has not read them)"),
        "socket_timeout": Option(float, 5.0,
                                 "seconds a Redis command may take before the connection is "
                                 "considered lost"),
        "ssl": Option(bool, False, "connect with TLS"),
    }

    def __init__(self, url: TransportURL, options: dict[str, Any]) -> None:
        super().__init__(url, options)
        if len(url.hosts) > 1:
            raise InvalidTransportURL(
                f"redisstreams takes one Redis host, not {len(url.hosts)} "
                f"({url.masked()}); point it at one server or a proxy in front of a cluster")
        host = url.hosts[0] if url.hosts else None
        self.namespace = url.virtual_host or "tidings"
        # No I/O here: redis-py connects on the first command.
        self._client = redis.Redis(
            host=(host.hostname if host else None) or "127.0.0.1",
            port=(host.port if host else None) or 6379,
            username=host.username if host else None,
            password=host.password if host else None,
            db=self.conf["db"], ssl=self.conf["ssl"],
            socket_timeout=self.conf["socket_timeout"],
            socket_connect_timeout=self.conf["socket_timeout"])
        self._grouped: set[bytes] = set()
        self._listeners: set[_StreamsListener] = set()
        self._lock = threading.Lock()
        self._shut = threading.Event()

    def stream_key(self, exchange: str, routing_key: str) -> bytes:
        """The stream an (exchange, routing key) lives in; public for tools and tests."""
        return (f"{self.namespace}:stream:{quote(exchange, safe='')}:"
                f"{quote(routing_key, safe='.')}").encode()

    def _create_group(self, key: bytes, group: str, start: str) -> None:
        try:
            self._client.xgroup_create(key, group, id=start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _unreachable(self, doing: str, exc: Exception) -> TransportUnreachable:
        return TransportUnreachable(f"redisstreams could not {doing} at {self.url.masked()}: "
                                    f"{exc}; check that Redis is running and reachable")

    def send(self, message: OutgoingMessage, timeout: float | None = None) -> None:
        key = self.stream_key(message.exchange, message.routing_key)
        fields: dict[bytes, Any] = {b"body": message.body, b"id": message.message_id}
        if message.headers:
            fields[b"h"] = json.dumps(message.headers)
        try:
            if key not in self._grouped:
                # The no-pool group exists from the first send, reading from the start, so a
                # notification sent before any listener of it waits for one.
                self._create_group(key, NO_POOL_GROUP, "0")
                self._grouped.add(key)
            self._client.xadd(key, fields, maxlen=self.conf["maxlen"] or None,
                              approximate=True)
        except _CONNECTION_ERRORS as exc:
            raise self._unreachable("send", exc) from exc

    def listen(self, bindings: Sequence[Binding], pool: str | None,
               prefetch: int) -> Listener:
        keys = list(dict.fromkeys(self.stream_key(b.exchange, b.routing_key) for b in bindings))
        group, start = (NO_POOL_GROUP, "0") if pool is None else (f"pool:{pool}", "$")
        try:
            listener = _StreamsListener(self, keys, group, start, prefetch)
        except _CONNECTION_ERRORS as exc:
            raise self._unreachable("listen", exc) from exc
        with self._lock:
            self._listeners.add(listener)
        return listener

    def _forget(self, listener: _StreamsListener) -> None:
        with self._lock:
            self._listeners.discard(listener)
            last = not self._listeners
        if last and self._shut.is_set():
            self._client.close()

    def cleanup(self) -> None:
        """Close connections. Running listeners hand their messages back at their next poll."""
        self._shut.set()
        with self._lock:
            idle = not self._listeners
        if idle:
            self._client.close()

    def describe(self) -> str:
        return f"redisstreams driver at {self.url.masked()} (namespace {self.namespace!r})"
