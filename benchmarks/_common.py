"""What every benchmark script shares: the counting endpoint. (A fresh RabbitMQ vhost comes
from tidings.testing.brokers.rabbit_vhost; the tidings-side harness is tidings.bench.)"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["Counter"]


class Counter:
    """An endpoint (for tidings and oslo.messaging alike) that counts and signals the N-th
    notification."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.done = threading.Event()

    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> None:
        self.count += 1
        if self.count >= self.expected:
            self.done.set()
