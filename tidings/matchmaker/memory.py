"""In-process matchmaker: the registry behind ``zmq+memory://`` (or ``?matchmaker=memory``).

Every matchmaker in one process with the same virtual host and namespace shares one registry, so
a notifier and a listener built from separate ``zmq+memory://`` transports find each other, as
with ``memory://``. Use a virtual host (``zmq+memory:///test-1``) or a namespace to keep tests
apart. It cannot reach other processes: plain ``zmq://`` (a per-user sqlite file) or the Redis
backend can.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from tidings.matchmaker.base import MatchMaker, Member, Registration, check_ttl
from tidings.transports.url import TransportURL

__all__ = ["MemoryMatchMaker"]

# (exchange, routing key) -> {(group, address): expiry on the monotonic clock}
_Table = dict[tuple[str, str], dict[tuple[str, str], float]]


class _Registry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.routes: _Table = {}
        self.generation = 0


_REGISTRIES: dict[tuple[str, str], _Registry] = {}
_REGISTRIES_LOCK = threading.Lock()


def _registry(vhost: str, namespace: str) -> _Registry:
    with _REGISTRIES_LOCK:
        reg = _REGISTRIES.get((vhost, namespace))
        if reg is None:
            reg = _REGISTRIES[(vhost, namespace)] = _Registry()
        return reg


class MemoryMatchMaker(MatchMaker):
    """One process's registry, keyed by (virtual host, namespace); see the module docstring."""

    name = "memory"

    def __init__(self, url: TransportURL, namespace: str = "tidings") -> None:
        super().__init__(url, namespace)
        if url.hosts:
            raise ValueError(
                f"{url.masked()}: the in-memory matchmaker has no server, so the URL takes no "
                f"host; use zmq+memory:// (or zmq+memory:///name to isolate a registry), or "
                f"zmq+redis://host:6379/0 to share a Redis registry between hosts")
        self._vhost = url.virtual_host or ""
        self._reg = _registry(self._vhost, namespace)

    def register(self, registrations: Sequence[Registration], ttl: float) -> int:
        ttl = check_ttl(ttl)
        reg = self._reg
        added = 0
        with reg.lock:
            now = time.monotonic()
            for r in registrations:
                route = reg.routes.setdefault((r.exchange, r.routing_key), {})
                key = (r.group, r.address)
                old = route.get(key)
                if old is None or old <= now:
                    added += 1
                route[key] = now + ttl
            if added:
                reg.generation += 1
        return added

    def unregister(self, registrations: Sequence[Registration]) -> None:
        reg = self._reg
        with reg.lock:
            removed = False
            for r in registrations:
                route = reg.routes.get((r.exchange, r.routing_key))
                if route is not None and route.pop((r.group, r.address), None) is not None:
                    removed = True
                    if not route:
                        del reg.routes[(r.exchange, r.routing_key)]
            if removed:
                reg.generation += 1

    def lookup(self, exchange: str, routing_key: str) -> dict[str, list[Member]]:
        reg = self._reg
        out: dict[str, list[Member]] = {}
        with reg.lock:
            route = reg.routes.get((exchange, routing_key))
            if not route:
                return out
            now = time.monotonic()
            expired = []
            for (group, address), expiry in route.items():
                if expiry <= now:
                    expired.append((group, address))
                else:
                    out.setdefault(group, []).append(Member(address, expiry - now))
            for key in expired:  # forget the dead so the table does not grow for ever
                del route[key]
        for members in out.values():
            members.sort(key=lambda m: m.address)
        return out

    def generation(self) -> int:
        return self._reg.generation

    def describe(self) -> str:
        # Names the registry, not the URL: transports whose URLs differ only in options share
        # it, and the zmq driver keys its process-wide change counter on this string.
        return f"memory matchmaker /{self._vhost} namespace={self.namespace!r}"
