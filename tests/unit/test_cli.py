"""The tidings command, driven as a real subprocess (brokerless parts; the broker-backed
commands are tested in tests/functional/test_cli_rabbit.py and test_cli_leftovers.py, the
one-line errors in test_errors.py), the version, the package docstring and tidings.metrics."""

from __future__ import annotations

import doctest
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from typing import Any

import pytest

import tidings as tidings_api
from tidings import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    lines = proc.stdout.splitlines()
    header = lines[0].split()
    assert header[0] == "capability" and "memory" in header and "rabbit" in header
    pools = next(line for line in lines if line.startswith("pools ")).split()
    assert pools[header.index("memory")] == "yes"
    assert max(len(line) for line in lines) <= 100, "tidings drivers must fit 100 columns"


def test_drivers_fits_100_columns_with_many_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    from tidings.drivers.memory import MemoryDriver

    schemes = ["memory"] + [f"plugin-number-{i}" for i in range(9)]
    monkeypatch.setattr(cli, "available_drivers", lambda: schemes)
    monkeypatch.setattr(cli, "load_driver_class", lambda scheme: MemoryDriver)
    out = io.StringIO()
    assert cli.run_drivers(out) == 0
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 100
    for scheme in schemes:  # every scheme in some block of columns
        assert re.search(rf"\b{re.escape(scheme)}\b", text), scheme


def test_help_lists_the_public_commands_only() -> None:
    proc = tidings("--help")
    assert proc.returncode == 0, proc.stderr
    assert "{demo,drivers,listen,notify,bench}" in proc.stdout
    assert "_member" not in proc.stdout and "SUPPRESS" not in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["notify", "nosuch://h", "--event-type", "e"], "no tidings driver for scheme 'nosuch'"),
    (["notify", "rabbit://u:hunter2@h:bad/", "--event-type", "e"], "a port must be a number"),
    (["notify", "memory://?bogus=1", "--event-type", "e"], "unknown option 'bogus'"),
    (["notify", "memory://", "--event-type", "e", "--payload", "{nope"], "not valid JSON"),
    (["notify", "memory://", "--event-type", "e", "--payload", "@/no/such/file"],
     "cannot read the file"),
    (["listen", "zmq://", "--topic", "t", "--filter", "colour=red"], "FIELD is"),
    (["listen", "memory://", "--topic", "t"], "inside this process"),
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


@pytest.mark.parametrize("args", [
    ["--verbose", "notify", "nosuch://h", "--event-type", "e"],
    ["notify", "nosuch://h", "--event-type", "e", "--verbose"],
    ["notify", "-v", "nosuch://h", "--event-type", "e"],
])
def test_verbose_shows_the_traceback_before_or_after_the_command(args: list[str]) -> None:
    proc = tidings(*args)
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


# -- version ----------------------------------------------------------------------------------

def test_version_has_one_source() -> None:
    with open(os.path.join(ROOT, "tidings", "_version.py"), encoding="utf-8") as fh:
        written = re.search(r'^__version__ = "([^"]+)"$', fh.read(), re.MULTILINE)
    assert written is not None
    assert tidings_api.__version__ == written.group(1)
    proc = tidings("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tidings {tidings_api.__version__}"
    setup = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr
    assert setup.stdout.strip().splitlines()[-1] == tidings_api.__version__


# -- help(tidings) --------------------------------------------------------------------------

def test_package_docstring_example_runs() -> None:
    assert tidings_api.__doc__ is not None and ">>> " in tidings_api.__doc__
    result = doctest.testmod(tidings_api, verbose=False, report=True)
    assert result.attempted >= 8 and result.failed == 0


# -- --priority warning -----------------------------------------------------------------------

@pytest.mark.parametrize("given", ["warning", "WARN", "warn"])
def test_notify_takes_warning_for_warn(given: str) -> None:
    proc = tidings("notify", "memory://", "--topic", "t", "--event-type", "x.y",
                   "--priority", given)
    assert proc.returncode == 0, proc.stderr
    assert "sent 1 warn notification(s) 'x.y' to openstack/t.warn" in proc.stdout


# -- listen and bench without leftovers, in-process checks ----------------------------------

def test_listen_pool_queue_expires_where_the_driver_takes_queue_expiry() -> None:
    import argparse

    def url_for(url: str, pool: str | None) -> tuple[str, bool]:
        return cli._listen_url(argparse.Namespace(url=url, pool=pool))

    rabbit = "rabbit://guest:guest@127.0.0.1:5672/"
    assert url_for(rabbit, "debug") == (f"{rabbit}?queue_expiry={cli.LISTEN_POOL_EXPIRY}", True)
    assert url_for(rabbit, None) == (rabbit, False)  # the group's queues are everyone's
    assert url_for(f"{rabbit}?queue_expiry=0", "debug") == (f"{rabbit}?queue_expiry=0", False)
    assert url_for("memory://", "debug") == ("memory://", False)  # no such option


def test_bench_and_demo_name_their_queues_per_run_on_one_exchange() -> None:
    from tidings import bench

    assert bench.bench_queue_expiry(5000) == 110 and bench.bench_queue_expiry(1) == 61
    work = bench.Workload("memory://", messages=10, pools=2)
    one, two = bench._TidingsAdapter(work), bench._TidingsAdapter(work)
    try:
        assert one.target.exchange == two.target.exchange == "tidings-bench"
        assert one.target.topic != two.target.topic
        assert one.notifier.topics == [one.target.topic]
    finally:
        one.close()
        two.close()


def test_plot_option_is_checked_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from tidings import bench

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    ran: list[Any] = []
    monkeypatch.setattr(bench, "run_tidings", lambda work: ran.append(work))
    with pytest.raises(RuntimeError, match=r"pip install 'tidings\[plot\]'"):
        cli.run_bench(cli._parser().parse_args(["bench", "memory://", "--plot", "x.png"]),
                      io.StringIO())
    assert not ran


# -- metrics ----------------------------------------------------------------------------------

def _listener_and_notifier() -> tuple[Any, Any, Any, threading.Event]:
    transport = tidings_api.get_notification_transport("memory:///metrics-" + os.urandom(4).hex())
    got = threading.Event()

    class Sink:
        def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                 metadata: Any) -> None:
            got.set()

    listener = tidings_api.get_notification_listener(
        transport, [tidings_api.Target(topic="m")], [Sink()], pool="audit")
    listener.start()
    notifier = tidings_api.Notifier(transport, "api.host1", topics=["m"])
    return transport, listener, notifier, got


def _sample(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name}{{{labels}}} not in:\n{text}"
    return float(match.group(1))


def test_metrics_render_listener_and_notifier_statistics() -> None:
    pytest.importorskip("prometheus_client")
    from tidings.metrics import LISTENER_METRICS, NOTIFIER_METRICS, StatsCollector, render

    transport, listener, notifier, got = _listener_and_notifier()
    try:
        notifier.info({}, "e", {"n": 1})
        assert got.wait(10)
        listener.stop()
        assert listener.wait(10)
        collector = StatsCollector()
        collector.watch_listener(listener)
        collector.watch_notifier(notifier)
        text = render(collector)
    finally:
        transport.cleanup()
    lab, nab = 'listener="audit"', 'notifier="api.host1"'
    assert _sample(text, "tidings_listener_received_total", lab) == 1
    assert _sample(text, "tidings_listener_acknowledged_total", lab) == 1
    assert _sample(text, "tidings_listener_in_flight", lab) == 0
    assert _sample(text, "tidings_listener_handler_seconds_count", lab) == 1
    assert _sample(text, "tidings_listener_handler_seconds_sum", lab) >= 0
    assert _sample(text, "tidings_notifier_sent_total", nab) == 1
    assert _sample(text, "tidings_notifier_send_seconds_count", nab) == 1
    assert "# TYPE tidings_listener_received_total counter" in text
    assert "# TYPE tidings_listener_in_flight gauge" in text
    assert "# TYPE tidings_listener_handler_seconds summary" in text
    # every metric the module declares is in the output and in docs/metrics.md
    with open(os.path.join(ROOT, "docs", "metrics.md"), encoding="utf-8") as fh:
        doc = fh.read()
    for suffix, mtype, _, _ in LISTENER_METRICS + NOTIFIER_METRICS:
        name = f"tidings_{suffix}" + ("_total" if mtype == "counter" else "")
        assert f"# TYPE tidings_{suffix}" in text
        assert f"`{name}`" in doc, f"{name} is not documented in docs/metrics.md"


def test_metrics_add_up_listeners_watched_under_one_name() -> None:
    pytest.importorskip("prometheus_client")
    from tidings.metrics import StatsCollector, render
    from tidings.transports.stats import ConsumerStats

    a, b = ConsumerStats(), ConsumerStats()
    a.received(2)
    b.received(3)
    a.handled(0.5)
    b.handled(0.25)
    collector = StatsCollector()
    collector.watch_listener(a, "pool")
    collector.watch_listener(b, "pool")
    text = render(collector)
    assert _sample(text, "tidings_listener_received_total", 'listener="pool"') == 5
    assert _sample(text, "tidings_listener_handler_seconds_count", 'listener="pool"') == 2
    assert _sample(text, "tidings_listener_handler_seconds_sum", 'listener="pool"') == 0.75
    assert _sample(text, "tidings_listener_handler_seconds_max", 'listener="pool"') == 0.5
    collector.forget(b)
    assert _sample(render(collector), "tidings_listener_received_total", 'listener="pool"') == 2


def test_listen_metrics_port_serves_prometheus_text() -> None:
    pytest.importorskip("prometheus_client")
    proc = subprocess.Popen([sys.executable, "-m", "tidings.cli", "listen",
                             f"zmq:///metrics-{uuid.uuid4().hex[:8]}",
                             "--topic", "t", "--pool", "tail", "--metrics-port", "0",
                             "--metrics-addr", "127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        url = None
        for _ in range(5):
            line = proc.stderr.readline()
            if line.startswith("metrics: "):
                url = line.split()[1]
                break
        assert url is not None and url.startswith("http://127.0.0.1:"), url
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        assert _sample(text, "tidings_listener_received_total", 'listener="tail"') == 0
        assert "# TYPE tidings_listener_handler_seconds summary" in text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
