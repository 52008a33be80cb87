"""A private RabbitMQ node for tests that stop, restart or kill the broker.

Tests that break the broker must never touch the shared one on 5672: other tests (and other
people) use it. :class:`RabbitNode` runs a separate node from the installed RabbitMQ under a
temporary directory, with its own node name, AMQP port, distribution port, Erlang cookie, data,
logs, configuration and plugin list, and without the system's ``rabbitmq-env.conf``. It runs as
the current user (the packaged ``/usr/sbin`` wrappers would switch to the ``rabbitmq`` user and
its cookie), and everything it starts is in one process group that it alone signals.

Typical use::

    with RabbitNode() as node:          # started, and torn down (data removed) afterwards
        url = node.url()                # rabbit://guest:guest@127.0.0.1:<port>/
        ...
        node.restart()                  # stop + start; durable queues and messages survive
        node.kill()                     # SIGKILL, as a crash would; start() again after

Plugins and a TLS listener are configuration, read when the node starts: ``enable_plugins()``
and ``add_tls_listener()`` before ``start()`` (or followed by ``restart()``).
Startup takes about 5-10 s on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from tidings.testing.managed import Managed, free_port

__all__ = ["RabbitNode", "RabbitNodeError", "free_port", "rabbitmq_installed"]


class RabbitNodeError(RuntimeError):
    """The private node could not be started, stopped or reached; the message says why."""


def _bin_dir() -> Path | None:
    """The directory of the real RabbitMQ scripts (not the /usr/sbin wrappers)."""
    env = os.environ.get("RABBITMQ_BIN_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path("/usr/lib/rabbitmq/bin"))
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(os.path.realpath(found)).parent)
    for directory in candidates:
        if (directory / "rabbitmq-server").is_file() and (directory / "rabbitmqctl").is_file():
            return directory
    return None


def rabbitmq_installed() -> bool:
    """Whether a RabbitMQ installation to run private nodes from is present."""
    return _bin_dir() is not None


class RabbitNode(Managed):
    """A RabbitMQ node of its own, under ``base_dir`` (a new temporary directory by default).

    Attributes: ``node_name`` (``tidings-<id>@localhost``), ``amqp_port``, ``dist_port``,
    ``base_dir``, ``tls_port`` (after ``add_tls_listener``).
    """

    def __init__(self, base_dir: str | os.PathLike[str] | None = None, *,
                 name: str | None = None, amqp_port: int | None = None,
                 plugins: Sequence[str] = (), config: Sequence[str] = (),
                 startup_timeout: float = 90.0) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RabbitNodeError("RabbitMQ is not installed (no rabbitmq-server and "
                                  "rabbitmqctl found; set $RABBITMQ_BIN_DIR to their directory "
                                  "or install rabbitmq-server)")
        self._bin = bin_dir
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir) if base_dir is not None else \
            Path(tempfile.mkdtemp(prefix="tidings-rabbit-"))
        self.node_name = f"{name or 'tidings-' + uuid.uuid4().hex[:8]}@localhost"
        self.amqp_port = amqp_port or free_port()
        self.dist_port = free_port()
        self.tls_port: int | None = None
        self.startup_timeout = startup_timeout
        self._plugins: list[str] = list(plugins)
        self._config: list[str] = list(config)
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: Path = self.base_dir / "server.out"
        for sub in ("home", "mnesia", "log"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        cookie = self.base_dir / "home" / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16).upper())
            cookie.chmod(0o400)
        (self.base_dir / "rabbitmq-env.conf").write_text("")

    # -- configuration ------------------------------------------------------------------
    def enable_plugins(self, *names: str) -> None:
        """Plugins to run (e.g. ``rabbitmq_amqp1_0``); read at the next start()."""
        for n in names:
            if n not in self._plugins:
                self._plugins.append(n)

    def add_config(self, *lines: str) -> None:
        """Extra ``rabbitmq.conf`` lines (``key = value``); read at the next start()."""
        self._config.extend(lines)

    def add_tls_listener(self, certfile: str | os.PathLike[str], keyfile: str | os.PathLike[str],
                         cafile: str | os.PathLike[str], *, port: int | None = None,
                         verify_peer: bool = False) -> int:
        """Listen for AMQP over TLS on ``port`` (a free one by default); returns the port.

        With ``verify_peer`` the node asks for and checks a client certificate signed by
        ``cafile``. Read at the next start().
        """
        self.tls_port = port or free_port()
        self._config += [
            f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
            f"ssl_options.cacertfile = {Path(cafile).resolve()}",
            f"ssl_options.certfile = {Path(certfile).resolve()}",
            f"ssl_options.keyfile = {Path(keyfile).resolve()}",
            f"ssl_options.verify = {'verify_peer' if verify_peer else 'verify_none'}",
            f"ssl_options.fail_if_no_peer_cert = {'true' if verify_peer else 'false'}",
        ]
        return self.tls_port

    def _write_config(self) -> None:
        lines = ["log.console = false", "log.file.level = info", *self._config]
        (self.base_dir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        (self.base_dir / "enabled_plugins").write_text(f"[{','.join(self._plugins)}].\n")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in [k for k in env if k.startswith("RABBITMQ_")]:
            del env[key]  # nothing of the shared node's environment leaks in
        b = self.base_dir
        env.update({
            "HOME": str(b / "home"),
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(b / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(b / "node.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        })
        return env

    # -- life cycle ---------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def url(self, vhost: str = "", *, user: str = "guest", password: str = "guest",
            scheme: str = "rabbit", tls: bool = False, query: str = "") -> str:
        """A transport URL for this node (``tls=True``: the TLS listener, with ssl=true)."""
        port = self.tls_port if tls else self.amqp_port
        if tls and port is None:
            raise RabbitNodeError("no TLS listener: call add_tls_listener() before start()")
        options = "&".join(o for o in (("ssl=true" if tls else ""), query) if o)
        return (f"{scheme}://{user}:{password}@127.0.0.1:{port}/{vhost}"
                + (f"?{options}" if options else ""))

    def start(self, timeout: float | None = None) -> None:
        """Start the node and return once it accepts AMQP connections."""
        if self.running:
            return
        self._write_config()
        out = self._output.open("ab")
        try:
            self._proc = subprocess.Popen(
                [str(self._bin / "rabbitmq-server")], env=self._env(), cwd=self.base_dir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)  # its own process group: ours alone to signal
        finally:
            out.close()
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            if self._proc.poll() is not None:
                raise RabbitNodeError(f"node {self.node_name} exited with code "
                                      f"{self._proc.returncode} while starting:\n{self.log_tail()}")
            if _port_open(self.amqp_port) and (self.tls_port is None
                                               or _port_open(self.tls_port)):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RabbitNodeError(f"node {self.node_name} did not accept connections on "
                                      f"127.0.0.1:{self.amqp_port} within "
                                      f"{timeout or self.startup_timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.1)  # polling a port that is not open yet; nothing to wait on

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the node cleanly (``rabbitmqctl stop``); kill it if that does not work."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc = None
            return
        try:
            self.ctl("stop", timeout=timeout)
        except (RabbitNodeError, subprocess.TimeoutExpired):
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            proc.wait(10)
        self._wait_port_closed(timeout)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the node, as a crash or a power cut would; ``start()`` brings it back."""
        proc = self._proc
        if proc is None:
            return
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        self._wait_port_closed(10.0)
        self._proc = None

    def restart(self, timeout: float | None = None) -> None:
        self.stop()
        self.start(timeout)

    def teardown(self) -> None:
        """Stop the node and, if this object created its directory, delete it."""
        try:
            if self.running:
                self.stop(timeout=30.0)
        finally:
            if self._own_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- administration -----------------------------------------------------------------
    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n <this node> <args>``; return its output or raise saying why."""
        return self._tool("rabbitmqctl", *args, timeout=timeout)

    def plugins(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmq-plugins -n <this node> <args>`` (e.g. ``enable --online x``)."""
        return self._tool("rabbitmq-plugins", *args, timeout=timeout)

    def _tool(self, tool: str, *args: str, timeout: float) -> str:
        proc = subprocess.run([str(self._bin / tool), "-n", self.node_name, *args],
                              env=self._env(), capture_output=True, text=True, timeout=timeout,
                              cwd=self.base_dir)
        if proc.returncode != 0:
            raise RabbitNodeError(f"{tool} {' '.join(args)} on {self.node_name} failed "
                                  f"({proc.returncode}): "
                                  f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    @contextlib.contextmanager
    def vhost(self, prefix: str = "tidings-test") -> Iterator[str]:
        """A fresh virtual host for guest on this node, deleted afterwards."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.ctl("add_vhost", name)
        try:
            self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
            yield name
        finally:
            if self.running:
                with contextlib.suppress(RabbitNodeError, subprocess.TimeoutExpired):
                    self.ctl("delete_vhost", name)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the node's console output and log, for error messages."""
        parts = []
        for path in [self._output, *sorted((self.base_dir / "log").glob("*.log"))]:
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts) or "(no output)"

    # -- internals ----------------------------------------------------------------------
    def _signal(self, sig: int) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # the group started with this node, nothing else

    def _wait_port_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _port_open(self.amqp_port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RabbitNode {self.node_name} amqp=127.0.0.1:{self.amqp_port} {state}>"


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
