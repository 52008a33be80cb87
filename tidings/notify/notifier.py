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

import datetime
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tidings.notify.serializer import NoOpSerializer
from tidings.transports.errors import MessageDeliveryFailure
from tidings.transports.retry import validate_retry
from tidings.transports.stats import PublisherStats
from tidings.transports.transport import Target, Transport

__all__ = ["NOTIFIER_DRIVERS", "Notifier"]

LOG = logging.getLogger(__name__)
_MARKER: Any = object()

_WIRE_PRIORITY = {"audit": "AUDIT", "debug": "DEBUG", "info": "INFO", "warn": "WARN",
                  "warning": "WARN", "error": "ERROR", "critical": "CRITICAL",
                  "sample": "SAMPLE"}
_LOG_LEVEL = {"AUDIT": logging.INFO, "DEBUG": logging.DEBUG, "INFO": logging.INFO,
              "WARN": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL,
              "SAMPLE": logging.DEBUG}

SendFn = Callable[["Notifier", dict[str, Any], dict[str, Any], str], None]


def _send_messaging(version: float) -> SendFn:
    def send(notifier: Notifier, ctxt: dict[str, Any], msg: dict[str, Any],
             priority: str) -> None:
        for target in notifier._targets(priority):
            notifier.transport._send_notification(target, ctxt, msg, version=version,
                                                  retry=notifier.retry)
    return send


def _send_log(notifier: Notifier, ctxt: dict[str, Any], msg: dict[str, Any],
              priority: str) -> None:
    logger = logging.getLogger(f"tidings.notification.{msg['event_type']}")
    logger.log(_LOG_LEVEL[priority], json.dumps(msg, default=str))


def _send_noop(notifier: Notifier, ctxt: dict[str, Any], msg: dict[str, Any],
               priority: str) -> None:
    return None


NOTIFIER_DRIVERS: dict[str, SendFn] = {
    "messagingv2": _send_messaging(2.0),
    "messaging": _send_messaging(1.0),
    "log": _send_log,
    "noop": _send_noop,
}


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
        self._drivers = [NOTIFIER_DRIVERS[n] for n in names]
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

    def _notify(self, ctxt: Any, event_type: str, payload: Any, priority: str) -> None:
        wire_priority = _WIRE_PRIORITY[priority]
        if not isinstance(event_type, str) or not event_type:
            raise ValueError(f"event_type must be a non-empty string, not {event_type!r}")
        payload = self._serializer.serialize_entity(ctxt, payload)
        context = _context_dict(ctxt, self._serializer)
        msg = {"message_id": str(uuid.uuid4()), "publisher_id": self.publisher_id,
               "event_type": event_type, "priority": wire_priority, "payload": payload,
               "timestamp": str(datetime.datetime.now(datetime.timezone.utc)
                                .replace(tzinfo=None))}
        for send in self._drivers:
            began = time.perf_counter()
            try:
                send(self, context, msg, wire_priority)
            except MessageDeliveryFailure as exc:
                self.stats.failed()
                if self.raise_on_failure:
                    raise
                LOG.error("could not send notification %s (%s): %s", msg["message_id"],
                          event_type, exc)
            else:
                self.stats.sent(time.perf_counter() - began)

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
