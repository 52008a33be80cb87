"""A private RabbitMQ cluster for tests that kill nodes under quorum queues.

Replicated queues only show what they promise when a node dies under load, and the shared broker
on 5672 must never die: :class:`RabbitCluster` runs ``size`` (three by default) private
:class:`~tidings.testing.rabbitnode.RabbitNode` nodes under one temporary directory, each with
its own node name, AMQP and distribution ports, data and logs, sharing one Erlang cookie so that
they can cluster. They find each other by classic peer discovery (every node's configuration
lists all of them) and start in parallel, since one start costs 5-10 s on a 2-core machine; a
node that formed a cluster of its own anyway (both started before either could see the other)
is joined with ``stop_app`` / ``join_cluster`` / ``start_app``. Teardown SIGKILLs every node and
deletes the directory, however the test ended.

Typical use::

    with RabbitCluster() as cluster:                 # three nodes, clustered
        url = cluster.url(query="quorum=true")       # every node's AMQP port, in order
        leader = cluster.leaders()["my-pool"]        # the node name leading a quorum queue
        cluster.kill(leader)                         # SIGKILL, as a crash would
        cluster.start(leader)                        # back, and in the cluster again
        cluster.wait_members_online(["my-pool"])     # every replica running again

``rabbitmqctl`` starts an Erlang VM per call (about 1.5 s on 2 cores), so the queries here ask
for everything they need in one call.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidings.testing.managed import Managed
from tidings.testing.rabbitnode import RabbitNode, RabbitNodeError

__all__ = ["ClientConnection", "RabbitCluster", "scratch_dir"]


def scratch_dir(prefix: str, *, tmpfs: bool = False) -> Path:
    """A new temporary directory; with ``tmpfs``, on ``/dev/shm`` when it exists and is
    writable (else in the usual temporary directory)."""
    shm = Path("/dev/shm")
    use_shm = tmpfs and shm.is_dir() and os.access(shm, os.W_OK)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=shm if use_shm else None))


@dataclass(frozen=True)
class ClientConnection:
    """One client connection as the cluster sees it."""

    node: str
    """The node the client is connected to (known by the AMQP port it listens on)."""
    name: str
    """The client's ``connection_name`` property (tidings: its role, pid and thread)."""
    peer_port: int
    """The client's local port."""


class RabbitCluster(Managed):
    """``size`` private RabbitMQ nodes in one cluster, under ``base_dir`` (a new temporary
    directory by default, deleted at teardown).

    ``tmpfs``: make that directory on ``/dev/shm`` when there is one, so that quorum queues'
    fsyncs cost a memory copy (the cluster then measures replication, not the disk).
    ``nodes`` are RabbitNode objects, in the order the URL lists them. ``config`` lines go into
    every node's ``rabbitmq.conf``. Methods that take a node accept the RabbitNode, its index
    or its node name (what ``leaders()`` and ``connections()`` report).
    """

    def __init__(self, size: int = 3, base_dir: str | Path | None = None, *,
                 tmpfs: bool = False, config: Sequence[str] = (), plugins: Sequence[str] = (),
                 startup_timeout: float = 120.0) -> None:
        if size < 1:
            raise ValueError(f"size={size} must be at least 1")
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir) if base_dir is not None else \
            scratch_dir("tidings-cluster-", tmpfs=tmpfs)
        self.startup_timeout = startup_timeout
        tag = uuid.uuid4().hex[:6]
        names = [f"tidings-{tag}-{i + 1}" for i in range(size)]
        discovery = ["cluster_formation.peer_discovery_backend = classic_config",
                     *(f"cluster_formation.classic_config.nodes.{i + 1} = {name}@localhost"
                       for i, name in enumerate(names))]
        cookie = secrets.token_hex(16).upper()
        self.nodes: list[RabbitNode] = []
        try:
            for i, name in enumerate(names):
                home = self.base_dir / f"node{i + 1}" / "home"
                home.mkdir(parents=True, exist_ok=True)
                cookie_file = home / ".erlang.cookie"  # RabbitNode keeps a cookie it finds
                cookie_file.write_text(cookie)
                cookie_file.chmod(0o400)
                self.nodes.append(RabbitNode(home.parent, name=name, plugins=plugins,
                                             config=[*discovery, *config],
                                             startup_timeout=startup_timeout))
        except BaseException:
            if self._own_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)
            raise

    # -- addressing ---------------------------------------------------------------------
    def node(self, which: RabbitNode | int | str) -> RabbitNode:
        """The node given by object, index or node name."""
        if isinstance(which, RabbitNode):
            return which
        if isinstance(which, int):
            return self.nodes[which]
        for n in self.nodes:
            if n.node_name == which:
                return n
        raise KeyError(f"{which!r} is not a node of this cluster "
                       f"({', '.join(n.node_name for n in self.nodes)})")

    def index(self, which: RabbitNode | int | str) -> int:
        return self.nodes.index(self.node(which))

    def url(self, vhost: str = "", *, order: Iterable[int] | None = None,
            user: str = "guest", password: str = "guest", query: str = "") -> str:
        """A ``rabbit://`` URL listing every node (``order``: node indexes, first tried first;
        the others follow in cluster order)."""
        first = list(order or ())
        indexes = first + [i for i in range(len(self.nodes)) if i not in first]
        hosts = ",".join(f"{user}:{password}@127.0.0.1:{self.nodes[i].amqp_port}"
                         for i in indexes)
        return f"rabbit://{hosts}/{vhost}" + (f"?{query}" if query else "")

    @property
    def running(self) -> list[RabbitNode]:
        return [n for n in self.nodes if n.running]

    # -- life cycle ---------------------------------------------------------------------
    def start(self, which: RabbitNode | int | str | None = None,
              timeout: float | None = None) -> None:
        """Start one node (back into the cluster it belongs to), or every node that is not
        running, in parallel; return when each accepts AMQP connections and is clustered."""
        targets = [self.node(which)] if which is not None else \
            [n for n in self.nodes if not n.running]
        errors: list[BaseException] = []

        def boot(n: RabbitNode) -> None:
            try:
                n.start(timeout)
            except BaseException as exc:  # reported by the caller's thread below
                errors.append(exc)

        threads = [threading.Thread(target=boot, args=(n,), name=f"start-{n.node_name}",
                                    daemon=True) for n in targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        self._ensure_clustered(timeout or self.startup_timeout)

    def kill(self, which: RabbitNode | int | str) -> RabbitNode:
        """SIGKILL one node, as a crash or a power cut would; ``start(node)`` brings it back."""
        n = self.node(which)
        n.kill()
        return n

    def teardown(self) -> None:
        """SIGKILL every node (their data goes with the directory) and delete the directory
        if this object created it."""
        try:
            threads = [threading.Thread(target=n.kill, daemon=True) for n in self.nodes]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        finally:
            if self._own_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def _ensure_clustered(self, timeout: float) -> None:
        """Join a running node that started a cluster of its own to the first node's cluster;
        then wait until every running node sees every other one as running."""
        anchor = self.running[0] if self.running else None
        if anchor is None:
            return
        for n in self.running:
            if n is anchor or n.node_name in self._status(anchor)["disk_nodes"]:
                continue
            n.ctl("stop_app")
            n.ctl("join_cluster", anchor.node_name)
            n.ctl("start_app")
        expected = {n.node_name for n in self.running}
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while True:
            seen = set(self._status(anchor)["running_nodes"])
            if expected <= seen:
                return
            if time.monotonic() > deadline:
                raise RabbitNodeError(f"the cluster did not form within {timeout:.0f}s: "
                                      f"{sorted(seen)} running, {sorted(expected)} expected")
            pause.wait(0.5)  # nodes are still joining: nothing to be notified of

    @staticmethod
    def _status(n: RabbitNode) -> dict[str, list[str]]:
        status = json.loads(n.ctl("cluster_status", "--formatter", "json"))
        return {"disk_nodes": list(status.get("disk_nodes") or []),
                "running_nodes": list(status.get("running_nodes") or [])}

    # -- administration -----------------------------------------------------------------
    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl <args>`` on the first running node (cluster-wide commands)."""
        running = self.running
        if not running:
            raise RabbitNodeError("no node of the cluster is running")
        return running[0].ctl(*args, timeout=timeout)

    def queues(self, vhost: str = "/") -> list[dict[str, Any]]:
        """Every queue of ``vhost``: name, type, leader, members and the members online."""
        out = self.ctl("list_queues", "-p", vhost or "/", "name", "type", "leader", "members",
                       "online", "--formatter", "json")
        return [q for q in json.loads(out or "[]") if isinstance(q, dict)]

    def leaders(self, vhost: str = "/") -> dict[str, str]:
        """Quorum queue name -> the node name of its leader."""
        return {q["name"]: q["leader"] for q in self.queues(vhost)
                if q.get("type") == "quorum" and q.get("leader")}

    def connections(self) -> list[ClientConnection]:
        """The client connections of every running node."""
        out = self.ctl("list_connections", "port", "peer_port", "client_properties",
                       "--formatter", "json")
        by_port = {n.amqp_port: n.node_name for n in self.nodes}
        found = []
        for c in json.loads(out or "[]"):
            if not isinstance(c, dict):
                continue
            props = c.get("client_properties")
            name = _connection_name(props)
            found.append(ClientConnection(by_port.get(int(c.get("port") or 0), "?"), name,
                                          int(c.get("peer_port") or 0)))
        return found

    def wait_members_online(self, queues: Iterable[str], vhost: str = "/",
                            timeout: float = 60.0) -> float:
        """Wait until every member of each quorum queue named is online (a restarted node's
        replicas are running again, so another node may die without losing the majority);
        return the seconds it took."""
        wanted = set(queues)
        began = time.monotonic()
        pause = threading.Event()
        while True:
            with contextlib.suppress(RabbitNodeError, subprocess.TimeoutExpired):
                found = {q["name"]: q for q in self.queues(vhost) if q["name"] in wanted}
                if set(found) == wanted and all(
                        q.get("members") and set(q["members"]) <= set(q.get("online") or [])
                        for q in found.values()):
                    return time.monotonic() - began
            if time.monotonic() - began > timeout:
                raise RabbitNodeError(f"quorum queues {sorted(wanted)} did not have every "
                                      f"member online within {timeout:.0f}s")
            pause.wait(0.2)  # replicas are starting: nothing to be notified of

    def __repr__(self) -> str:
        return f"<RabbitCluster {', '.join(repr(n) for n in self.nodes)}>"


def _connection_name(props: Any) -> str:
    """The ``connection_name`` client property, in whichever shape the JSON formatter gives
    client properties (a mapping, or a list of [key, type, value] triples)."""
    if isinstance(props, dict):
        return str(props.get("connection_name", ""))
    if isinstance(props, list):
        for item in props:
            if isinstance(item, list) and len(item) >= 3 and item[0] == "connection_name":
                return str(item[2])
    return ""
