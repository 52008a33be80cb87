"""A small TCP proxy for fault tests: put it between a client and a broker, then cut or stall.

``cut()`` resets every proxied connection without a clean close (SO_LINGER 0 gives an RST, as a
dead peer or a firewall does), ``stall()`` keeps the sockets open but stops moving bytes (a hung
network: only heartbeats or timeouts notice), ``resume()`` moves bytes again, and
``refuse(True)`` makes new connections fail until ``refuse(False)``. Loopback only.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from types import TracebackType

__all__ = ["FaultProxy"]


class FaultProxy:
    """Forward 127.0.0.1:<port> to ``target``; see the module docstring for the faults."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.setblocking(False)
        self.port: int = self._server.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._server, selectors.EVENT_READ, None)
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._lock = threading.Lock()
        self._stalled = threading.Event()
        self._refusing = False
        self._stop = threading.Event()
        self._requests: list[tuple[list[int], threading.Event]] = []
        self.connections_made = 0
        self.cuts = 0
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- faults ------------------------------------------------------------------------------
    def cut(self, timeout: float = 5.0) -> int:
        """Reset every open proxied connection (no FIN: an RST). Returns how many.

        The proxy's own thread does the cutting (selectors are not thread-safe); this waits
        for it, at most ``timeout`` seconds.
        """
        done = threading.Event()
        result: list[int] = []
        with self._lock:
            self._requests.append((result, done))
        if not done.wait(timeout):
            raise TimeoutError("the proxy thread did not cut the connections in time")
        return result[0]

    def _cut_now(self) -> int:
        with self._lock:
            socks = list(self._pairs)
            self._pairs.clear()
        for sock in socks:
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            sock.close()
        self.cuts += 1
        return len(socks) // 2

    def stall(self) -> None:
        """Stop forwarding bytes in both directions; connections stay open."""
        self._stalled.set()

    def resume(self) -> None:
        self._stalled.clear()

    def refuse(self, on: bool = True) -> None:
        """While on, accept-and-reset new connections (the broker looks down)."""
        self._refusing = on

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs) // 2

    # -- plumbing ----------------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            client, _ = self._server.accept()
        except BlockingIOError:
            return
        if self._refusing:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._pairs[client] = upstream
            self._pairs[upstream] = client
        self._sel.register(client, selectors.EVENT_READ, None)
        self._sel.register(upstream, selectors.EVENT_READ, None)
        self.connections_made += 1

    def _close_pair(self, sock: socket.socket) -> None:
        with self._lock:
            peer = self._pairs.pop(sock, None)
            if peer is not None:
                self._pairs.pop(peer, None)
        for s in (sock, peer):
            if s is None:
                continue
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                requests, self._requests = self._requests, []
            for result, done in requests:
                result.append(self._cut_now())
                done.set()
            for key, _ in self._sel.select(timeout=0.05):
                sock = key.fileobj
                if sock is self._server:
                    self._accept()
                    continue
                if self._stalled.is_set():
                    continue
                with self._lock:
                    peer = self._pairs.get(sock)  # type: ignore[call-overload]
                if peer is None:
                    continue
                try:
                    data = sock.recv(65536)  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._close_pair(sock)  # type: ignore[arg-type]
                    continue
                try:
                    peer.setblocking(True)
                    peer.settimeout(5)
                    peer.sendall(data)
                    peer.setblocking(False)
                except OSError:
                    self._close_pair(sock)  # type: ignore[arg-type]
            if self._stalled.is_set():
                self._stop.wait(0.02)  # selectors report readiness constantly while stalled

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._cut_now()
        self._sel.close()
        self._server.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType]) -> None:
        self.close()
