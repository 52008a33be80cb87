"""``nats://``: tidings on NATS JetStream, through nats-py (asyncio): listeners on a loop thread
of their own, sends on a loop that the sending threads run themselves (``_DrivenLoop``).

The model (docs/nats.md has the whole of it):

* each exchange is one stream, ``tidings_<namespace>_<exchange>``, capturing the subjects
  ``tidings.<namespace>.<exchange>.>``; a routing key is the rest of the subject
  (``notifications.info``). Retention is *interest*: a message stays until every consumer of
  its subject has acknowledged it (or ``max_age`` passes);
* the no-pool group is one durable pull consumer per (exchange, routing key), ``g_<key>``,
  created by the first send as well as by ``listen()`` (``stores_without_listener``), and
  shared by every no-pool listener of that key; a pool is one durable ``p_<pool>_<key>`` per
  routing key it listens to, created by its first member, delivering what is sent from then on;
* a receiver owns one connection and one inbox; it asks each consumer of its bindings for at
  most what the core may still take, with at most one pull request open per consumer, so it
  never takes more than the core can hold. Pulls are paced (see ``_NatsReceiver``): a steady
  stream arrives in bursts, so one wake-up of each thread serves many messages. Ack is
  ``+ACK``, requeue ``-NAK``, reject ``+TERM`` (no dead-lettering), sent in batches; held
  messages get ``+WPI`` (work in progress) every ``ack_wait / 3`` so a slow handler keeps
  them; ``delivery_count`` is JetStream's ``num_delivered``;
* a send publishes the whole batch on the sending connection, each message with a reply
  subject of its own, then waits for every publish ack (``confirmed_send``), running the
  send loop in the caller's thread meanwhile. A message over the server's ``max_payload`` is
  refused alone with ``MessageTooLarge``. ``Nats-Msg-Id`` is ``<routing key>/<message id>``:
  de-duplication never crosses topics;
* several hosts in the URL are the servers of one cluster; every connection may go to any of
  them, and a lost one is made again by the core's retry and reconnect policies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
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
_SETTLE_BATCH = 0.005  # seconds a receiver's settlements may wait to go out together
_PACE = 0.005  # under load, a consumer is polled at most this often (see _NatsReceiver)
_LONG_POLL = 0.5  # seconds an idle consumer's pull request waits for a message
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
            if future.done():  # the coroutine's own timeout (nats-py's are TimeoutErrors too)
                raise
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


class _DrivenLoop:
    """The sending connection's asyncio loop, run by the threads that wait on it.

    A confirmed send waits for its publish acks anyway. Handing the batch to a loop thread
    and sleeping until that thread wakes the caller costs two thread switches and two
    hand-overs of the GIL per send, most of what a send costs; so the sending thread runs the
    loop itself until its acks are in, as an asyncio program awaits in place. A thread that
    sends while another runs the loop queues its batch there and sleeps; it takes the loop
    over if its acks are not in when the runner's are. Between sends, after ``GRACE`` seconds
    without a runner, a keeper thread runs the loop, so that nats-py answers the server's
    pings and notices a lost connection; a send takes the loop back from it. A thread that
    already runs an asyncio loop of its own never runs this one: the keeper does.
    """

    GRACE = 0.05

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._cond = threading.Condition()
        self._runner: int | None = None  # ident of the thread running the loop
        self._sleepers = 0  # senders waiting for their acks or for the loop
        self._urgent = False  # a sender that cannot run the loop waits: no grace period
        self._idle_since = time.monotonic()
        self._closing = False
        self._keeper = threading.Thread(target=self._keep, name="tidings-nats-send",
                                        daemon=True)
        self._keeper.start()

    def _keep(self) -> None:
        me = threading.get_ident()
        cond = self._cond
        while True:
            with cond:
                while True:
                    if self._closing:
                        return
                    if self._runner is None:
                        left = 0.0 if self._urgent else \
                            self._idle_since + self.GRACE - time.monotonic()
                        if left <= 0:
                            break
                    else:
                        left = self.GRACE
                    cond.wait(left)  # no notification per send: a look every GRACE at most
                self._runner = me
                self._urgent = False
            try:
                self.loop.run_forever()
            finally:
                with cond:
                    self._runner = None
                    self._idle_since = time.monotonic()
                    cond.notify_all()

    def _release_keeper(self) -> None:
        """On the loop: stop it if the keeper runs it (a late request finds a sender running
        it, and must not stop that one's run)."""
        if threading.current_thread() is self._keeper:
            self.loop.stop()

    def wait(self, submit: Callable[[], None], job: _Job, timeout: float) -> bool:
        """Run ``submit()`` on the loop; return True once ``job`` is complete, False after
        ``timeout`` seconds. Runs the loop in this thread whenever nobody else does."""
        deadline = time.monotonic() + timeout
        me = threading.get_ident()
        cond = self._cond
        own_loop = asyncio._get_running_loop() is not None
        queued = False
        job.on_done = self._done
        with cond:
            while True:
                if not job.left:
                    return True
                if self._runner is None and not own_loop and not self._closing:
                    self._runner = me
                    break
                if not queued:  # someone runs the loop (or will): hand it our batch
                    self.loop.call_soon_threadsafe(submit)
                    queued = True
                if self._runner is not None and self._runner == self._keeper.ident:
                    self.loop.call_soon_threadsafe(self._release_keeper)  # give it back
                elif own_loop and self._runner is None:
                    self._urgent = True
                    cond.notify_all()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._sleepers += 1
                try:
                    cond.wait(left)
                finally:
                    self._sleepers -= 1
        try:
            loop = self.loop
            if not queued:
                loop.call_soon(submit)  # this thread runs the loop: no wake-up needed
            if job.left:
                job.fut = future = loop.create_future()

                def expire() -> None:
                    if not future.done():
                        future.set_result(None)

                timer = loop.call_later(max(0.0, deadline - time.monotonic()), expire)
                try:
                    loop.run_until_complete(future)
                finally:
                    timer.cancel()
                    job.fut = None
            return not job.left
        finally:
            with cond:
                self._runner = None
                self._idle_since = time.monotonic()
                if self._sleepers:  # one of them may need the loop now
                    cond.notify_all()

    def _done(self, job: _Job) -> None:
        """On the loop: ``job`` is complete. Wake its sender (the runner, or a sleeper)."""
        future = job.fut
        if future is not None and not future.done():
            future.set_result(None)
        with self._cond:  # a sender about to sleep holds it until it waits
            if self._sleepers:
                self._cond.notify_all()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None) -> Any:
        """Run ``coro`` on the loop and return its result (``_Loop.run``'s contract)."""
        box = _Job(1)
        out: list[Any] = []
        tasks: list[asyncio.Future[Any]] = []

        async def wrapper() -> None:
            try:
                out.append((True, await coro))
            except BaseException as exc:
                out.append((False, exc))
            finally:
                box.set(0, None)

        def submit() -> None:
            tasks.append(asyncio.ensure_future(wrapper()))

        if not self.wait(submit, box, 30.0 if timeout is None else timeout):
            self.loop.call_soon_threadsafe(lambda: [t.cancel() for t in tasks])
            raise TransportUnreachable(f"NATS did not answer within {timeout} s")
        ok, value = out[0]
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        """Cancel what nats-py still runs on the loop, then stop the keeper."""
        async def finish() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2)

        if not self._closing:
            try:
                self.run(finish(), 5)
            except Exception as exc:
                LOG.debug("nats: stopping the sending loop: %s", exc)
        with self._cond:
            self._closing = True
            if self._runner is not None and self._runner == self._keeper.ident:
                self.loop.call_soon_threadsafe(self._release_keeper)
            self._cond.notify_all()
        if threading.current_thread() is not self._keeper:
            self._keeper.join(5)


_PENDING: Any = object()  # a message of a _Job whose publish ack has not come yet


class _Job:
    """One ``send_batch()``: a result per message, set on the send loop as its publish acks
    come. The caller waits on ``done`` (a plain lock, released by the last result): one wake
    of the caller per batch, not per message."""

    __slots__ = ("done", "fut", "left", "on_done", "results", "sent", "task", "tokens")

    def __init__(self, count: int) -> None:
        self.results: list[Any] = [_PENDING] * count
        self.left = count
        self.tokens: list[str] = []
        self.task: asyncio.Future[None] | None = None
        self.sent = 0.0  # loop time the first message was published
        self.fut: asyncio.Future[None] | None = None  # set when the job completes
        self.on_done: Callable[[_Job], None] | None = None
        self.done = threading.Lock()
        self.done.acquire()

    def set(self, index: int, result: BaseException | None) -> None:
        if self.results[index] is _PENDING:
            self.results[index] = result
            self.left -= 1
            if not self.left:
                self.done.release()
                if self.on_done is not None:
                    self.on_done(self)


class _Link:
    """The driver's sending connection and the publish acks it still owes, by the token of
    their reply subject (``<inbox>.<token>``). Publish acks come on one subscription of the
    link's inbox, so a message costs no request task and no timer of its own. Send loop
    only."""

    def __init__(self, failure: Callable[[BaseException, str], BaseException],
                 unanswered: Callable[[_Link, tuple[str, str, str]], None], where: str) -> None:
        self.where = where  # "nats at <masked URL>", for messages
        self.failure = failure
        self.unanswered = unanswered
        self.nc: Any = None
        self.js: Any = None
        self.prefix = ""
        self.max_payload = 0
        # token -> (job, index, (subject, stream, no-pool consumer), deadline), oldest first
        self.waiting: dict[str, tuple[_Job, int, tuple[str, str, str], float]] = {}
        self.timer: asyncio.TimerHandle | None = None  # at the oldest one's deadline
        self.lost: str | None = None
        self._seq = 0

    def open(self, nc: Any, js: Any) -> None:
        self.nc, self.js = nc, js
        self.prefix = nc.new_inbox() + "."
        self.max_payload = nc.max_payload

    def expect(self, job: _Job, index: int, route: tuple[str, str, str],
               deadline: float) -> str:
        """A token for the reply subject of message ``index`` of ``job``, whose ack fails
        as unreachable after ``deadline`` (loop time)."""
        self._seq += 1
        token = f"{self._seq:x}"
        self.waiting[token] = (job, index, route, deadline)
        job.tokens.append(token)
        return token

    async def on_ack(self, msg: Any) -> None:
        entry = self.waiting.pop(msg.subject[len(self.prefix):], None)
        if entry is None:  # its caller stopped waiting
            return
        job, index, route, _ = entry
        stream = route[1]
        status = msg.headers.get("Status") if msg.headers else None
        try:
            if status == "503":  # nothing listens on the subject: no stream, or no leader
                self.unanswered(self, route)
                raise nats.js.errors.NoStreamResponseError
            if status is not None:
                raise nats.js.errors.ServiceUnavailableError(
                    code=int(status), description=msg.headers.get("Description"))
            reply = json.loads(msg.data)
            if "error" in reply:
                nats.js.errors.APIError.from_error(reply["error"])  # raises it
        except Exception as exc:
            job.set(index, self.failure(exc, stream))
        else:
            job.set(index, None)

    def lose(self, exc: TransportUnreachable) -> None:
        """The connection went: every publish ack it still owed fails, retryable."""
        if self.lost is None:
            self.lost = str(exc)
        waiting, self.waiting = self.waiting, {}
        for job, index, _, _ in waiting.values():
            job.set(index, exc)

    def watch(self) -> None:
        """Expire unacknowledged messages at their deadline: one timer for the link, at the
        oldest one's (every message waits the same ``send_timeout``), not one per send."""
        if self.timer is None and self.waiting:
            deadline = next(iter(self.waiting.values()))[3]
            self.timer = asyncio.get_running_loop().call_at(deadline, self._sweep)

    def _sweep(self) -> None:
        self.timer = None
        now = asyncio.get_running_loop().time()
        while self.waiting:
            token, (job, index, _, deadline) = next(iter(self.waiting.items()))
            if deadline > now:
                break
            del self.waiting[token]
            job.set(index, TransportUnreachable(
                f"{self.where}: no publish ack within {deadline - job.sent:g} s"))
        self.watch()


class _NatsReceiver(Receiver):
    """The consumers of one listener's bindings, pulled through one inbox on a connection of
    its own. ``_ready``, ``_credit``, ``_held``, ``_room`` and the flags are shared with the
    loop thread under ``_cond``.

    Pulling is paced so that a steady stream arrives in bursts: each consumer has at most one
    pull request open. An idle consumer waits on a long poll for one message; once messages
    flow, it is polled (``no_wait``) for all the core may take, at most every ``_PACE``
    seconds, or again at once when a poll came back full (a backlog). One wake-up of the loop
    and of the poll thread then serves a burst instead of each message, which is most of what
    a message costs in Python threads; a message waits at most ``_PACE`` more under load.
    """

    def __init__(self, driver: NatsDriver, consumers: list[tuple[str, str, str, DeliverPolicy]],
                 prefetch: int, routes: dict[str, tuple[str, str]],
                 purpose: str = "listener") -> None:
        self._driver, self._io = driver, driver.io()
        self._purpose = purpose
        self._routes = routes  # subject -> the (exchange, routing key) it was sent to
        self._consumers = [(stream, durable) for stream, durable, _, _ in consumers]
        self._specs = consumers  # (stream, durable, subject, deliver policy), by index
        self._js: Any = None
        self._index = {c: i for i, c in enumerate(self._consumers)}
        self._cond = threading.Condition()
        self._ready: deque[IncomingMessage] = deque()
        # reply subject of an open pull request -> [messages left, deadline, consumer index,
        # messages asked, whether it is a poll (no_wait)]
        self._credit: dict[str, list[Any]] = {}
        self._timers: list[asyncio.TimerHandle | None] = [None] * len(self._consumers)
        self._room = prefetch  # what the core may still take, as of its last receive()
        self._held: dict[int, Any] = {}  # id(token) -> nats Msg handed to the core, unsettled
        self._woken = self._closed = False
        self._lost: str | None = None
        self._seq = 0
        self._ack_wait = driver.conf["ack_wait"]
        self._progress: asyncio.TimerHandle | None = None
        self._olock = threading.Lock()
        self._outbox: list[tuple[str, bytes, str]] = []
        self._posting = False
        self._drainer: Any = None
        self._nc: Any = None
        self._inbox = ""
        self._sub: Any = None
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
        self._nc = await self._driver.connect(self._on_lost, self._purpose)
        self._driver.check_server(self._nc)
        js = self._nc.jetstream(timeout=self._driver.conf["connect_timeout"])
        self._js = js
        for stream, durable, subject, policy in consumers:
            try:
                await self._driver.ensure(js, stream, durable, subject, policy)
            except (*_LOST, nats.js.errors.ServiceUnavailableError) as exc:
                # No answer (a cluster electing a leader, a server too busy): the core
                # listens again under its backoff.
                text = mask_password(str(exc)) or type(exc).__name__
                raise TransportUnreachable(
                    f"nats at {self._driver.url.masked()}: JetStream did not confirm the "
                    f"consumer {durable} of {stream}: {text}") from None
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=self._on_msg)
        await self._nc.flush()
        self._progress = self._io.loop.call_later(self._ack_wait / 3, self._keep_held)

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
                credit = self._credit.pop(msg.subject, None)
                desc = headers.get("Description", "")
                if "push" in desc:  # someone made it a push consumer: listen again
                    self._lost = f"its JetStream consumer cannot be pulled ({status} {desc})"
                    self._cond.notify_all()
                elif credit is not None and (status == "503" or "Deleted" in desc):
                    # No consumer answered (a replicated one electing a leader) or it was
                    # deleted: pull again shortly, and make it again meanwhile if it is gone.
                    self._recheck(credit[2])
                    self._pace(credit[2], 0.2)
                elif credit is not None:
                    if status not in ("404", "408"):  # e.g. 409 Exceeded MaxWaiting: later
                        self._pace(credit[2], 0.1)
                    elif credit[4] and credit[0] < credit[3]:  # a poll that found some
                        self._pace(credit[2])
                    else:  # nothing there (or a long poll ran out): wait for the next one
                        self._pull(credit[2], poll=False)
                return
            incoming, consumer = _unwrap(msg)
            incoming.exchange, incoming.routing_key = self._routes.get(msg.subject, (None, None))
            index = self._index.get(consumer) if consumer is not None else None
            for reply, credit in self._credit.items():  # its consumer's open request
                if credit[2] == index:
                    credit[0] -= 1
                    if credit[0] <= 0:  # the request is done: no end of request will come
                        del self._credit[reply]
                        if credit[4]:  # a full poll: a backlog waits, poll again now
                            self._pull(credit[2], poll=True)
                        else:  # the first message after a quiet spell: poll for the rest soon
                            self._pace(credit[2])
                    break
            if self._closed:  # arrived while closing: handed back by _shutdown()
                self._late.append(msg.reply)
                return
            self._ready.append(incoming)
            if len(self._ready) == 1:
                self._cond.notify_all()
        with self._olock:
            if self._posting:
                return
            self._posting = True
        # Its settlement, and those of the deliveries that follow within _SETTLE_BATCH, go
        # out in one drain: settle() then needs no wake-up of this loop per message.
        self._io.loop.call_later(_SETTLE_BATCH, self._start_drain)

    def _recheck(self, index: int) -> None:
        """Make consumer ``index`` again if it is gone, in the background (any thread)."""
        if self._js is None or self._closed:
            return
        if threading.get_ident() == self._io.thread.ident:
            self._driver.recheck(self._js, *self._specs[index])
        else:
            self._io.loop.call_soon_threadsafe(self._driver.recheck, self._js,
                                               *self._specs[index])

    def _pace(self, index: int, delay: float = _PACE) -> None:
        """Poll consumer ``index`` in ``delay`` seconds. Loop thread, ``_cond`` held."""
        if self._timers[index] is None and not self._closed:
            self._timers[index] = self._io.loop.call_later(delay, self._paced, index)

    def _paced(self, index: int) -> None:
        with self._cond:
            self._timers[index] = None
            self._pull(index, poll=True)

    def _pull(self, index: int, poll: bool) -> None:
        """One pull request to consumer ``index`` for what the core may still take (the room
        of its last ``receive()`` minus what is buffered), unless it has one open or a poll
        scheduled. ``poll``: answered at once, with what is there; else a long poll for one
        message. A consumer with no room is left alone until ``receive()`` finds room again:
        on *k* routing keys, up to *k* times the room may be buffered here (never handed over
        beyond it). ``_cond`` held, any thread."""
        if self._closed or self._nc is None or self._timers[index] is not None:
            return
        now = time.monotonic()
        for reply, credit in list(self._credit.items()):
            if credit[2] == index:
                if credit[1] >= now:
                    return
                # Its end never came: a consumer that does not exist (deleted) answers
                # nothing, nor does one whose leader died with the request.
                del self._credit[reply]
                self._recheck(index)
        room = self._room - len(self._ready)
        if room <= 0:
            return
        stream, durable = self._consumers[index]
        self._seq += 1
        reply = f"{self._inbox}.{self._seq}"
        if poll:
            request: dict[str, Any] = {"batch": room, "no_wait": True}
            self._credit[reply] = [room, now + 2.0, index, room, True]
        else:
            request = {"batch": 1, "expires": int(_LONG_POLL * 1e9)}
            self._credit[reply] = [1, now + _LONG_POLL + 2.0, index, 1, False]
        self._post([(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
                     json.dumps(request).encode(), reply)], urgent=True)

    def _post(self, items: list[tuple[str, bytes, str]], urgent: bool = False) -> None:
        """Queue (subject, payload, reply) publishes for the loop: one wake-up per burst.

        Settlements ride on a drain already due (at most ``_SETTLE_BATCH`` away); an
        ``urgent`` one (a pull request: deliveries wait for it) wakes the loop now."""
        with self._olock:
            self._outbox.extend(items)
            if self._posting and not urgent:
                return
            self._posting = True
        if threading.get_ident() == self._io.thread.ident:
            self._io.loop.call_soon(self._start_drain)
        else:
            self._io.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        items: list[tuple[str, bytes, str]] = []
        try:
            while True:
                with self._olock:
                    items, self._outbox = self._outbox, []
                    nc = self._nc
                    if not items or nc is None:
                        self._posting = False
                        return
                for subject, payload, reply in items:
                    await nc.publish(subject, payload, reply=reply)
        except Exception as exc:  # the connection went: receive() or settle() says so
            LOG.debug("nats: publishing from a receiver: %s", exc)
            with self._olock:
                self._outbox.clear()
                self._posting = False
        finally:
            with self._cond:  # an interrupt() while this drain was due left its wake-up here
                if self._woken:
                    self._cond.notify_all()

    def receive(self, max_messages: int, timeout: float) -> Sequence[IncomingMessage]:
        deadline = time.monotonic() + timeout
        if self._requeued:
            self._post([(r, b"-NAK", "") for r in self._requeued])
            self._requeued = []
        with self._cond:
            self._room = max_messages
            while True:
                if self._lost is not None:
                    raise TransportUnreachable(f"nats at {self._driver.url.masked()}: "
                                               f"{self._lost}")
                if self._ready or self._woken or self._closed:
                    break
                for index in range(len(self._consumers)):  # idle ones (no room before)
                    self._pull(index, poll=True)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._woken = False
            out = [self._ready.popleft() for _ in range(min(max_messages, len(self._ready)))]
            self._room = max_messages - len(out)
            for msg in out:
                self._held[id(msg.token)] = msg.token
        return out

    def _keep_held(self) -> None:
        """Work in progress, every ``ack_wait / 3``, for every message this receiver has and
        nobody settled: JetStream would hand it to another member once ``ack_wait`` passed.
        On the loop, so it goes on while the poll thread waits for room."""
        with self._cond:
            if self._closed:
                return
            replies = [m.reply for m in self._held.values()]
            replies += [m.token.reply for m in self._ready]
            self._progress = self._io.loop.call_later(self._ack_wait / 3, self._keep_held)
        if replies:
            self._post([(r, b"+WPI", "") for r in replies], urgent=True)

    def interrupt(self) -> None:
        """Wake the poll thread, or leave it to the drain that is due within _SETTLE_BATCH
        (it wakes the poll thread when it ends): the settlements of a burst then cost one
        wake-up, not one each."""
        with self._cond:
            self._woken = True
            with self._olock:
                due = self._posting
            if not due:
                self._cond.notify_all()

    def settle(self, outcomes: Sequence[Outcome]) -> None:
        if self._lost is not None or self._nc is None or self._nc.is_closed:
            raise TransportUnreachable(f"nats at {self._driver.url.masked()}: "
                                       f"{self._lost or 'the connection is closed'}")
        items = []
        with self._cond:
            for msg, how in outcomes:
                self._held.pop(id(msg.token), None)
                verb = _SETTLE_VERB.get(how)
                if verb is None:  # requeue: at the next receive(), or by close() once gone
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
            timers = [*self._timers, self._progress]
        for timer in timers:
            if timer is not None:
                self._io.loop.call_soon_threadsafe(timer.cancel)
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
            deadline = time.monotonic() + _LONG_POLL + 1
            while self._credit and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await nc.close()
        except Exception as exc:
            LOG.debug("nats: closing a receiver's connection: %s", exc)
        return leftovers + self._late


async def _twice(call: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    """A JetStream API call, asked again once if it went unanswered: a replicated stream or
    consumer that was just made (or lost its leader) may not answer a first request on
    nats-server 2.9 although it answers the next one."""
    try:
        return await call(*args)
    except nats.errors.TimeoutError:
        LOG.debug("nats: %s%s went unanswered; asking again", getattr(call, "__name__", call),
                  args[:1])
        return await call(*args)


def _unwrap(msg: Any) -> tuple[IncomingMessage, tuple[str, str] | None]:
    """One JetStream delivery as an IncomingMessage (one it cannot read carries ``problem``),
    and the (stream, consumer) it came from."""
    raw = msg.headers or {}
    headers = {k: v for k, v in raw.items() if k not in _OWN_HEADERS}
    problem, consumer = None, None
    try:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
        # or, with a domain and account hash, $JS.ACK.<domain>.<hash>.<stream>... (11+ tokens)
        tokens = msg.reply.split(".")
        at = 2 if len(tokens) == 9 else 4 if len(tokens) >= 11 else -1
        if at < 0 or tokens[0] != "$JS" or tokens[1] != "ACK":
            raise ValueError(f"{msg.reply!r} is not a JetStream ack subject")
        count = int(tokens[at + 2])
        consumer = (tokens[at], tokens[at + 1])
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
        "retention": Option(str, "interest", "when a message leaves its stream: interest "
                            "(once every consumer of its subject acknowledged it) or limits "
                            "(after max_age; consumers keep their own place)",
                            choices=("interest", "limits")),
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
        # nats-py reads credentials in a server URL without percent-decoding them, so a password
        # with ':', '/', '#' or '%' would be sent encoded. One user:password pair for every host
        # (the usual case) goes to nats-py as plain arguments instead, the server URLs bare.
        logins = {(h.username, h.password) for h in url.hosts}
        login = logins.pop() if len(logins) == 1 else None
        self._login = login if login is not None and None not in login else None
        self.servers = [self._server(h) for h in url.hosts] or ["nats://127.0.0.1:4222"]
        if self.conf["storage"] == "memory":
            self.capabilities = Capabilities(**{**type(self).capabilities.as_dict(),
                                                "durable": False})
        self._io: _Loop | None = None  # the receivers'
        self._send_io: _DrivenLoop | None = None
        self._io_lock = threading.Lock()
        self._users = 0
        self._cleaned = False
        self._link: _Link | None = None  # the sending connection (send loop only)
        self._connecting: asyncio.Lock | None = None
        self._ensured: set[tuple[str, str]] = set()
        # (exchange, routing key) -> (subject, stream, no-pool consumer), computed once
        self._targets: dict[tuple[str, str], tuple[str, str, str]] = {}
        self._publishing: set[asyncio.Future[None]] = set()
        self._warned = False
        self._checking: set[tuple[str, str]] = set()  # (stream, durable) being checked again

    def _server(self, host: Any) -> str:
        if host.hostname is None and host.port is None:
            raise InvalidTransportURL(f"nats needs a host in {self.url.masked()}")
        name = host.hostname or "127.0.0.1"
        name = f"[{name}]" if ":" in name else name
        creds = ""
        if host.username is not None and self._login is None:
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

    async def connect(self, on_lost: Callable[..., Any] | None = None,
                      purpose: str = "publisher") -> Any:
        """A connection to the first server of the URL's list (nats-py shuffles it) that
        answers. nats-py's own reconnect is off: a lost connection fails what it carried, and
        the core's retry and reconnect policies make a new one, to any server of the list.
        Each server is tried twice, 0.1 s apart, so that servers that refuse fail the connect
        at once (nats-py would go round the list for ever). Its name (``tidings <purpose>
        pid=<pid>``) is what the server's monitoring shows."""
        conf = self.conf
        kwargs: dict[str, Any] = {
            "servers": self.servers, "allow_reconnect": False, "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.1,
            "connect_timeout": conf["connect_timeout"], "ping_interval": 20,
            "max_outstanding_pings": 3, "name": f"tidings {purpose} pid={os.getpid()}",
            "token": conf["token"],
            "nkeys_seed_str": conf["nkey_seed"], "user_credentials": conf["creds_file"],
        }
        if self._login is not None:
            kwargs["user"], kwargs["password"] = self._login
        if self.tls:
            kwargs["tls"] = _ssl_context(conf)
            kwargs["tls_hostname"] = conf["tls_hostname"]

        last: list[str] = []  # why the last server failed: "no servers available" says less

        async def quiet(exc: Exception) -> None:
            text = mask_password(str(exc)) or type(exc).__name__
            LOG.debug("nats: %s", text)
            last[:] = [text]

        kwargs["error_cb"] = quiet
        if on_lost is not None:
            kwargs["disconnected_cb"] = kwargs["closed_cb"] = on_lost
        try:
            return await nats.connect(**kwargs)
        except Exception as exc:
            text = mask_password(str(exc)) or type(exc).__name__
            if isinstance(exc, nats.errors.NoServersError) and last:
                text = last[0]
            raise TransportUnreachable(
                f"nats could not connect to {self.url.masked()}: {text}; check that "
                f"nats-server is running with JetStream (-js) and the credentials") from None

    def check_server(self, nc: Any) -> None:
        """Warn once about a replicated interest stream on a server older than 2.11, where
        each replica removes acknowledged messages on its own (nats-io/nats-server#6140 made
        that one decision in 2.11): on nats-server 2.9.10, with more than one consumer (the
        group and a pool), the slower consumer was seen to miss messages the other had
        acknowledged, with or without faults (docs/nats.md, "A JetStream cluster")."""
        if self._warned or self.conf["replicas"] < 2 or self.conf["retention"] != "interest":
            return
        self._warned = True
        version = getattr(nc, "connected_server_version", None)
        major, minor = getattr(version, "major", 0), getattr(version, "minor", 0)
        if (major, minor) < (2, 11):
            LOG.warning("nats at %s: replicas=%d with retention=interest on nats-server %s: "
                        "servers before 2.11 can drop a message from a replicated stream "
                        "before every consumer (group and pools) acknowledged it; use "
                        "retention=limits with max_age, or nats-server 2.11 or later",
                        self.url.masked(), self.conf["replicas"],
                        f"{major}.{minor}" if major else "(unknown version)")

    async def _sender(self) -> _Link:
        """The sending connection, made (again) when there is none or it was lost."""
        link = self._link
        if link is not None and link.lost is None and not link.nc.is_closed:
            return link
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            link = self._link
            if link is None or link.lost is not None or link.nc.is_closed:
                link = _Link(self._failure, lambda link, route: self.recheck(
                    link.js, route[1], route[2], route[0], DeliverPolicy.ALL),
                    f"nats at {self.url.masked()}")
                lost_link = link

                async def lost(*_: Any) -> None:
                    lost_link.lose(TransportUnreachable(
                        f"nats at {self.url.masked()}: the connection to NATS was lost"))

                nc = await self.connect(lost)
                self.check_server(nc)
                link.open(nc, nc.jetstream(timeout=self.conf["connect_timeout"]))
                try:
                    await nc.subscribe(link.prefix + "*", cb=link.on_ack)
                except Exception:
                    await nc.close()
                    raise
                self._link = link
        return link

    def recheck(self, js: Any, stream: str, durable: str, subject: str,
                policy: DeliverPolicy) -> None:
        """Nothing answered on a stream or consumer made before: a replicated one electing a
        leader (it answers nothing for seconds, its API calls neither), or one deleted under
        us. Make it again if it is gone, in the background on the running loop, so that
        sends and pulls go on retrying meanwhile instead of waiting on JetStream's API."""
        if (stream, durable) in self._checking:
            return
        self._checking.add((stream, durable))

        async def check() -> None:
            try:
                await self.ensure(js, stream, durable, subject, policy, again=True)
            except Exception as exc:
                LOG.debug("nats: checking %s/%s: %s", stream, durable, exc)
            finally:
                self._checking.discard((stream, durable))

        task = asyncio.ensure_future(check())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def ensure(self, js: Any, stream: str, durable: str, subject: str,
                     policy: DeliverPolicy, again: bool = False) -> None:
        """The stream and the durable consumer exist (created as configured, or kept as they
        are if someone made them otherwise). ``again``: ask JetStream even if they were made
        before (they may have been deleted since)."""
        if again or (stream, "") not in self._ensured:
            config = StreamConfig(
                name=stream, subjects=[subject.rsplit(".", subject.count(".") - 2)[0] + ".>"],
                retention=RetentionPolicy(self.conf["retention"]),
                num_replicas=self.conf["replicas"],
                storage=StorageType(self.conf["storage"]), max_age=self.conf["max_age"] or None)
            try:
                await _twice(js.add_stream, config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_IN_USE:
                    raise
            self._ensured.add((stream, ""))
        if not again and (stream, durable) in self._ensured:
            return
        consumer = ConsumerConfig(
            durable_name=durable, deliver_policy=policy, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.conf["ack_wait"], filter_subject=subject, max_ack_pending=-1,
            max_deliver=-1)
        try:
            await _twice(js.consumer_info, stream, durable)  # there already: used as it is
        except nats.js.errors.NotFoundError:
            try:
                await _twice(js.add_consumer, stream, consumer)
            except nats.js.errors.APIError:
                await _twice(js.consumer_info, stream, durable)  # made meanwhile elsewhere
        self._ensured.add((stream, durable))

    # -- sending --------------------------------------------------------------------------
    def send_batch(self, messages: Sequence[OutgoingMessage],
                   timeout: float | None) -> list[BaseException | None]:
        """Publish the batch and wait for its publish acks, running the send loop in this
        thread meanwhile (``_DrivenLoop``): a batch costs one round trip to the server and no
        hand-over to another thread."""
        if not messages:
            return []
        timeout = timeout or 30.0
        dedupe = self.conf["dedupe"]
        items = []
        for m in messages:
            route = self._targets.get((m.exchange, m.routing_key))
            if route is None:
                if len(self._targets) > 4096:
                    self._targets.clear()
                route = self._targets[(m.exchange, m.routing_key)] = (
                    self.subject(m.exchange, m.routing_key), self.stream_name(m.exchange),
                    f"g_{_token(m.routing_key)}")
            headers = {**m.headers, ID_HEADER: m.message_id, "Content-Type": m.content_type}
            if dedupe:
                headers["Nats-Msg-Id"] = f"{m.routing_key}/{m.message_id}"
            items.append((route, m, headers))
        job = _Job(len(messages))
        link = self._link
        ready = link is not None and link.lost is None and all(
            (route[1], route[2]) in self._ensured for route, _, _ in items)
        io = self.io_for_send()
        # The loop fails what is unacknowledged ``timeout`` after publishing; this bound only
        # guards against a loop that cannot run.
        bound = timeout + (1.0 if ready else self.conf["connect_timeout"] + 1.0)
        if io.wait(lambda: self._start(job, items, timeout), job, bound):
            return job.results  # type: ignore[return-value]
        late = TransportUnreachable(f"nats at {self.url.masked()}: no publish ack within "
                                    f"{timeout} s")
        results = [late if r is _PENDING else r for r in job.results]
        io.loop.call_soon_threadsafe(self._forget, job)
        return results  # type: ignore[return-value]

    def _start(self, job: _Job, items: list[Any], timeout: float) -> None:
        task = job.task = asyncio.ensure_future(self._publish(job, items, timeout))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, job: _Job, items: list[tuple[tuple[str, str, str],
                                                          OutgoingMessage, dict[str, str]]],
                       timeout: float) -> None:
        """Publish every message of ``job`` with a reply subject of the link's; the acks
        resolve them (``_Link.on_ack``), and what has no ack ``timeout`` seconds later fails
        as unreachable (a stream electing a leader drops publishes unanswered). Runs on the
        send loop."""
        try:
            link = await self._sender()
        except Exception as exc:
            failed = exc if isinstance(exc, TransportUnreachable) else self._failure(exc, "")
            for i in range(len(items)):
                job.set(i, failed)
            return
        limit = link.max_payload
        job.sent = asyncio.get_running_loop().time()
        deadline = job.sent + timeout
        for i, ((subject, stream, durable), m, headers) in enumerate(items):
            size = len(m.body) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 14
            if size > limit:
                job.set(i, MessageTooLarge(
                    f"message {m.message_id} is {size} bytes with its headers, over the NATS "
                    f"server's max_payload of {limit}; set the URL option max_message_size="
                    f"{max(limit - 4096, 0)} so tidings refuses it before sending, or raise "
                    f"max_payload in the server's configuration"))
                continue
            token = None
            try:
                if (stream, durable) not in self._ensured:
                    await self.ensure(link.js, stream, durable, subject, DeliverPolicy.ALL)
                if link.lost is not None:  # its acks could never come
                    raise nats.errors.ConnectionClosedError
                token = link.expect(job, i, (subject, stream, durable), deadline)
                await link.nc.publish(subject, m.body, reply=link.prefix + token,
                                      headers=headers)
            except Exception as exc:
                if token is not None:
                    link.waiting.pop(token, None)
                job.set(i, self._failure(exc, stream))
        link.watch()

    def _forget(self, job: _Job) -> None:
        """A caller stopped waiting for ``job``: what it has not published yet (it may still be
        connecting) is not published, and its acks no longer matter."""
        if job.task is not None:
            job.task.cancel()
        link = self._link
        if link is not None:
            for token in job.tokens:
                link.waiting.pop(token, None)

    def io_for_send(self) -> _DrivenLoop:
        """Sending has a loop of its own, run by the senders (see ``_DrivenLoop``): a send
        never queues behind deliveries."""
        send_io = self._send_io
        if send_io is not None:
            return send_io
        with self._io_lock:
            if self._send_io is None:
                self._send_io = _DrivenLoop()
            return self._send_io

    def hand_back(self, replies: list[str]) -> None:
        """NAK deliveries of a closed receiver, through the sending connection."""
        async def nak() -> None:
            sender = (await self._sender()).nc
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
                link = self._link
                if link is not None:
                    io.run(link.nc.close(), 5)
                io.stop()

    def _failure(self, exc: BaseException, stream: str) -> BaseException:
        """A retry may cure a lost connection, a timeout, and a stream or consumer deleted
        under us (``recheck`` makes those again)."""
        text = mask_password(str(exc)) or type(exc).__name__
        if isinstance(exc, (*_LOST, nats.js.errors.NoStreamResponseError,
                            nats.js.errors.ServiceUnavailableError, TransportUnreachable)):
            return TransportUnreachable(f"nats at {self.url.masked()}: {text}")
        return MessageDeliveryFailure(f"nats at {self.url.masked()} refused the message: {text}")

    # -- listening ------------------------------------------------------------------------
    def listen(self, bindings: Sequence[Binding], pool: str | None, prefetch: int) -> Receiver:
        consumers: dict[tuple[str, str], tuple[str, str, str, DeliverPolicy]] = {}
        routes = {self.subject(b.exchange, b.routing_key): (b.exchange, b.routing_key)
                  for b in bindings}
        for b in bindings:
            stream = self.stream_name(b.exchange)
            key = _token(b.routing_key)
            durable, policy = ((f"g_{key}", DeliverPolicy.ALL) if pool is None
                               else (f"p_{_token(pool)}_{key}", DeliverPolicy.NEW))
            consumers[(stream, durable)] = (stream, durable, self.subject(b.exchange,
                                                                          b.routing_key), policy)
        purpose = "listener group" if pool is None else f"listener pool '{pool}'"
        return _NatsReceiver(self, list(consumers.values()), prefetch, routes, purpose)

    def cleanup(self) -> None:
        """Close the sending connection; the receivers' loop stops once every receiver is
        closed."""
        with self._io_lock:
            self._cleaned = True
            io, users, send_io = self._io, self._users, self._send_io
        if send_io is not None:
            if self._link is not None:
                try:
                    send_io.run(self._link.nc.close(), 5)
                except Exception as exc:
                    LOG.debug("nats: closing the sending connection: %s", exc)
            send_io.stop()
            with self._io_lock:  # a receiver closing later hands back on a loop of its own
                if self._send_io is send_io:
                    self._send_io = None
        if io is not None and users == 0:
            io.stop()
