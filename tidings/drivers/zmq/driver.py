"""``zmq://``: brokerless notifications over ZeroMQ, with pools, exchanges and acknowledgements.

There is no broker. A listener binds a ROUTER socket and registers its address in a matchmaker
under (exchange, routing key, group), where the group is its pool or the no-pool group. A
notifier looks the (exchange, routing key) up, finds every group registered, and sends one copy
per group straight to one member of it, rotating members. The notifier's transport holds each
copy in a bounded window until a listener acknowledges it, and resends it to another member of
the same group when the member it went to requeues it, disconnects, expires from the registry
and stops answering, or stays silent for ``ack_timeout`` seconds.

What that means, said plainly (see docs/zmq.md):

* ``send()`` returns once a copy for every group registered at that moment is in the sender's
  window, not when a listener has it (``confirmed_send=False``). It blocks only while the window
  is full, and raises TransportUnreachable if it stays full for the send timeout or if the
  matchmaker cannot be reached.
* A message sent while a group has no registered member is not delivered to that group
  (``stores_without_listener=False``). Nothing is written to disk (``durable=False``).
* Redelivery (``at_least_once``, ``requeue``) lasts as long as the sending transport: copies
  that are unacknowledged when the sending process dies are lost, and copies of a group that has
  had no member for ``ttl`` seconds are dropped with a warning.
* A rejected message is dropped (logged by the core); there is no dead-letter destination.

URLs: ``zmq://`` (in-memory matchmaker, one process), ``zmq+redis://host:6379/0`` (Redis),
``zmq+sqlite:////abs/path/tidings.db`` (a file shared by the processes of one host; three
slashes for a path relative to the working directory), or ``?matchmaker=<name>`` in the query.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any

import zmq

from tidings.drivers.zmq.listener import Registrar, ZmqListener
from tidings.drivers.zmq.sender import Directory, Sender
from tidings.matchmaker.base import MatchMaker, get_matchmaker
from tidings.transports.base import (
    Binding,
    Capabilities,
    Driver,
    Listener,
    Option,
    OutgoingMessage,
)
from tidings.transports.errors import InvalidTransportOption, InvalidTransportURL
from tidings.transports.url import TransportURL, mask_password

__all__ = ["ZmqDriver"]

LOG = logging.getLogger(__name__)

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

    def __init__(self, url: TransportURL, options: dict[str, Any]) -> None:
        super().__init__(url, options)
        conf = {name: options.get(name, opt.default) for name, opt in self.options.items()}
        self.conf = conf
        self._check(conf)
        backend = self._backend(url, conf["matchmaker"])
        self.ttl: float = conf["ttl"]
        self.bind_address: str = conf["bind_address"]
        advertise = conf["advertise_address"]
        if advertise is None and self.bind_address in _WILDCARDS:
            advertise = socket.gethostname()
        self.advertise_address: str | None = advertise
        self.port_range = (conf["port_min"], conf["port_max"])
        try:
            self.matchmaker: MatchMaker = get_matchmaker(backend, url, conf["namespace"])
        except InvalidTransportURL:
            raise
        except ValueError as exc:
            raise InvalidTransportURL(mask_password(str(exc))) from None
        self._ctx = zmq.Context(io_threads=1)
        self._lock = threading.Lock()
        self._listeners: set[ZmqListener] = set()
        self._closed = False
        self._released = False
        self._registrar = Registrar(self.matchmaker, self.ttl)
        directory = Directory(self.matchmaker, self.ttl, conf["lookup_interval"])
        self._sender = Sender(self._ctx, directory,
                              window=conf["ack_window"], ack_timeout=conf["ack_timeout"],
                              orphan_timeout=self.ttl, connect_grace=conf["connect_grace"],
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
        if (low, high) != (0, 0):
            if not (1 <= low <= high <= 65535):
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

    # -- the contract ------------------------------------------------------------------------
    def send(self, message: OutgoingMessage, timeout: float | None = None) -> None:
        self._sender.send(message, timeout)

    def listen(self, bindings: Sequence[Binding], pool: str | None,
               prefetch: int) -> Listener:
        if pool is not None and (not isinstance(pool, str) or not pool):
            raise ValueError(f"pool must be a non-empty string or None, not {pool!r}")
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.describe()} was cleaned up; build a new transport")
        listener = ZmqListener(
            self._ctx, self.matchmaker, self._registrar, bindings, pool, prefetch,
            bind_address=self.bind_address, advertise_address=self.advertise_address,
            port_range=self.port_range, on_close=self._forget)
        with self._lock:
            self._listeners.add(listener)
        return listener

    def _forget(self, listener: ZmqListener) -> None:
        with self._lock:
            self._listeners.discard(listener)
            last = self._closed and not self._listeners
        if last:
            self._release()

    def cleanup(self) -> None:
        """Flush the window (up to flush_timeout), unregister listeners, close sockets.

        Listeners still open keep their sockets (they belong to their poll threads) until
        they are closed; the ZeroMQ context ends with the last of them.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._sender.close(self.conf["flush_timeout"])
        self._registrar.stop()
        with self._lock:
            last = not self._listeners
        if last:
            self._release()

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        try:
            self.matchmaker.close()
        finally:
            self._ctx.term()

    def registered(self, exchange: str, routing_key: str) -> dict[str, int]:
        """How many live listeners each group has for (exchange, routing key), right now.

        For tooling that must not send before its listeners are up (there is no broker to keep
        the messages): the multi-process demo waits on this, e.g. until
        ``registered("openstack", "notifications.info")`` lists its pools. The no-pool group's
        key is ``""``.
        """
        return {group: len(members)
                for group, members in self.matchmaker.lookup(exchange, routing_key).items()}

    def describe(self) -> str:
        return f"zmq driver ({self.matchmaker.describe()})"
