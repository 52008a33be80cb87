"""Plain ``zmq://`` across processes with no configuration, as a new user tries it: ``tidings
listen zmq:// --topic t`` in one process and ``tidings notify zmq:// --topic t`` in another
(the registry is this user's sqlite file in $XDG_RUNTIME_DIR/tidings, here a temporary
directory both processes inherit), and a notify that finds no listener fails, saying so, instead
of printing "sent 1". Also: ``zmq:///name`` isolates a registry, ``zmq+memory://`` stays in one
process, and a host in a plain ``zmq://`` URL is refused.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tidings
from tidings import InvalidTransportURL, MessageDeliveryFailure, Target
from tidings.drivers.zmq import ZmqDriver
from tidings.transports.base import Binding

WAIT = 30.0  # the bound on every wait


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG_RUNTIME_DIR in tmp_path, for this process and the children it starts."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    return run


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tidings.cli", *args]


def registered(topic: str, url: str = "zmq://") -> dict[str, int]:
    t = tidings.get_notification_transport(url)
    try:
        drv = t._driver
        assert isinstance(drv, ZmqDriver)
        return drv.registered("openstack", f"{topic}.info")
    finally:
        t.cleanup()


class Listen:
    """``tidings listen zmq:// --topic <topic>`` in a child process; its output collected."""

    def __init__(self, topic: str) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(cli("listen", "zmq://", "--topic", topic),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def wait_for(self, text: str) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: any(text in line for line in self.lines), WAIT):
                pytest.fail(f"tidings listen never printed {text!r}: {''.join(self.lines)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)


@pytest.fixture
def listeners() -> Iterator[list[Listen]]:
    started: list[Listen] = []
    yield started
    for lst in started:
        lst.stop()


def wait_registered(topic: str, lst: Listen) -> None:
    deadline = time.monotonic() + WAIT
    while registered(topic) != {"": 1}:
        if time.monotonic() > deadline or lst.proc.poll() is not None:
            pytest.fail(f"the listener never registered: {''.join(lst.lines)}")
        time.sleep(0.05)


@pytest.mark.slow
def test_listen_and_notify_on_plain_zmq_in_two_processes(runtime: Path,
                                                         listeners: list[Listen]) -> None:
    lst = Listen("t")
    listeners.append(lst)
    wait_registered("t", lst)
    registry = runtime / "tidings"
    assert (registry / "registry.db").exists()
    assert registry.stat().st_mode & 0o777 == 0o700
    sent = subprocess.run(cli("notify", "zmq://", "--topic", "t", "--event-type",
                              "demo.crossed", "--payload", '{"n": 1}'),
                          capture_output=True, text=True, timeout=WAIT)
    assert sent.returncode == 0, sent.stderr
    lst.wait_for("demo.crossed")


@pytest.mark.slow
def test_notify_with_no_listener_fails_and_says_why(runtime: Path) -> None:
    began = time.monotonic()
    sent = subprocess.run(cli("notify", "zmq://", "--topic", "nobody", "--event-type", "x.y",
                              "--retry", "1"), capture_output=True, text=True, timeout=WAIT)
    assert sent.returncode != 0, sent.stdout
    assert "no listener is registered for openstack/nobody.info" in sent.stderr, sent.stderr
    assert "stores nothing" in sent.stderr and "sent 1" not in sent.stdout
    assert time.monotonic() - began < WAIT


def test_a_virtual_host_isolates_a_registry_in_the_default_file(runtime: Path) -> None:
    a = tidings.get_notification_transport("zmq:///a")
    try:
        lst = a._driver.listen([Binding("openstack", "t.info")], None, 4)
        try:
            assert registered("t", "zmq:///a") == {"": 1}
            assert registered("t", "zmq:///b") == {}
            assert registered("t") == {}
            assert "namespace='tidings/a'" in a._driver.describe()
            assert str(runtime / "tidings" / "registry.db") in a._driver.describe()
        finally:
            lst.close()
    finally:
        a.cleanup()


def test_zmq_memory_stays_in_the_process_and_hosts_are_refused(runtime: Path) -> None:
    t = tidings.get_notification_transport("zmq+memory:///mem?wait_for_listener=false")
    try:
        assert t._driver.matchmaker.name == "memory"  # type: ignore[attr-defined]
        assert not (runtime / "tidings").exists()  # the default registry was never made
        with pytest.raises(MessageDeliveryFailure, match="no listener is registered"):
            t.send_raw(Target(topic="nobody", exchange="ex"), b"{}", message_id="m", retry=0)
    finally:
        t.cleanup()
    with pytest.raises(InvalidTransportURL, match="zmq:// takes no host"):
        tidings.get_notification_transport("zmq://somehost/")
