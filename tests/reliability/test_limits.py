"""Resource limits of the RabbitMQ drivers (rabbit:// and amqp://), on the broker on
127.0.0.1:5672 (fresh vhost per test; no private node needed):

* bodies over max_message_size are refused as they arrive: the peak RSS (VmHWM) of a listener
  in its own process (limits_child.py) stays bounded while it refuses six 100 MiB bodies with a
  16 MiB limit (before: 350 MB for rabbit://, 635 MB for amqp://; see docs/reliability.md);
* ``transport.cleanup()`` returns within about a second while a connect is in progress to a
  broker that accepted the TCP connection and never answers (before: up to connect_timeout),
  and the connect in progress ends too.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import amqp
import pytest

import tidings
from tidings import Target
from tidings.testing.brokers import rabbit_vhost, require_service
from tidings.transports import envelope
from tidings.transports.base import Binding

CHILD = Path(__file__).with_name("limits_child.py")
MIB = 1024 * 1024


@pytest.fixture
def vhost() -> Iterator[str]:
    require_service("rabbitmq")
    with rabbit_vhost("tidings-limits") as name:
        yield name


def _good(key: str) -> tuple[str, bytes]:
    message_id = str(uuid.uuid4())
    return message_id, envelope.encode({
        "message_id": message_id, "publisher_id": "test", "event_type": "limits.test",
        "priority": "INFO", "payload": {"key": key}, "timestamp": "2026-01-01 00:00:00"})


@pytest.mark.parametrize("scheme,bound_mb", [("rabbit", 32), ("amqp", 48)])
def test_large_bodies_are_refused_without_reading_them_whole(
        vhost: str, scheme: str, bound_mb: int, figures: Any) -> None:
    topic = f"rss-{uuid.uuid4().hex[:8]}"
    child = subprocess.Popen(
        [sys.executable, str(CHILD), f"{scheme}://guest:guest@127.0.0.1:5672/{vhost}", topic],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "READY"
        conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest",
                               virtual_host=vhost)
        conn.connect()
        try:
            ch = conn.channel()
            big = b"x" * (100 * MIB)
            for i in range(6):
                ch.basic_publish(amqp.Message(big, message_id=f"big-{i}"),
                                 exchange="openstack", routing_key=f"{topic}.info")
            del big
            message_id, body = _good("end")
            ch.basic_publish(amqp.Message(body, message_id=message_id),
                             exchange="openstack", routing_key=f"{topic}.info")
        finally:
            conn.close()
        line = child.stdout.readline().split()
        assert line and line[0] == "PEAK", f"the listener did not finish: {line}"
        baseline, peak, keys = int(line[1]) // 1024, int(line[2]) // 1024, line[3]
        assert keys == "end"
        figures(f"{scheme} 6x100MiB over 16MiB limit", sent=7, processed=1, duplicates=0,
                lost=0, recovery_s=None, baseline_mb=baseline, peak_mb=peak)
        assert peak - baseline < bound_mb, f"peak RSS {peak} MB over a baseline of {baseline}"
    finally:
        child.kill()
        child.wait(10)


class BlackHole:
    """A listening socket on loopback that accepts and never answers. With ``forward_091``,
    AMQP 0-9-1 connections (header ``AMQP\\0\\0\\9\\1``) are passed to the broker and only AMQP
    1.0 ones are held: amqp:// declares over 0-9-1 before it opens its AMQP 1.0 connection."""

    def __init__(self, forward_091: bool = False) -> None:
        self.forward = forward_091
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.held.append(conn)
            if self.forward:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        head = b""
        while len(head) < 8:
            chunk = conn.recv(8 - len(head))
            if not chunk:
                return
            head += chunk
        if head[4] != 0:  # AMQP 1.0 (or its SASL layer): held, never answered
            return
        up = socket.create_connection(("127.0.0.1", 5672))
        self.held.append(up)
        up.sendall(head)
        threading.Thread(target=self._pipe, args=(conn, up), daemon=True).start()
        self._pipe(up, conn)

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while chunk := a.recv(65536):
                b.sendall(chunk)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()
        for s in self.held:
            s.close()


@pytest.mark.parametrize("scheme,forward,action", [
    ("rabbit", False, "send"), ("rabbit", False, "listen"),
    ("amqp", False, "send"), ("amqp", False, "listen"),
    ("amqp", True, "send"), ("amqp", True, "listen"),
])
def test_cleanup_returns_promptly_while_connecting(scheme: str, forward: bool,
                                                   action: str) -> None:
    if forward:
        require_service("rabbitmq")
    hole = BlackHole(forward)
    t = tidings.get_notification_transport(
        f"{scheme}://guest:guest@127.0.0.1:{hole.port}/?connect_timeout=30")
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            if action == "send":
                t.send_raw(Target(topic="x.info"), b"{}", message_id="m", retry=0)
            else:
                t.listen([Binding("openstack", "x.info")], None, 10)
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=work, daemon=True)
    try:
        worker.start()
        deadline = time.monotonic() + 10
        while len(hole.held) < (2 if forward else 1) and time.monotonic() < deadline:
            time.sleep(0.02)  # until the connect is in progress (the 0-9-1 one done too)
        time.sleep(0.5)
        assert worker.is_alive(), f"the {action} did not wait for the broker: {outcome}"
        started = time.monotonic()
        t.cleanup()
        took = time.monotonic() - started
        assert took < 1.5, f"cleanup() took {took:.1f}s while connecting"
        worker.join(3.0)
        assert not worker.is_alive(), f"the {action} went on connecting after cleanup()"
        assert "error" in outcome
    finally:
        t.cleanup()
        hole.close()
