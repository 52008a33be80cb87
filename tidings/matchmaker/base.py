"""The matchmaker contract, and the loader that finds backends through stevedore.

A brokerless transport has no queue a notifier can publish to and forget: a notifier has to know
which listeners are alive, right now, for an (exchange, routing key). The matchmaker is that
registry. Each entry says "the listener at ``address`` belongs to ``group`` for ``exchange`` /
``routing_key``", where the group is a pool name, or :data:`NO_POOL` for the listeners that share
the routing key without a pool (the no-pool group). The exchange is part of every key, so a
notifier on exchange A can never find a listener of exchange B.

Entries carry a time-to-live: a listener refreshes its entries while it lives, and one that dies
without unregistering (SIGKILL, power loss) drops out when its TTL runs out instead of being
looked up for ever. Expiry is judged by one clock per backend (the Redis server's ``TIME``, the
host clock for sqlite, the process's monotonic clock in memory) so hosts need not agree on time.

:meth:`MatchMaker.generation` is a counter that changes whenever an entry is added or removed
(not when one is merely refreshed). It lets a sender keep its lookups in a cache and validate the
cache with one cheap read per send instead of a full lookup.

Addresses are opaque strings to the matchmaker; the ZeroMQ driver decides what they hold.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from tidings.transports.errors import (
    InvalidTransportOption,
    InvalidTransportURL,
    MessageDeliveryFailure,
    MessageUndeliverable,
)
from tidings.transports.loader import entry_point_names, load_plugin
from tidings.transports.url import TransportURL, mask_password

__all__ = [
    "MATCHMAKER_NAMESPACE",
    "NO_POOL",
    "MatchMaker",
    "Member",
    "NoListener",
    "Registration",
    "available_matchmakers",
    "check_ttl",
    "get_matchmaker",
    "load_matchmaker_class",
    "matchmaker_for",
]

MATCHMAKER_NAMESPACE = "tidings.matchmakers"

NO_POOL = ""
"""The group name of the listeners that consume a routing key without a pool."""


@dataclass(frozen=True)
class Registration:
    """One listener's membership of one group: (exchange, routing key, group) -> address."""

    exchange: str
    routing_key: str
    group: str
    address: str

    def __post_init__(self) -> None:
        for name in ("exchange", "routing_key", "address"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"Registration.{name} must be a non-empty string, not {value!r}")
        if not isinstance(self.group, str):
            raise ValueError(f"Registration.group must be a pool name or NO_POOL (''), "
                             f"not {self.group!r}")


@dataclass(frozen=True)
class Member:
    """A live address found by :meth:`MatchMaker.lookup`, with the seconds left on its TTL.

    ``expires_in`` lets a caller cache the answer no longer than the entry is sure to live.
    """

    address: str
    expires_in: float


class NoListener(MessageDeliveryFailure, MessageUndeliverable):
    """A message was not sent: no listener is registered for its (exchange, routing key) and
    a brokerless transport keeps nothing. Both a MessageDeliveryFailure and oslo.messaging's
    MessageUndeliverable (``exchange``, ``routing_key``, ``message``: the message id)."""

    def __init__(self, exchange: str, routing_key: str, message_id: str, registry: str) -> None:
        MessageDeliveryFailure.__init__(
            self, f"zmq: no listener is registered for {exchange}/{routing_key} in the "
                  f"{registry}, and zmq:// stores nothing: message {message_id} was not sent. "
                  f"Start a listener first; one using another registry (URL, namespace, or "
                  f"user for plain zmq://) is not seen")
        self.exception, self.exchange, self.routing_key = None, exchange, routing_key
        self.message = message_id


def check_ttl(ttl: float) -> float:
    """Validate a TTL early so that a zero or negative one fails loudly, not as instant expiry."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) \
            or ttl <= 0:
        raise ValueError(f"ttl={ttl!r}: a registration's time-to-live must be a positive number "
                         f"of seconds")
    return float(ttl)


class MatchMaker(abc.ABC):
    """A registry backend. Thread-safe: senders look up from any thread while a listener's
    heartbeat thread refreshes its entries.

    Backends raise :class:`~tidings.transports.errors.TransportUnreachable` when their store
    cannot be reached, so the core's retry policy applies to sends that need a lookup.
    """

    name: ClassVar[str] = ""

    def __init__(self, url: TransportURL, namespace: str = "tidings") -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty string, not {namespace!r}")
        self.url = url
        self.namespace = namespace

    @abc.abstractmethod
    def register(self, registrations: Sequence[Registration], ttl: float) -> int:
        """Add or refresh ``registrations`` so they live ``ttl`` more seconds.

        Returns how many were new (absent or already expired); if any were, the generation
        changes. Refreshing the same entries again is how a listener stays registered.
        """

    @abc.abstractmethod
    def unregister(self, registrations: Sequence[Registration]) -> None:
        """Remove ``registrations`` now (a listener closing cleanly). Missing ones are ignored."""

    @abc.abstractmethod
    def lookup(self, exchange: str, routing_key: str) -> dict[str, list[Member]]:
        """Every group registered for (exchange, routing key) with its live members.

        Groups without a live member are left out. The key of the no-pool group is
        :data:`NO_POOL`. Members are in a stable order (by address) so callers can rotate.
        """

    @abc.abstractmethod
    def generation(self) -> int:
        """A counter that changes whenever an entry is added or removed (not refreshed)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Entries stay until unregistered or expired."""

    def describe(self) -> str:
        """One line for logs; never shows a password."""
        return f"{self.name} matchmaker {self.url.masked()} namespace={self.namespace!r}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def available_matchmakers() -> list[str]:
    """Names with an installed ``tidings.matchmakers`` entry point (imported or not)."""
    return entry_point_names(MATCHMAKER_NAMESPACE)


def load_matchmaker_class(name: str) -> type[MatchMaker]:
    """The backend class registered as ``name``, or DriverLoadFailure saying what to install."""
    return load_plugin(
        MATCHMAKER_NAMESPACE, name, MatchMaker,
        unknown="no tidings matchmaker named {name!r}; installed matchmakers: {installed}. Use "
                "one of them (zmq://, zmq+redis://host:6379/0, zmq+sqlite:////path/file.db) or "
                "install the plug-in that provides {name!r}.",
        unimportable="matchmaker {name!r} is installed but cannot be imported ({exc}); install "
                     "its library, e.g. pip install 'tidings[{name}]'")


def get_matchmaker(name: str, url: TransportURL | str,
                   namespace: str = "tidings") -> MatchMaker:
    """Load backend ``name`` and build it for ``url`` (its hosts / virtual host say where)."""
    return load_matchmaker_class(name)(TransportURL.parse(url), namespace)


def matchmaker_for(url: TransportURL, option: str | None, namespace: str) -> MatchMaker:
    """The registry a transport URL names: ``zmq+<name>://`` or ``?matchmaker=<name>`` (both
    given, they must agree), else this user's default one, the sqlite file in
    :func:`tidings.matchmaker.sqlite.runtime_dir`, where a virtual host (``zmq:///name``) names
    a registry of its own (it joins the namespace). Bad URLs raise InvalidTransportURL."""
    name = url.subscheme
    if name and option and name != option:
        raise InvalidTransportOption(
            f"{url.masked()}: the scheme says matchmaker {name!r} but the query says "
            f"matchmaker={option!r}; give one of them")
    name = name or option
    if name is None:
        if url.hosts:
            raise InvalidTransportURL(
                f"{url.masked()}: {url.transport}:// takes no host (its registry is a file of "
                f"this user on this host); for several hosts use zmq+redis://host:6379/0")
        name, namespace = "sqlite", f"{namespace}/{url.virtual_host or ''}".rstrip("/")
        url = TransportURL(url.transport, query_items=url.query_items)
    try:
        return get_matchmaker(name, url, namespace)
    except InvalidTransportURL:
        raise
    except ValueError as exc:
        raise InvalidTransportURL(mask_password(str(exc))) from None
