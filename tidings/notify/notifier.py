"""Notifier: send notifications, with oslo.messaging's names, drivers and message format.

Notifier drivers decide where a notification goes: ``messagingv2`` (the transport, enveloped),
``messaging`` (the transport, v1, no envelope), ``log`` (the Python logger
``tidings.notification.<event_type>``) and ``noop``. A notification goes to routing topic
``<topic>.<priority>`` on the notifier's exchange for each of its topics.

Differences from oslo.messaging, on purpose: a plain dict context is sent (oslo 18 silently drops
it), and ``raise_on_failure=True`` turns a send that exhausted its retries into an exception
instead of only a log line. Errors a retry cannot fix (a message over max_message_size, a
payload that is not JSON-able) always raise: they are the caller's bug, not the network's.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tidings.notify import tracing
from tidings.notify.serializer import NoOpSerializer
from tidings.notify.stamps import new_message_id, utc_timestamp
from tidings.transports.base import OutgoingMessage
from tidings.transports.errors import MessageDeliveryFailure
from tidings.transports.retry import validate_retry
from tidings.transports.stats import PublisherStats
from tidings.transports.transport import Target, Transport

__all__ = ["NOTIFIER_DRIVERS", "BackgroundNotifier", "Notifier"]

LOG = logging.getLogger(__name__)
_MARKER: Any = object()

_WIRE_PRIORITY = {"audit": "AUDIT", "debug": "DEBUG", "info": "INFO", "warn": "WARN",
                  "warning": "WARN", "error": "ERROR", "critical": "CRITICAL",
                  "sample": "SAMPLE"}
_LOG_LEVEL = {"AUDIT": logging.INFO, "DEBUG": logging.DEBUG, "INFO": logging.INFO,
              "WARN": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL,
              "SAMPLE": logging.DEBUG}

SendFn = Callable[["Notifier", dict[str, Any], dict[str, Any], str], None]


def _send_log(notifier: Notifier, ctxt: dict[str, Any], msg: dict[str, Any],
              priority: str) -> None:
    logger = logging.getLogger(f"tidings.notification.{msg['event_type']}")
    logger.log(_LOG_LEVEL[priority], json.dumps(msg, default=str))


def _send_noop(notifier: Notifier, ctxt: dict[str, Any], msg: dict[str, Any],
               priority: str) -> None:
    return None


#: Notifier drivers that send through the transport, with their envelope version.
_TRANSPORT_VERSIONS = {"messagingv2": 2.0, "messaging": 1.0}
#: Notifier drivers that do not use the transport, with the function that does their work.
_LOCAL_DRIVERS: dict[str, SendFn] = {"log": _send_log, "noop": _send_noop}

#: The notifier driver names, oslo.messaging's.
NOTIFIER_DRIVERS: tuple[str, ...] = (*_TRANSPORT_VERSIONS, *_LOCAL_DRIVERS)


def _context_dict(ctxt: Any, serializer: Any) -> dict[str, Any]:
    if ctxt is not None and not isinstance(ctxt, dict):
        redact = getattr(ctxt, "redacted_copy", None)  # oslo.context hides secrets this way
        if callable(redact):
            ctxt = redact()
    out = serializer.serialize_context(ctxt)
    if not isinstance(out, Mapping):
        raise TypeError(f"serializer.serialize_context returned {type(out).__name__}, "
                        f"not a dict")
    return dict(out)


class Notifier:
    """Send notifications of every priority: ``notifier.info(ctxt, event_type, payload)``."""

    def __init__(self, transport: Transport, publisher_id: str | None = None,
                 driver: str | Sequence[str] | None = "messagingv2",
                 topics: Sequence[str] | None = None, serializer: Any = None,
                 retry: int | None = None, exchange: str | None = None, *,
                 raise_on_failure: bool = False) -> None:
        names = [driver] if isinstance(driver, str) else list(driver or ["messagingv2"])
        unknown = [n for n in names if n not in NOTIFIER_DRIVERS]
        if unknown:
            raise ValueError(f"unknown notifier driver(s) {unknown}; choose from "
                             f"{', '.join(NOTIFIER_DRIVERS)}")
        signing = getattr(transport, "signing", None)
        if "messaging" in names and signing is not None and signing.active is not None:
            raise ValueError("this transport signs notifications, which needs the v2 envelope: "
                             "use driver='messagingv2' instead of 'messaging'")
        topics = ["notifications"] if topics is None else list(topics)
        if isinstance(topics, str) or not all(isinstance(t, str) and t for t in topics):
            raise ValueError(f"topics must be a list of non-empty strings, not {topics!r}")
        self.transport = transport
        self.publisher_id = publisher_id
        self.topics = topics
        self.retry = validate_retry(retry)
        self.exchange = exchange or transport.default_exchange
        self.raise_on_failure = raise_on_failure
        self._driver_names = names
        # (envelope version, None) for a driver that sends through the transport, which
        # _deliver (and BackgroundNotifier's batches) call directly; (None, function) for log
        # and noop.
        self._sends = [(_TRANSPORT_VERSIONS[n], None) if n in _TRANSPORT_VERSIONS
                       else (None, _LOCAL_DRIVERS[n]) for n in names]
        self._serializer = serializer or NoOpSerializer()
        self.stats = PublisherStats()
        self._target_cache: dict[str, list[Target]] = {}

    def _targets(self, wire_priority: str) -> list[Target]:
        """The routing targets ``<topic>.<priority>`` on this notifier's exchange (cached)."""
        targets = self._target_cache.get(wire_priority)
        if targets is None:
            targets = [Target(f"{t}.{wire_priority.lower()}", self.exchange) for t in self.topics]
            self._target_cache[wire_priority] = targets
        return targets

    def prepare(self, publisher_id: str | None = _MARKER, retry: int | None = _MARKER, *,
                topics: Sequence[str] | None = _MARKER,
                exchange: str | None = _MARKER) -> Notifier:
        """A cheap copy with another publisher_id, retry, topics or exchange; shares stats."""
        child = object.__new__(Notifier)
        child.__dict__.update(self.__dict__)
        child._target_cache = {}
        if publisher_id is not _MARKER:
            child.publisher_id = publisher_id
        if retry is not _MARKER:
            child.retry = validate_retry(retry)
        if topics is not _MARKER:
            child.topics = ["notifications"] if topics is None else list(topics)
        if exchange is not _MARKER:
            child.exchange = exchange or self.transport.default_exchange
        return child

    def is_enabled(self) -> bool:
        """False when the only driver is ``noop``, so callers can skip building payloads."""
        return self._driver_names != ["noop"]

    def _build(self, ctxt: Any, event_type: str, payload: Any,
               priority: str) -> tuple[dict[str, Any], dict[str, Any], str]:
        """Serialize now, in the caller's thread: what is sent is the payload as it was."""
        wire_priority = _WIRE_PRIORITY[priority]
        if not isinstance(event_type, str) or not event_type:
            raise ValueError(f"event_type must be a non-empty string, not {event_type!r}")
        serializer = self._serializer
        if type(serializer) is NoOpSerializer and type(ctxt) is dict:
            context = dict(ctxt)  # what the default serializer gives, without its checks
        else:
            payload = serializer.serialize_entity(ctxt, payload)
            context = _context_dict(ctxt, serializer)
        msg = {"message_id": new_message_id(), "publisher_id": self.publisher_id,
               "event_type": event_type, "priority": wire_priority, "payload": payload,
               "timestamp": utc_timestamp()}
        return context, msg, wire_priority

    def _deliver(self, context: dict[str, Any], msg: dict[str, Any], wire_priority: str) -> None:
        for version, send in self._sends:
            began = time.perf_counter()
            try:
                if send is not None:
                    send(self, context, msg, wire_priority)
                else:
                    self.transport._send_notifications(self._targets(wire_priority), context,
                                                       msg, version or 2.0, self.retry)
            except MessageDeliveryFailure as exc:
                self.stats.failed()
                if self.raise_on_failure:
                    raise
                LOG.error("could not send notification %s (%s): %s", msg["message_id"],
                          msg["event_type"], exc)
            else:
                self.stats.sent(time.perf_counter() - began)

    def _notify(self, ctxt: Any, event_type: str, payload: Any, priority: str) -> None:
        context, msg, wire_priority = self._build(ctxt, event_type, payload, priority)
        if not tracing.active():
            self._deliver(context, msg, wire_priority)
            return
        with tracing.publish_span(event_type, self.exchange, msg["message_id"]):
            self._deliver(tracing.inject(context), msg, wire_priority)

    def audit(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "audit")

    def debug(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "debug")

    def info(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "info")

    def warn(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "warn")

    warning = warn

    def error(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "error")

    def critical(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "critical")

    def sample(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "sample")


class BackgroundNotifier(Notifier):
    """A Notifier that never blocks its caller on the broker: notifications go into a bounded
    queue and one background thread sends them under the notifier's retry policy.

    oslo.messaging's notifier blocks the calling thread (with ``retry=None``, forever) while the
    broker is unreachable. Here the caller only waits when the queue is full and
    ``on_full='block'``; ``'drop'`` drops the notification (logged, counted in
    ``stats.snapshot()['dropped']``) and ``'raise'`` raises ``queue.Full``. The payload is
    serialized at call time. ``flush()`` waits for the queue to drain; ``close()`` flushes and
    stops the thread (call it before ``transport.cleanup()``). ``prepare()`` copies share the
    queue, the thread and the stats.

    The thread takes up to ``pipeline`` queued notifications at a time and hands them to the
    transport together (``Transport.send_many``): a driver with asynchronous confirmations
    (rabbit://) publishes them all and then waits for the broker's confirmations at once, so a
    backlog drains at many times the rate of one confirmed round trip per notification, and
    ``flush()`` still returns only when the broker has confirmed every one of them. A failed
    notification is retried alone under the retry policy, so it may arrive after later ones.
    ``pipeline=1`` sends one at a time.
    """

    def __init__(self, transport: Transport, publisher_id: str | None = None,
                 driver: str | Sequence[str] | None = "messagingv2",
                 topics: Sequence[str] | None = None, serializer: Any = None,
                 retry: int | None = None, exchange: str | None = None, *,
                 queue_size: int = 10000, on_full: str = "block",
                 pipeline: int = 64) -> None:
        super().__init__(transport, publisher_id, driver, topics, serializer, retry, exchange)
        if on_full not in ("block", "drop", "raise"):
            raise ValueError(f"on_full={on_full!r}: choose 'block', 'drop' or 'raise'")
        for name, value in (("queue_size", queue_size), ("pipeline", pipeline)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.on_full = on_full
        self.pipeline = pipeline
        self._queue: queue.Queue[tuple[Notifier, tuple[Any, ...]] | None] = \
            queue.Queue(queue_size)
        self._closed = threading.Event()  # shared with prepare()d copies, like the queue
        self._thread = threading.Thread(target=self._run, name="tidings-notifier", daemon=True)
        self._thread.start()

    def _notify(self, ctxt: Any, event_type: str, payload: Any, priority: str) -> None:
        if self._closed.is_set():
            raise RuntimeError("this BackgroundNotifier was closed; build a new one")
        context, msg, wire_priority = self._build(ctxt, event_type, payload, priority)
        if tracing.active():
            context = tracing.inject(context)
        item = (self, (context, msg, wire_priority))
        if self.on_full == "block":
            self._queue.put(item)
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            if self.on_full == "raise":
                raise
            self.stats.dropped()
            LOG.error("notifier queue full (%d): dropped notification %s (%s)",
                      self._queue.maxsize, item[1][1]["message_id"], event_type)

    def _run(self) -> None:
        take = self._queue.get_nowait
        while True:
            items = [self._queue.get()]
            try:
                while len(items) < self.pipeline and items[-1] is not None:
                    items.append(take())
            except queue.Empty:
                pass
            try:
                self._send_batch([item for item in items if item is not None])
            except Exception:
                LOG.exception("background send of %d notification(s) failed", len(items))
            finally:
                for _ in items:
                    self._queue.task_done()
            if items[-1] is None:
                return

    def _send_batch(self, items: list[tuple[Notifier, tuple[Any, ...]]]) -> None:
        """Encode every transport send of ``items``, send them with one pipelined call per
        retry value, then account for each notification (sent, or failed and logged)."""
        began = time.perf_counter()
        errors: list[BaseException | None] = [None] * len(items)
        batches: dict[int | None, tuple[list[OutgoingMessage], list[int]]] = {}
        for index, (owner, (context, msg, wire_priority)) in enumerate(items):
            try:
                for version, send in owner._sends:
                    if send is not None:
                        send(owner, context, msg, wire_priority)  # log, noop: no broker
                        continue
                    out, where = batches.setdefault(owner.retry, ([], []))
                    for target in owner._targets(wire_priority):
                        out.append(owner.transport.encode_notification(
                            target, context, msg, version or 2.0))
                        where.append(index)
            except Exception as exc:
                errors[index] = exc
        for retry, (out, where) in batches.items():
            for index, failed in zip(where, self.transport.send_many(out, retry), strict=True):
                if failed is not None and errors[index] is None:
                    errors[index] = failed
        took = time.perf_counter() - began
        for (owner, (_, msg, _)), exc in zip(items, errors, strict=True):
            if exc is None:
                owner.stats.sent(took)
                continue
            owner.stats.failed()
            if isinstance(exc, MessageDeliveryFailure):
                LOG.error("could not send notification %s (%s): %s", msg["message_id"],
                          msg["event_type"], exc)
            else:
                LOG.error("background send of notification %s (%s) failed: %s",
                          msg["message_id"], msg["event_type"], exc, exc_info=exc)

    def pending(self) -> int:
        """Notifications queued and not yet sent."""
        return self._queue.unfinished_tasks

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far was sent (or failed); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout: float | None = 30.0) -> bool:
        """Flush, then stop the sending thread. Returns False if the flush timed out."""
        if self._closed.is_set():
            return True
        self._closed.set()
        flushed = self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout)
        return flushed
