"""What the fault tests share: recording endpoints and senders that keep times, listener child
processes, a private redis-server, a throw-away CA, log watchers and the process's RSS.

Everything here records *when* things happened as well as *what*, because the figures the
reliability report asks for (recovery time, the gap after a restart) are differences of those
times; and every wait is on an event or a condition with a bound, so a broken driver fails a test
instead of hanging it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

import tidings
from tidings.testing.brokers import in_ci
from tidings.testing.checker import DeliveryLog, DeliveryReport
from tidings.testing.managed import free_port

__all__ = [
    "CHILD_SCRIPT",
    "WAIT",
    "ListenerProcess",
    "LogWatch",
    "Recorder",
    "RedisServer",
    "SendStream",
    "first_after",
    "free_port",
    "make_pki",
    "rss_bytes",
    "started",
    "summary",
    "uid",
    "unavailable",
    "wait_until",
]

WAIT = 60.0
"""The bound on every wait. A healthy run needs a few seconds; a node restart about 15."""

CHILD_SCRIPT = Path(__file__).with_name("listener_child.py")


def uid() -> str:
    return uuid.uuid4().hex[:10]


def unavailable(msg: str) -> None:
    """Fail in CI (a fault test must run there), skip on a laptop that lacks the tool."""
    if in_ci():
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT,
               every: float = 0.05) -> None:
    """Poll a condition we cannot be notified of (a broker's or a registry's state), bounded."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}", pytrace=False)
        pause.wait(every)


def first_after(times: Iterable[tuple[float, Hashable]], t0: float) -> float | None:
    """Seconds from ``t0`` to the first recorded time after it (None if there is none)."""
    later = [t for t, _ in times if t >= t0]
    return min(later) - t0 if later else None


def rss_bytes() -> int:
    """This process's resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- recording both ends ---------------------------------------------------------------------
class Recorder:
    """A notification endpoint that records each delivery and acknowledgement by payload key.

    ``delay`` is simulated work per message (it can be changed while running: the backlog test
    slows the consumer, then lets it drain). Returning None makes the core acknowledge the
    message right after, so an ``ack`` here means "processed"; a message processed twice shows up
    as duplicated in the checker.
    """

    def __init__(self, log: DeliveryLog, *, delay: float = 0.0) -> None:
        self.log = log
        self.delay = delay
        self.acks: list[tuple[float, Hashable]] = []
        self._lock = threading.Lock()

    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> None:
        key = payload["key"]
        self.log.delivered(key)
        if self.delay:
            time.sleep(self.delay)  # the work a real endpoint does; not a synchronisation
        with self._lock:
            self.acks.append((time.monotonic(), key))
        self.log.acked(key)

    def ack_times(self) -> list[tuple[float, Hashable]]:
        with self._lock:
            return list(self.acks)


class SendStream:
    """Send ``keys`` through one Notifier from ``threads`` threads, recording each outcome.

    A send that returned is logged ``sent`` with its time; one that raised
    MessageDeliveryFailure is logged ``send_failed`` (the checker counts it as recovered if it
    arrives anyway). ``pace`` spaces a thread's sends (seconds), for streams that must span a
    fault rather than finish before it.
    """

    def __init__(self, notifier: tidings.Notifier, log: DeliveryLog, keys: Sequence[int], *,
                 threads: int = 1, pace: float = 0.0, payload: dict[str, Any] | None = None,
                 ) -> None:
        self.notifier = notifier
        self.log = log
        self.keys = list(keys)
        self.pace = pace
        self.payload = payload or {}
        self.done: list[tuple[float, int]] = []
        self.failed: list[tuple[int, BaseException]] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._progress = threading.Condition(self._lock)
        self._threads = [threading.Thread(target=self._run, args=(self.keys[i::threads],),
                                          name=f"send-stream-{i}", daemon=True)
                         for i in range(threads)]

    def start(self) -> SendStream:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self, keys: list[int]) -> None:
        for key in keys:
            if self._stop.is_set():
                return
            try:
                self.notifier.info({}, "reliability.tick", {"key": key, **self.payload})
            except tidings.MessageDeliveryFailure as exc:
                self.log.send_failed(key)
                with self._lock:
                    self.failed.append((key, exc))
            except BaseException as exc:  # surfaced by the test through .errors
                with self._lock:
                    self.errors.append(exc)
                return
            else:
                now = time.monotonic()
                self.log.sent(key)
                with self._progress:
                    self.done.append((now, key))
                    self._progress.notify_all()
            if self.pace:
                self._stop.wait(self.pace)

    def wait_sent(self, count: int, timeout: float = WAIT) -> bool:
        """Wait until ``count`` sends have returned."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while len(self.done) < count:
                left = deadline - time.monotonic()
                if left <= 0 or not any(t.is_alive() for t in self._threads):
                    return len(self.done) >= count
                self._progress.wait(min(left, 0.5))
            return True

    def join(self, timeout: float = WAIT) -> bool:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def sent_keys(self) -> list[int]:
        with self._lock:
            return [k for _, k in self.done]

    def done_times(self) -> list[tuple[float, int]]:
        with self._lock:
            return list(self.done)


class LogWatch(logging.Handler):
    """Count log records whose message contains ``needle``; wait for a count (an event).

    Attached to ``logger`` for the duration of a ``with`` block, at ``level``.
    """

    def __init__(self, logger: str, needle: str = "", level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self.logger = logging.getLogger(logger)
        self.needle = needle
        self.records: list[logging.LogRecord] = []
        self._cond = threading.Condition()
        self._old_level = self.logger.level

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            with self._cond:
                self.records.append(record)
                self._cond.notify_all()

    @property
    def count(self) -> int:
        with self._cond:
            return len(self.records)

    def messages(self) -> list[str]:
        with self._cond:
            return [r.getMessage() for r in self.records]

    def wait_for(self, count: int, timeout: float = WAIT) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.records) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def __enter__(self) -> LogWatch:
        self.logger.addHandler(self)
        if self.logger.getEffectiveLevel() > self.level:
            self.logger.setLevel(self.level)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._old_level)


# -- a listener in a child process -----------------------------------------------------------
class ListenerProcess:
    """tests/reliability/listener_child.py in a child process, feeding a shared DeliveryLog.

    The child prints ``delivered K`` / ``processed K`` per message; ``processed`` is logged as
    an acknowledgement (the core acknowledges right after the endpoint returns, so a child killed
    in between shows up as a duplicate: at least once). ``hold_after=n``: after n messages the
    endpoint blocks on the next one ("holding K") until stopped or killed, so the child sits on
    unacknowledged messages.
    """

    def __init__(self, name: str, url: str, log: DeliveryLog, *, topic: str,
                 exchange: str | None = None, pool: str | None = None, prefetch: int = 16,
                 hold_after: int = -1) -> None:
        self.name = name
        self.log = log
        self.ready = threading.Event()
        self.holding = threading.Event()
        self.processed: list[tuple[float, int]] = []
        self.stderr: list[str] = []
        self._lock = threading.Lock()
        args = [sys.executable, str(CHILD_SCRIPT), url, "--topic", topic,
                "--prefetch", str(prefetch), "--hold-after", str(hold_after)]
        if exchange:
            args += ["--exchange", exchange]
        if pool:
            args += ["--pool", pool]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, name=f"{name}-out", daemon=True).start()
        threading.Thread(target=self._read_err, name=f"{name}-err", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            word, _, rest = line.strip().partition(" ")
            if word == "ready":
                self.ready.set()
            elif word == "delivered":
                self.log.delivered(int(rest))
            elif word == "holding":
                self.holding.set()
            elif word == "processed":
                with self._lock:
                    self.processed.append((time.monotonic(), int(rest)))
                self.log.acked(int(rest))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_ready(self, timeout: float = WAIT) -> None:
        if not self.ready.wait(timeout):
            pytest.fail(f"listener process {self.name} did not start within {timeout:.0f}s: "
                        f"{''.join(self.stderr[-20:])}", pytrace=False)

    def processed_keys(self) -> list[int]:
        with self._lock:
            return [k for _, k in self.processed]

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no close, no acknowledgement."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Ask it to stop (close its stdin), kill it if it does not within a bound."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


# -- a private redis-server ---------------------------------------------------------------------
class RedisServer:
    """A redis-server of our own on a free port, data in a temp dir, nothing saved to disk.

    ``kill()`` SIGKILLs it (everything is gone: no RDB, no AOF) and ``start()`` brings up an
    empty one on the same port, as an operator restarting a cache-like registry would.
    """

    def __init__(self, base_dir: Path, *extra: str) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            unavailable("redis-server is not installed, so no private Redis can be started "
                        "(apt-get install redis-server)")
        self.exe = str(exe)
        self.dir = base_dir
        self.port = free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        out = (self.dir / "redis.out").open("ab")
        try:
            self.proc = subprocess.Popen(
                [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
                 *self.extra],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        finally:
            out.close()
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                tail = (self.dir / "redis.out").read_text(errors="replace")[-2000:]
                pytest.fail(f"private redis-server exited ({proc.returncode}): {tail}",
                            pytrace=False)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
            except OSError:
                return False

        wait_until(answers, f"the private redis-server on port {self.port}", timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def url(self, query: str = "") -> str:
        return f"zmq+redis://127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# -- a throw-away CA ----------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> Path:
    """In ``d``: ca.pem, a server certificate naming only DNS:localhost (so connecting to
    127.0.0.1 is a hostname mismatch), client.pem/key, and another CA (other-ca.pem)."""
    if shutil.which("openssl") is None:
        unavailable("the openssl command is needed to make test certificates")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=tidings reliability CA", cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                 f"{name}.ext", cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-ca.key",
             "-out", "other-ca.pem", "-days", "2", "-subj", "/CN=another CA", cwd=d)
    return d


@contextlib.contextmanager
def started(listener: tidings.NotificationListener) -> Iterator[tidings.NotificationListener]:
    """Start a listener; stop it and wait (bounded) at the end."""
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()
        assert listener.wait(WAIT), "a listener did not stop"


def summary(report: DeliveryReport) -> dict[str, int]:
    """The checker's counts under the names the figures table uses."""
    c = report.counts
    return {"sent": c["sent_ok"], "processed": c["acknowledged"],
            "duplicates": c["duplicated"], "lost": c["lost"],
            "redelivered": c["redelivered"], "recovered": c["recovered"]}
