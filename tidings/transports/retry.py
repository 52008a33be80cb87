"""The one retry policy every driver's sends share.

oslo.messaging semantics for ``retry``: None or -1 retries forever, 0 never retries, N retries at
most N times (so N + 1 attempts). Only :class:`TransportUnreachable` is retried; any other error
is not something waiting can fix. Backoff doubles from ``interval`` up to ``max_interval``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from tidings.transports.errors import (
    MessageDeliveryFailure,
    MessageUndeliverable,
    TransportUnreachable,
)

__all__ = ["Backoff", "call_with_retry", "validate_retry"]

LOG = logging.getLogger(__name__)
T = TypeVar("T")


class Backoff:
    """Exponential backoff: ``interval``, doubling on each ``next()``, capped at
    ``max_interval``. The one schedule behind send retries and listener reconnects."""

    __slots__ = ("_delay", "interval", "max_interval")

    def __init__(self, interval: float, max_interval: float) -> None:
        self.interval = interval
        self.max_interval = max(interval, max_interval)
        self._delay = interval

    def next(self) -> float:
        """The delay to wait now; the following one doubles."""
        delay = self._delay
        self._delay = min(delay * 2, self.max_interval)
        return delay

    def peek(self) -> float:
        """The delay the next ``next()`` returns."""
        return self._delay


def validate_retry(retry: int | None) -> int | None:
    """Check a ``retry`` value early, so a typo fails at construction, not at the first send."""
    if retry is None:
        return None
    if isinstance(retry, bool) or not isinstance(retry, int) or retry < -1:
        raise ValueError(f"retry={retry!r}: use None or -1 to retry forever, 0 for no retry, "
                         f"or a positive number of retries")
    return None if retry == -1 else retry


def call_with_retry(attempt: Callable[[], T], retry: int | None, what: str, *,
                    interval: float = 0.2, max_interval: float = 5.0,
                    stop: threading.Event | None = None,
                    failed: TransportUnreachable | None = None) -> T:
    """Run ``attempt`` until it succeeds or the policy gives up; raise MessageDeliveryFailure.

    ``stop`` (set by Transport.cleanup) ends an endless retry so that shutting down never hangs.
    ``failed`` is a first attempt that was already made elsewhere (a pipelined send) and failed:
    it counts against ``retry`` and is followed by the usual backoff.
    """
    retry = validate_retry(retry)
    failures = 0
    backoff = Backoff(interval, max_interval)
    pending_failure = failed
    while True:
        try:
            if pending_failure is not None:
                exc, pending_failure = pending_failure, None
                raise exc
            return attempt()
        except TransportUnreachable as exc:
            failures += 1
            if retry is not None and failures > retry:
                hint = ("Start a listener for it first, or raise retry."
                        if isinstance(exc.__cause__, MessageUndeliverable)
                        else "Check that the broker is reachable, or raise retry.")
                raise MessageDeliveryFailure(
                    f"{what} failed after {failures} attempt(s) (retry={retry}): {exc}. "
                    f"{hint}") from exc
            delay = backoff.next()
            if failures == 1 or failures % 20 == 0:  # the whole story now and then
                LOG.warning("%s failed (attempt %d, retry=%s): %s; trying again in %.1fs",
                            what, failures, "forever" if retry is None else retry, exc, delay)
            else:
                LOG.warning("%s failed (attempt %d: %s); trying again in %.1fs", what,
                            failures, type(exc).__name__, delay)
            if stop is not None and stop.wait(delay):
                raise MessageDeliveryFailure(f"{what} abandoned: the transport was cleaned up") \
                    from exc
            if stop is None:
                threading.Event().wait(delay)
