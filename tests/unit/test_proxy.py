"""The fault proxy the reliability tests rely on: it forwards, cuts, stalls and refuses."""

from __future__ import annotations

import socket
import threading

import pytest

from tidings.testing.proxy import FaultProxy


@pytest.fixture
def echo_server() -> tuple[str, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:  # the proxy reset us: that is the point of the test
                return

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[:2]
    server.close()


def _talk(port: int, data: bytes, timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return sock.recv(4096)


def test_forwards_cuts_stalls_and_refuses(echo_server: tuple[str, int]) -> None:
    with FaultProxy(echo_server) as proxy:
        assert _talk(proxy.port, b"hello") == b"hello"
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        sock.sendall(b"a")
        assert sock.recv(10) == b"a"
        assert proxy.cut() == 1
        with pytest.raises((ConnectionResetError, BrokenPipeError, OSError)):
            sock.sendall(b"b")
            if not sock.recv(10):
                raise ConnectionResetError("closed")
        sock.close()
        proxy.stall()
        with pytest.raises(socket.timeout):
            _talk(proxy.port, b"stalled", timeout=0.3)
        proxy.resume()
        assert _talk(proxy.port, b"again") == b"again"
        proxy.refuse(True)
        with pytest.raises(OSError):
            data = _talk(proxy.port, b"x", timeout=1)
            if not data:
                raise ConnectionResetError("refused")
        proxy.refuse(False)
        assert _talk(proxy.port, b"back") == b"back"
