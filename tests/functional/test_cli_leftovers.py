"""The tidings command leaves nothing of a run behind on a shared RabbitMQ, Ctrl-C or not.

Each test runs the commands in a fresh virtual host and then reads what is left with
``rabbitmqctl`` (no management plug-in needed): every queue the commands declared must carry an
expiry (``x-expires``) or be gone, and the exchanges must be the commands' fixed ones, the same
after any number of runs. Exchanges cannot expire and tidings' API has no call that deletes one,
so ``tidings demo`` and ``tidings bench`` each use one fixed exchange, left empty.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tidings.bench import bench_queue_expiry
from tidings.cli import DEMO_QUEUE_EXPIRY, LISTEN_POOL_EXPIRY
from tidings.testing.brokers import rabbit_vhost

FIXED_EXCHANGES = {"tidings-demo", "tidings-bench", "openstack"}
"""The demo's, the benchmark's, and the default exchange that listen (and oslo.messaging) use."""


@pytest.fixture
def vhost() -> Iterator[str]:
    with rabbit_vhost("tidings-leftovers") as name:
        yield name


def url_of(vhost: str, query: str = "") -> str:
    return f"rabbit://guest:guest@127.0.0.1:5672/{vhost}{query}"


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "tidings.cli", *args], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"tidings {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _ctl(*args: str) -> Any:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    proc = subprocess.run([exe, *args, "-q", "--formatter", "json"], capture_output=True,
                          text=True, timeout=60, check=True)
    return json.loads(proc.stdout or "[]")


def queues(vhost: str) -> dict[str, dict[str, Any]]:
    """Every queue of ``vhost`` -> its declare arguments ({"x-expires": 30000, ...})."""
    rows = _ctl("list_queues", "-p", vhost, "name", "arguments")
    return {row["name"]: {arg[0]: arg[-1] for arg in row["arguments"]} for row in rows}


def exchanges(vhost: str) -> set[str]:
    """The exchanges of ``vhost`` that someone declared (not the default or amq.* ones)."""
    names = {row["name"] for row in _ctl("list_exchanges", "-p", vhost, "name")}
    return {n for n in names if n and not n.startswith("amq.")}


def never_expiring(vhost: str) -> list[str]:
    return sorted(name for name, args in queues(vhost).items() if "x-expires" not in args)


class Listen:
    """``tidings listen`` in the background; ``stop()`` is Ctrl-C."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tidings.cli", "listen", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.banner = ""
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith("listening on"):
                self.banner = line
                self.ready.set()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(30)


def wait_until_gone(vhost: str, timeout: float = 40) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    left = queues(vhost)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = queues(vhost)
    return left


def test_demo_bench_and_listen_pool_leave_only_expiring_queues_and_fixed_exchanges(
        vhost: str) -> None:
    url = url_of(vhost)
    run("demo", url, "--count", "20")
    run("bench", url, "--messages", "300", "--pools", "2", "--compare", "raw")
    run("bench", url, "--messages", "300", "--pools", "1", "--compare", "oslo")
    tail = Listen(url, "--topic", "leftovers", "--pool", "debug")
    assert tail.ready.wait(30), "tidings listen did not start"
    assert f"expires {LISTEN_POOL_EXPIRY}s after the last member leaves" in tail.banner
    assert tail.stop() == 0

    left = queues(vhost)
    assert not never_expiring(vhost), f"queues that never expire: {never_expiring(vhost)}"
    assert left["debug"]["x-expires"] == LISTEN_POOL_EXPIRY * 1000
    demo = {n: a for n, a in left.items() if "demo-" in n}
    assert len(demo) == 3 and all(a["x-expires"] == DEMO_QUEUE_EXPIRY * 1000
                                  for a in demo.values()), demo  # group queue and two pools
    bench = {n: a for n, a in left.items() if n.startswith("bench-")}
    # per tidings run: the group queue and its pools; oslo's and the raw loop's were deleted
    assert len(bench) == (1 + 2) + (1 + 1), bench
    assert all(a["x-expires"] == bench_queue_expiry(300) * 1000 for a in bench.values())
    assert not [n for n in left if "oslo" in n or "raw-bench" in n], left

    first = exchanges(vhost)
    assert first <= FIXED_EXCHANGES, f"run-specific exchanges: {first - FIXED_EXCHANGES}"
    run("demo", url, "--count", "10")
    run("bench", url, "--messages", "100", "--pools", "1")
    assert exchanges(vhost) == first  # a second run adds none


def test_the_queues_are_deleted_by_the_broker_after_the_run(vhost: str) -> None:
    """The same runs with short expiries given in the URL (the URL's own queue_expiry wins):
    after a few seconds nothing is left but the fixed exchanges."""
    run("bench", url_of(vhost, "?queue_expiry=5"), "--messages", "100", "--pools", "1")
    tail = Listen(url_of(vhost, "?queue_expiry=1"), "--topic", "gone", "--pool", "gone-tail")
    assert tail.ready.wait(30)
    assert "expires" not in tail.banner  # the URL decided
    assert tail.stop() == 0
    assert queues(vhost), "the runs declared no queue at all?"
    left = wait_until_gone(vhost)
    assert not left, f"queues still there 40 s after the runs: {left}"
    assert exchanges(vhost) <= FIXED_EXCHANGES


def test_ctrl_c_during_bench_leaves_only_expiring_queues(vhost: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tidings.cli", "bench", url_of(vhost),
                             "--messages", "200000", "--pools", "1", "--progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    publishing = threading.Event()

    def watch() -> None:
        assert proc.stderr is not None
        while True:
            chunk = proc.stderr.read(64)
            if not chunk:
                return
            if "publish" in chunk:
                publishing.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert publishing.wait(60), "the benchmark never started publishing"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    left = queues(vhost)
    assert left, "the run declared no queue?"
    assert not never_expiring(vhost), never_expiring(vhost)
    assert exchanges(vhost) <= FIXED_EXCHANGES


def test_an_old_bench_queue_without_expiry_does_not_break_bench(vhost: str) -> None:
    """Earlier versions left bench.info without an expiry; a bench with queue_expiry=60 then
    failed with PRECONDITION_FAILED. Runs now name their queues for the run."""
    run("notify", url_of(vhost), "--exchange", "tidings-bench", "--topic", "bench",
        "--event-type", "old.leftover")
    assert "x-expires" not in queues(vhost)["bench.info"]
    proc = run("bench", url_of(vhost, "?queue_expiry=60"), "--messages", "100", "--pools", "1")
    assert "tidings rabbit" in proc.stdout


def test_listen_pool_over_a_queue_declared_without_expiry_says_how_to_join_it(
        vhost: str) -> None:
    old = Listen(url_of(vhost, "?queue_expiry=0"), "--topic", "t", "--pool", "legacy")
    assert old.ready.wait(30)
    assert old.stop() == 0
    proc = subprocess.run([sys.executable, "-m", "tidings.cli", "listen", url_of(vhost),
                           "--topic", "t", "--pool", "legacy"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "add queue_expiry=0 to the URL" in lines[0] and "'legacy'" in lines[0]
    joined = Listen(url_of(vhost, "?queue_expiry=0"), "--topic", "t", "--pool", "legacy")
    assert joined.ready.wait(30)
    assert joined.stop() == 0
