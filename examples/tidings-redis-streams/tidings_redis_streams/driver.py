"""``redisstreams://``: a tidings driver on Redis Streams, written as a third party would.

It imports only the driver contract (``tidings.transports.*``) and ``redis``. Each (exchange,
routing key) is a stream; the no-pool group (``group``, created by the first send) and each pool
(``pool:<name>``, created by its first member) are consumer groups, each receiver one consumer;
ack and reject are ``XACK``; requeue parks the entry for the next ``XAUTOCLAIM`` of any member,
which also takes over a dead consumer's entries after ``claim_idle``. See the README's model.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tidings.transports.base import (
    REQUEUE,
    Binding,
    Capabilities,
    Driver,
    IncomingMessage,
    Option,
    Outcome,
    OutgoingMessage,
    Receiver,
)
from tidings.transports.errors import InvalidTransportURL, TransportUnreachable
from tidings.transports.url import TransportHost, TransportURL

__all__ = ["RedisStreamsDriver"]

LOG = logging.getLogger(__name__)
NO_POOL_GROUP = "group"
PARKED = "__parked__"
#: Far beyond any claim_idle: the next XAUTOCLAIM of any member takes a parked entry at once.
PARKED_IDLE_MS = 365 * 24 * 3600 * 1000
_LOST = (redis.ConnectionError, redis.TimeoutError)


def _within(convert: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    """An Option type: ``convert`` the text, then refuse a value outside [low, high]."""
    def number(raw: str) -> Any:  # named for the core's message: "... is not a valid number"
        if not low <= (value := convert(raw)) <= high:
            raise ValueError(raw)
        return value
    return number


@contextmanager
def _reaching(doing: str, where: str) -> Iterator[None]:
    """Raise what a reconnect may cure as TransportUnreachable: a lost connection, and a
    consumer group that vanished (Redis restarted empty, keys deleted): listen() recreates it."""
    try:
        yield
    except (*_LOST, redis.ResponseError) as exc:
        if not isinstance(exc, _LOST) and "NOGROUP" not in str(exc):
            raise
        raise TransportUnreachable(f"redisstreams could not {doing} at {where}: {exc}; check "
                                   f"that Redis is running and reachable") from exc


def _unwrap(key: bytes, entry: bytes, fields: dict[bytes, bytes], times: int) -> IncomingMessage:
    """One stream entry as a delivery. One it cannot read carries ``problem`` (the core rejects
    it alone): a bad entry must never make receive() raise."""
    problem = None if b"body" in fields else "the stream entry has no body field"
    try:
        headers = json.loads(fields.get(b"h", b"{}"))
    except ValueError as exc:
        headers, problem = None, f"its headers field is not JSON ({exc})"
    message_id = fields.get(b"id", b"").decode(errors="replace") or None
    msg = IncomingMessage(fields.get(b"body", b""), message_id, headers, times > 1,
                          token=(key, entry), delivery_count=times)
    msg.problem = msg.problem or problem
    return msg


class _StreamsReceiver(Receiver):
    """One consumer of one consumer group, reading every stream of its bindings, on a Redis
    connection of its own (a blocking read holds it) that close() releases."""

    def __init__(self, driver: RedisStreamsDriver, keys: list[bytes], group: str,
                 start: str) -> None:
        self._where = driver.url.masked()
        self._client = driver.connect()
        self._keys, self._group = keys, group
        self._claim_idle_ms = int(driver.conf["claim_idle"] * 1000)
        self._consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._cursors = dict.fromkeys(keys, b"0-0")
        self._ready: list[IncomingMessage] = []  # read from Redis, not yet asked for
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.xgroup_create(key, group, id=start, mkstream=True)
        with _reaching("listen", self._where):
            for reply in pipe.execute(raise_on_error=False):
                if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                    raise reply

    def receive(self, max_messages: int, timeout: float) -> Sequence[IncomingMessage]:
        if not self._ready:
            with _reaching("receive", self._where):
                self._read(max_messages, timeout)
        out, self._ready = self._ready[:max_messages], self._ready[max_messages:]
        return out

    def _read(self, count: int, timeout: float) -> None:
        """Parked and orphaned entries (XAUTOCLAIM) and new ones (XREADGROUP) in one round
        trip, else one XREADGROUP blocking up to ``timeout``. COUNT is per stream: what a read
        of several streams brings beyond ``count`` waits in ``_ready`` for the next call."""
        streams: dict[Any, Any] = dict.fromkeys(self._keys, ">")
        pipe = self._client.pipeline(transaction=False)
        for key in self._keys:
            pipe.xautoclaim(key, self._group, self._consumer, self._claim_idle_ms,
                            start_id=self._cursors[key], count=count)
        pipe.xreadgroup(self._group, self._consumer, streams, count=count)
        *claims, fresh = pipe.execute()
        claimed = []
        for key, (cursor, entries, *_) in zip(self._keys, claims, strict=True):
            self._cursors[key] = cursor
            claimed += [(key, entry, fields) for entry, fields in entries if fields is not None]
        if claimed:  # how often Redis delivered each, so max_deliveries holds across members
            pipe = self._client.pipeline(transaction=False)
            for key, entry, _ in claimed:
                pipe.xpending_range(key, self._group, entry, entry, 1)
            for (key, entry, fields), info in zip(claimed, pipe.execute(), strict=True):
                times = info[0]["times_delivered"] if info else 2
                self._ready.append(_unwrap(key, entry, fields, times))
        if not self._ready and not fresh and timeout > 0:
            fresh = self._client.xreadgroup(self._group, self._consumer, streams, count=count,
                                            block=max(1, int(timeout * 1000)))
        for key, entries in fresh or ():
            self._ready += [_unwrap(key, entry, fields, 1) for entry, fields in entries]

    def settle(self, outcomes: Sequence[Outcome]) -> None:
        """XACK the acked and rejected entries, park the requeued ones: one command per stream
        and kind, all in one round trip."""
        acks: dict[bytes, list[bytes]] = {}
        parks: dict[bytes, list[bytes]] = {}
        for msg, how in outcomes:
            (parks if how == REQUEUE else acks).setdefault(msg.token[0], []).append(msg.token[1])
        pipe = self._client.pipeline(transaction=False)
        for key, entries in acks.items():
            pipe.xack(key, self._group, *entries)
        for key, entries in parks.items():
            self._park(pipe, key, entries)
        with _reaching("settle", self._where):
            pipe.execute()

    def _park(self, client: Any, key: bytes, entries: Sequence[Any]) -> None:
        client.xclaim(key, self._group, PARKED, 0, entries, idle=PARKED_IDLE_MS, justid=True)

    def close(self) -> None:
        """Park what is still pending for this consumer (read into ``_ready``, or held when the
        connection was lost), then delete it. If Redis cannot be reached, the entries stay
        pending and another member takes them over after claim_idle: none is lost."""
        keys, self._keys, client = self._keys, [], self._client  # a second close() does nothing
        try:
            for key in keys:
                while pending := client.xpending_range(key, self._group, "-", "+", 1000,
                                                       consumername=self._consumer):
                    self._park(client, key, [p["message_id"] for p in pending])
                # DELCONSUMER drops the consumer's pending entries: only now that it has none.
                client.xgroup_delconsumer(key, self._group, self._consumer)
        except (*_LOST, redis.ResponseError) as exc:
            LOG.warning("redisstreams: could not hand back pending messages at %s on close "
                        "(%s); other members take them after claim_idle", self._where, exc)
        finally:
            client.close()


class RedisStreamsDriver(Driver):
    """Redis Streams with consumer groups; see the module docstring for the model."""

    name = "redisstreams"
    capabilities = Capabilities(  # not durable (Redis persistence is the operator's), no DLQ
        pools=True, requeue=True, requeue_to_other_member=True, exchanges=True,
        at_least_once=True, stores_without_listener=True, prefetch=True, confirmed_send=True)
    options = {
        "db": Option(_within(int, 0, 1 << 31), 0, "Redis database number"),
        "claim_idle": Option(_within(float, 0.001, 86400), 60.0, "seconds (up to 86400) "
                             "before another member takes over a vanished consumer's messages"),
        "maxlen": Option(_within(int, 0, 1 << 63), 0, "approximate cap on each stream's "
                         "length, dropping its oldest entries even if unread; 0 keeps all"),
        "socket_timeout": Option(float, 5.0, "seconds a Redis command (a send attempt) may "
                                 "take before the connection counts as lost"),
        "ssl": Option(bool, False, "connect with TLS"),
    }

    def __init__(self, url: TransportURL, options: dict[str, Any]) -> None:
        super().__init__(url, options)
        if len(url.hosts) > 1:
            raise InvalidTransportURL(
                f"redisstreams takes one Redis host, not {len(url.hosts)} "
                f"({url.masked()}); point it at one server or a proxy in front of a cluster")
        host = url.hosts[0] if url.hosts else TransportHost()
        self.namespace = url.virtual_host or "tidings"
        seconds = self.conf["socket_timeout"]
        #: A new Redis client; no I/O yet (redis-py connects on the first command). No retries
        #: inside redis-py: retrying is the core's job, and a retried XADD could add twice.
        self.connect = functools.partial(
            redis.Redis, host=host.hostname or "127.0.0.1", port=host.port or 6379,
            username=host.username, password=host.password, db=self.conf["db"],
            ssl=self.conf["ssl"], socket_timeout=seconds, socket_connect_timeout=seconds,
            retry=Retry(NoBackoff(), 0))
        self._client = self.connect()  # for sending; each receiver has its own
        self._grouped: set[bytes] = set()  # streams whose no-pool group exists

    def stream_key(self, exchange: str, routing_key: str) -> bytes:
        """The stream an (exchange, routing key) lives in; public for tools and tests."""
        return (f"{self.namespace}:stream:{quote(exchange, safe='')}:"
                f"{quote(routing_key, safe='.')}").encode()

    def send_batch(self, messages: Sequence[OutgoingMessage],
                   timeout: float | None) -> list[BaseException | None]:
        """XADD every message in one round trip (``socket_timeout`` bounds it). The first send
        to a stream creates its no-pool group too, reading from the start, so a notification
        sent before any listener of that group waits for one."""
        keys = [self.stream_key(m.exchange, m.routing_key) for m in messages]
        fresh = [k for k in dict.fromkeys(keys) if k not in self._grouped]
        pipe = self._client.pipeline(transaction=False)
        for key in fresh:
            pipe.xgroup_create(key, NO_POOL_GROUP, id="0", mkstream=True)
        for key, message in zip(keys, messages, strict=True):
            fields: dict[Any, Any] = {b"body": message.body, b"id": message.message_id}
            if message.headers:
                fields[b"h"] = json.dumps(message.headers)
            pipe.xadd(key, fields, maxlen=self.conf["maxlen"] or None, approximate=True)
        try:
            with _reaching("send", self.url.masked()):
                replies = pipe.execute(raise_on_error=False)
        except TransportUnreachable as exc:
            return [exc] * len(messages)
        self._grouped.update(k for k, r in zip(fresh, replies, strict=False)
                             if not isinstance(r, Exception) or "BUSYGROUP" in str(r))
        return [r if isinstance(r, Exception) else None for r in replies[len(fresh):]]

    def listen(self, bindings: Sequence[Binding], pool: str | None, prefetch: int) -> Receiver:
        # Nothing to do with prefetch: the core never asks receive() for more than it allows.
        keys = list(dict.fromkeys(self.stream_key(b.exchange, b.routing_key) for b in bindings))
        group, start = (NO_POOL_GROUP, "0") if pool is None else (f"pool:{pool}", "$")
        return _StreamsReceiver(self, keys, group, start)

    def cleanup(self) -> None:
        """Close the sending connection; each receiver closes its own when the core stops it."""
        self._client.close()
