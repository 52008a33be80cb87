"""The driver contract: what a transport driver implements, and nothing more.

A driver moves encoded bytes between the core and one kind of broker. Everything that is the same
on every broker (URL parsing, option checking, capability checks, envelopes, retry policy,
dispatch, the once-only settlement of a message) lives in the core, so a driver stays small and a
third party can write one from this module alone. See docs/drivers.md for a walk-through.

The contract, in short::

    class MyDriver(Driver):
        name = "mine"
        capabilities = Capabilities(pools=True, requeue=True, ...)
        options = {"heartbeat": Option(int, 60, "seconds between heartbeats")}

        def __init__(self, url, options): ...            # no I/O needed here
        def send(self, message: OutgoingMessage) -> None  # one attempt; raise on failure
        def listen(self, bindings, pool, prefetch) -> Listener
        def cleanup(self) -> None

    class MyListener(Listener):
        def poll(self, timeout) -> list[IncomingMessage]  # block up to timeout
        def close(self) -> None                            # unsettled messages go back

    class MyMessage(IncomingMessage):
        def _ack(self) / _requeue(self) / _reject(self)    # called at most once, by the core
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Generic, TypeVar

from tidings.transports.url import TransportURL

__all__ = [
    "Binding",
    "Capabilities",
    "Driver",
    "IncomingMessage",
    "Listener",
    "Option",
    "OutgoingMessage",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do, declared as data so the core can check it in one place.

    The core raises ``NotImplementedError`` when a listener is built that needs a feature the
    driver does not declare, instead of silently downgrading (oslo.messaging only finds out at
    ``start()``, and some of its checks never run). The conformance suite skips a feature's tests
    by these flags, never by URL scheme, and runs a "raises NotImplementedError" test instead.
    """

    pools: bool = False
    """Listeners may join a named pool: every pool gets its own copy, one member takes it."""
    requeue: bool = False
    """A received message can be handed back and will be delivered again."""
    requeue_to_other_member: bool = False
    """A requeued message can reach another member of the group once the first has gone."""
    exchanges: bool = True
    """Exchanges are isolated: a listener on exchange A never sees exchange B's messages."""
    at_least_once: bool = False
    """A message that is received but not acknowledged (listener stopped or crashed) is delivered
    again, so nothing acknowledged-after-processing is lost."""
    durable: bool = False
    """Messages can survive a broker restart (persistent messages in durable queues)."""
    stores_without_listener: bool = False
    """A message sent while no listener of the no-pool group runs waits for one (the group's
    queue exists from the first send), instead of being dropped."""
    dead_letter: bool = False
    """A rejected message can be routed to a dead-letter destination instead of being dropped."""
    prefetch: bool = True
    """No more than ``prefetch`` unsettled messages are ever handed to one listener."""
    confirmed_send: bool = False
    """``send()`` returns only once the broker has taken responsibility for the message."""

    def as_dict(self) -> dict[str, bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class Option(Generic[T]):
    """A URL query option a driver accepts: its type, default and a line of help.

    Drivers declare their options; the core converts and validates ``?key=value`` strings against
    them and rejects unknown keys, naming the accepted ones, so a typo never passes silently.
    ``type`` is ``bool``, ``int``, ``float``, ``str``, or any callable turning the string into
    the value (raising ``ValueError`` on bad input).
    """

    type: Callable[[str], T]
    default: T | None
    help: str
    choices: tuple[str, ...] | None = None
    secret: bool = False
    """Mask the value wherever options are shown (for example a key's passphrase)."""

    def convert(self, name: str, raw: str) -> T:
        from tidings.transports.errors import InvalidTransportOption

        shown = "****" if self.secret else repr(raw)
        if self.choices is not None and raw not in self.choices:
            raise InvalidTransportOption(
                f"URL option {name}={shown} is not one of {', '.join(self.choices)}")
        try:
            if self.type is bool:
                lowered = raw.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True  # type: ignore[return-value]
                if lowered in ("0", "false", "no", "off"):
                    return False  # type: ignore[return-value]
                raise ValueError(raw)
            return self.type(raw)
        except (TypeError, ValueError):
            kind = getattr(self.type, "__name__", "value")
            raise InvalidTransportOption(
                f"URL option {name}={shown} is not a valid {kind}: {self.help}") from None


@dataclass(frozen=True)
class Binding:
    """One (exchange, routing key) a listener consumes, e.g. ('nova', 'notifications.info')."""

    exchange: str
    routing_key: str


@dataclass(slots=True)
class OutgoingMessage:
    """One encoded message for the driver to deliver to ``exchange`` under ``routing_key``.

    ``body`` is the complete encoded notification (UTF-8 JSON); drivers send it as it is, with
    ``content_type``; ``headers`` are extra application headers the core wants carried (for
    example a signature) and may be empty. ``persistent`` asks a broker to keep it on disk.
    """

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    persistent: bool = True


# Guards the check-and-set of once-only settlement. One lock for every message rather than one
# each: settling is a few bytecodes under it, two threads rarely settle at the same moment, and a
# lock made per message cost as much as the rest of the message's bookkeeping.
_SETTLE_LOCK = threading.Lock()


class IncomingMessage(abc.ABC):
    """A message a listener received; the core settles it exactly once.

    The public ``ack()``, ``requeue()`` and ``reject()`` are implemented here: the first call wins
    and later ones are no-ops, so no driver ever sends a second settlement (which on RabbitMQ
    closes the channel). Drivers implement only ``_ack``, ``_requeue`` and ``_reject``, which the
    core calls at most once per message. They may be called from any thread; a driver whose
    connection is single-threaded queues them and performs them in its next ``poll()`` or in
    ``close()``.
    """

    __slots__ = ("_settled", "body", "headers", "message_id", "redelivered")

    def __init__(self, body: bytes, message_id: str | None = None,
                 headers: Mapping[str, Any] | None = None, redelivered: bool = False) -> None:
        self.body = body
        self.message_id = message_id
        self.headers = dict(headers) if headers else {}
        self.redelivered = redelivered
        self._settled: str | None = None

    @property
    def settled(self) -> str | None:
        """``'ack'``, ``'requeue'``, ``'reject'`` or None while the message is still unsettled."""
        return self._settled

    def _settle(self, how: str, action: Callable[[], None]) -> bool:
        with _SETTLE_LOCK:
            if self._settled is not None:
                return False
            self._settled = how
        action()
        return True

    def _claim_for_return(self) -> str:
        """For a driver's ``close()``, which hands its unsettled messages back to the broker
        itself: mark this message requeued unless it was settled first, and return how it is
        settled now (``'requeue'`` unless an ack or reject won). No ``_requeue()`` follows."""
        with _SETTLE_LOCK:
            if self._settled is None:
                self._settled = "requeue"
            return self._settled

    def ack(self) -> bool:
        """Acknowledge: the message is done. Returns False if it was already settled."""
        return self._settle("ack", self._ack)

    def requeue(self) -> bool:
        """Hand the message back for another delivery. Returns False if already settled."""
        return self._settle("requeue", self._requeue)

    def reject(self) -> bool:
        """Drop the message, or dead-letter it where the driver can. False if already settled."""
        return self._settle("reject", self._reject)

    @abc.abstractmethod
    def _ack(self) -> None: ...

    @abc.abstractmethod
    def _requeue(self) -> None: ...

    @abc.abstractmethod
    def _reject(self) -> None: ...

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} id={self.message_id!r} bytes={len(self.body)} "
                f"settled={self._settled!r}>")


class Listener(abc.ABC):
    """A driver's consumer for a set of bindings, optionally as a member of a pool.

    ``poll()`` is called by the core from one thread at a time. A listener must never hold more
    than ``prefetch`` unsettled messages; messages it still holds when ``close()`` is called go
    back to the broker (or, for a brokerless driver, to another member) as if requeued.
    """

    @abc.abstractmethod
    def poll(self, timeout: float) -> Sequence[IncomingMessage]:
        """Wait up to ``timeout`` seconds for messages; return those available (maybe none).

        Return as soon as at least one message is there; never block longer than ``timeout``,
        so the core can stop a listener promptly. A lost connection is the driver's to repair
        here (reconnect, redeclare, resume); raise only when it cannot go on.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop consuming, perform pending settlements, return unsettled messages. Idempotent."""


class Driver(abc.ABC):
    """A transport driver, found by URL scheme through the ``tidings.drivers`` entry points.

    The core builds it with the parsed URL and the query options already converted to the types
    the driver declared in ``options`` (plus the core's own options, which it removes first).
    ``capabilities`` is a class attribute (what ``tidings drivers`` lists); a driver whose
    options change what it can promise (durable queues, a dead-letter exchange) sets
    ``self.capabilities`` in ``__init__``, and the core checks that instance's value.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    options: ClassVar[Mapping[str, Option[Any]]] = {}

    def __init__(self, url: TransportURL, options: Mapping[str, Any]) -> None:
        self.url = url
        self.conf = dict(options)

    @abc.abstractmethod
    def send(self, message: OutgoingMessage, timeout: float | None = None) -> None:
        """Deliver one message, one attempt. Return when the broker has it (if it confirms).

        Raise :class:`~tidings.transports.errors.TransportUnreachable` when the broker cannot be
        reached or did not confirm, so the core's retry policy decides whether to try again;
        raise anything else for errors a retry cannot fix. ``timeout`` bounds the attempt.
        """

    def send_many(self, messages: Sequence[OutgoingMessage],
                  timeout: float | None = None) -> list[BaseException | None]:
        """Deliver several messages, one attempt each; one result per message, in order:
        None when the broker has it, else the exception :meth:`send` would have raised.

        Optional. A driver whose broker confirms asynchronously overrides it to publish them
        all and then wait for the confirmations together (one round trip for the lot instead
        of one each); this default sends them one by one. ``timeout`` bounds each message's
        attempt; a pipelining driver may apply it to the batch as a whole.
        The core (BackgroundNotifier) retries the failed ones under its retry policy.
        """
        results: list[BaseException | None] = []
        for message in messages:
            try:
                self.send(message, timeout=timeout)
            except Exception as exc:
                results.append(exc)
            else:
                results.append(None)
        return results

    @abc.abstractmethod
    def listen(self, bindings: Sequence[Binding], pool: str | None,
               prefetch: int) -> Listener:
        """Start consuming ``bindings``: as the no-pool group when ``pool`` is None, else as a
        member of ``pool``. The core calls this only for features declared in capabilities."""

    def cleanup(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads. Called once, by ``Transport.cleanup()``."""

    def describe(self) -> str:
        """One line for logs and the CLI; must not reveal passwords."""
        return f"{self.name} driver at {self.url.masked()}"
