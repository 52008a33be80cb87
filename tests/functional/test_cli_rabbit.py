"""The tidings command against the real RabbitMQ, as a subprocess: listen, notify, demo, bench."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

import tidings
from tidings.testing.brokers import rabbit_vhost


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with rabbit_vhost("tidings-cli") as vhost:
        yield f"rabbit://guest:guest@127.0.0.1:5672/{vhost}"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tidings.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


class Tail:
    """``tidings listen`` in the background, its stdout lines collected as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tidings.cli", "listen", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.banner = ""
        self.cond = threading.Condition()
        self.ready = threading.Event()
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith("listening on"):
                self.banner = line
                self.ready.set()

    def wait_lines(self, n: int, timeout: float = 30) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.lines) >= n, timeout)


def test_listen_in_a_pool_prints_json_lines_and_filters(url: str) -> None:
    tail = Tail(url, "--topic", "cli", "--exchange", "cli-ex", "--pool", "cli-tail", "--json",
                "--filter", r"event_type=^compute\.", "--count", "2")
    assert tail.ready.wait(30), "tidings listen did not start"
    assert "as a member of pool 'cli-tail'" in tail.banner
    for event in ("compute.a", "volume.b", "compute.c"):
        sent = run("notify", url, "--topic", "cli", "--exchange", "cli-ex", "--event-type",
                   event, "--payload", json.dumps({"e": event}))
        assert sent.returncode == 0, sent.stderr
    assert tail.wait_lines(2)
    assert tail.proc.wait(30) == 0  # --count 2 reached: it stops by itself
    got = [json.loads(line) for line in tail.lines]
    assert [g["event_type"] for g in got] == ["compute.a", "compute.c"]
    assert got[0]["payload"] == {"e": "compute.a"} and got[0]["priority"] == "info"


def test_ctrl_c_acknowledges_nothing_unprinted(url: str) -> None:
    tail = Tail(url, "--topic", "cli2", "--count", "1")
    assert tail.ready.wait(30)
    assert "no-pool group" in tail.banner
    transport = tidings.get_notification_transport(url)
    notifier = tidings.Notifier(transport, "p", topics=["cli2"])
    for i in range(5):
        notifier.info({}, "e", {"i": i})
    assert tail.wait_lines(1)
    assert tail.proc.wait(30) == 0
    # The other four were not printed, so they were not acknowledged: still in the queue.
    got: list[int] = []
    done = threading.Event()

    class Rest:
        def info(self, ctxt: object, pub: object, et: object, payload: dict, md: object) -> None:
            got.append(payload["i"])
            if len(got) == 4:
                done.set()

    listener = tidings.get_notification_listener(transport, [tidings.Target(topic="cli2")],
                                                 [Rest()])
    listener.start()
    assert done.wait(30)
    listener.stop()
    assert listener.wait(30)
    transport.cleanup()
    printed = json.loads(tail.lines[0][tail.lines[0].index("{"):])["i"]
    assert len(got) == 4 and sorted([*got, printed]) == [0, 1, 2, 3, 4]


def test_sigint_stops_listen_cleanly(url: str) -> None:
    tail = Tail(url, "--topic", "cli3", "--pool", "p3")
    assert tail.ready.wait(30)
    tail.proc.send_signal(signal.SIGINT)
    assert tail.proc.wait(30) == 0


def test_demo_and_bench_on_rabbit(url: str, tmp_path: os.PathLike[str]) -> None:
    demo = run("demo", url, "--count", "40")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "all pool guarantees hold" in demo.stdout
    assert "?queue_expiry=30 " in demo.stdout  # its queues go away after the run
    out = os.path.join(tmp_path, "b.json")
    bench = run("bench", url, "--messages", "300", "--compare", "raw", "--json", out,
                timeout=300)
    assert bench.returncode == 0, bench.stderr
    results = json.load(open(out))
    assert [r["name"] for r in results] == ["tidings rabbit", "raw py-amqp"]
    assert all(r["drain_rate"] > 0 and r["publish_rate"] > 0 for r in results)


def _queues(vhost: str) -> list[str]:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    proc = subprocess.run([exe, "list_queues", "-q", "-p", vhost, "name"], capture_output=True,
                          text=True, timeout=60, check=True)
    return [line for line in proc.stdout.split() if line != "name"]


def test_demo_leaves_no_queues_behind() -> None:
    """A demo run declares a group queue and two pools named for the run; with queue_expiry
    (here 1 s instead of the demo's 30) the broker deletes them once the run is over, so
    running the demo again and again does not pile up queues."""
    with rabbit_vhost("tidings-cli-demo") as vhost:
        demo = run("demo", f"rabbit://guest:guest@127.0.0.1:5672/{vhost}?queue_expiry=1",
                   "--count", "10")
        assert demo.returncode == 0, demo.stdout + demo.stderr
        left = _queues(vhost)
        assert len(left) == 3 and all("demo-" in q for q in left), left  # group and 2 pools
        gone = threading.Event()
        deadline = time.monotonic() + 30
        while left and time.monotonic() < deadline:
            gone.wait(0.5)
            left = _queues(vhost)
        assert not left, f"queues still there 30 s after the demo: {left}"


def test_unreachable_broker_is_one_line(url: str) -> None:
    proc = run("notify", "rabbit://guest:s3cret-pw@127.0.0.1:1/", "--event-type", "e",
               "--retry", "0")
    assert proc.returncode == 2
    assert "s3cret-pw" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
