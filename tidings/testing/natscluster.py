"""A private NATS JetStream cluster for tests that SIGKILL servers under replicated streams.

Replicated streams (the ``nats://`` URL option ``replicas=3``) only show what they promise when
a server dies under load, and the shared server on 4222 must never die: :class:`NatsCluster`
runs ``size`` (three by default) ``nats-server -js`` processes of the installed binary, each with
its own server name, client, route and monitoring ports on 127.0.0.1 and its own store
directory under one temporary directory, each routed to the others under one cluster name.
It signals only the processes it started; teardown SIGKILLs them and deletes the directory.

Typical use::

    with NatsCluster() as cluster:                   # three servers, a JetStream meta leader
        url = cluster.url("ns", query="replicas=3")  # nats://127.0.0.1:p1,...,127.0.0.1:p3/ns?..
        leader = cluster.stream_leader("tidings_ns_openstack")   # index of the leading server
        cluster.kill(leader)                         # SIGKILL, as a crash would
        cluster.start(leader)                        # back, and caught up with its peers

Readiness is read from each server's monitoring port, never guessed with a sleep: ``/healthz``
(JetStream is current), ``/jsz`` (a meta leader every running server agrees on) and
``/routez`` (a route to every other running server), polled with a bound. A server that does
not come up fails with the end of its log. Starting three servers takes a second or two.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidings.testing.managed import Managed, free_port

__all__ = ["NatsCluster", "NatsClusterError", "NatsServer", "nats_server_binary"]

_ROUTES_SETTLE = 1.5
"""Seconds the routes must stay the same before the cluster counts as ready: longer than
nats-server's one-second interval between attempts to solicit a route."""


class NatsClusterError(RuntimeError):
    """The private cluster could not be started or queried; the message says why."""


def nats_server_binary() -> str | None:
    """The installed ``nats-server`` (on PATH, or Debian's /usr/sbin), or None."""
    found = shutil.which("nats-server")
    if found:
        return found
    return "/usr/sbin/nats-server" if os.access("/usr/sbin/nats-server", os.X_OK) else None


@dataclass
class NatsServer:
    """One server of the cluster: its name, ports and files, and its process when running."""

    name: str
    port: int
    """Client port (what ``nats://`` URLs name)."""
    route_port: int
    http_port: int
    """Monitoring port (``/jsz``, ``/connz``, ``/healthz``)."""
    store: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        """The end of the server's log, for error messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class NatsCluster(Managed):
    """``size`` private JetStream servers in one cluster, under ``base_dir`` (a new temporary
    directory by default, deleted at teardown).

    ``tmpfs``: make that directory on ``/dev/shm`` when there is one, so that file storage costs
    a memory copy (the cluster then measures replication, not the disk). Methods that take a
    server accept the NatsServer, its index or its server name (what JetStream reports as a
    leader).
    """

    def __init__(self, size: int = 3, base_dir: str | Path | None = None, *,
                 tmpfs: bool = True, exe: str | None = None,
                 startup_timeout: float = 30.0) -> None:
        if size < 1:
            raise ValueError(f"size={size} must be at least 1")
        binary = exe or nats_server_binary()
        if binary is None:
            raise NatsClusterError("nats-server is not installed (apt-get install nats-server, "
                                   "or put the binary on PATH)")
        self.exe = binary
        self.startup_timeout = startup_timeout
        self._own_dir = base_dir is None
        if base_dir is None:
            shm = Path("/dev/shm")
            use_shm = tmpfs and shm.is_dir() and os.access(shm, os.W_OK)
            base_dir = tempfile.mkdtemp(prefix="tidings-nats-cluster-",
                                        dir=shm if use_shm else None)
        self.base_dir = Path(base_dir)
        tag = uuid.uuid4().hex[:6]
        self.cluster_name = f"tidings-{tag}"
        self.servers = [NatsServer(name=f"n{i + 1}-{tag}", port=free_port(),
                                   route_port=free_port(), http_port=free_port(),
                                   store=self.base_dir / f"n{i + 1}",
                                   log=self.base_dir / f"n{i + 1}.log")
                        for i in range(size)]

    # -- addressing ---------------------------------------------------------------------
    def server(self, which: NatsServer | int | str) -> NatsServer:
        """The server given by object, index or server name."""
        if isinstance(which, NatsServer):
            return which
        if isinstance(which, int):
            return self.servers[which]
        for s in self.servers:
            if s.name == which:
                return s
        raise KeyError(f"{which!r} is not a server of this cluster "
                       f"({', '.join(s.name for s in self.servers)})")

    def index(self, which: NatsServer | int | str) -> int:
        return self.servers.index(self.server(which))

    def url(self, namespace: str = "", *, query: str = "",
            order: Iterable[int] | None = None) -> str:
        """A ``nats://`` URL listing every server (``order``: indexes listed first; nats-py
        shuffles the list anyway unless told not to)."""
        first = list(order or ())
        indexes = first + [i for i in range(len(self.servers)) if i not in first]
        hosts = ",".join(f"127.0.0.1:{self.servers[i].port}" for i in indexes)
        return f"nats://{hosts}/{namespace}" + (f"?{query}" if query else "")

    @property
    def running(self) -> list[NatsServer]:
        return [s for s in self.servers if s.running]

    # -- life cycle ---------------------------------------------------------------------
    def start(self, which: NatsServer | int | str | None = None,
              timeout: float | None = None) -> float:
        """Start one server (back into the cluster, with the data it had), or every server
        that is not running; return the seconds until every running server is ready (see
        the module docstring)."""
        began = time.monotonic()
        targets = [self.server(which)] if which is not None else \
            [s for s in self.servers if not s.running]
        for s in targets:
            if s.running:
                continue
            s.store.mkdir(parents=True, exist_ok=True)
            routes = ",".join(f"nats://127.0.0.1:{o.route_port}" for o in self.servers
                              if o is not s)
            args = [self.exe, "-js", "-a", "127.0.0.1", "-p", str(s.port), "-n", s.name,
                    "--cluster_name", self.cluster_name,
                    "--cluster", f"nats://127.0.0.1:{s.route_port}", "-sd", str(s.store),
                    "-m", str(s.http_port), "-l", str(s.log)]
            if routes:
                args += ["--routes", routes]
            s.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        self.wait_ready(timeout or self.startup_timeout)
        return time.monotonic() - began

    def kill(self, which: NatsServer | int | str) -> int:
        """SIGKILL one server, as a crash or a power cut would; its index. ``start()`` brings
        it back with the data it had."""
        s = self.server(which)
        if s.proc is not None and s.proc.poll() is None:
            os.kill(s.proc.pid, signal.SIGKILL)
            s.proc.wait(10)
        return self.index(s)

    def teardown(self) -> None:
        """SIGKILL every server and delete the directory if this object made it."""
        try:
            for s in self.servers:
                self.kill(s)
        finally:
            if self._own_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- what the servers say -----------------------------------------------------------
    def monitor(self, which: NatsServer | int | str, path: str) -> dict[str, Any]:
        """A monitoring endpoint's JSON (``"jsz?streams=true"``, ``"connz"``, ...); a 503
        answer (``/healthz`` while JetStream catches up) is returned too."""
        s = self.server(which)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/{path}",
                                        timeout=2) as answer:
                out: dict[str, Any] = json.load(answer)
        except urllib.error.HTTPError as exc:
            out = json.loads(exc.read() or b"{}")
            out.setdefault("status", f"http {exc.code}")
        return out

    def _ready(self) -> tuple[str | None, Any]:
        """(None when every running server is ready, else what it still waits for; the
        routes every server has, by id)."""
        running = self.running
        leaders = set()
        routes: list[Any] = []
        for s in running:
            try:
                health = self.monitor(s, "healthz")
                if health.get("status") != "ok":
                    return f"{s.name}: healthz says {health}", None
                found = self.monitor(s, "routez").get("routes") or []
                if len(found) < len(running) - 1:
                    return f"{s.name}: {len(found)} route(s) of {len(running) - 1}", None
                routes.append(sorted(r.get("rid", 0) for r in found))
                leaders.add(self.monitor(s, "jsz").get("meta_cluster", {}).get("leader"))
            except (OSError, ValueError) as exc:
                return f"{s.name}: monitoring port not answering ({exc})", None
        names = {s.name for s in running}
        if len(leaders) != 1 or not leaders <= names:
            return f"no JetStream meta leader every server agrees on ({leaders})", None
        return None, routes

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait (bounded) until every running server is ready and its routes have settled;
        raise NatsClusterError with the end of the log of a server that died or did not get
        there.

        Settled: the same routes for ``_ROUTES_SETTLE`` seconds. Servers that start together
        each solicit a route to the others, retry a second later, and then close the
        duplicates; a JetStream API request that crosses a route being closed is lost (the
        client times out), so readiness waits that out."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        seen: Any = None
        since = time.monotonic()
        while True:
            for s in self.servers:
                if s.proc is not None and s.proc.poll() is not None and s.proc.returncode != -9:
                    raise NatsClusterError(f"nats-server {s.name} exited with "
                                           f"{s.proc.returncode}:\n{s.tail()}")
            waiting, routes = self._ready()
            if routes != seen:
                seen, since = routes, time.monotonic()
            elif waiting is None and time.monotonic() - since >= _ROUTES_SETTLE:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {s.name}\n{s.tail(8)}" for s in self.running)
                raise NatsClusterError(f"the NATS cluster was not ready within "
                                       f"{timeout or self.startup_timeout:.0f}s: {waiting}\n"
                                       f"{logs}")
            time.sleep(0.05)  # polling a server's state: nothing to be notified of

    def streams(self) -> list[dict[str, Any]]:
        """Every stream (with its consumers) as the running servers report them."""
        streams: list[dict[str, Any]] = []
        for s in self.running:
            try:
                jsz = self.monitor(s, "jsz?streams=true&consumers=true")
            except (OSError, ValueError):
                continue
            for account in jsz.get("account_details") or []:
                streams += account.get("stream_detail") or []
        return streams

    def leaders(self, stream: str) -> dict[str, int]:
        """Index of the server leading ``stream`` (key ``""``) and each of its consumers (by
        name), as far as running servers know one."""
        out: dict[str, int] = {}
        names = {s.name for s in self.running}
        for detail in self.streams():
            if detail.get("name") != stream:
                continue
            entries = [("", detail.get("cluster") or {})]
            entries += [(c.get("name", ""), c.get("cluster") or {})
                        for c in detail.get("consumer_detail") or []]
            for key, cluster in entries:
                leader = cluster.get("leader")
                if leader in names and key not in out:
                    out[key] = self.index(leader)
        return out

    def stream_leader(self, stream: str, timeout: float = 30.0) -> int:
        """Index of the running server that leads ``stream``, once one does (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            led = self.leaders(stream).get("")
            if led is not None:
                return led
            if time.monotonic() > deadline:
                raise NatsClusterError(f"no running server leads the stream {stream!r} after "
                                       f"{timeout:.0f}s")
            time.sleep(0.05)  # polling the servers' state

    def connections(self) -> list[tuple[int, str]]:
        """(server index, client name) of every client connection of the running servers."""
        out = []
        for s in self.running:
            for conn in self.monitor(s, "connz?limit=1024").get("connections") or []:
                out.append((self.index(s), str(conn.get("name", ""))))
        return out

    def move_leaders(self, stream: str, to: NatsServer | int | str,
                     consumers: Iterable[str] = (), timeout: float = 30.0) -> None:
        """Make server ``to`` lead ``stream`` and ``consumers`` by asking the current leaders
        to step down until the election lands there (each election picks one of the other
        replicas; bounded)."""
        import asyncio

        import nats

        target = self.index(to)
        wanted = ["", *consumers]
        deadline = time.monotonic() + timeout

        async def step_down(subject: str) -> None:
            nc = await nats.connect(f"nats://127.0.0.1:{self.server(target).port}",
                                    connect_timeout=5, allow_reconnect=False)
            try:
                await nc.request(subject, b"", timeout=5)
            finally:
                await nc.close()

        while True:
            led = self.leaders(stream)
            missing = [k for k in wanted if led.get(k) != target]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise NatsClusterError(f"could not move the leaders of {stream!r} to "
                                       f"{self.server(target).name} within {timeout:.0f}s: "
                                       f"{led}")
            for key in missing:
                if key not in led:
                    continue  # between leaders: look again
                subject = (f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}" if not key else
                           f"$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{key}")
                try:
                    asyncio.run(step_down(subject))
                except Exception:  # an election in progress: try again
                    pass
            time.sleep(0.1)  # the new leaders' names reach the monitoring ports
