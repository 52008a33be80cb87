"""Notification listeners: consume targets, dispatch to endpoints, settle each message once.

Settlement policy (documented in the README):

* every endpoint returned HANDLED or None -> ack;
* an endpoint returned REQUEUE or raised -> requeue if ``allow_requeue=True``; otherwise the
  message is rejected (dead-lettered where the driver can) and logged with its id, never
  acknowledged as if it had been processed (oslo.messaging acks it and it is gone);
* no endpoint handles the message's priority -> rejected and logged (a requeue would only
  bring it straight back);
* the body cannot be decoded or its signature checked -> rejected and logged with its id; the
  listener keeps going, and no other message is touched.
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
from tidings.notify.executors import DEFAULT_POOL_SIZE, workers_for
from tidings.transports import conf as options
from tidings.transports.base import Binding, IncomingMessage
from tidings.transports.envelope import Notification
from tidings.transports.transport import Target, Transport, log_rejected

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
                 batch_timeout: float | None = None, prefetch: int | None = None,
                 workers: int = 0) -> None:
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
        self._loop = transport.consumer(self.bindings, pool, handle,
                                        name=f"tidings-listener-{pool or 'group'}",
                                        prefetch=prefetch, workers=workers,
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

    def reset(self) -> None:
        """oslo.messaging's hook for a SIGHUP'd daemon; there as here, it does nothing."""

    @property
    def running(self) -> bool:
        return self._loop.running

    # -- turning messages into outcomes --------------------------------------------------
    def _decode(self, msg: IncomingMessage) -> Notification | None:
        """The notification in ``msg`` with the serializer applied, or None once ``msg`` was
        rejected (logged with its id) because it is not one. Any error counts: a body that
        breaks the decoder or the serializer in an unforeseen way is this message's problem
        alone."""
        try:
            note = Notification.from_wire(self.transport.decode(msg, self.bindings))
        except Exception as exc:
            log_rejected(msg, exc)
            msg.reject()
            return None
        if self.dispatcher.plain:
            return note
        try:
            return self.dispatcher.prepare(note)
        except Exception:
            LOG.exception("serializer failed on message %s; rejecting it",
                          msg.message_id or note.metadata.get("message_id"))
            msg.reject()
            return None

    def _finish(self, msg: IncomingMessage, result: str, message_id: Any) -> None:
        if result == NotificationResult.HANDLED:
            msg.ack()
        elif result == NotificationResult.UNHANDLED:
            LOG.error("notification %s has a priority no endpoint handles: rejecting it "
                      "(dead-lettered where the driver can)", message_id)
            msg.reject()
        elif self.allow_requeue:
            msg.requeue()
        else:
            reason = "asked for a requeue" if result == NotificationResult.REQUEUE else "failed"
            LOG.error("notification %s %s and allow_requeue is False: rejecting it "
                      "(dead-lettered where the driver can)", message_id, reason)
            msg.reject()

    def _handle(self, messages: list[IncomingMessage]) -> None:
        # One pass over what the consumer hands over (a poll's worth inline, one message on a
        # worker): the tracing check and the statistics lock are taken once for the lot, and
        # the common outcome (handled -> ack) skips _finish().
        dispatch = self.dispatcher.dispatch
        decode = self.transport.decode
        bindings = self.bindings
        from_wire = Notification.from_wire
        plain = self.dispatcher.plain
        clock = time.perf_counter
        traced = tracing.active()
        count = 0
        total = longest = 0.0
        try:
            for msg in messages:
                if plain:
                    try:
                        note = from_wire(decode(msg, bindings))
                    except Exception as exc:
                        log_rejected(msg, exc)
                        msg.reject()
                        continue
                else:
                    prepared = self._decode(msg)
                    if prepared is None:
                        continue
                    note = prepared
                began = clock()
                try:
                    if traced:
                        with tracing.process_span(note.ctxt, note.event_type,
                                                  note.metadata.get("message_id")
                                                  or msg.message_id):
                            result = dispatch(note)
                    else:
                        result = dispatch(note)
                except Exception:  # the dispatcher catches endpoints; this is anything else
                    LOG.exception("dispatching message %s failed", msg.message_id)
                    result = NotificationResult.FAILED
                took = clock() - began
                count += 1
                total += took
                if took > longest:
                    longest = took
                if result == NotificationResult.HANDLED:
                    msg.ack()
                else:
                    self._finish(msg, result, note.metadata.get("message_id") or msg.message_id)
        finally:
            self.stats.handled_batch(count, total, longest)

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


def _pool_size(transport: Transport, pool_size: int | None) -> int:
    """The worker pool's size: as given, else ``[DEFAULT] executor_thread_pool_size`` of the
    transport's ConfigOpts (oslo.messaging reads it there), else 64."""
    if pool_size is not None:
        return pool_size
    conf = getattr(transport, "conf", None)
    return options.pool_size(conf) if conf is not None else DEFAULT_POOL_SIZE


def _build(transport: Transport, targets: Sequence[Target], dispatcher: NotificationDispatcher,
           executor: str | None, allow_requeue: bool, pool: str | None,
           pool_size: int | None, **kw: Any) -> NotificationListener:
    workers = workers_for(executor, _pool_size(transport, pool_size))
    if isinstance(targets, Target):
        targets = [targets]
    if not targets or not all(isinstance(t, Target) for t in targets):
        raise ValueError("targets must be a non-empty list of tidings.Target")
    for target in targets:  # oslo.messaging's check and message, when the listener is built
        target.require_topic("A target must have topic specified")
    if pool is not None and (not isinstance(pool, str) or not pool):
        raise ValueError(f"pool must be a non-empty string or None, not {pool!r}")
    # Checked now, when the listener is built, not at start() (oslo.messaging's way).
    transport.check_features(pool=pool, allow_requeue=allow_requeue)
    transport._ensure_open("listen")
    return NotificationListener(transport, targets, dispatcher, allow_requeue=allow_requeue,
                                pool=pool, workers=workers, **kw)


def get_notification_listener(transport: Transport, targets: Sequence[Target],
                              endpoints: Sequence[Any], executor: str | None = "threading",
                              serializer: Any = None, allow_requeue: bool = False,
                              pool: str | None = None, *,
                              prefetch: int | None = None,
                              executor_thread_pool_size: int | None = None,
                              ) -> NotificationListener:
    """Build a listener that calls ``endpoints`` once per notification.

    ``executor="threading"`` (the default; None means the same, ``"eventlet"`` is refused
    with a ValueError saying so) runs endpoints on up to ``executor_thread_pool_size`` threads
    at once (default: ``[DEFAULT] executor_thread_pool_size`` of a transport built from a
    ConfigOpts, else 64), each message settled right after its own endpoints returned; never
    more than ``prefetch`` are in flight. ``executor="blocking"``
    runs them one at a time, in arrival order, on the listener's own thread.
    Raises NotImplementedError here if ``pool`` or ``allow_requeue=True`` is asked of a driver
    that lacks it. ``prefetch`` overrides the transport's bound on unacknowledged messages.
    """
    return _build(transport, targets, NotificationDispatcher(endpoints, serializer), executor,
                  allow_requeue, pool, executor_thread_pool_size, prefetch=prefetch)


def get_batch_notification_listener(transport: Transport, targets: Sequence[Target],
                                    endpoints: Sequence[Any], executor: str | None = "threading",
                                    serializer: Any = None, allow_requeue: bool = False,
                                    pool: str | None = None, batch_size: int | None = None,
                                    batch_timeout: float | None = None, *,
                                    prefetch: int | None = None,
                                    executor_thread_pool_size: int | None = None,
                                    ) -> NotificationListener:
    """Build a listener that calls endpoints with lists of up to ``batch_size`` notifications,
    flushing a partial batch after ``batch_timeout`` seconds.

    The transport's prefetch is raised to ``batch_size`` when smaller, since a batch can only
    fill from messages the broker has handed over. ``batch_size=None`` with a
    ``batch_timeout`` collects what arrives within the timeout, up to the prefetch (memory
    stays bounded; oslo.messaging collects without a bound). With both None each
    notification is delivered at once as a batch of one (oslo.messaging delivers nothing until
    ``stop()``). Notifications collected but not yet handed to an endpoint when the listener
    stops go back to the broker (oslo.messaging hands them to the endpoints while stopping).
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None")
    if prefetch is None and batch_size is not None:
        prefetch = max(batch_size, transport.options["prefetch"])
    if batch_size is None and batch_timeout is not None:
        batch_size = transport._prefetch(prefetch)
    return _build(transport, targets, BatchNotificationDispatcher(endpoints, serializer),
                  executor, allow_requeue, pool, executor_thread_pool_size,
                  batch_size=batch_size,
                  batch_timeout=batch_timeout, prefetch=prefetch)
