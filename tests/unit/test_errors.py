"""What a new user sees when something is wrong: one line that says what to do, no traceback.

Each test drives the ``tidings`` command as a subprocess, the way a user meets it; a library that
is "not installed" is hidden from that process (``sys.modules[name] = None``), so the tests run
with every extra installed.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tidings import cli
from tidings.transports.loader import did_you_mean, install_hint


def run(*args: str, hide: tuple[str, ...] = (), timeout: float = 60) -> \
        subprocess.CompletedProcess[str]:
    """``tidings ARGS`` in a new process in which the modules ``hide`` cannot be imported."""
    code = ("import sys\n"
            f"for name in {list(hide)!r}:\n"
            "    sys.modules[name] = None\n"
            "from tidings.cli import main\n"
            f"sys.exit(main({list(args)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single line of stderr of a failed command (asserting that there is just one)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- a typo in the scheme -----------------------------------------------------------------------

@pytest.mark.parametrize("scheme, meant", [("rabit", "rabbit"), ("rabbitmq", "rabbit"),
                                           ("memroy", "memory"), ("zqm", "zmq")])
def test_scheme_typo_says_did_you_mean(scheme: str, meant: str) -> None:
    line = one_line(run("notify", f"{scheme}://guest:pw@127.0.0.1/", "--event-type", "e"))
    assert f"no tidings driver for scheme {scheme!r} (did you mean {meant}://?)" in line
    assert "installed drivers:" in line and "pw@" not in line


def test_unknown_scheme_lists_the_installed_ones_without_a_guess() -> None:
    line = one_line(run("notify", "kafka://h/", "--event-type", "e"))
    assert "no tidings driver for scheme 'kafka'; installed drivers: " in line
    assert "did you mean" not in line and "memory" in line


def test_did_you_mean_only_suggests_close_names() -> None:
    assert did_you_mean("rabit", ["amqp", "memory", "rabbit", "zmq"]) == "rabbit"
    assert did_you_mean("RABBIT", ["rabbit"]) == "rabbit"
    assert did_you_mean("kafka", ["amqp", "memory", "rabbit", "zmq"]) is None


# -- a driver whose library is missing ----------------------------------------------------------

@pytest.mark.parametrize("url, hide, module, extra", [
    ("rabbit://h/", ("amqp", "kombu"), "'amqp'", "tidings[rabbit]"),
    ("amqp://h/", ("proton",), "'proton' (package python-qpid-proton)", "tidings[amqp1]"),
    ("zmq://", ("zmq",), "'zmq' (package pyzmq)", "tidings[zmq]"),
])
def test_missing_driver_library_names_the_one_extra_for_the_scheme(
        url: str, hide: tuple[str, ...], module: str, extra: str) -> None:
    line = one_line(run("notify", url, "--event-type", "e", hide=hide))
    scheme = url.split(":", 1)[0]
    assert line.startswith(f"tidings notify: error: the {scheme}:// driver cannot be loaded "
                           f"because the Python module {module} is not installed"), line
    assert line.endswith(f"install it with: pip install '{extra}'"), line
    others = {"tidings[rabbit]", "tidings[amqp1]", "tidings[zmq]"} - {extra}
    assert not any(other in line for other in others), line
    assert "No module named" not in line


def test_a_plugins_missing_library_is_named_from_its_own_requirements() -> None:
    class Dist:
        name = "tidings-kafka"
        requires = ["confluent-kafka>=2; extra == 'fast'", "kafka_python>=2.0"]

    ep: Any = SimpleNamespace(dist=Dist())
    assert install_hint("tidings.drivers", "kafka", ep, "confluent_kafka") == \
        "pip install 'tidings-kafka[fast]'"
    assert install_hint("tidings.drivers", "kafka", ep, "kafka_python") == \
        "pip install 'kafka_python>=2.0'"
    assert "tidings-kafka" in install_hint("tidings.drivers", "kafka", ep, "other")
    assert install_hint("tidings.drivers", "rabbit", None, "amqp") == \
        "pip install 'tidings[rabbit]'"


def test_demo_processes_says_it_needs_pyzmq() -> None:
    line = one_line(run("demo", "--processes", hide=("zmq",)))
    assert "zmq://" in line and "pip install 'tidings[zmq]'" in line
    assert "broker URL" in line
    help_text = subprocess.run([sys.executable, "-m", "tidings.cli", "demo", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    assert "pyzmq" in " ".join(help_text.split())


# -- options ------------------------------------------------------------------------------------

def test_verbose_after_the_command_is_accepted() -> None:
    proc = run("notify", "nosuch://h", "--event-type", "e", "--verbose")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert "unrecognized arguments" not in proc.stderr


@pytest.mark.parametrize("command", [["notify", "memory://", "--event-type", "e"],
                                     ["listen", "memory://", "--topic", "t"]])
def test_priority_warning_means_warn(command: list[str]) -> None:
    args = cli._parser().parse_args([*command, "--priority", "warning"])
    assert args.priority in ("warn", ["warn"])


def test_priority_typo_lists_the_priorities() -> None:
    proc = run("notify", "memory://", "--event-type", "e", "--priority", "loud")
    assert proc.returncode == 2
    assert "invalid choice: 'loud'" in proc.stderr and "'warn'" in proc.stderr


def test_payload_file_that_is_not_json_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"id": 1,,}', encoding="utf-8")
    line = one_line(run("notify", "memory://", "--event-type", "e", "--payload", f"@{bad}"))
    assert f"the file {str(bad)!r} is not valid JSON" in line and "line 1" in line


def test_payload_file_that_is_missing_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    line = one_line(run("notify", "memory://", "--event-type", "e", "--payload", f"@{missing}"))
    assert f"cannot read the file {str(missing)!r}" in line and "No such file" in line


def test_payload_file_that_is_not_text_is_named(tmp_path: Path) -> None:
    binary = tmp_path / "blob.json"
    binary.write_bytes(b"\xff\xfe\x00{")
    line = one_line(run("notify", "memory://", "--event-type", "e", "--payload", f"@{binary}"))
    assert f"the file {str(binary)!r} is not UTF-8 text" in line


def test_payload_from_a_good_file_is_sent(tmp_path: Path) -> None:
    good = tmp_path / "event.json"
    good.write_text(json.dumps({"id": 7}), encoding="utf-8")
    proc = run("notify", "memory://", "--event-type", "e", "--payload", f"@{good}")
    assert proc.returncode == 0, proc.stderr


def test_plot_without_matplotlib_fails_before_the_benchmark_runs() -> None:
    began = time.monotonic()
    proc = run("bench", "memory://", "--messages", "200000", "--plot", "out.png",
               hide=("matplotlib",))
    line = one_line(proc)
    assert "--plot needs matplotlib" in line and "pip install 'tidings[plot]'" in line
    assert "publish/s" not in proc.stdout  # nothing was measured
    assert time.monotonic() - began < 30


# -- a broker that cannot be reached ------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again on return: nothing listens there


def test_unreachable_broker_is_one_line_after_the_retries() -> None:
    port = _closed_port()
    proc = run("notify", f"rabbit://guest:s3cret@127.0.0.1:{port}/", "--event-type", "e")
    line = one_line(proc)
    assert "s3cret" not in proc.stderr + proc.stdout
    assert "WARNING" not in proc.stderr and "warning" not in proc.stderr
    assert "gave up after 4 attempts (--retry 3" in line
    assert f"127.0.0.1:{port}" in line and "Check that the broker" in line


@pytest.mark.parametrize("pool", [[], ["--pool", "tail"]])
def test_unreachable_broker_is_one_line_for_listen(pool: list[str]) -> None:
    port = _closed_port()
    line = one_line(run("listen", f"rabbit://guest:s3cret@127.0.0.1:{port}/", "--topic", "t",
                        *pool))
    assert "s3cret" not in line and f"127.0.0.1:{port}" in line
    assert "queue_expiry=0" not in line  # the hint for a queue declared otherwise is not for this


def test_retrying_forever_says_so_once() -> None:
    port = _closed_port()
    proc = subprocess.Popen([sys.executable, "-m", "tidings.cli", "notify",
                             f"rabbit://guest:guest@127.0.0.1:{port}/", "--event-type", "e",
                             "--retry", "-1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        time.sleep(3)  # several attempts (0.2, 0.4, 0.8, 1.6 s apart)
    finally:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.count("retrying until it answers") == 1, err
    assert len(err.strip().splitlines()) == 1, err


# -- --metrics-port -------------------------------------------------------------------------------

def test_metrics_port_without_prometheus_client_says_what_to_install() -> None:
    line = one_line(run("listen", "memory://", "--topic", "t", "--metrics-port", "0",
                        hide=("prometheus_client",)))
    assert "pip install 'tidings[metrics]'" in line


def test_metrics_port_in_use_is_one_line() -> None:
    pytest.importorskip("prometheus_client")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line(run("listen", "memory://", "--topic", "t", "--metrics-port", str(port),
                            "--metrics-addr", "127.0.0.1"))
    assert f"--metrics-port {port}: cannot listen" in line and "choose another port" in line


def test_every_error_here_has_no_password() -> None:
    """The URL's password never shows, whatever fails (a catch-all for the cases above)."""
    for args in (["notify", "rabit://u:hunter2@h/", "--event-type", "e"],
                 ["listen", "rabbit://u:hunter2@127.0.0.1:1/", "--topic", "t"]):
        proc = run(*args)
        assert "hunter2" not in proc.stderr + proc.stdout
