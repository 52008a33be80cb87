"""What the test fixtures that run broker processes of their own share: the ``with`` protocol
and a free port."""

from __future__ import annotations

import socket
from types import TracebackType
from typing import TypeVar

__all__ = ["Managed", "free_port"]

M = TypeVar("M", bound="Managed")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Managed:
    """``start()`` on entering a ``with`` block and ``teardown()`` on leaving it.

    ``teardown()`` also runs when ``start()`` fails half-way: a node or server that did come up
    must never outlive the test that wanted it (it would hold its ports and data directory, and
    a later run would find them taken)."""

    def start(self) -> object:
        raise NotImplementedError

    def teardown(self) -> None:
        raise NotImplementedError

    def __enter__(self: M) -> M:
        try:
            self.start()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.teardown()
