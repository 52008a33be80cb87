"""Fixtures of the fault tests, and the figures table printed at the end of the run.

Each scenario calls ``figures(name, sent=..., processed=..., duplicates=..., lost=...,
recovery_s=..., **more)``: the row is printed at once (``FIGURES {...}``, visible with ``-s`` or
``-rP``), kept as a user property in JUnit XML, appended to ``$TIDINGS_FIGURES_FILE`` as a JSON
line when that is set, and shown in a table in the terminal summary of every normal run, so
the numbers are in the test output without any flag.

One private RabbitMQ node serves the whole package (starting one costs 5-10 s): it runs the
AMQP 1.0 plugin and a TLS listener with a CA made here, keeps its data on /dev/shm when there is
one (durable messages then cost a memory copy, not an fsync, which keeps a 10,000-message stream
within the time budget; a broker *restart* keeps tmpfs data, which is what these tests restart),
and is never the shared broker on 5672.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tidings.testing.rabbitnode import RabbitNode, rabbitmq_installed

from .support import make_pki, unavailable

_FIGURES: list[dict[str, Any]] = []
_COLUMNS = ("sent", "processed", "duplicates", "lost", "recovery_s")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[..., dict[str, Any]]:
    """Record one scenario's figures (see the module docstring)."""

    def record(scenario: str, **values: Any) -> dict[str, Any]:
        row = {"scenario": scenario, **values}
        _FIGURES.append(row)
        print("FIGURES " + json.dumps(row, default=str))
        request.node.user_properties.append(("figures", json.dumps(row, default=str)))
        path = os.environ.get("TIDINGS_FIGURES_FILE")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        return row

    return record


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if not _FIGURES:
        return
    tr = terminalreporter
    tr.section("tidings reliability figures")
    width = max(len(r["scenario"]) for r in _FIGURES)
    tr.write_line(f"{'scenario':<{width}}  " + "  ".join(f"{c:>10}" for c in _COLUMNS)
                  + "  more")
    for row in _FIGURES:
        more = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()
                         if k != "scenario" and k not in _COLUMNS)
        tr.write_line(f"{row['scenario']:<{width}}  "
                      + "  ".join(f"{_fmt(row.get(c)):>10}" for c in _COLUMNS) + f"  {more}")


@pytest.fixture(scope="package")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for DNS:localhost only, a client certificate, another CA."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="package")
def node(pki: Path) -> Iterator[RabbitNode]:
    """The package's private RabbitMQ node: AMQP 0-9-1 and 1.0 on ``amqp_port``, TLS on
    ``tls_port`` (certificate for localhost, CA ``pki/ca.pem``); restarted and alarmed by the
    tests, never the shared one."""
    if not rabbitmq_installed():
        unavailable("RabbitMQ is not installed here, so no private node can be started")
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="tidings-reliability-",
                                 dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))
    n = RabbitNode(base, plugins=["rabbitmq_amqp1_0"])
    n.add_tls_listener(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    try:
        with n:
            yield n
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="package")
def vhost(node: RabbitNode) -> Iterator[str]:
    """One virtual host on the private node for the package (``rabbitmqctl`` costs about a
    second and a half per call, three per vhost); every test names its topics, pools and queues
    with a fresh uuid, and the node and its data are deleted after the run."""
    with node.vhost("tidings-reliability") as name:
        yield name
