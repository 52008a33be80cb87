"""Notifier: send notifications, with oslo.messaging's names, arguments, drivers and message.

``Notifier(transport, publisher_id=None, driver=None, serializer=None, retry=None, topics=None)``
takes oslo.messaging's arguments in oslo.messaging's order. When the transport was built from
an oslo.config ``ConfigOpts``, ``driver``, ``topics`` and ``retry`` default to
``[oslo_messaging_notifications] driver / topics / retry`` as there (no driver configured means
nothing is sent); from a URL they default to ``messagingv2``, ``['notifications']`` and retry
forever.

Notifier drivers decide where a notification goes: ``messagingv2`` (the transport, enveloped),
``messaging`` (the transport, v1, no envelope), ``log`` (the Python logger
``oslo.messaging.notification.<event_type>``, passwords masked as oslo.messaging masks them),
``routing`` (other drivers chosen per event type and priority by the YAML file in
``[oslo_messaging_notifications] routing_config``), ``test`` (recorded in
``tidings.notify._impl_test.NOTIFICATIONS``) and ``noop``. A notification goes to routing key
``<topic>.<priority>`` on the notifier's exchange for each of its topics.

Differences from oslo.messaging, on purpose (the README lists them all): a plain dict context is
sent with its secrets masked (oslo.messaging 18 drops it), ``raise_on_failure=True`` turns a send
that exhausted its retries into an exception instead of only a log line, and errors a retry
cannot fix (a message over max_message_size, a payload that is not JSON-able, an unknown driver
name, ``topics`` given as a string) raise: they are the caller's bug, not the network's.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tidings.notify import _impl_test, tracing
from tidings.notify.serializer import NoOpSerializer
from tidings.notify.stamps import new_message_id, utc_timestamp
from tidings.transports import conf as options
from tidings.transports.base import OutgoingMessage
from tidings.transports.envelope import to_primitive
from tidings.transports.errors import MessageDeliveryFailure
from tidings.transports.masking import mask_context, mask_dict_password
from tidings.transports.retry import validate_retry
from tidings.transports.stats import PublisherStats
from tidings.transports.transport import Target, Transport

__all__ = ["NOTIFIER_DRIVERS", "BackgroundNotifier", "Notifier"]

LOG = logging.getLogger(__name__)
_MARKER: Any = object()

#: The log driver's logger names, oslo.messaging's (logging configurations name them).
LOGGER_BASE = "oslo.messaging.notification"

#: (notifier, wire context, serializer's context, message, priority, retry) -> None
SendFn = Callable[["Notifier", dict[str, Any], Any, dict[str, Any], str, Any], None]


def _send_log(notifier: Notifier, ctxt: dict[str, Any], raw: Any, msg: dict[str, Any],
              priority: str, retry: Any) -> None:
    """oslo.messaging's log driver: the message (no context) as JSON, passwords masked, at the
    logger method named after the priority; AUDIT and SAMPLE have none, so, as there, they are
    not logged and a warning says so."""
    logger = logging.getLogger(f"{LOGGER_BASE}.{msg['event_type']}")
    method = getattr(logger, priority.lower(), None)
    if method:
        method(json.dumps(mask_dict_password(msg), default=to_primitive))
    else:
        warnings.warn('Unable to log message as notify cannot find a '
                      f'logger with the priority specified {priority.lower()}', stacklevel=2)


def _send_noop(notifier: Notifier, ctxt: dict[str, Any], raw: Any, msg: dict[str, Any],
               priority: str, retry: Any) -> None:
    return None


def _send_test(notifier: Notifier, ctxt: dict[str, Any], raw: Any, msg: dict[str, Any],
               priority: str, retry: Any) -> None:
    """oslo.messaging's test driver: (context, message, priority, retry) in a module list."""
    _impl_test.NOTIFICATIONS.append((raw, msg, priority, retry))


def _send_routing(notifier: Notifier, ctxt: dict[str, Any], raw: Any, msg: dict[str, Any],
                  priority: str, retry: Any) -> None:
    """oslo.messaging's routing driver: the drivers of every group of the routing file whose
    rules accept this event type and priority (fnmatch patterns), each once."""
    groups = notifier._routing_groups()
    accepted: set[str] = set()
    for group in groups.values():
        for name, rules in group.items():
            checks = []
            for key, patterns in (rules or {}).items():
                if key == "accepted_events":
                    checks.append(any(fnmatch.fnmatch(msg["event_type"], p) for p in patterns))
                if key == "accepted_priorities":
                    checks.append(any(fnmatch.fnmatch(priority.lower(), p.lower())
                                      for p in patterns))
            if all(checks):
                accepted.add(name)
    for name in sorted(accepted):
        if name == "routing" or name not in NOTIFIER_DRIVERS:
            LOG.warning("routing: skipping unknown notifier driver %r", name)
            continue
        LOG.info("Routing '%(event)s' notification to '%(driver)s' driver",
                 {"event": msg.get("event_type"), "driver": name})
        version = _TRANSPORT_VERSIONS.get(name)
        if version is not None:
            notifier._transport_send(ctxt, msg, priority, retry, version)
        else:
            _LOCAL_DRIVERS[name](notifier, ctxt, raw, msg, priority, retry)


#: Notifier drivers that send through the transport, with their envelope version.
_TRANSPORT_VERSIONS = {"messagingv2": 2.0, "messaging": 1.0}
#: Notifier drivers that do not use the transport directly, with the function that does it.
_LOCAL_DRIVERS: dict[str, SendFn] = {"log": _send_log, "noop": _send_noop, "test": _send_test,
                                     "routing": _send_routing}

#: The notifier driver names, oslo.messaging's.
NOTIFIER_DRIVERS: tuple[str, ...] = (*_TRANSPORT_VERSIONS, *_LOCAL_DRIVERS)


def _sanitize_context(ctxt: Any) -> Any:
    """What of the caller's context may travel (oslo.messaging's ``_sanitize_context``, except
    that dicts are kept, their secrets masked): None -> {}; a dict (or other mapping) -> a copy
    masked as ``oslo_utils.strutils.mask_dict_password`` masks; an object with
    ``redacted_copy()`` (oslo.context's RequestContext) -> that copy, exactly as oslo.messaging
    sends it; an object with only ``to_dict()`` -> its dict, masked; anything else -> {} and
    a warning, as there."""
    if ctxt is None:
        return {}
    if type(ctxt) is dict:
        return mask_context(ctxt)
    redact = getattr(ctxt, "redacted_copy", None)
    if callable(redact):
        return redact()
    if isinstance(ctxt, Mapping):
        return mask_context(ctxt)
    to_dict = getattr(ctxt, "to_dict", None)
    if callable(to_dict):
        as_dict = to_dict()
        if isinstance(as_dict, Mapping):
            return mask_context(as_dict)
    LOG.warning("Unable to properly redact context for notification, omitting context from "
                "notification.")
    return {}


def _wire_context(out: Any) -> dict[str, Any]:
    """The serializer's context as the dict that is packed into the message (oslo.messaging's
    pack_context: a dict as it is, anything else through ``to_dict()``)."""
    if isinstance(out, dict):
        return out
    if isinstance(out, Mapping):
        return dict(out)
    to_dict = getattr(out, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise TypeError(f"serializer.serialize_context returned {type(out).__name__}, not a dict "
                    f"or an object with to_dict()")


def _driver_names(driver: Any, default: list[str]) -> list[str]:
    if driver is None:
        return list(default)
    if isinstance(driver, str):
        return [driver]
    if isinstance(driver, (list, tuple)) and all(isinstance(d, str) for d in driver):
        return list(driver)
    raise ValueError(f"driver must be a driver name or a list of them, not {driver!r}")


def _topic_list(topics: Any) -> list[str]:
    """``topics`` as a list, refused when it is a string (which list() would split into
    one-letter topics) or holds anything but non-empty strings."""
    if isinstance(topics, (str, bytes)) or not isinstance(topics, (list, tuple)) or \
            not all(isinstance(t, str) and t for t in topics):
        raise ValueError(f"topics must be a list of non-empty strings, not {topics!r}")
    return list(topics)


class Notifier:
    """Send notifications of every priority: ``notifier.info(ctxt, event_type, payload)``.

    oslo.messaging's arguments and order; tidings adds the keyword-only ``exchange`` (default:
    the transport's, i.e. ``control_exchange``) and ``raise_on_failure``.
    """

    def __init__(self, transport: Transport, publisher_id: str | None = None,
                 driver: str | Sequence[str] | None = None, serializer: Any = None,
                 retry: int | None = None, topics: Sequence[str] | None = None, *,
                 exchange: str | None = None, raise_on_failure: bool = False) -> None:
        conf = getattr(transport, "conf", None)
        if conf is not None:
            conf_drivers, conf_topics, conf_retry = options.notifier_settings(conf)
        else:
            conf_drivers, conf_topics, conf_retry = ["messagingv2"], ["notifications"], None
        names = _driver_names(driver, conf_drivers)
        unknown = [n for n in names if n not in NOTIFIER_DRIVERS]
        if unknown:
            raise ValueError(f"unknown notifier driver(s) {unknown}; choose from "
                             f"{', '.join(NOTIFIER_DRIVERS)}")
        signing = getattr(transport, "signing", None)
        if "messaging" in names and signing is not None and signing.active is not None:
            raise ValueError("this transport signs notifications, which needs the v2 envelope: "
                             "use driver='messagingv2' instead of 'messaging'")
        self.transport = transport
        self.publisher_id = publisher_id
        self.topics = _topic_list(conf_topics if topics is None else topics)
        chosen = conf_retry if retry is None else retry
        #: As given (or configured): -1 and None retry forever, 0 never, N at most N times.
        self.retry = -1 if chosen == -1 else validate_retry(chosen)
        self.exchange = exchange or transport.default_exchange
        self.raise_on_failure = raise_on_failure
        self._driver_names = names
        # (envelope version, None) for a driver that sends through the transport, which
        # _deliver (and BackgroundNotifier's batches) call directly; (None, function) for the
        # others.
        self._sends = [(_TRANSPORT_VERSIONS[n], None) if n in _TRANSPORT_VERSIONS
                       else (None, _LOCAL_DRIVERS[n]) for n in names]
        self._serializer = serializer or NoOpSerializer()
        self.stats = PublisherStats()
        self._target_cache: dict[str, list[Target]] = {}
        self._routing: dict[str, Any] | None = None

    def _targets(self, priority: str) -> list[Target]:
        """The routing targets ``<topic>.<priority>`` on this notifier's exchange (cached)."""
        targets = self._target_cache.get(priority)
        if targets is None:
            low = priority.lower()
            targets = [Target(exchange=self.exchange, topic=f"{t}.{low}") for t in self.topics]
            self._target_cache[priority] = targets
        return targets

    def _routing_groups(self) -> dict[str, Any]:
        """The routing driver's groups, read once from ``routing_config`` (a YAML file)."""
        if self._routing is None:
            groups: Any = {}
            conf = getattr(self.transport, "conf", None)
            filename = ""
            if conf is not None:
                options.register_routing_opt(conf)
                filename = conf[options.GROUP].routing_config
            if filename:
                import yaml  # the routing driver's dependency, as in oslo.messaging

                with open(filename, encoding="utf-8") as fh:
                    groups = yaml.safe_load(fh) or {}
            else:
                LOG.warning("the routing notifier driver has no routing_config: it sends "
                            "nothing")
            self._routing = groups if isinstance(groups, dict) else {}
        return self._routing

    def prepare(self, publisher_id: str | None = _MARKER, retry: int | None = _MARKER, *,
                topics: Sequence[str] | None = _MARKER,
                exchange: str | None = _MARKER) -> Notifier:
        """A cheap copy with another publisher_id, retry, topics or exchange, of the same class
        (a BackgroundNotifier's copies share its queue and thread); shares the stats."""
        child = object.__new__(type(self))
        child.__dict__.update(self.__dict__)
        child._target_cache = {}
        if publisher_id is not _MARKER:
            child.publisher_id = publisher_id
        if retry is not _MARKER:
            child.retry = -1 if retry == -1 else validate_retry(retry)
        if topics is not _MARKER:
            child.topics = ["notifications"] if topics is None else _topic_list(topics)
        if exchange is not _MARKER:
            child.exchange = exchange or self.transport.default_exchange
        return child

    def is_enabled(self) -> bool:
        """False when the only driver is ``noop``, so callers can skip building payloads
        (oslo.messaging's rule: no driver at all still counts as enabled)."""
        return self._driver_names != ["noop"]

    def _build_message(self, ctxt: Any, event_type: str, payload: Any, priority: str,
                       publisher_id: str | None = None,
                       ) -> tuple[dict[str, Any], Any, dict[str, Any], str]:
        """Serialize now, in the caller's thread: what is sent is the payload as it was.
        Returns (wire context, the serializer's context, message, priority)."""
        if not isinstance(event_type, str) or not event_type:
            raise ValueError(f"event_type must be a non-empty string, not {event_type!r}")
        serializer = self._serializer
        if type(serializer) is NoOpSerializer and type(ctxt) is dict:
            context = raw = mask_context(ctxt)  # what the default serializer gives, cheaply
        else:
            payload = serializer.serialize_entity(ctxt, payload)
            raw = serializer.serialize_context(_sanitize_context(ctxt))
            context = _wire_context(raw)
        msg = {"message_id": new_message_id(),
               "publisher_id": publisher_id or self.publisher_id,
               "event_type": event_type, "priority": priority, "payload": payload,
               "timestamp": utc_timestamp()}
        return context, raw, msg, priority

    def _build(self, ctxt: Any, event_type: str, payload: Any,
               priority: str) -> tuple[dict[str, Any], dict[str, Any], str]:
        """(wire context, message, priority): :meth:`_build_message` without the serializer's
        own context."""
        context, _, msg, priority = self._build_message(ctxt, event_type, payload, priority)
        return context, msg, priority

    def _transport_send(self, context: dict[str, Any], msg: dict[str, Any], priority: str,
                        retry: Any, version: float) -> None:
        """Send through the transport to every topic; a topic whose send fails for good is
        logged (or raised, with ``raise_on_failure``) and the next topic is still tried."""
        if retry is not None and retry < 0:
            retry = None
        targets = self._targets(priority)
        if len(targets) == 1:
            self.transport._send_notifications(targets, context, msg, version, retry)
            return
        failure: MessageDeliveryFailure | None = None
        for target in targets:
            try:
                self.transport._send_notifications((target,), context, msg, version, retry)
            except MessageDeliveryFailure as exc:
                if self.raise_on_failure:
                    failure = failure or exc
                    continue
                LOG.error("could not send notification %s (%s) to %s: %s", msg["message_id"],
                          msg["event_type"], target.topic, exc)
        if failure is not None:
            raise failure

    def _deliver(self, context: dict[str, Any], raw: Any, msg: dict[str, Any], priority: str,
                 retry: Any) -> None:
        for version, send in self._sends:
            began = time.perf_counter()
            try:
                if send is not None:
                    send(self, context, raw, msg, priority, retry)
                elif retry is None and len(self.topics) == 1:  # the common case, directly
                    self.transport._send_notifications(self._targets(priority), context, msg,
                                                       version or 2.0, None)
                else:
                    self._transport_send(context, msg, priority, retry, version or 2.0)
            except MessageDeliveryFailure as exc:
                self.stats.failed()
                if self.raise_on_failure:
                    raise
                LOG.error("could not send notification %s (%s): %s", msg["message_id"],
                          msg["event_type"], exc)
            else:
                self.stats.sent(time.perf_counter() - began)

    def _notify(self, ctxt: Any, event_type: str, payload: Any, priority: str,
                publisher_id: str | None = None, retry: int | None = None) -> None:
        """Send one notification at ``priority`` (oslo.messaging's arguments: the priority is
        put on the wire as given, ``INFO`` by ``info()``; the routing key uses it lower-cased).
        As there, ``retry`` of 0 or None means the notifier's."""
        context, raw, msg, priority = self._build_message(ctxt, event_type, payload, priority,
                                                          publisher_id)
        retry = retry or self.retry
        if not tracing.active():
            self._deliver(context, raw, msg, priority, retry)
            return
        with tracing.publish_span(event_type, self.exchange, msg["message_id"]):
            self._deliver(tracing.inject(context), raw, msg, priority, retry)

    def audit(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "AUDIT")

    def debug(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "DEBUG")

    def info(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "INFO")

    def warn(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "WARN")

    warning = warn

    def error(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "ERROR")

    def critical(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "CRITICAL")

    def sample(self, ctxt: Any, event_type: str, payload: Any) -> None:
        self._notify(ctxt, event_type, payload, "SAMPLE")


_Item = tuple[Notifier, tuple[dict[str, Any], Any, dict[str, Any], str, Any]]


class BackgroundNotifier(Notifier):
    """A Notifier that never blocks its caller on the broker: notifications go into a bounded
    queue and one background thread sends them under the notifier's retry policy.

    oslo.messaging's notifier blocks the calling thread (with ``retry=None``, forever) while the
    broker is unreachable. Here the caller only waits when the queue is full and
    ``on_full='block'``; ``'drop'`` drops the notification (logged, counted in
    ``stats.snapshot()['dropped']``) and ``'raise'`` raises ``queue.Full``. The payload is
    serialized at call time. ``flush()`` waits for the queue to drain; ``close()`` flushes and
    stops the thread (call it before ``transport.cleanup()``). ``prepare()`` copies are
    BackgroundNotifiers too and share the queue, the thread and the stats.

    The thread takes up to ``pipeline`` queued notifications at a time and hands them to the
    transport together (``Transport.send_many``): a driver with asynchronous confirmations
    (rabbit://) publishes them all and then waits for the broker's confirmations at once, so a
    backlog drains at many times the rate of one confirmed round trip per notification, and
    ``flush()`` still returns only when the broker has confirmed every one of them. A failed
    notification is retried alone under the retry policy, so it may arrive after later ones.
    ``pipeline=1`` sends one at a time.
    """

    def __init__(self, transport: Transport, publisher_id: str | None = None,
                 driver: str | Sequence[str] | None = None, serializer: Any = None,
                 retry: int | None = None, topics: Sequence[str] | None = None, *,
                 exchange: str | None = None, raise_on_failure: bool = False,
                 queue_size: int = 10000, on_full: str = "block",
                 pipeline: int = 64) -> None:
        super().__init__(transport, publisher_id, driver, serializer, retry, topics,
                         exchange=exchange, raise_on_failure=raise_on_failure)
        if on_full not in ("block", "drop", "raise"):
            raise ValueError(f"on_full={on_full!r}: choose 'block', 'drop' or 'raise'")
        for name, value in (("queue_size", queue_size), ("pipeline", pipeline)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.on_full = on_full
        self.pipeline = pipeline
        self._queue: queue.Queue[_Item | None] = queue.Queue(queue_size)
        self._closed = threading.Event()  # shared with prepare()d copies, like the queue
        self._stopping = threading.Event()  # close() gave up waiting: drain, then end
        self._thread = threading.Thread(target=self._run, name="tidings-notifier", daemon=True)
        self._thread.start()

    def _notify(self, ctxt: Any, event_type: str, payload: Any, priority: str,
                publisher_id: str | None = None, retry: int | None = None) -> None:
        if self._closed.is_set():
            raise RuntimeError("this BackgroundNotifier was closed; build a new one")
        context, raw, msg, priority = self._build_message(ctxt, event_type, payload, priority,
                                                          publisher_id)
        if tracing.active():
            context = tracing.inject(context)
        item: _Item = (self, (context, raw, msg, priority, retry or self.retry))
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
                      self._queue.maxsize, msg["message_id"], event_type)

    def _run(self) -> None:
        take = self._queue.get_nowait
        while True:
            if self._stopping.is_set():  # close() timed out: send what is left, then end
                try:
                    first = take()
                except queue.Empty:
                    return
            else:
                first = self._queue.get()
            items = [first]
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

    def _send_batch(self, items: list[_Item]) -> None:
        """Encode every transport send of ``items``, send them with one pipelined call per
        retry value, then account for each notification (sent, or failed and logged)."""
        began = time.perf_counter()
        errors: list[BaseException | None] = [None] * len(items)
        batches: dict[int | None, tuple[list[OutgoingMessage], list[int]]] = {}
        for index, (owner, (context, raw, msg, priority, retry)) in enumerate(items):
            try:
                for version, send in owner._sends:
                    if send is not None:
                        send(owner, context, raw, msg, priority, retry)  # log, test, ...
                        continue
                    key = None if retry is None or retry < 0 else retry
                    out, where = batches.setdefault(key, ([], []))
                    for target in owner._targets(priority):
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
        for (owner, (_, _, msg, _, _)), error in zip(items, errors, strict=True):
            if error is None:
                owner.stats.sent(took)
                continue
            owner.stats.failed()
            if isinstance(error, MessageDeliveryFailure):
                LOG.error("could not send notification %s (%s): %s", msg["message_id"],
                          msg["event_type"], error)
            else:
                LOG.error("background send of notification %s (%s) failed: %s",
                          msg["message_id"], msg["event_type"], error, exc_info=error)

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
        """Flush, then stop the sending thread, within ``timeout`` seconds in all. Returns
        False if the flush timed out (the broker is away): the call still returns on time, and
        the thread goes on sending what is left under the retry policy (``transport.cleanup()``
        ends an endless retry) and ends when the queue is empty. Later sends raise."""
        if self._closed.is_set():
            return True
        self._closed.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        flushed = self.flush(timeout)
        self._stopping.set()
        try:
            self._queue.put_nowait(None)  # wakes the thread if it waits for work
        except queue.Full:
            pass  # it is busy sending: it sees _stopping after this batch
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._thread.join(remaining)
        return flushed
