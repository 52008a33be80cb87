"""The tidings command, driven as a real subprocess (brokerless parts; the broker-backed
commands are tested in tests/functional/test_cli_rabbit.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def tidings(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tidings.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_demo_on_memory_shows_the_split_and_checks_it() -> None:
    proc = tidings("demo", "--count", "40")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "all pool guarantees hold" in out
    for label in ("(no pool)", "audit", "billing"):
        assert out.count("ok   each notification reached exactly one member of " + label) == 1
    table = [line for line in out.splitlines()
             if line.startswith(("(no pool)", "audit", "billing"))]
    assert len(table) == 6  # two members in the group and in each pool
    assert sum(int(line.split()[-1]) for line in table) == 120  # 40 per group/pool


def test_drivers_lists_builtin_drivers_with_capabilities() -> None:
    proc = tidings("drivers")
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0]
    assert "pools" in header and "requeue" in header
    memory = next(line for line in proc.stdout.splitlines() if line.startswith("memory"))
    assert "yes" in memory


def test_help_lists_the_public_commands_only() -> None:
    proc = tidings("--help")
    assert proc.returncode == 0, proc.stderr
    assert "{demo,drivers,listen,notify,bench}" in proc.stdout
    assert "_member" not in proc.stdout and "SUPPRESS" not in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["notify", "nosuch://h", "--event-type", "e"], "no tidings driver for scheme 'nosuch'"),
    (["notify", "rabbit://u:hunter2@h:bad/", "--event-type", "e"], "port 'bad'"),
    (["notify", "memory://?bogus=1", "--event-type", "e"], "unknown option 'bogus'"),
    (["notify", "memory://", "--event-type", "e", "--payload", "{nope"], "not valid JSON"),
    (["notify", "memory://", "--event-type", "e", "--payload", "@/no/such/file"],
     "cannot read the file"),
    (["listen", "memory://", "--topic", "t", "--filter", "colour=red"], "FIELD is"),
    (["demo", "--count", "0"], "at least 1"),
])
def test_errors_are_one_line_without_traceback_or_password(args: list[str],
                                                           message: str) -> None:
    proc = tidings(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1


def test_verbose_shows_the_traceback() -> None:
    proc = tidings("--verbose", "notify", "nosuch://h", "--event-type", "e")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_notify_sends_count_notifications() -> None:
    proc = tidings("notify", "memory://", "--topic", "t", "--event-type", "x.y", "--count", "3",
                   "--payload", '{"a": 1}')
    assert proc.returncode == 0, proc.stderr
    assert "sent 3 info notification(s) 'x.y' to openstack/t.info" in proc.stdout


@pytest.mark.parametrize("command", ["demo", "drivers", "listen", "notify", "bench"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    proc = tidings(command, "--help")
    assert proc.returncode == 0
    assert "example:" in proc.stdout and f"tidings {command}" in proc.stdout


def test_bench_on_memory_writes_json(tmp_path: pytest.TempPathFactory) -> None:
    out = tmp_path / "bench.json"  # type: ignore[operator]
    proc = tidings("bench", "memory://", "--messages", "300", "--pools", "2", "--members", "2",
                   "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "publish/s" in proc.stdout and "tidings memory" in proc.stdout
    (result,) = json.loads(out.read_text())
    assert result["publish_rate"] > 0 and result["drain_rate"] > 0 and result["e2e_rate"] > 0
    assert result["latency_ms"]["p99"] >= result["latency_ms"]["p50"] >= 0
    assert not result["notes"]


def test_demo_across_processes_on_zmq_with_the_sqlite_matchmaker() -> None:
    proc = tidings("demo", "--processes", "--count", "30", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "listeners in separate processes" in proc.stdout
    assert "zmq driver" in proc.stdout
    pids = {line.split("pid")[1].split()[0] for line in proc.stdout.splitlines() if " pid " in line}
    assert len(pids) == 6  # every member its own process
    assert "all pool guarantees hold" in proc.stdout


def test_demo_processes_refuses_memory() -> None:
    proc = tidings("demo", "memory://", "--processes")
    assert proc.returncode == 2 and "lives inside one process" in proc.stderr


def test_bench_compare_raw_on_zmq_reports_a_ratio() -> None:
    proc = tidings("bench", "zmq://", "--messages", "300", "--compare", "raw", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "raw pyzmq push/pull" in proc.stdout
    assert "ratio tidings zmq / raw pyzmq push/pull: end to end" in proc.stdout


def test_bench_compare_raw_without_a_reference_says_so() -> None:
    proc = tidings("bench", "memory://", "--messages", "10", "--compare", "raw")
    assert proc.returncode == 2 and "no raw reference loop for memory://" in proc.stderr
