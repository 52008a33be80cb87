"""The zmq driver across processes: listeners in child processes registered through the sqlite
and the Redis matchmaker, the default registry of plain ``zmq://`` (this user's sqlite file in
$XDG_RUNTIME_DIR/tidings, pointed at a temporary directory), and sqlite with CURVE (one URL for
every process, sender or listener), a notifier in the test process.

Covered: pools and the no-pool group split (every group once, members share), an even split
of what is sent right after the members registered (connect_grace), exchange isolation, a
listener SIGKILLed mid-stream (its unacknowledged messages reach the other member, nothing is
lost), and TTL expiry (a frozen listener drops out of the registry, new messages go to the live
member, and what the frozen one held is resent after ack_timeout).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tidings
from tidings.matchmaker.base import get_matchmaker
from tidings.testing.brokers import require_service

WAIT = 30.0  # the bound on every wait; a healthy run needs a few seconds at most

CHILD = r"""
import sys, threading, time
import tidings
from tidings import Target

url, exchange, topic, pool, delay, prefetch = sys.argv[1:7]
delay = float(delay)
transport = tidings.get_notification_transport(url)
out = threading.Lock()


class Endpoint:
    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        if delay:
            time.sleep(delay)  # the work a real endpoint would do
        with out:  # endpoints run on a pool of threads: one whole line at a time
            sys.stdout.write(f"got {payload['i']}\n")
            sys.stdout.flush()


listener = tidings.get_notification_listener(
    transport, [Target(topic=topic, exchange=exchange)], [Endpoint()],
    pool=None if pool == "-" else pool, prefetch=int(prefetch))
listener.start()
print("ready", flush=True)
sys.stdin.read()  # the test closes our stdin to stop us
listener.stop()
listener.wait(10)
transport.cleanup()
print("bye", flush=True)
"""


class Child:
    """A listener process; what it handled is collected by a reader thread."""

    def __init__(self, name: str, url: str, *, exchange: str = "ex",
                 topic: str = "notifications", pool: str | None = None, delay: float = 0.0,
                 prefetch: int = 16) -> None:
        self.name = name
        self.cond = threading.Condition()
        self.handled: list[int] = []
        self.ready = threading.Event()
        self.err: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, url, exchange, topic, pool or "-",
             str(delay), str(prefetch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if parts == ["ready"]:
                self.ready.set()
            elif len(parts) == 2 and parts[0] == "got" and parts[1].isdigit():
                with self.cond:
                    self.handled.append(int(parts[1]))
                    self.cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def wait_ready(self) -> None:
        if not self.ready.wait(WAIT):
            pytest.fail(f"listener process {self.name} did not start: {''.join(self.err)}")

    def ids(self) -> list[int]:
        with self.cond:
            return list(self.handled)

    def freeze(self) -> None:
        """SIGSTOP the process and wait until the kernel reports it stopped: kill() returns
        before every thread has stopped, and on a loaded machine a listener was seen handling
        messages sent tens of milliseconds after it."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        status: list[int] = []
        stopped = threading.Event()

        def wait() -> None:
            status.append(os.waitpid(self.proc.pid, os.WUNTRACED)[1])
            stopped.set()

        threading.Thread(target=wait, daemon=True).start()
        if not stopped.wait(WAIT):
            pytest.fail(f"listener process {self.name} did not stop within {WAIT}s of SIGSTOP")
        assert os.WIFSTOPPED(status[0]), f"{self.name} ended instead of stopping: {status[0]}"

    def ask_to_stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except (OSError, BrokenPipeError):
                self.proc.kill()

    def wait_stopped(self) -> None:
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)


def wait_until(condition: Callable[[], bool], what: str, children: list[Child],
               timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            counts = {c.name: len(c.ids()) for c in children}
            errors = "".join(line for c in children for line in c.err[-5:])
            pytest.fail(f"timed out after {timeout}s waiting for {what}; handled: {counts}; "
                        f"stderr tails: {errors}")
        time.sleep(0.02)


@pytest.fixture(params=["sqlite", "redis", "default", "curve"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A URL for a fresh registry: an sqlite file in tmp_path, a fresh Redis namespace, plain
    zmq:// with XDG_RUNTIME_DIR (which the children inherit) in tmp_path, or an sqlite file
    with CURVE keys made in tmp_path."""
    if request.param == "sqlite":
        yield f"zmq+sqlite:///{tmp_path}/registry.db?ttl=2"
        return
    if request.param == "default":
        (tmp_path / "run").mkdir()
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
        yield "zmq://?ttl=2"
        return
    if request.param == "curve":
        zmq_auth = pytest.importorskip("zmq.auth")
        keys, public = tmp_path / "keys", tmp_path / "public"
        keys.mkdir()
        public.mkdir()
        zmq_auth.create_certificates(str(keys), "deploy")
        (public / "deploy.key").write_bytes((keys / "deploy.key").read_bytes())
        yield (f"zmq+sqlite:///{tmp_path}/registry.db?ttl=2&curve_secret_key="
               f"{keys}/deploy.key_secret&curve_public_keys_dir={public}")
        return
    require_service("redis")
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield f"zmq+redis://127.0.0.1:6379/0?namespace={ns}&ttl=2"
    mm = get_matchmaker("redis", "zmq+redis://127.0.0.1:6379/0", ns)
    mm.purge()  # type: ignore[attr-defined]
    mm.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:  # all at once: each takes a moment to stop and clean up
        child.ask_to_stop()
    for child in started:
        child.wait_stopped()


def start(children: list[Child], *new: Child) -> None:
    children.extend(new)
    for child in new:
        child.wait_ready()


def send(url: str, ids: range, exchange: str = "ex") -> tidings.Transport:
    transport = tidings.get_notification_transport(url)
    notifier = tidings.Notifier(transport, publisher_id="parent", exchange=exchange,
                                raise_on_failure=True)
    for i in ids:
        notifier.info({}, "test.event", {"i": i})
    return transport


@pytest.mark.slow
def test_pools_no_pool_group_and_exchanges_across_processes(
        registry_url: str, children: list[Child]) -> None:
    w1 = Child("w1", registry_url, pool="workers", prefetch=4)
    w2 = Child("w2", registry_url, pool="workers", prefetch=4)
    plain = Child("plain", registry_url)
    other = Child("other", registry_url, exchange="other-exchange")
    start(children, w1, w2, plain, other)
    transport = send(registry_url, range(200))
    try:
        wait_until(lambda: len(w1.ids()) + len(w2.ids()) >= 200 and len(plain.ids()) >= 200,
                   "200 messages in the pool and in the no-pool group", children)
        assert sorted(w1.ids() + w2.ids()) == list(range(200)), "the pool got a wrong set"
        assert w1.ids() and w2.ids(), "pool members did not share the messages"
        assert sorted(plain.ids()) == list(range(200))
        assert other.ids() == [], "a listener on another exchange got messages"
        other_transport = send(registry_url, range(500, 520), exchange="other-exchange")
        other_transport.cleanup()
        wait_until(lambda: len(other.ids()) >= 20, "the other exchange's messages", children)
        assert sorted(other.ids()) == list(range(500, 520))
        assert len(plain.ids()) == 200 and len(w1.ids()) + len(w2.ids()) == 200
    finally:
        transport.cleanup()


def wait_handled(child: Child, n: int, children: list[Child]) -> None:
    """Wait (on the child's condition, bounded) until ``child`` handled at least ``n``."""
    with child.cond:
        if child.cond.wait_for(lambda: len(child.handled) >= n, WAIT):
            return
    counts = {c.name: len(c.ids()) for c in children}
    pytest.fail(f"timed out after {WAIT}s waiting for {child.name} to handle {n}; "
                f"handled: {counts}")


@pytest.mark.slow
def test_members_share_what_is_sent_right_after_they_registered(
        registry_url: str, children: list[Child]) -> None:
    """As in ``tidings demo --processes``: sent as soon as every member is registered, fewer
    messages than the prefetch. The sender's connections finish their handshakes one after
    the other; a member still handshaking keeps its turn (connect_grace), so the first one
    connected does not take them all."""
    m1 = Child("m1", registry_url, pool="workers", prefetch=64)
    m2 = Child("m2", registry_url, pool="workers", prefetch=64)
    start(children, m1, m2)
    transport = send(registry_url, range(20))
    try:
        wait_handled(m1, 10, children)
        wait_handled(m2, 10, children)
        assert sorted(m1.ids() + m2.ids()) == list(range(20))
        assert (len(m1.ids()), len(m2.ids())) == (10, 10)
    finally:
        transport.cleanup()


@pytest.mark.slow
def test_a_listener_killed_mid_stream_loses_nothing(registry_url: str,
                                                     children: list[Child]) -> None:
    victim = Child("victim", registry_url, pool="workers", delay=0.002, prefetch=8)
    survivor = Child("survivor", registry_url, pool="workers", delay=0.002, prefetch=8)
    start(children, victim, survivor)
    n = 400
    transport = send(registry_url, range(n))
    try:
        wait_until(lambda: len(victim.ids()) >= 30, "the victim to be busy", children)
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        wait_until(lambda: set(victim.ids()) | set(survivor.ids()) >= set(range(n)),
                   "every message handled by someone", children)
        handled = Counter(victim.ids() + survivor.ids())
        twice = {i for i, count in handled.items() if count > 1}
        # At least once: a message the victim handled may come again if its ack died with
        # it, but nothing else is duplicated and nothing is lost.
        assert twice <= set(victim.ids())
        assert len(survivor.ids()) > 0 and victim.proc.returncode == -signal.SIGKILL
        wait_until(lambda: transport._driver._sender.unacknowledged == 0,  # type: ignore
                   "the sender's window to drain", children)
    finally:
        transport.cleanup()


@pytest.mark.slow
def test_a_frozen_listener_expires_and_its_messages_move(registry_url: str,
                                                         children: list[Child]) -> None:
    url = registry_url.replace("ttl=2", "ttl=1&ack_timeout=2")
    frozen = Child("frozen", url, pool="workers", prefetch=4)
    alive = Child("alive", url, pool="workers", prefetch=4)
    start(children, frozen, alive)
    transport = send(url, range(40))
    mm = transport._driver.matchmaker  # type: ignore[attr-defined]
    try:
        wait_until(lambda: len(frozen.ids()) + len(alive.ids()) >= 40, "the first 40",
                   children)
        frozen.freeze()
        notifier = tidings.Notifier(transport, publisher_id="parent", exchange="ex",
                                    raise_on_failure=True)
        for i in range(100, 120):  # some go to the frozen member while it is still registered
            notifier.info({}, "test.event", {"i": i})
        wait_until(lambda: len(mm.lookup("ex", "notifications.info").get("workers", [])) == 1,
                   "the frozen listener's registration to expire", children)
        for i in range(200, 240):  # the registry now lists only the live member
            notifier.info({}, "test.event", {"i": i})
        expected = set(range(100, 120)) | set(range(200, 240))
        wait_until(lambda: expected <= set(alive.ids()),
                   "the live member to get everything sent after the freeze", children)
        assert not expected & set(frozen.ids())
        assert sorted(set(frozen.ids()) | set(alive.ids())) == sorted(
            set(range(40)) | expected)
    finally:
        frozen.proc.kill()
        transport.cleanup()
