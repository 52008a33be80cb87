"""Counters for listeners and notifiers that an application can read and export.

Kept in the core so every driver reports the same figures; cheap enough for the hot path (one
lock, integer adds) and readable as a plain dict via ``snapshot()``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["ConsumerStats", "PublisherStats"]


@dataclass
class _Latency:
    count: int = 0
    total: float = 0.0
    max: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def add_many(self, count: int, total: float, longest: float) -> None:
        self.count += count
        self.total += total
        if longest > self.max:
            self.max = longest

    def as_dict(self) -> dict[str, float]:
        mean = self.total / self.count if self.count else 0.0
        return {"count": self.count, "mean_s": mean, "max_s": self.max}


@dataclass
class ConsumerStats:
    """received, acknowledged, requeued, rejected, in flight, and handler latency."""

    _received: int = 0
    _settled: dict[str, int] = field(default_factory=lambda: {"ack": 0, "requeue": 0,
                                                              "reject": 0})
    _latency: _Latency = field(default_factory=_Latency)
    _returned: int = 0
    _lost: int = 0
    _gave_up: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def received(self, n: int = 1) -> None:
        with self._lock:
            self._received += n

    def settled(self, how: str, n: int = 1) -> None:
        with self._lock:
            self._settled[how] += n

    def settled_many(self, acks: int, requeues: int, rejects: int) -> None:
        """One batch of settlements handed to the driver, counted under one lock."""
        with self._lock:
            settled = self._settled
            settled["ack"] += acks
            settled["requeue"] += requeues
            settled["reject"] += rejects

    def returned(self, n: int) -> None:
        """Messages given back unsettled when a listener stopped."""
        with self._lock:
            self._returned += n

    def gave_up(self, n: int) -> None:
        """Messages rejected because they reached the listener's max_deliveries."""
        with self._lock:
            self._gave_up += n

    def lost(self, n: int) -> None:
        """Messages held when a connection was lost: the broker delivers them again."""
        with self._lock:
            self._lost += n

    def handled(self, seconds: float) -> None:
        with self._lock:
            self._latency.add(seconds)

    def handled_batch(self, count: int, total: float, longest: float) -> None:
        """``count`` handler calls taking ``total`` seconds (the longest ``longest``), under
        one lock: a listener records a poll's worth at once."""
        if not count:
            return
        with self._lock:
            self._latency.add_many(count, total, longest)

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            done = sum(self._settled.values()) + self._returned + self._lost
            return {"received": self._received, "acknowledged": self._settled["ack"],
                    "requeued": self._settled["requeue"], "rejected": self._settled["reject"],
                    "returned_on_close": self._returned,
                    "rejected_after_max_deliveries": self._gave_up,
                    "lost_with_connection": self._lost,
                    "in_flight": self._received - done,
                    "handler_latency": self._latency.as_dict()}


@dataclass
class PublisherStats:
    """sent, failed, dropped (BackgroundNotifier) and send latency of a notifier, shared by
    its prepare()d copies."""

    _sent: int = 0
    _failed: int = 0
    _dropped: int = 0
    _latency: _Latency = field(default_factory=_Latency)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def sent(self, seconds: float) -> None:
        with self._lock:
            self._sent += 1
            self._latency.add(seconds)

    def failed(self) -> None:
        with self._lock:
            self._failed += 1

    def dropped(self) -> None:
        with self._lock:
            self._dropped += 1

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"sent": self._sent, "failed": self._failed, "dropped": self._dropped,
                    "send_latency": self._latency.as_dict()}
