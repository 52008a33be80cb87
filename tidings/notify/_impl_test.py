"""The ``test`` notifier driver's record, where oslo.messaging keeps it
(``oslo_messaging.notify._impl_test``): every notification a ``driver='test'`` notifier sends is
appended to ``NOTIFICATIONS`` as (context, message, priority, retry), and ``reset()`` starts a
new list (as there, it rebinds the name: read it through this module)."""

from __future__ import annotations

from typing import Any

__all__ = ["NOTIFICATIONS", "reset"]

NOTIFICATIONS: list[tuple[Any, dict[str, Any], str, Any]] = []


def reset() -> None:
    "Clear out the list of recorded notifications."
    global NOTIFICATIONS
    NOTIFICATIONS = []
