"""Notification listeners: consume targets, dispatch to endpoints, settle each message once.

Settlement policy (documented in the README):

* every endpoint returned HANDLED or None -> ack;
* an endpoint returned REQUEUE or raised -> requeue if ``allow_requeue=True``; otherwise the
  message is rejected (dead-lettered where the driver can) and logged with its id, never
  acknowledged as if it had been processed (oslo.messaging acks it and it is gone);
* the body cannot be decoded -> rejected and logged with its id; the listener keeps going.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from tidings.notify import tracing
from tidings.notify.dispatcher import (
    BatchNotificationDispatcher,
    NotificationDispatcher,
    NotificationResult,
)
from tidings.notify.executors import check_executor
from tidings.transports.base import Binding, IncomingMessage
from tidings.transports.consumer import PollLoop
from tidings.transports.envelope import Notification
from tidings.transports.errors import MalformedMessage
from tidings.transports.transport import Target, Transport

__all__ = ["NotificationListener", "get_batch_notification_listener",
           "get_notification_listener"]

LOG = logging.getLogger(__name__)


class NotificationListener:
    """A running consumer of notifications: ``start()``, ``stop()``, ``wait()``.

    ``start()`` opens the driver listener (so an unreachable broker fails there, in the caller)
    and polls in a thread; ``stop()`` asks it to stop after the current message; ``wait()``
    waits until it has stopped and returned unsettled messages. ``start()`` after ``stop()``
    starts again with a new driver listener.
    """

    def __init__(self, transport: Transport, targets: Sequence[Target],
                 dispatcher: NotificationDispatcher, *, allow_requeue: bool = False,
                 pool: str | None = None, batch_size: int | None = None,
                 batch_timeout: float | None = None, prefetch: int | None = None) -> None:
        self.transport = transport
        self.targets = list(targets)
        self.dispatcher = dispatcher
        self.allow_requeue = allow_requeue
        self.pool = pool
        self.bindings = [Binding(transport.resolve(t), f"{t.topic}.{p}")
                         for t in self.targets for p in dispatcher.supported_priorities]
        batch = isinstance(dispatcher, BatchNotificationDispatcher)
        handle = self._handle_batch if batch else self._handle
        if batch and batch_size is None and batch_timeout is None:
            batch_size = 1
        self._loop = PollLoop(lambda: transport.listen(self.bindings, pool, prefetch), handle,
                              name=f"tidings-listener-{pool or 'group'}",
                              batch_size=batch_size, batch_timeout=batch_timeout)
        self.stats = self._loop.stats

    def start(self) -> None:
        """Start consuming. Calling it again while running does nothing."""
        self._loop.start()

    def stop(self) -> None:
        """Stop after the message being handled; returns at once. Safe before start()."""
        self._loop.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until stopped and closed; False if ``timeout`` passed first."""
        return self._loop.wait(timeout)

    @property
    def running(self) -> bool:
        return self._loop.running

    # -- turning messages into outcomes --------------------------------------------------
    def _decode(self, msg: IncomingMessage) -> Notification | None:
        """The notification in ``msg`` with the serializer applied, or None once ``msg`` was
        rejected (logged with its id) because it is not one."""
        try:
            note = Notification.from_wire(self.transport.decode(msg))
        except MalformedMessage as exc:
            self._reject_malformed(msg, exc)
            return None
        return self._prepare(msg, note)

    def _reject_malformed(self, msg: IncomingMessage, exc: MalformedMessage) -> None:
        LOG.error("rejecting malformed message %s: %s", msg.message_id or "(no id)", exc)
        self._settle(msg, "reject")

    def _prepare(self, msg: IncomingMessage, note: Notification) -> Notification | None:
        try:
            return self.dispatcher.prepare(note)
        except Exception:
            LOG.exception("serializer failed on message %s; rejecting it",
                          msg.message_id or note.metadata.get("message_id"))
            self._settle(msg, "reject")
            return None

    def _settle(self, msg: IncomingMessage, how: str) -> None:
        done = getattr(msg, how)()
        if done:
            self.stats.settled(how)

    def _finish(self, msg: IncomingMessage, result: str, message_id: Any) -> None:
        if result == NotificationResult.HANDLED:
            self._settle(msg, "ack")
        elif self.allow_requeue:
            self._settle(msg, "requeue")
        else:
            reason = "asked for a requeue" if result == NotificationResult.REQUEUE else "failed"
            LOG.error("notification %s %s and allow_requeue is False: rejecting it "
                      "(dead-lettered where the driver can)", message_id, reason)
            self._settle(msg, "reject")

    def _handle(self, messages: list[IncomingMessage]) -> None:
        # One pass per poll's worth of messages: the tracing check and the statistics lock are
        # taken once for the lot, and the common outcome (handled -> ack) skips _finish().
        # _decode() is inlined: two calls fewer per message, and none into a serializer that
        # would change nothing.
        dispatch = self.dispatcher.dispatch
        decode = self.transport.decode
        from_wire = Notification.from_wire
        plain = self.dispatcher.plain
        clock = time.perf_counter
        traced = tracing.active()
        count = acked = 0
        total = longest = 0.0
        try:
            for msg in messages:
                try:
                    note = from_wire(decode(msg))
                except MalformedMessage as exc:
                    self._reject_malformed(msg, exc)
                    continue
                if not plain:
                    prepared = self._prepare(msg, note)
                    if prepared is None:
                        continue
                    note = prepared
                began = clock()
                if traced:
                    with tracing.process_span(note.ctxt, note.event_type,
                                              note.metadata.get("message_id") or msg.message_id):
                        result = dispatch(note)
                else:
                    result = dispatch(note)
                took = clock() - began
                count += 1
                total += took
                if took > longest:
                    longest = took
                if result == NotificationResult.HANDLED:
                    if msg.ack():
                        acked += 1
                else:
                    self._finish(msg, result, note.metadata.get("message_id") or msg.message_id)
        finally:
            self.stats.handled_batch(count, total, longest, acked)

    def _handle_batch(self, messages: list[IncomingMessage]) -> None:
        decoded = [(msg, note) for msg in messages if (note := self._decode(msg)) is not None]
        if not decoded:
            return
        assert isinstance(self.dispatcher, BatchNotificationDispatcher)
        began = time.perf_counter()
        outcome = self.dispatcher.dispatch_batch((id(m), n) for m, n in decoded)
        self.stats.handled(time.perf_counter() - began)
        for msg, note in decoded:
            self._finish(msg, outcome[id(msg)],
                         note.metadata.get("message_id") or msg.message_id)


def _build(transport: Transport, targets: Sequence[Target], dispatcher: NotificationDispatcher,
           executor: str, allow_requeue: bool, pool: str | None, **kw: Any) -> NotificationListener:
    check_executor(executor)
    if isinstance(targets, Target):
        targets = [targets]
    if not targets or not all(isinstance(t, Target) for t in targets):
        raise ValueError("targets must be a non-empty list of tidings.Target")
    if pool is not None and (not isinstance(pool, str) or not pool):
        raise ValueError(f"pool must be a non-empty string or None, not {pool!r}")
    # Checked now, when the listener is built, not at start() (oslo.messaging's way).
    transport.check_features(pool=pool, allow_requeue=allow_requeue)
    transport._ensure_open("listen")
    return NotificationListener(transport, targets, dispatcher, allow_requeue=allow_requeue,
                                pool=pool, **kw)


def get_notification_listener(transport: Transport, targets: Sequence[Target],
                              endpoints: Sequence[Any], executor: str = "threading",
                              serializer: Any = None, allow_requeue: bool = False,
                              pool: str | None = None, *,
                              prefetch: int | None = None) -> NotificationListener:
    """Build a listener that calls ``endpoints`` once per notification.

    Raises NotImplementedError here if ``pool`` or ``allow_requeue=True`` is asked of a driver
    that lacks it. ``prefetch`` overrides the transport's bound on unacknowledged messages.
    """
    return _build(transport, targets, NotificationDispatcher(endpoints, serializer), executor,
                  allow_requeue, pool, prefetch=prefetch)


def get_batch_notification_listener(transport: Transport, targets: Sequence[Target],
                                    endpoints: Sequence[Any], executor: str = "threading",
                                    serializer: Any = None, allow_requeue: bool = False,
                                    pool: str | None = None, batch_size: int | None = None,
                                    batch_timeout: float | None = None, *,
                                    prefetch: int | None = None) -> NotificationListener:
    """Build a listener that calls endpoints with lists of up to ``batch_size`` notifications,
    flushing a partial batch after ``batch_timeout`` seconds.

    The transport's prefetch is raised to ``batch_size`` when smaller, since a batch can only
    fill from messages the broker has handed over.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None")
    if prefetch is None and batch_size is not None:
        prefetch = max(batch_size, transport.options["prefetch"])
    return _build(transport, targets, BatchNotificationDispatcher(endpoints, serializer),
                  executor, allow_requeue, pool, batch_size=batch_size,
                  batch_timeout=batch_timeout, prefetch=prefetch)
