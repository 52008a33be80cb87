"""Dispatch decoded notifications to endpoint methods named after priorities.

Semantics are oslo.messaging's, with one fix: a failing endpoint never makes a message vanish.
The dispatcher only decides an outcome (HANDLED, REQUEUE, FAILED); the listener turns it into
ack, requeue or a logged reject, depending on ``allow_requeue``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tidings.notify.filter import NotificationFilter
from tidings.notify.serializer import NoOpSerializer
from tidings.transports.envelope import Notification

__all__ = ["PRIORITIES", "BatchNotificationDispatcher", "NotificationDispatcher",
           "NotificationResult"]

LOG = logging.getLogger(__name__)

PRIORITIES = ("audit", "debug", "info", "warn", "error", "critical", "sample")


class NotificationResult:
    """What an endpoint method may return. None counts as HANDLED."""

    HANDLED = "handled"
    REQUEUE = "requeue"
    #: Not returned by endpoints: the dispatcher's verdict when an endpoint raised.
    FAILED = "failed"
    #: Not returned by endpoints: no endpoint handles the message's priority. Requeueing it
    #: would bring it straight back, so it is rejected whatever ``allow_requeue`` says.
    UNHANDLED = "unhandled"


Callback = tuple[NotificationFilter | None, Callable[..., Any], str]


class NotificationDispatcher:
    """Call every endpoint that implements the priority and whose filter matches, in order.

    The first REQUEUE or exception stops the round: later endpoints are not called, as in
    oslo.messaging, so a requeued message is not half-processed twice by the ones after it.
    """

    def __init__(self, endpoints: Sequence[Any], serializer: Any = None) -> None:
        if not endpoints:
            raise ValueError("a notification listener needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.serializer = serializer or NoOpSerializer()
        #: True when prepare() would change nothing (the default serializer), so the listener
        #: skips calling it.
        self.plain = type(self.serializer) is NoOpSerializer
        self._callbacks: dict[str, list[Callback]] = {}
        for endpoint, prio in itertools.product(self.endpoints, PRIORITIES):
            method = getattr(endpoint, prio, None)
            if callable(method):
                rule = getattr(endpoint, "filter_rule", None)
                if rule is not None and not hasattr(rule, "match"):
                    raise TypeError(f"{type(endpoint).__name__}.filter_rule must be a "
                                    f"NotificationFilter, not {type(rule).__name__}")
                name = f"{type(endpoint).__name__}.{prio}"
                self._callbacks.setdefault(prio, []).append((rule, method, name))
        if not self._callbacks:
            raise ValueError(f"no endpoint has a method named after a priority "
                             f"({', '.join(PRIORITIES)}); nothing would be consumed")

    @property
    def supported_priorities(self) -> list[str]:
        return [p for p in PRIORITIES if p in self._callbacks]

    def prepare(self, note: Notification) -> Notification:
        """Apply the serializer to context and payload (once, before any endpoint sees it)."""
        if self.plain:  # the default changes nothing: skip it
            return note
        note.ctxt = self.serializer.deserialize_context(note.ctxt)
        note.payload = self.serializer.deserialize_entity(note.ctxt, note.payload)
        return note

    @staticmethod
    def _matches(rule: NotificationFilter | None, note: Notification) -> bool:
        return rule is None or rule.match(note.ctxt, note.publisher_id, note.event_type,
                                          note.metadata, note.payload)

    def dispatch(self, note: Notification) -> str:
        """Run the endpoints for one notification and return a NotificationResult value."""
        callbacks = self._callbacks.get(note.priority)
        if callbacks is None:
            return NotificationResult.UNHANDLED
        for rule, method, name in callbacks:
            if rule is not None and not self._matches(rule, note):  # no call without a rule
                continue
            try:
                ret = method(note.ctxt, note.publisher_id, note.event_type, note.payload,
                             note.metadata)
            except Exception:
                LOG.exception("endpoint %s raised on notification %s", name,
                              note.metadata.get("message_id"))
                return NotificationResult.FAILED
            if ret == NotificationResult.REQUEUE:
                return NotificationResult.REQUEUE
        return NotificationResult.HANDLED


def _batch_item(note: Notification) -> dict[str, Any]:
    """What a batch endpoint gets for one notification: oslo.messaging's dict (ctxt,
    publisher_id, event_type, payload, metadata; the priority is the method's name)."""
    return {"ctxt": note.ctxt, "publisher_id": note.publisher_id,
            "event_type": note.event_type, "payload": note.payload,
            "metadata": note.metadata}


class BatchNotificationDispatcher(NotificationDispatcher):
    """Call endpoint methods with lists: the batch's notifications of that priority that pass
    the endpoint's filter. A REQUEUE or exception marks that priority's messages of the batch.

    As in oslo.messaging, the priorities of a batch are handled in alphabetical order (audit,
    critical, debug, error, info, sample, warn), each priority's notifications in arrival
    order."""

    def dispatch_batch(self, notes: Iterable[tuple[Any, Notification]]) -> dict[Any, str]:
        """Take (key, notification) pairs; return key -> NotificationResult for each."""
        outcome: dict[Any, str] = {}
        by_priority: dict[str, list[tuple[Any, Notification]]] = {}
        for key, note in notes:
            by_priority.setdefault(note.priority, []).append((key, note))
        for priority, items in sorted(by_priority.items(), key=lambda kv: kv[0]):
            verdict = NotificationResult.HANDLED
            callbacks = self._callbacks.get(priority)
            if callbacks is None:
                verdict = NotificationResult.UNHANDLED
            for rule, method, name in callbacks or ():
                chosen = [_batch_item(n) for _, n in items if self._matches(rule, n)]
                if not chosen:
                    continue
                try:
                    ret = method(chosen)
                except Exception:
                    LOG.exception("batch endpoint %s raised on %d notification(s)", name,
                                  len(chosen))
                    verdict = NotificationResult.FAILED
                    break
                if ret == NotificationResult.REQUEUE:
                    verdict = NotificationResult.REQUEUE
                    break
            for key, _ in items:
                outcome[key] = verdict
        return outcome
