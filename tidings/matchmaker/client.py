"""How a transport uses a matchmaker: keeping its listeners registered, and cached lookups.

:class:`Registrar` registers listeners' entries and refreshes them from one thread, so they
outlive a missed refresh or two while the process lives and drop out after the TTL when it dies.
:class:`Directory` answers lookups from a cache: a send must see a listener that has just
registered, but a full lookup per send would cost a Redis round trip or an sqlite query each
time. Changes made by this process (its own listeners registering or leaving) invalidate every
cache of the process at once, through a process-wide counter; changes made by other processes
are noticed through the registry's generation, read at most once per ``check_interval``
seconds; and no cached lookup outlives the shortest TTL in it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tidings.matchmaker.base import MatchMaker, Registration

__all__ = ["Directory", "Registrar", "Route"]

LOG = logging.getLogger(__name__)

_LOCAL_CHANGES: dict[str, int] = {}  # registry (its description) -> changes made by this process
_LOCAL_LOCK = threading.Lock()


def _note_local_change(matchmaker: MatchMaker) -> None:
    key = matchmaker.describe()
    with _LOCAL_LOCK:
        _LOCAL_CHANGES[key] = _LOCAL_CHANGES.get(key, 0) + 1


class Registrar:
    """Keeps registrations alive: one thread refreshes them all every third of the TTL."""

    def __init__(self, matchmaker: MatchMaker, ttl: float) -> None:
        self._matchmaker = matchmaker
        self._ttl = ttl
        self._lock = threading.Lock()
        # Held by a refresh from its snapshot of the entries to the registry's answer, and by
        # remove() and stop(): a refresh that read an entry never re-registers it after it was
        # unregistered (which would keep a closed listener registered for a TTL).
        self._refreshing = threading.Lock()
        self._entries: list[Sequence[Registration]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, registrations: Sequence[Registration]) -> None:
        """Register now (raising what the matchmaker raises), then keep them refreshed."""
        self._matchmaker.register(registrations, self._ttl)
        _note_local_change(self._matchmaker)
        with self._lock:
            self._entries.append(registrations)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="tidings-matchmaker-registrar")
                self._thread.start()

    def remove(self, registrations: Sequence[Registration]) -> None:
        """Unregister what :meth:`add` registered (nothing once stopped)."""
        with self._refreshing:
            with self._lock:
                if registrations not in self._entries:
                    return
                self._entries.remove(registrations)
            try:
                self._matchmaker.unregister(registrations)
            finally:
                _note_local_change(self._matchmaker)

    def stop(self) -> None:
        """Stop refreshing and unregister what is left."""
        self._stop.set()
        with self._refreshing, self._lock:
            left, self._entries = self._entries, []
        for registrations in left:
            try:
                self._matchmaker.unregister(registrations)
            except Exception as exc:
                LOG.warning("could not unregister %d registration(s) (%s); they expire after "
                            "the TTL", len(registrations), exc)
            _note_local_change(self._matchmaker)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _run(self) -> None:
        interval = self._ttl / 3
        failures = 0
        while not self._stop.wait(interval if not failures else min(interval, 0.5)):
            try:
                with self._refreshing:
                    with self._lock:
                        entries = [r for registrations in self._entries for r in registrations]
                    added = self._matchmaker.register(entries, self._ttl) if entries else 0
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    LOG.warning("refreshing %d registration(s) in %s failed %d time(s) in a row "
                                "(%s); retrying; they expire %.1fs after the last success",
                                len(entries), self._matchmaker.describe(), failures, exc,
                                self._ttl)
                continue
            failures = 0
            if added:
                LOG.info("%d registration(s) had expired in %s and were renewed; was this "
                         "process paused for longer than the TTL (%.1fs)?", added,
                         self._matchmaker.describe(), self._ttl)


@dataclass(frozen=True)
class Route:
    """A validated lookup: group -> member addresses, for one (exchange, routing key).
    ``stamp`` grows with every lookup, so a holder can tell a newer one from an older."""

    key: tuple[str, str]
    groups: dict[str, tuple[str, ...]]
    stamp: int
    valid_until: float


class Directory:
    """Lookups cached until the registry changes or an entry's TTL runs out (see above)."""

    def __init__(self, matchmaker: MatchMaker, max_age: float,
                 check_interval: float = 0.0) -> None:
        self._mm = matchmaker
        self._key = matchmaker.describe()
        self._max_age = max_age
        self._check_interval = check_interval
        self._lock = threading.Lock()
        self._routes: dict[tuple[str, str], Route] = {}
        self._state: tuple[int, int] | None = None  # (generation, local changes) of the cache
        self._next_check = 0.0
        self._stamps = itertools.count(1)

    @property
    def registry(self) -> str:
        """The registry's description, for messages (never a password)."""
        return self._key

    def route(self, exchange: str, routing_key: str) -> Route:
        """The current groups of (exchange, routing key); raises TransportUnreachable."""
        now = time.monotonic()
        local = _LOCAL_CHANGES.get(self._key, 0)
        if self._state is None or local != self._state[1] or now >= self._next_check:
            state = (self._mm.generation(), local)
            with self._lock:
                if state != self._state:
                    self._routes.clear()
                    self._state = state
                self._next_check = now + self._check_interval
        key = (exchange, routing_key)
        cached = self._routes.get(key)
        if cached is not None and cached.valid_until > now:
            return cached
        seen = self._state
        found = self._mm.lookup(exchange, routing_key)
        now = time.monotonic()
        life = min((m.expires_in for ms in found.values() for m in ms), default=self._max_age)
        route = Route(key, {g: tuple(m.address for m in ms) for g, ms in found.items()},
                      next(self._stamps), now + max(0.0, min(life, self._max_age)))
        with self._lock:
            if self._state == seen:
                if len(self._routes) >= 10_000:  # endless distinct topics: start afresh
                    self._routes.clear()
                self._routes[key] = route
        return route
