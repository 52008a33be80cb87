"""Connects that ``cleanup()`` can end. Both drivers open py-amqp connections (``rabbit://`` for
everything, ``amqp://`` for its AMQP 0-9-1 declares); a broker that accepts the TCP connection
and never answers holds such a connect for connect_timeout, and so would a ``cleanup()`` that
waited for it. A :class:`Connecting` per driver lists the connects in progress; ``abort()``
shuts their sockets down (the blocked handshake read returns at once) and refuses new ones."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

import amqp
import kombu.transport.pyamqp

__all__ = ["Connecting", "KombuTransport"]


class Connecting:
    """The py-amqp connections one driver is opening (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: set[amqp.Connection] = set()
        self.aborted = False

    @contextlib.contextmanager
    def watch(self, conn: amqp.Connection) -> Any:
        """Around ``conn.connect()``: OSError at once if the driver was cleaned up."""
        with self._lock:
            if self.aborted:
                raise OSError("the driver was cleaned up while connecting")
            self._conns.add(conn)
        try:
            yield
        finally:
            with self._lock:
                self._conns.discard(conn)

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            conns = list(self._conns)
        for conn in conns:
            sock = getattr(getattr(conn, "_transport", None), "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _Connection(kombu.transport.pyamqp.Connection):  # type: ignore[misc]
    """kombu's py-amqp connection, watched by the :class:`Connecting` set as the kombu
    connection's ``tidings_connecting`` (kombu sets ``client`` before calling connect())."""

    def connect(self, callback: Any = None) -> Any:
        connecting: Connecting | None = getattr(self.client, "tidings_connecting", None)
        if connecting is None:
            return super().connect(callback)
        with connecting.watch(self):
            return super().connect(callback)


class KombuTransport(kombu.transport.pyamqp.Transport):  # type: ignore[misc]
    """kombu's ``pyamqp`` transport with watched connects: ``kombu.Connection(transport=...)``."""

    Connection = _Connection
