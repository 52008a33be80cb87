"""Reach the brokers tests need, and isolate each test run on them.

In CI (``CI`` set in the environment) a missing broker fails the test loudly: a broker test must
run, never skip. On a laptop without brokers the test is skipped with a message naming the
service and the command that starts it (``tools/services.sh`` starts them all).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["SERVICES", "in_ci", "rabbit_vhost", "require_service", "service_up"]

SERVICES = {
    "rabbitmq": ("127.0.0.1", 5672, "rabbitmq-server -detached (or: bash tools/services.sh)"),
    "redis": ("127.0.0.1", 6379, "redis-server --daemonize yes --port 6379 --save '' "
                                 "(or: bash tools/services.sh)"),
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def service_up(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str | None = None, port: int | None = None,
                    how: str | None = None) -> tuple[str, int]:
    """Return (host, port) of the service ``name`` once a TCP connection to it succeeds, or fail
    (CI) / skip (elsewhere) saying how to start it.

    ``name`` labels the messages. For the services tidings' own tests use (``SERVICES``:
    ``"rabbitmq"``, ``"redis"``) host, port and the start command default to theirs; any other
    service, say a plug-in's broker, passes its own::

        host, port = require_service("nats", "127.0.0.1", 4222, how="nats-server --jetstream &")
    """
    import pytest

    known: tuple[str | None, int | None, str | None] = SERVICES.get(name, (None, None, None))
    host, port = host or known[0], port or known[1]
    if host is None or port is None:
        raise ValueError(f"require_service({name!r}) needs host and port: it knows only "
                         f"{', '.join(sorted(SERVICES))} by name")
    how = how or known[2] or f"start {name} listening on {host}:{port}"
    if not service_up(host, port):
        msg = f"{name} is not reachable on {host}:{port}; start it with: {how}"
        if in_ci():
            pytest.fail(f"CI requires every broker test to run: {msg}", pytrace=False)
        pytest.skip(msg)
    return host, port


def _rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")


@contextmanager
def rabbit_vhost(prefix: str = "tidings-test") -> Iterator[str]:
    """A fresh RabbitMQ virtual host for guest, deleted afterwards (with all its queues)."""
    require_service("rabbitmq")
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        _rabbitmqctl("delete_vhost", name)
