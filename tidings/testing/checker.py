"""A delivery checker in the style of Jepsen's RabbitMQ queue runs.

A delivery test records what it tried to send and what came out the other side; the checker
then sorts every message id into Jepsen's buckets instead of only comparing totals, because a
lost message and a duplicated one cancel out in a count but never in these sets:

``lost``
    sent successfully but never acknowledged by a consumer. Must be empty for a driver that
    declares ``at_least_once``: that is the whole promise.
``recovered``
    the send reported a failure (or its outcome was unknown) but the message was acknowledged
    anyway. Allowed: a broker may take a message and lose the confirmation.
``duplicated``
    acknowledged more than once. An acknowledgement means "processed"; two of them mean the
    application processed the message twice without having failed the first time.
``unexpected``
    delivered or acknowledged but never sent: a message from another test, a corrupted id, or
    a driver inventing messages. Always a failure.
``redelivered``
    delivered more than once (whatever the acknowledgements). Normal after a requeue or a
    consumer stopping with messages in flight; reported so a test can bound it.

:class:`DeliveryLog` is the thread-safe recorder tests write to from senders and endpoints, and
also what they wait on (``wait_acked``) so that a test waits on an event, never a sleep.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

__all__ = ["EVENTS", "DeliveryCheckError", "DeliveryLog", "DeliveryReport", "check"]

#: The events a log may hold for a message id.
EVENTS = ("sent", "send_failed", "send_unknown", "delivered", "ack", "requeue", "reject")


class DeliveryCheckError(AssertionError):
    """A delivery history broke a promise; the message lists the counts and examples."""


@dataclass(frozen=True)
class DeliveryReport:
    """The checker's verdict: Jepsen's buckets as sets (or id -> count for the repeated ones)."""

    attempted: int
    sent_ok: int
    acknowledged: int
    lost: frozenset[Hashable] = field(default_factory=frozenset)
    recovered: frozenset[Hashable] = field(default_factory=frozenset)
    duplicated: dict[Hashable, int] = field(default_factory=dict)
    unexpected: frozenset[Hashable] = field(default_factory=frozenset)
    redelivered: dict[Hashable, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """The figures Jepsen prints: how many ids fell in each bucket."""
        return {"attempted": self.attempted, "sent_ok": self.sent_ok,
                "acknowledged": self.acknowledged, "lost": len(self.lost),
                "recovered": len(self.recovered), "duplicated": len(self.duplicated),
                "unexpected": len(self.unexpected), "redelivered": len(self.redelivered)}

    def valid(self, *, at_least_once: bool = True, allow_duplicates: bool = False) -> bool:
        """True if nothing unexpected happened (and nothing was lost / acked twice, as asked)."""
        return not self.problems(at_least_once=at_least_once, allow_duplicates=allow_duplicates)

    def problems(self, *, at_least_once: bool = True,
                 allow_duplicates: bool = False) -> list[str]:
        """One line per broken promise, with up to five example ids each."""
        out = []
        if self.unexpected:
            out.append(f"{len(self.unexpected)} unexpected (never sent): "
                       f"{_examples(self.unexpected)}")
        if at_least_once and self.lost:
            out.append(f"{len(self.lost)} lost (sent, never acknowledged): "
                       f"{_examples(self.lost)}")
        if not allow_duplicates and self.duplicated:
            out.append(f"{len(self.duplicated)} acknowledged more than once: "
                       f"{_examples(self.duplicated)}")
        return out

    def assert_valid(self, *, at_least_once: bool = True, allow_duplicates: bool = False) -> None:
        """Raise :class:`DeliveryCheckError` listing every broken promise and the counts."""
        problems = self.problems(at_least_once=at_least_once, allow_duplicates=allow_duplicates)
        if problems:
            raise DeliveryCheckError("; ".join(problems) + f" -- counts: {self.counts}")


def _examples(ids: Iterable[Hashable], limit: int = 5) -> str:
    shown = sorted(ids, key=repr)
    text = ", ".join(repr(i) for i in shown[:limit])
    return text + (", ..." if len(shown) > limit else "")


def check(history: Iterable[tuple[Hashable, str]],
          sent: Iterable[Hashable] | None = None) -> DeliveryReport:
    """Sort a delivery history into Jepsen's buckets.

    ``history`` is a sequence of ``(message id, event)`` with events from :data:`EVENTS`.
    ``sent`` adds ids that were sent successfully, for callers who keep them apart from the
    log. An id that is both ``sent`` and ``send_failed`` (a retry succeeded) counts as sent.
    """
    sent_ok: set[Hashable] = set(sent or ())
    unsure: set[Hashable] = set()
    acks: Counter[Hashable] = Counter()
    deliveries: Counter[Hashable] = Counter()
    for message_id, event in history:
        if event == "sent":
            sent_ok.add(message_id)
        elif event in ("send_failed", "send_unknown"):
            unsure.add(message_id)
        elif event == "ack":
            acks[message_id] += 1
        elif event == "delivered":
            deliveries[message_id] += 1
        elif event not in EVENTS:
            raise ValueError(f"unknown delivery event {event!r} for {message_id!r}; "
                             f"use one of {', '.join(EVENTS)}")
    unsure -= sent_ok
    attempted = sent_ok | unsure
    acked = set(acks)
    seen = acked | set(deliveries)
    return DeliveryReport(
        attempted=len(attempted), sent_ok=len(sent_ok), acknowledged=len(acked),
        lost=frozenset(sent_ok - acked), recovered=frozenset(acked & unsure),
        duplicated={k: n for k, n in acks.items() if n > 1},
        unexpected=frozenset(seen - attempted),
        redelivered={k: n for k, n in deliveries.items() if n > 1})


class DeliveryLog:
    """A thread-safe history of (id, event) that tests append to and wait on.

    Senders call :meth:`sent`; endpoints call :meth:`delivered` and :meth:`acked`. Waiting is on
    a condition variable, so a test resumes the moment the last acknowledgement is recorded and
    fails after a bounded time otherwise.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._history: list[tuple[Hashable, str]] = []
        self._acked: set[Hashable] = set()
        self._ack_order: list[Hashable] = []  # lets waiters look only at what is new

    def record(self, message_id: Hashable, event: str) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown delivery event {event!r}; use one of {', '.join(EVENTS)}")
        with self._cond:
            self._history.append((message_id, event))
            if event == "ack":
                self._acked.add(message_id)
                self._ack_order.append(message_id)
            self._cond.notify_all()

    def sent(self, message_id: Hashable) -> None:
        self.record(message_id, "sent")

    def send_failed(self, message_id: Hashable) -> None:
        self.record(message_id, "send_failed")

    def delivered(self, message_id: Hashable) -> None:
        self.record(message_id, "delivered")

    def acked(self, message_id: Hashable) -> None:
        self.record(message_id, "ack")

    @property
    def history(self) -> list[tuple[Hashable, str]]:
        with self._cond:
            return list(self._history)

    def count(self, event: str) -> int:
        with self._cond:
            return sum(1 for _, e in self._history if e == event)

    def acked_ids(self) -> set[Hashable]:
        with self._cond:
            return set(self._acked)

    def wait_acked(self, ids: Iterable[Hashable], timeout: float) -> bool:
        """Wait until every id in ``ids`` has been acknowledged; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            missing = set(ids) - self._acked
            seen = len(self._ack_order)
            while missing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
                missing.difference_update(self._ack_order[seen:])
                seen = len(self._ack_order)
            return True

    def report(self, sent: Iterable[Hashable] | None = None) -> DeliveryReport:
        """The :func:`check` verdict on everything recorded so far."""
        return check(self.history, sent)
