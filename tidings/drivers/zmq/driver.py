"""``zmq://``: brokerless notifications over ZeroMQ, with pools, exchanges and acknowledgements.

Listeners bind a ROUTER and register (exchange, routing key, group) -> address in a matchmaker;
a notifier sends one copy per registered group to one member of it, keeps it in a bounded window
until acknowledged and resends it to another member when needed. A send that finds no group
fails (NoListener); nothing is stored or on disk. Registries: ``zmq://`` (this user's sqlite
file, every process of the user on the host), ``zmq+memory://`` (one process), ``zmq+sqlite:
////path.db``, ``zmq+redis://host:6379/0``. ``curve_*``: CURVE (curve.py). See docs/zmq.md.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import zmq

from tidings.drivers.zmq.curve import Curve
from tidings.drivers.zmq.listener import ZmqReceiver
from tidings.drivers.zmq.sender import Sender
from tidings.matchmaker.base import MatchMaker, NoListener, matchmaker_for
from tidings.matchmaker.client import Directory, Registrar
from tidings.transports.base import Binding, Capabilities, Driver, Option, OutgoingMessage
from tidings.transports.errors import InvalidTransportOption
from tidings.transports.url import TransportURL

__all__ = ["NoListener", "ZmqDriver"]

_WILDCARDS = ("0.0.0.0", "*", "::", "[::]")


class ZmqDriver(Driver):
    """Brokerless driver on pyzmq; see the module docstring for its model and its promises."""

    name = "zmq"
    capabilities = Capabilities(
        pools=True, requeue=True, requeue_to_other_member=True, exchanges=True,
        at_least_once=True, durable=False, stores_without_listener=False, dead_letter=False,
        prefetch=True, confirmed_send=False)
    options = {
        "matchmaker": Option(str, None, "listener registry: sqlite (default: this user's), "
                                        "memory, redis or a plug-in; or zmq+<name>://"),
        "namespace": Option(str, "tidings", "registry namespace: deployments sharing one "
                                            "registry stay apart"),
        "bind_address": Option(str, "127.0.0.1", "address listeners bind (0.0.0.0: all)"),
        "advertise_address": Option(str, None, "host senders reach this host's listeners at "
                                               "(default: bind_address, or the host name)"),
        "port_min": Option(int, 0, "lowest port a listener may bind (0: any free port)"),
        "port_max": Option(int, 0, "highest port a listener may bind (0: any free port)"),
        "ttl": Option(float, 10.0, "seconds a registration lives unrefreshed"),
        "lookup_interval": Option(float, 0.05, "seconds a sender trusts a lookup before "
                                               "checking for other processes' listeners"),
        "ack_window": Option(int, 1000, "most copies a sending transport keeps unacknowledged"),
        "ack_timeout": Option(float, 30.0, "seconds a listener holding our copies may stay "
                                           "silent before they go to another member"),
        "flush_timeout": Option(float, 5.0, "seconds cleanup() waits for acknowledgements"),
        "connect_grace": Option(float, 1.0, "seconds a newly found listener's turn is kept "
                                            "while it is connecting (0: no waiting)"),
        "wait_for_listener": Option(bool, True, "retry a send that found no listener under "
                                                "the retry policy (false: fail it at once)"),
        "curve_secret_key": Option(str, None, "this process's CURVE certificate (.key_secret "
                                              "file): encrypt and authenticate", secret=True),
        "curve_public_keys_dir": Option(str, None, "the public .key certificates to trust"),
        "curve_server_key": Option(str, None, "public .key certificate of the listeners"),
    }

    def __init__(self, url: TransportURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        conf = self.conf
        self._check(conf)
        advertise = conf["advertise_address"]
        if advertise is None and conf["bind_address"] in _WILDCARDS:
            advertise = socket.gethostname()
        self._bind = {"bind_address": conf["bind_address"], "advertise_address": advertise,
                      "port_range": (conf["port_min"], conf["port_max"])}
        self._curve = Curve.from_options(conf)
        self._auth: Any = None  # the ZAP handler, from the first CURVE listener on
        self.matchmaker: MatchMaker = matchmaker_for(url, conf["matchmaker"], conf["namespace"])
        self._ctx = zmq.Context(io_threads=1)
        self._lock = threading.Lock()
        self._receivers: set[ZmqReceiver] = set()
        self._closed = self._released = False
        self._registrar = Registrar(self.matchmaker, conf["ttl"])
        directory = Directory(self.matchmaker, conf["ttl"], conf["lookup_interval"])
        self._sender = Sender(self._ctx, directory, window=conf["ack_window"],
                              ack_timeout=conf["ack_timeout"], orphan_timeout=conf["ttl"],
                              connect_grace=conf["connect_grace"], curve=self._curve,
                              name=f"zmq sender ({url.masked()})")

    @staticmethod
    def _check(conf: dict[str, Any]) -> None:
        def bad(name: str, why: str) -> InvalidTransportOption:
            return InvalidTransportOption(f"URL option {name}={conf[name]!r} {why}")

        for name in ("ttl", "ack_timeout"):
            if not conf[name] > 0:
                raise bad(name, "must be a positive number of seconds")
        for name in ("flush_timeout", "lookup_interval", "connect_grace"):
            if not conf[name] >= 0:
                raise bad(name, "must be zero or a positive number of seconds")
        if conf["ack_window"] < 1:
            raise bad("ack_window", "must be at least 1")
        low, high = conf["port_min"], conf["port_max"]
        if (low, high) != (0, 0) and not (1 <= low <= high <= 65535):
            raise InvalidTransportOption(
                f"URL options port_min={low} and port_max={high} must satisfy "
                f"1 <= port_min <= port_max <= 65535 (or both be 0 for any free port)")
        if not conf["namespace"]:
            raise bad("namespace", "must not be empty")

    def send_batch(self, messages: Sequence[OutgoingMessage],
                   timeout: float | None) -> list[BaseException | None]:
        return self._sender.send_batch(messages, timeout)

    def retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, NoListener):  # a listener may be starting; each retry is logged
            return bool(self.conf["wait_for_listener"])
        return super().retryable(exc)

    def listen(self, bindings: Sequence[Binding], pool: str | None,
               prefetch: int) -> ZmqReceiver:
        if pool is not None and (not isinstance(pool, str) or not pool):
            raise ValueError(f"pool must be a non-empty string or None, not {pool!r}")
        if self._closed:
            raise RuntimeError(f"{self.describe()} was cleaned up; build a new transport")
        if self._curve is not None:
            with self._lock:
                if self._auth is None:
                    self._auth = self._curve.authenticator(self._ctx)
        receiver = ZmqReceiver(self._ctx, self._registrar, bindings, pool, prefetch,
                               on_close=self._release, curve=self._curve, **self._bind)
        with self._lock:
            self._receivers.add(receiver)
        return receiver

    def cleanup(self) -> None:
        """Flush the window (up to flush_timeout), unregister listeners, close sockets.

        Receivers still open keep their sockets (they belong to their poll threads) until
        they are closed; the ZeroMQ context ends with the last of them."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._sender.close(self.conf["flush_timeout"])
        self._registrar.stop()
        self._release(None)

    def _release(self, closed: ZmqReceiver | None) -> None:
        """A receiver closed (None: the driver was cleaned up); once the driver and all its
        receivers are, close the registry and end the ZeroMQ context."""
        with self._lock:
            self._receivers.discard(closed)
            if not self._closed or self._receivers or self._released:
                return
            self._released = True
        try:
            if self._auth is not None:
                self._auth.stop()
            self.matchmaker.close()
        finally:
            self._ctx.term()

    def registered(self, exchange: str, routing_key: str) -> dict[str, int]:
        """How many live listeners each group has for (exchange, routing key) now (the no-pool
        group's key is ``""``): for tooling that must not send before its listeners are up,
        since no broker keeps the messages (the multi-process demo waits on this)."""
        return {group: len(members)
                for group, members in self.matchmaker.lookup(exchange, routing_key).items()}

    def describe(self) -> str:
        curve = ", CURVE" if self._curve is not None else ""
        return f"zmq driver ({self.matchmaker.describe()}{curve})"
