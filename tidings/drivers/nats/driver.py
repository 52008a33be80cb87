"""``nats://``: tidings on NATS JetStream, through nats-py (asyncio) on a loop thread of its own.

The model (docs/nats.md has the whole of it):

* each exchange is one stream, ``tidings_<namespace>_<exchange>``, capturing the subjects
  ``tidings.<namespace>.<exchange>.>``; a routing key is the rest of the subject
  (``notifications.info``). Retention is *interest*: a message stays until every consumer of
  its subject has acknowledged it (or ``max_age`` passes);
* the no-pool group is one durable pull consumer per (exchange, routing key), ``g_<key>``,
  created by the first send as well as by ``listen()`` (``stores_without_listener``), and
  shared by every no-pool listener of that key; a pool is one durable ``p_<pool>_<key>`` per
  routing key it listens to, created by its first member, delivering what is sent from then on;
* a receiver owns one connection and one inbox; it asks the consumers of its bindings for at
  most ``max_messages`` in all (pull requests that expire within about a second), so it never
  takes more than the core can hold; ack is ``+ACK``, requeue ``-NAK``, reject ``+TERM`` (no
  dead-lettering), and held messages get ``+WPI`` (work in progress) every ``ack_wait / 3``
  so a slow handler keeps them; ``delivery_count`` is JetStream's ``num_delivered``;
* a send publishes the whole batch, then awaits every publish ack (``confirmed_send``). A
  message over the server's ``max_payload`` is refused alone with ``MessageTooLarge``.
  ``Nats-Msg-Id`` is ``<routing key>/<message id>``: de-duplication never crosses topics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any
from urllib.parse import quote

import nats
import nats.errors
import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from tidings.transports.base import (
    ACK,
    REJECT,
    Binding,
    Capabilities,
    Driver,
    IncomingMessage,
    Option,
    Outcome,
    OutgoingMessage,
    Receiver,
)
from tidings.transports.errors import (
    InvalidTransportURL,
    MessageDeliveryFailure,
    MessageTooLarge,
    TransportUnreachable,
)
from tidings.transports.url import TransportURL, mask_password

__all__ = ["NatsDriver"]

LOG = logging.getLogger(__name__)
ID_HEADER = "Tidings-Id"
_OWN_HEADERS = frozenset({ID_HEADER, "Nats-Msg-Id", "Content-Type", "Content-Encoding"})
_SETTLE_VERB = {ACK: b"+ACK", REJECT: b"+TERM"}  # anything else (REQUEUE) is -NAK
_STREAM_IN_USE = 10058
_LOST = (nats.errors.ConnectionClosedError, nats.errors.NoServersError,
         nats.errors.StaleConnectionError, nats.errors.OutboundBufferLimitError,
         nats.errors.TimeoutError, nats.errors.NoRespondersError, ConnectionError, OSError,
         asyncio.TimeoutError)


def _token(text: str, keep: str = "-") -> str:
    """``text`` as one subject token or name piece: ASCII letters, digits and ``keep`` as they
    are, every other byte as ``=XX``; the empty string is ``=`` (no other text gives it)."""
    if not text:
        return "="
    return "".join(c if c.isascii() and (c.isalnum() or c in keep)
                   else "".join(f"={b:02X}" for b in c.encode()) for c in text)


def _within(convert: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    def number(raw: str) -> Any:  # named for the core's message: "... is not a valid number"
        if not low <= (value := convert(raw)) <= high:
            raise ValueError(raw)
        return value
    return number


class _Loop:
    """An asyncio event loop in a daemon thread owned by the driver."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tidings-nats-io",
                                       daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None) -> Any:
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TransportUnreachable(f"NATS did not answer within {timeout} s") from None

    def stop(self) -> None:
        """Cancel what nats-py still runs (readers, pingers of closed connections), then stop."""
        if self.loop.is_closed() or not self.loop.is_running():
            return

        async def finish() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=2) if tasks else None

        if threading.current_thread() is not self.thread:
            try:
                self.submit(finish()).result(5)
            except Exception as exc:
                LOG.debug("nats: stopping the loop: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(5)


class _NatsReceiver(Receiver):
    """The consumers of one listener's bindings, pulled through one inbox on a connection of
    its own. ``_ready``, ``_credit`` and the flags are shared with the loop thread under
    ``_cond``."""

    def __init__(self, driver: NatsDriver, consumers: list[tuple[str, str, str, DeliverPolicy]],
                 prefetch: int) -> None:
        self._driver, self._io = driver, driver.io()
        self._consumers = [(stream, durable) for stream, durable, _, _ in consumers]
        self._index = {c: i for i, c in enumerate(self._consumers)}
        self._cond = threading.Condition()
        self._ready: deque[IncomingMessage] = deque()
        self._credit: dict[str, list[float]] = {}  # reply subject -> [messages left, deadline]
        self._held: dict[int, Any] = {}  # id(token) -> nats Msg handed to the core, unsettled
        self._woken = self._closed = False
        self._lost: str | None = None
        self._seq = 0
        self._ack_wait = driver.conf["ack_wait"]
        self._progress_at = time.monotonic() + self._ack_wait / 3
        self._olock = threading.Lock()
        self._outbox: list[tuple[str, bytes, str]] = []
        self._posting = False
        self._drainer: Any = None
        self._nc: Any = None
        self._inbox = ""
        self._sub: Any = None
        self._expires = 0.0  # the longest pull request expiry asked for
        self._late: list[str] = []  # delivered while closing: handed back last
        self._requeued: list[str] = []  # requeued since the last receive()
        try:
            self._io.run(self._open(consumers), driver.conf["connect_timeout"] + 10)
        except BaseException:
            self._closed = True
            self._io.submit(self._shutdown([]))
            driver.released()
            raise

    async def _open(self, consumers: list[tuple[str, str, str, DeliverPolicy]]) -> None:
        self._nc = await self._driver.connect(self._on_lost)
        js = self._nc.jetstream()
        for stream, durable, subject, policy in consumers:
            await self._driver.ensure(js, stream, durable, subject, policy)
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=self._on_msg)
        await self._nc.flush()

    async def _on_lost(self, *_: Any) -> None:
        with self._cond:
            if not self._closed and self._lost is None:
                self._lost = "the connection to NATS was lost"
            self._cond.notify_all()

    async def _on_msg(self, msg: Any) -> None:
        """A delivery (its subject is the stream's, its consumer is in the ack subject) or the
        end of one of our pull requests (a status on that request's reply subject)."""
        headers = msg.headers or {}
        with self._cond:
            if not msg.reply:
                status = headers.get("Status")
                if status is None or status == "100":
                    return
                self._credit.pop(msg.subject, None)
                desc = headers.get("Description", "")
                if status == "503" or "Deleted" in desc:
                    self._lost = f"its JetStream consumer went away ({status} {desc})"
                self._cond.notify_all()
                return
            incoming, consumer = _unwrap(msg)
            index = self._index.get(consumer) if consumer is not None else None
            for reply, credit in self._credit.items():  # the oldest open request of that consumer
                if credit[2] == index:
                    credit[0] -= 1
                    if credit[0] <= 0:
                        del self._credit[reply]
                    break
            if self._closed:  # arrived while closing: handed back by _shutdown()
                self._late.append(msg.reply)
                return
            self._ready.append(incoming)
            if len(self._ready) == 1:
                self._cond.notify_all()

    def _ask(self, max_messages: int, expires: float) -> None:
        """Pull requests for what the core may still take: each consumer is asked for at most
        ``max_messages`` minus what is buffered and what it still owes, so one routing key is
        fetched exactly; k keys may bring up to k times that (kept here until asked for).
        Caller holds ``_cond``."""
        now = time.monotonic()
        owed = [0] * len(self._consumers)
        for subject, (left, deadline, index) in list(self._credit.items()):
            if deadline < now:  # its end of request never came: stop counting it
                del self._credit[subject]
            else:
                owed[int(index)] += int(left)
        room = max_messages - len(self._ready)
        if room <= 0 or self._nc is None:
            return
        requests = []
        for index, (stream, durable) in enumerate(self._consumers):
            batch = room - owed[index]
            if batch <= 0 or (owed[index] and batch * 2 < room):  # fewer, larger requests
                continue
            self._seq += 1
            reply = f"{self._inbox}.{self._seq}"
            self._credit[reply] = [batch, now + expires + 5, index]
            requests.append((f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}", json.dumps(
                {"batch": batch, "expires": int(expires * 1e9)}).encode(), reply))
        if requests:
            self._post(requests)

    def _post(self, items: list[tuple[str, bytes, str]]) -> None:
        """Queue (subject, payload, reply) publishes for the loop: one wake-up per burst."""
        with self._olock:
            self._outbox.extend(items)
            if self._posting:
                return
            self._posting = True
        self._io.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while True:
            with self._olock:
                items, self._outbox = self._outbox, []
                if not items or self._nc is None:
                    self._posting = False
                    return
            try:
                for subject, payload, reply in items:
                    await self._nc.publish(subject, payload, reply=reply)
            except Exception as exc:  # the connection went: receive() or settle() says so
                LOG.debug("nats: publishing from a receiver: %s", exc)
                with self._olock:
                    self._outbox.clear()
                    self._posting = False
                return

    def receive(self, max_messages: int, timeout: float) -> Sequence[IncomingMessage]:
        deadline = time.monotonic() + timeout
        if self._requeued:
            self._post([(r, b"-NAK", "") for r in self._requeued])
            self._requeued = []
        if deadline > self._progress_at:
            self._keep_held()
        with self._cond:
            while True:
                if self._lost is not None:
                    raise TransportUnreachable(f"nats at {self._driver.url.masked()}: "
                                               f"{self._lost}")
                if self._ready or self._woken or self._closed:
                    break
                self._expires = max(self._expires, min(max(timeout, 0.5), 5.0))
                self._ask(max_messages, min(max(timeout, 0.5), 5.0))
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._woken = False
            out = [self._ready.popleft() for _ in range(min(max_messages, len(self._ready)))]
        for msg in out:
            self._held[id(msg.token)] = msg.token
        return out

    def _keep_held(self) -> None:
        """Work in progress for every message this receiver has and nobody settled: JetStream
        would hand it to another member once ``ack_wait`` passed."""
        self._progress_at = time.monotonic() + self._ack_wait / 3
        with self._cond:
            replies = [m.reply for m in self._held.values()]
            replies += [m.token.reply for m in self._ready]
        if replies and self._nc is not None:
            self._post([(r, b"+WPI", "") for r in replies])

    def interrupt(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def settle(self, outcomes: Sequence[Outcome]) -> None:
        if self._lost is not None or self._nc is None or self._nc.is_closed:
            raise TransportUnreachable(f"nats at {self._driver.url.masked()}: "
                                       f"{self._lost or 'the connection is closed'}")
        items = []
        for msg, how in outcomes:
            self._held.pop(id(msg.token), None)
            verb = _SETTLE_VERB.get(how)
            if verb is None:  # requeue: at the next receive(), or by close() once we are gone
                self._requeued.append(msg.token.reply)
            else:
                items.append((msg.token.reply, verb, ""))
        if items:
            self._post(items)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            leftovers = [m.token.reply for m in self._ready] + self._requeued
            self._ready.clear()
            self._cond.notify_all()
        try:
            # Handed back through the sending connection once ours is closed (see _shutdown)
            self._driver.hand_back(self._io.run(self._shutdown(leftovers), 10))
        except Exception as exc:  # a dead connection: JetStream redelivers after ack_wait
            LOG.debug("nats: closing a receiver: %s", mask_password(str(exc)))
        finally:
            self._driver.released()

    async def _shutdown(self, leftovers: list[str]) -> list[str]:
        deadline = time.monotonic() + 5
        while self._posting and time.monotonic() < deadline:  # settlements still going out
            await asyncio.sleep(0.005)
        nc, self._nc = self._nc, None
        if nc is None or nc.is_closed:
            return leftovers + self._late
        try:
            # JetStream would deliver what we hand back (and what the core requeued just
            # before) to our pull requests still open: let them end first (within their
            # expiry), collecting what they bring, then close, then hand it all back through
            # the driver's sending connection.
            deadline = time.monotonic() + self._expires + 1
            while self._credit and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await nc.close()
        except Exception as exc:
            LOG.debug("nats: closing a receiver's connection: %s", exc)
        return leftovers + self._late


def _unwrap(msg: Any) -> tuple[IncomingMessage, tuple[str, str] | None]:
    """One JetStream delivery as an IncomingMessage (one it cannot read carries ``problem``),
    and the (stream, consumer) it came from."""
    raw = msg.headers or {}
    headers = {k: v for k, v in raw.items() if k not in _OWN_HEADERS}
    problem, consumer = None, None
    try:
        meta = msg.metadata
        count = int(meta.num_delivered)
        consumer = (meta.stream, meta.consumer)
    except Exception as exc:
        count, problem = 1, f"its JetStream metadata cannot be read ({exc})"
    out = IncomingMessage(msg.data, raw.get(ID_HEADER), headers, count > 1, token=msg,
                          delivery_count=count)
    out.problem = out.problem or problem
    return out, consumer


def _ssl_context(conf: dict[str, Any]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=conf["tls_ca_file"])
    if conf["tls_cert_file"]:
        ctx.load_cert_chain(conf["tls_cert_file"], conf["tls_key_file"],
                            conf["tls_key_password"])
    if not conf["tls_verify"]:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class NatsDriver(Driver):
    """NATS JetStream: streams per exchange, durable pull consumers per group; see the module
    docstring and docs/nats.md."""

    name = "nats"
    capabilities = Capabilities(
        pools=True, requeue=True, requeue_to_other_member=True, exchanges=True,
        at_least_once=True, durable=True, stores_without_listener=True, dead_letter=False,
        prefetch=True, confirmed_send=True)
    options = {
        "storage": Option(str, "file", "JetStream storage of the streams tidings creates: file "
                          "(survives a restart, durable) or memory", choices=("file", "memory")),
        "replicas": Option(_within(int, 1, 5), 1, "replicas of each stream (1 to 5)"),
        "ack_wait": Option(_within(float, 1, 86400), 30.0, "seconds (1 to 86400) before "
                           "JetStream redelivers a message whose listener vanished; held "
                           "messages are kept alive with in-progress acks"),
        "max_age": Option(_within(float, 0, 1e9), 0.0, "seconds a message may wait in its "
                          "stream before it is dropped unread; 0 keeps it"),
        "dedupe": Option(bool, True, "send Nats-Msg-Id as '<routing key>/<message id>', so a "
                         "retried send is stored once (within the stream's duplicate window)"),
        "connect_timeout": Option(_within(float, 0.1, 600), 5.0, "seconds to connect, and "
                                  "bound on a JetStream API call"),
        "token": Option(str, None, "authentication token", secret=True),
        "nkey_seed": Option(str, None, "NKey seed (SU...) to sign in with (needs the nkeys "
                            "package)", secret=True),
        "creds_file": Option(str, None, "path of a .creds file (user JWT and NKey seed)"),
        "tls": Option(bool, False, "connect with TLS (also: nats+tls://)"),
        "tls_ca_file": Option(str, None, "CA bundle to verify the server with"),
        "tls_cert_file": Option(str, None, "client certificate (PEM)"),
        "tls_key_file": Option(str, None, "client key (PEM)"),
        "tls_key_password": Option(str, None, "password of the client key", secret=True),
        "tls_verify": Option(bool, True, "verify the server's certificate"),
        "tls_hostname": Option(str, None, "name to verify the server's certificate against"),
    }

    def __init__(self, url: TransportURL, options: dict[str, Any]) -> None:
        super().__init__(url, options)
        if url.subscheme not in (None, "tls"):
            raise InvalidTransportURL(f"nats does not know the scheme {url.transport!r} "
                                      f"({url.masked()}); write nats:// or nats+tls://")
        self.tls = bool(self.conf["tls"] or url.subscheme == "tls")
        self.namespace = url.virtual_host or ""
        self.prefix = f"tidings.{_token(self.namespace)}"
        self.servers = [self._server(h) for h in url.hosts] or ["nats://127.0.0.1:4222"]
        if self.conf["storage"] == "memory":
            self.capabilities = Capabilities(**{**type(self).capabilities.as_dict(),
                                                "durable": False})
        self._io: _Loop | None = None  # the receivers'
        self._send_io: _Loop | None = None
        self._io_lock = threading.Lock()
        self._users = 0
        self._cleaned = False
        self._nc: Any = None
        self._js: Any = None
        self._connecting: asyncio.Lock | None = None
        self._ensured: set[tuple[str, str]] = set()

    def _server(self, host: Any) -> str:
        if host.hostname is None and host.port is None:
            raise InvalidTransportURL(f"nats needs a host in {self.url.masked()}")
        name = host.hostname or "127.0.0.1"
        name = f"[{name}]" if ":" in name else name
        creds = ""
        if host.username is not None:
            creds = quote(host.username, safe="")
            if host.password is not None:
                creds += ":" + quote(host.password, safe="")
            creds += "@"
        return f"{'tls' if self.tls else 'nats'}://{creds}{name}:{host.port or 4222}"

    # -- names ----------------------------------------------------------------------------
    def stream_name(self, exchange: str) -> str:
        """The stream of an exchange; public for tools and tests."""
        return f"tidings_{_token(self.namespace)}_{_token(exchange)}"

    def subject(self, exchange: str, routing_key: str) -> str:
        parts = ".".join(_token(p, "-_") for p in routing_key.split("."))
        return f"{self.prefix}.{_token(exchange)}.{parts}"

    # -- the loop and connections ---------------------------------------------------------
    def io(self) -> _Loop:
        """The loop thread, started at first use; each receiver counts as a user of it."""
        with self._io_lock:
            if self._io is None:
                self._io = _Loop()
            self._users += 1
            return self._io

    def released(self) -> None:
        with self._io_lock:
            self._users -= 1
            if self._cleaned and self._users == 0 and self._io is not None:
                self._io.stop()

    async def connect(self, on_lost: Callable[..., Any] | None = None) -> Any:
        conf = self.conf
        kwargs: dict[str, Any] = {
            "servers": self.servers, "allow_reconnect": False, "max_reconnect_attempts": 0,
            "connect_timeout": conf["connect_timeout"], "ping_interval": 20,
            "max_outstanding_pings": 3, "name": "tidings", "token": conf["token"],
            "nkeys_seed_str": conf["nkey_seed"], "user_credentials": conf["creds_file"],
        }
        if self.tls:
            kwargs["tls"] = _ssl_context(conf)
            kwargs["tls_hostname"] = conf["tls_hostname"]

        async def quiet(exc: Exception) -> None:
            LOG.debug("nats: %s", mask_password(str(exc)))

        kwargs["error_cb"] = quiet
        if on_lost is not None:
            kwargs["disconnected_cb"] = kwargs["closed_cb"] = on_lost
        try:
            return await nats.connect(**kwargs)
        except Exception as exc:
            raise TransportUnreachable(
                f"nats could not connect to {self.url.masked()}: "
                f"{mask_password(str(exc)) or type(exc).__name__}; check that nats-server is "
                f"running with JetStream (-js) and the credentials") from None

    async def _sender(self) -> Any:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._nc is None or self._nc.is_closed:
                self._nc = await self.connect()
                self._js = self._nc.jetstream(timeout=self.conf["connect_timeout"])
                self._ensured.clear()
        return self._nc

    async def ensure(self, js: Any, stream: str, durable: str, subject: str,
                     policy: DeliverPolicy) -> None:
        """The stream and the durable consumer exist (created as configured, or kept as they
        are if someone made them otherwise)."""
        if (stream, "") not in self._ensured:
            config = StreamConfig(
                name=stream, subjects=[subject.rsplit(".", subject.count(".") - 2)[0] + ".>"],
                retention=RetentionPolicy.INTEREST, num_replicas=self.conf["replicas"],
                storage=StorageType(self.conf["storage"]), max_age=self.conf["max_age"] or None)
            try:
                await js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_IN_USE:
                    raise
            self._ensured.add((stream, ""))
        if (stream, durable) in self._ensured:
            return
        consumer = ConsumerConfig(
            durable_name=durable, deliver_policy=policy, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.conf["ack_wait"], filter_subject=subject, max_ack_pending=-1,
            max_deliver=-1)
        try:
            await js.add_consumer(stream, consumer)
        except nats.js.errors.APIError:
            await js.consumer_info(stream, durable)  # there already, made otherwise: use it
        self._ensured.add((stream, durable))

    # -- sending --------------------------------------------------------------------------
    def send_batch(self, messages: Sequence[OutgoingMessage],
                   timeout: float | None) -> list[BaseException | None]:
        if not messages:
            return []
        bound = (timeout or 30.0) + self.conf["connect_timeout"]
        try:
            result: list[BaseException | None] = self.io_for_send().run(
                self._send(messages, timeout or 30.0), bound)
            return result
        except TransportUnreachable as exc:
            return [exc] * len(messages)

    def io_for_send(self) -> _Loop:
        """Sending has a loop thread of its own: a send never queues behind deliveries."""
        with self._io_lock:
            if self._send_io is None:
                self._send_io = _Loop()
            return self._send_io

    def hand_back(self, replies: list[str]) -> None:
        """NAK deliveries of a closed receiver, through the sending connection."""
        async def nak() -> None:
            sender = await self._sender()
            for reply in replies:
                await sender.publish(reply, b"-NAK")
            await sender.flush(5)

        if not replies:
            return
        io = self.io_for_send()
        try:
            io.run(nak(), self.conf["connect_timeout"] + 5)
        finally:
            if self._cleaned:  # after cleanup(): this connection and loop were only for this
                with self._io_lock:
                    self._send_io = None
                if self._nc is not None:
                    io.run(self._nc.close(), 5)
                io.stop()

    async def _send(self, messages: Sequence[OutgoingMessage],
                    timeout: float) -> list[BaseException | None]:
        try:
            nc = await self._sender()
        except TransportUnreachable as exc:
            return [exc] * len(messages)
        js, limit = self._js, nc.max_payload
        results: list[BaseException | None] = [None] * len(messages)
        sends: list[tuple[int, Any]] = []
        for i, m in enumerate(messages):
            subject = self.subject(m.exchange, m.routing_key)
            headers = {**m.headers, ID_HEADER: m.message_id, "Content-Type": m.content_type}
            if self.conf["dedupe"]:
                headers["Nats-Msg-Id"] = f"{m.routing_key}/{m.message_id}"
            size = len(m.body) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 14
            if size > limit:
                results[i] = MessageTooLarge(
                    f"message {m.message_id} is {size} bytes with its headers, over the NATS "
                    f"server's max_payload of {limit}; set the URL option max_message_size="
                    f"{max(limit - 4096, 0)} so tidings refuses it before sending, or raise "
                    f"max_payload in the server's configuration")
                continue
            stream = self.stream_name(m.exchange)
            try:
                await self.ensure(js, stream, f"g_{_token(m.routing_key)}", subject,
                                  DeliverPolicy.ALL)
            except Exception as exc:
                results[i] = self._failure(exc, stream)
                continue
            sends.append((i, js.publish(subject, m.body, timeout=timeout, headers=headers)))
        acks = await asyncio.gather(*(c for _, c in sends), return_exceptions=True)
        for (i, _), ack in zip(sends, acks, strict=True):
            if isinstance(ack, BaseException):
                results[i] = self._failure(ack, self.stream_name(messages[i].exchange))
        return results

    def _failure(self, exc: BaseException, stream: str) -> BaseException:
        """A retry may cure a lost connection, a timeout, and a stream or consumer deleted
        under us (forgotten here, so the retry makes them again)."""
        self._ensured = {e for e in self._ensured if e[0] != stream}
        text = mask_password(str(exc)) or type(exc).__name__
        if isinstance(exc, (*_LOST, nats.js.errors.NoStreamResponseError,
                            nats.js.errors.ServiceUnavailableError, TransportUnreachable)):
            return TransportUnreachable(f"nats at {self.url.masked()}: {text}")
        return MessageDeliveryFailure(f"nats at {self.url.masked()} refused the message: {text}")

    # -- listening ------------------------------------------------------------------------
    def listen(self, bindings: Sequence[Binding], pool: str | None, prefetch: int) -> Receiver:
        consumers: dict[tuple[str, str], tuple[str, str, str, DeliverPolicy]] = {}
        for b in bindings:
            stream = self.stream_name(b.exchange)
            key = _token(b.routing_key)
            durable, policy = ((f"g_{key}", DeliverPolicy.ALL) if pool is None
                               else (f"p_{_token(pool)}_{key}", DeliverPolicy.NEW))
            consumers[(stream, durable)] = (stream, durable, self.subject(b.exchange,
                                                                          b.routing_key), policy)
        return _NatsReceiver(self, list(consumers.values()), prefetch)

    def cleanup(self) -> None:
        """Close the sending connection; the receivers' loop stops once every receiver is
        closed."""
        with self._io_lock:
            self._cleaned = True
            io, users, send_io = self._io, self._users, self._send_io
        if send_io is not None:
            if self._nc is not None:
                try:
                    send_io.run(self._nc.close(), 5)
                except Exception as exc:
                    LOG.debug("nats: closing the sending connection: %s", exc)
            send_io.stop()
        if io is not None and users == 0:
            io.stop()
