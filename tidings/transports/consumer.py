"""The one consumer behind every listener: notification listeners and join_consumer_pool.

Everything about receiving that is the same on every broker happens here, once:

* **prefetch**: the consumer never asks the driver for more than ``prefetch`` minus what it
  holds, so a listener's memory and its unacknowledged messages stay bounded;
* **the held set**: every message received and not yet settled, in arrival order;
* **once-only settlement**: ``IncomingMessage.ack()`` and friends (from any thread) put the
  message on a settlement queue; the poll thread hands what is queued to the driver's
  ``settle()`` as one batch;
* **dispatch**: handlers run inline (``blocking``) or on a bounded worker pool (``threading``);
* **isolation**: a delivery the driver could not unwrap is rejected alone, a handler that
  raises rejects only the messages it was given;
* **redelivery**: a requeued message goes back after a delay that doubles with each of its
  deliveries (it keeps its prefetch slot meanwhile, so it cannot come straight back in a hot
  loop), and once it has been delivered ``max_deliveries`` times it is rejected instead
  (dead-lettered where the driver and broker can), logged at ERROR with its id and counted;
* **reconnecting**: when ``receive()`` or ``settle()`` raises, what the lost connection
  delivered is forgotten (the broker delivers it again), and ``listen()`` is called again under
  one exponential backoff (the URL's ``reconnect_interval`` and ``reconnect_max_interval``);
* **closing**: queued work is dropped, running handlers finish, and every message still
  unsettled goes back to the driver as ``REQUEUE`` before ``close()``: nothing is lost.

Every driver call for one listener comes from this consumer's poll thread, except
``Receiver.interrupt()``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from tidings.transports.base import ACK, REJECT, REQUEUE, IncomingMessage, Outcome, Receiver
from tidings.transports.errors import (
    ListenerLifecycleError,
    TransportClosed,
    TransportUnreachable,
)
from tidings.transports.retry import Backoff
from tidings.transports.stats import ConsumerStats
from tidings.transports.workers import Inline, WorkerPool

__all__ = ["Consumer", "Handler"]

LOG = logging.getLogger(__name__)

Handler = Callable[[list[IncomingMessage]], None]
"""Takes messages and settles each one (ack, requeue or reject)."""

#: How many requeued message ids a consumer remembers to count their deliveries (the oldest are
#: forgotten first; a message whose count was forgotten starts again from its broker's flag).
_REMEMBERED = 10_000

# What the poll thread is doing, for a settlement made elsewhere: whether to wake it, and how.
_BUSY, _WAITING, _RECEIVING = 0, 1, 2


class Consumer:
    """Receives from a driver in a thread and hands messages to ``handle``.

    Without batching, ``handle`` gets a poll's worth of messages when it runs inline, one message
    per call on a worker pool (each settled right after its own handler). With ``batch_size``
    or ``batch_timeout`` it gets lists of at most ``batch_size``, a partial one after
    ``batch_timeout`` seconds.
    """

    poll_interval = 0.2
    """Longest a receive() waits, so stop() is noticed within about this long."""
    settle_interval = 0.05
    """Longest a settlement waits while the poll thread is in a receive() it cannot interrupt."""

    def __init__(self, open_receiver: Callable[[], Receiver], handle: Handler, *, name: str,
                 prefetch: int, workers: int = 0, batch_size: int | None = None,
                 batch_timeout: float | None = None, stats: ConsumerStats | None = None,
                 backoff: tuple[float, float] = (0.2, 5.0), max_deliveries: int | None = 5,
                 requeue_delay: tuple[float, float] = (0.1, 1.0),
                 retryable: Callable[[BaseException], bool] | None = None) -> None:
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None")
        if batch_timeout is not None and batch_timeout <= 0:
            raise ValueError(f"batch_timeout={batch_timeout!r} must be positive seconds or None")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch={prefetch!r} must be a positive integer")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers={workers!r} must be 0 (inline) or a positive integer")
        if max_deliveries is not None and (isinstance(max_deliveries, bool)
                                           or not isinstance(max_deliveries, int)
                                           or max_deliveries < 1):
            raise ValueError(f"max_deliveries={max_deliveries!r} must be a positive number of "
                             f"deliveries, or None for no limit")
        if not 0 <= requeue_delay[0] <= requeue_delay[1]:
            raise ValueError(f"requeue_delay={requeue_delay!r} must be (first, longest) seconds, "
                             f"0 <= first <= longest")
        self._open = open_receiver
        self._retryable = retryable or (lambda exc: isinstance(exc, TransportUnreachable))
        self._handle = handle
        self._name = name
        self._prefetch = prefetch
        self._workers = workers
        self._batch_size = batch_size
        self._batch_timeout = batch_timeout
        self._batching = batch_size is not None or batch_timeout is not None
        self._backoff = backoff
        self._slice = max(1, prefetch // 4)
        self._max_deliveries = max_deliveries
        self._requeue_delay = requeue_delay
        # message key -> the delivery number of its last requeued delivery
        self._deliveries: OrderedDict[object, int] = OrderedDict()
        # (due, n, message): requeues waiting out their delay, still held
        self._delayed: list[tuple[float, int, IncomingMessage]] = []
        self._order = itertools.count()
        self.stats = stats or ConsumerStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Per run of the poll thread (reset by start()):
        self._held: dict[IncomingMessage, None] = {}
        self._settlements: deque[IncomingMessage] = deque()
        self._wake = threading.Event()
        self._state = _BUSY
        self._receiver: Receiver | None = None
        self._interruptible = False
        self._executor: Inline | WorkerPool = Inline()
        self._sink: Callable[[IncomingMessage], None] = self._enqueue

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stop.is_set()

    @property
    def held(self) -> int:
        """How many messages the consumer holds now (received, not yet settled)."""
        return len(self._held)

    def start(self) -> bool:
        """Open the driver receiver and start polling. A second start() is a no-op (False).

        Opening happens here, in the caller, so an unreachable broker or a refused declaration
        fails loudly at start() instead of in a background thread."""
        with self._lock:
            if self.running:
                LOG.debug("%s: start() while running is ignored", self._name)
                return False
            previous = self._thread
        if previous is not None:  # restart after stop(): let the old loop finish first
            previous.join()
        with self._lock:
            if self.running:
                return False
            receiver = self._open()
            self._stop.clear()
            self._held = {}
            self._settlements = deque()
            self._delayed = []
            self._state = _BUSY
            self._executor = (WorkerPool(self._workers, f"{self._name}-worker")
                              if self._workers else Inline())
            # Handlers on workers settle from other threads: wake the poll thread for them.
            # Inline handlers settle on the poll thread itself, so a plain append will do (a
            # settlement made elsewhere by the application waits at most settle_interval).
            self._sink = self._enqueue if self._workers else self._settlements.append
            self._thread = threading.Thread(target=self._run, args=(receiver,),
                                            name=self._name, daemon=True)
            self._thread.start()
            return True

    def stop(self) -> None:
        """Stop receiving; returns at once. Handlers already running finish (wait() waits for
        them); messages not yet handed to a handler go back to the broker."""
        self._stop.set()
        self._wake.set()
        receiver = self._receiver
        if receiver is not None and self._interruptible:
            try:
                receiver.interrupt()
            except Exception:
                LOG.debug("%s: interrupting the receiver failed", self._name, exc_info=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until stopped, handlers finished and unsettled messages returned.

        True once stopped; False if ``timeout`` passed first (for instance wait() before stop():
        the consumer keeps running until someone stops it)."""
        thread = self._thread
        if thread is None:
            return True
        current = threading.current_thread()
        if thread is current or self._executor.runs_in(current):
            raise ListenerLifecycleError("wait() called from an endpoint of the same listener "
                                         "would wait forever; call stop() only")
        thread.join(timeout)
        return not thread.is_alive()

    # -- settlements (any thread) -------------------------------------------------------
    def _enqueue(self, msg: IncomingMessage) -> None:
        """IncomingMessage's sink: queue its settlement and wake the poll thread if it waits."""
        self._settlements.append(msg)
        state = self._state
        if state == _WAITING:
            self._wake.set()
        elif state == _RECEIVING and self._interruptible:
            receiver = self._receiver
            if receiver is not None:
                receiver.interrupt()

    def _flush(self, receiver: Receiver) -> None:
        """Hand every queued settlement of a held message to the driver, as one batch."""
        queued = self._settlements
        held = self._held
        batch: list[Outcome] = []
        requeues = rejects = dropped = 0
        while queued:
            msg = queued.popleft()
            if held.pop(msg, 0) is not None:  # not ours any more: from a lost connection
                dropped += 1
                continue
            how = msg._settled or ACK
            if how is REQUEUE:  # the constants themselves: requeue() stores REQUEUE
                verdict = self._redeliver(msg)
                if verdict is None:  # waits out its delay, still held
                    held[msg] = None
                    continue
                how = verdict
            elif self._deliveries:
                self._deliveries.pop(_key(msg), None)
            batch.append((msg, how))
            if how is not ACK:
                if how is REQUEUE:
                    requeues += 1
                else:
                    rejects += 1
        if dropped:
            LOG.debug("%s: dropped %d settlement(s) of messages from a lost connection; the "
                      "broker delivers them again", self._name, dropped)
        if batch:
            receiver.settle(batch)
            self.stats.settled_many(len(batch) - requeues - rejects, requeues, rejects)

    def _redeliver(self, msg: IncomingMessage) -> str | None:
        """The redelivery policy for a requeued message: REJECT once it has had its
        deliveries, REQUEUE if it may go back now, None if it waits out a delay first."""
        key = _key(msg)
        known = self._deliveries.pop(key, None)
        number = msg.delivery_count or (known + 1 if known else (2 if msg.redelivered else 1))
        limit = self._max_deliveries
        if limit is not None and number >= limit:
            LOG.error("%s: message %s was delivered %d times and never handled (max_deliveries="
                      "%d): rejecting it (dead-lettered where the driver can)", self._name,
                      msg.message_id or "(no id)", number, limit)
            msg._settled = REJECT
            self.stats.gave_up(1)
            return REJECT
        self._deliveries[key] = number
        if len(self._deliveries) > _REMEMBERED:
            self._deliveries.popitem(last=False)
        first, longest = self._requeue_delay
        delay = min(longest, first * 2 ** (number - 1))
        if delay <= 0:
            return REQUEUE
        heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._order), msg))
        return None

    def _release_due(self, receiver: Receiver) -> float:
        """Requeue the delayed messages whose time has come; seconds until the next one."""
        delayed = self._delayed
        now = time.monotonic()
        due = []
        while delayed and delayed[0][0] <= now:
            msg = heapq.heappop(delayed)[2]
            if self._held.pop(msg, 0) is None:
                due.append((msg, REQUEUE))
        if due:
            receiver.settle(due)
            self.stats.settled_many(0, len(due), 0)
        return delayed[0][0] - now if delayed else self.poll_interval

    # -- the poll thread ----------------------------------------------------------------
    def _run(self, receiver: Receiver | None) -> None:
        assert receiver is not None
        self._receiver = receiver
        self._interruptible = type(receiver).interrupt is not Receiver.interrupt
        pending: list[IncomingMessage] = []  # batching: received, not yet a full batch
        first_at = 0.0
        stop = self._stop
        try:
            while not stop.is_set():
                try:
                    if self._settlements:
                        self._flush(receiver)
                    timeout = self.poll_interval
                    if self._delayed:
                        timeout = min(timeout, self._release_due(receiver))
                    if self._executor.nudge():  # work waits for a thread: look again soon
                        timeout = min(timeout, WorkerPool.grow_after)
                    room = self._prefetch - len(self._held)
                    if room <= 0:
                        self._wait_for_room(timeout)
                        continue
                    if pending and self._batch_timeout is not None:
                        timeout = max(0.0, min(timeout, first_at + self._batch_timeout
                                               - time.monotonic()))
                    if self._held and not (self._interruptible and self._workers):
                        timeout = min(timeout, self.settle_interval)
                    self._state = _RECEIVING
                    if self._settlements:  # one arrived before the state said where we are
                        timeout = 0.0
                    try:
                        got = receiver.receive(room, timeout)
                    finally:
                        self._state = _BUSY
                    accepted = self._accept(got, room) if got else []
                    if not self._batching:
                        if accepted:
                            self._dispatch(accepted, receiver)
                        continue
                except Exception as exc:
                    pending.clear()
                    again = self._reconnect(receiver, exc)
                    if again is None:
                        receiver = None
                        return
                    receiver = again
                    continue
                if accepted:
                    if not pending:
                        first_at = time.monotonic()
                    pending.extend(accepted)
                size = self._batch_size or len(pending) or 1
                while len(pending) >= size and not stop.is_set():
                    batch, pending = pending[:size], pending[size:]
                    first_at = time.monotonic()
                    self._executor.submit(self._call, batch)
                if (pending and self._batch_timeout is not None
                        and time.monotonic() - first_at >= self._batch_timeout):
                    batch, pending = pending, []
                    self._executor.submit(self._call, batch)
        finally:
            self._shutdown(receiver)

    def _accept(self, got: Sequence[IncomingMessage], room: int) -> list[IncomingMessage]:
        """Hold what the driver delivered; reject the deliveries it could not unwrap."""
        if len(got) > room:
            LOG.error("%s: the driver returned %d messages when asked for at most %d; holding "
                      "them all (a driver bug: prefetch is exceeded)", self._name, len(got),
                      room)
        held = self._held
        sink = self._sink
        bad = False
        for msg in got:
            msg._sink = sink
            held[msg] = None
            if msg.problem is not None:
                bad = True
        self.stats.received(len(got))
        if not bad:
            return got if isinstance(got, list) else list(got)
        for msg in got:
            if msg.problem is not None:
                LOG.error("%s: rejecting message %s: %s", self._name,
                          msg.message_id or "(no id)", msg.problem)
                msg.reject()
        return [m for m in got if m.problem is None]

    def _dispatch(self, messages: list[IncomingMessage], receiver: Receiver) -> None:
        """Hand messages to their handlers: one each on workers; inline, in slices of a
        quarter of the prefetch window, settling after each, so the broker refills the window
        while the rest are handled and a slow message does not hold back the acks of those
        before it."""
        executor = self._executor
        if executor.concurrent:
            call = self._call
            for msg in messages:
                executor.submit(call, [msg])
            return
        step = self._slice
        if len(messages) <= step:
            self._call(messages)
            return
        for i in range(0, len(messages), step):
            if self._stop.is_set():
                return  # the rest stay unsettled and go back to the broker
            self._call(messages[i:i + step])
            if self._settlements:
                self._flush(receiver)

    def _call(self, messages: list[IncomingMessage]) -> None:
        """Run the handler; if it breaks, reject (and log) what it left unsettled."""
        if self._stop.is_set() and self._executor.concurrent:
            return  # queued before stop(): stays unsettled and goes back to the broker
        try:
            self._handle(messages)
        except Exception:
            LOG.exception("%s: handler failed", self._name)
            for msg in messages:
                if msg.settled is None and msg.reject():
                    LOG.error("%s: rejected message %s after a handler failure", self._name,
                              msg.message_id)

    def _wait_for_room(self, timeout: float) -> None:
        """Every prefetch slot is taken: wait for a settlement, a delayed requeue or stop."""
        self._wake.clear()
        self._state = _WAITING
        if not self._settlements:
            self._wake.wait(timeout if self._executor.concurrent
                            else min(timeout, self.settle_interval))
        self._state = _BUSY

    def _reconnect(self, receiver: Receiver, exc: Exception) -> Receiver | None:
        """Forget the lost connection's messages, close it, listen again with backoff.

        Returns the new receiver, or None once the consumer is stopped."""
        lost = len(self._held)
        if isinstance(exc, TransportUnreachable):
            LOG.warning("%s: lost its connection (%s); reconnecting. The broker delivers the "
                        "%d message(s) held here again", self._name, exc, lost)
        else:
            LOG.error("%s: the driver failed (%r); reconnecting. The broker delivers the %d "
                      "message(s) held here again", self._name, exc, lost, exc_info=exc)
        self.stats.lost(lost)
        self._held = {}
        self._delayed = []
        self._receiver = None
        _close(receiver, self._name)
        backoff = Backoff(*self._backoff)
        failures = 0
        while not self._stop.wait(backoff.next()):
            try:
                receiver = self._open()
            except TransportClosed:
                LOG.warning("%s: the transport was cleaned up; not reconnecting. Stop the "
                            "listener before cleaning up its transport", self._name)
                return None
            except Exception as again:
                failures += 1
                if failures <= 3 or failures % 20 == 0:
                    # A refused login or a queue declared with other arguments will not cure
                    # itself: say it louder than a broker that is still restarting.
                    level = logging.WARNING if self._retryable(again) else logging.ERROR
                    LOG.log(level, "%s: cannot reconnect (attempt %d): %s; next attempt in "
                            "%.1fs", self._name, failures, again, backoff.peek())
                continue
            LOG.info("%s: reconnected after %d failed attempt(s)", self._name, failures)
            self._receiver = receiver
            self._interruptible = type(receiver).interrupt is not Receiver.interrupt
            return receiver
        return None

    def _shutdown(self, receiver: Receiver | None) -> None:
        """Let running handlers finish, settle what they settled, return the rest, close."""
        self._stop.set()
        try:
            if not self._executor.stop(timeout=None):
                LOG.error("%s: handlers still running at close", self._name)
            if receiver is not None:
                try:
                    if self._settlements:
                        self._flush(receiver)
                    # Unsettled, or requeued and waiting out a delay: back to the broker now.
                    waiting = {m for _, _, m in self._delayed}
                    returned = [(m, REQUEUE) for m in self._held
                                if m._claim(REQUEUE) or m in waiting]
                    if returned:
                        receiver.settle(returned)
                        self.stats.returned(len(returned))
                except Exception as exc:
                    LOG.warning("%s: settling at close failed (%s); the broker returns "
                                "unacknowledged messages when the connection closes",
                                self._name, exc)
                self._receiver = None  # no interrupt() from stop() once it is closing
                _close(receiver, self._name)
        finally:
            self._held = {}
            self._delayed = []
            self._settlements.clear()
            self._receiver = None


def _key(msg: IncomingMessage) -> object:
    """What identifies a message across its redeliveries: its id, else its body."""
    return msg.message_id or hash(msg.body)


def _close(receiver: Receiver, name: str) -> None:
    try:
        receiver.close()
    except Exception:
        LOG.exception("%s: closing the driver receiver failed", name)

