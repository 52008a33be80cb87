"""``zmq://``: brokerless notifications over ZeroMQ, with pools, exchanges and acknowledgements.

A listener binds a ROUTER socket and registers its address in a matchmaker under (exchange,
routing key, group), the group being its pool or the no-pool group. A notifier looks the
(exchange, routing key) up and sends one copy per registered group straight to one member of it,
rotating members. The sending transport keeps each copy in a bounded window until a listener
acknowledges it, and resends it to another member of the group when the one it went to requeues
it, disconnects, stops answering or stays silent for ``ack_timeout``; a group with no member for
``ttl`` seconds has its copies dropped (logged). So a send returns once every group registered
then has its copy in the window (``confirmed_send=False``); a group without a member gets nothing
(``stores_without_listener=False``); nothing is on disk; redelivery lasts as long as the sending
transport; a rejected message is dropped (no dead-letter destination). See docs/zmq.md.

URLs: ``zmq://`` (in-memory matchmaker, one process), ``zmq+redis://host:6379/0`` (Redis),
``zmq+sqlite:////abs/path/tidings.db`` (a file shared by the processes of one host; three
slashes for a path relative to the working directory), or ``?matchmaker=<name>`` in the query.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import zmq

from tidings.drivers.zmq.listener import ZmqReceiver
from tidings.drivers.zmq.sender import Sender
from tidings.matchmaker.base import MatchMaker, get_matchmaker
from tidings.matchmaker.client import Directory, Registrar
from tidings.transports.base import Binding, Capabilities, Driver, Option, OutgoingMessage
from tidings.transports.errors import InvalidTransportOption, InvalidTransportURL
from tidings.transports.url import TransportURL, mask_password

__all__ = ["ZmqDriver"]

_WILDCARDS = ("0.0.0.0", "*", "::", "[::]")


class ZmqDriver(Driver):
    """Brokerless driver on pyzmq; see the module docstring for its model and its promises."""

    name = "zmq"
    capabilities = Capabilities(
        pools=True, requeue=True, requeue_to_other_member=True, exchanges=True,
        at_least_once=True, durable=False, stores_without_listener=False, dead_letter=False,
        prefetch=True, confirmed_send=False)
    options = {
        "matchmaker": Option(str, None, "listener registry: memory (one process), redis, "
                                        "sqlite, or an installed plug-in; zmq+<name>:// sets "
                                        "it too"),
        "namespace": Option(str, "tidings", "registry namespace (Redis key prefix); keeps "
                                            "deployments sharing one registry apart"),
        "bind_address": Option(str, "127.0.0.1", "address listeners bind; 0.0.0.0 for all "
                                                 "interfaces"),
        "advertise_address": Option(str, None, "host name or address senders use to reach "
                                               "this host's listeners (default: bind_address, "
                                               "or the host name when binding a wildcard)"),
        "port_min": Option(int, 0, "lowest port a listener may bind (0: any free port)"),
        "port_max": Option(int, 0, "highest port a listener may bind (0: any free port)"),
        "ttl": Option(float, 10.0, "seconds a listener's registration lives unrefreshed; a "
                                   "listener that dies silently drops out after this"),
        "lookup_interval": Option(float, 0.05, "seconds a sender reuses a lookup before "
                                               "checking the registry for listeners of other "
                                               "processes (0: every send); this process's own "
                                               "listeners are seen at once"),
        "ack_window": Option(int, 1000, "most copies one sending transport keeps "
                                        "unacknowledged; send() waits for room beyond it"),
        "ack_timeout": Option(float, 30.0, "seconds a listener holding our copies may stay "
                                           "silent before they go to another member"),
        "flush_timeout": Option(float, 5.0, "seconds cleanup() waits for unacknowledged "
                                            "copies that still have a listener"),
        "connect_grace": Option(float, 1.0, "seconds a newly found listener's turn is kept "
                                            "while its connection is being set up, so the "
                                            "first one connected does not take every copy "
                                            "(0: no waiting)"),
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
        try:
            self.matchmaker: MatchMaker = get_matchmaker(
                self._backend(url, conf["matchmaker"]), url, conf["namespace"])
        except InvalidTransportURL:
            raise
        except ValueError as exc:
            raise InvalidTransportURL(mask_password(str(exc))) from None
        self._ctx = zmq.Context(io_threads=1)
        self._lock = threading.Lock()
        self._receivers: set[ZmqReceiver] = set()
        self._closed = self._released = False
        self._registrar = Registrar(self.matchmaker, conf["ttl"])
        directory = Directory(self.matchmaker, conf["ttl"], conf["lookup_interval"])
        self._sender = Sender(self._ctx, directory, window=conf["ack_window"],
                              ack_timeout=conf["ack_timeout"], orphan_timeout=conf["ttl"],
                              connect_grace=conf["connect_grace"],
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

    @staticmethod
    def _backend(url: TransportURL, option: str | None) -> str:
        sub = url.subscheme
        if sub and option and sub != option:
            raise InvalidTransportOption(
                f"{url.masked()}: the scheme says matchmaker {sub!r} but the query says "
                f"matchmaker={option!r}; give one of them")
        return sub or option or "memory"

    def send_batch(self, messages: Sequence[OutgoingMessage],
                   timeout: float | None) -> list[BaseException | None]:
        return self._sender.send_batch(messages, timeout)

    def listen(self, bindings: Sequence[Binding], pool: str | None,
               prefetch: int) -> ZmqReceiver:
        if pool is not None and (not isinstance(pool, str) or not pool):
            raise ValueError(f"pool must be a non-empty string or None, not {pool!r}")
        if self._closed:
            raise RuntimeError(f"{self.describe()} was cleaned up; build a new transport")
        receiver = ZmqReceiver(self._ctx, self._registrar, bindings, pool, prefetch,
                               on_close=self._release, **self._bind)
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
        return f"zmq driver ({self.matchmaker.describe()})"
