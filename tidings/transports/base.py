"""The driver contract: what a transport driver implements, and nothing more.

A driver moves encoded bytes between the core and one kind of broker. Everything that is the same
on every broker lives in the core, once: URL parsing, option checking, capability checks,
envelopes, the retry policy, reconnecting with backoff, dispatch on a worker pool, prefetch, the
set of messages a listener holds, once-only settlement and returning unsettled messages on close.
A driver therefore stays small, and a third party can write one from this module alone (see
docs/drivers.md for a walk-through). The shape follows Go CDK's ``pubsub/driver``: batches in,
batches out, and the portable logic on the other side of the line.

The contract, in short::

    class MyDriver(Driver):
        name = "mine"
        capabilities = Capabilities(pools=True, requeue=True, ...)
        options = {"heartbeat": Option(int, 60, "seconds between heartbeats")}

        def __init__(self, url, options): ...                         # no I/O needed here
        def send_batch(self, messages, timeout) -> list[BaseException | None]   # one attempt each
        def retryable(self, exc) -> bool                              # optional
        def listen(self, bindings, pool, prefetch) -> Receiver        # subscription in place
        def cleanup(self) -> None                                     # optional

    class MyReceiver(Receiver):
        def receive(self, max_messages, timeout) -> list[IncomingMessage]  # block up to timeout
        def settle(self, outcomes) -> None      # [(message, ACK | REQUEUE | REJECT), ...]
        def close(self) -> None                 # stop consuming; the broker keeps the rest
        def interrupt(self) -> None             # optional, any thread: end a blocked receive()

Every ``Receiver`` call comes from the core's poll thread for that listener, one at a time, except
``interrupt()``. A lost connection is reported by raising (``TransportUnreachable``) from
``receive()`` or ``settle()``: the core drops what the lost connection delivered (the broker
delivers it again), closes the receiver and calls ``listen()`` again under its backoff.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Generic, TypeVar

from tidings.transports.url import TransportURL

__all__ = [
    "ACK",
    "REJECT",
    "REQUEUE",
    "Binding",
    "Capabilities",
    "Driver",
    "IncomingMessage",
    "Option",
    "OutgoingMessage",
    "Receiver",
]

T = TypeVar("T")

ACK = "ack"
"""Outcome: the message is done; the broker forgets it."""
REQUEUE = "requeue"
"""Outcome: hand the message back for another delivery (to any member of its group or pool)."""
REJECT = "reject"
"""Outcome: drop the message, or dead-letter it where the driver and broker can."""


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


class IncomingMessage:
    """One delivery, built by a driver's ``receive()``; the core settles it exactly once.

    A driver fills in what the broker said (``body``, ``message_id``, ``headers``,
    ``redelivered``, where the broker counts them ``delivery_count``, and, where the broker says
    where the delivery was sent, ``exchange`` and ``routing_key``) and keeps whatever it
    needs to settle the delivery later in ``token`` (a delivery tag, a stream entry id, a
    (sender, sequence) pair). A delivery the driver cannot unwrap (headers that are not a
    mapping, a property it cannot read) is still returned, with ``problem`` saying what is wrong:
    the core rejects it and logs its id, and the other deliveries of the batch go on as usual.

    ``ack()``, ``requeue()`` and ``reject()`` may be called from any thread: the first call wins,
    later ones return False, and the outcome goes to the core's settlement queue, which hands it
    to the driver's ``settle()`` on the poll thread. No driver ever sees a second settlement of
    one message (which on RabbitMQ closes the channel).
    """

    __slots__ = ("_settled", "_sink", "body", "delivery_count", "exchange", "headers",
                 "message_id", "problem", "redelivered", "routing_key", "token")

    def __init__(self, body: bytes, message_id: str | None = None,
                 headers: Mapping[str, Any] | None = None, redelivered: bool = False,
                 token: Any = None, delivery_count: int | None = None,
                 exchange: str | None = None, routing_key: str | None = None) -> None:
        self.body = body
        self.message_id = message_id
        self.redelivered = redelivered
        self.token = token
        self.delivery_count = delivery_count
        # Where the message was sent, in the broker's words: signatures bind a message to its
        # route, and a route the broker vouches for is checked exactly (else the listener's
        # bindings are the best the core knows). None where the driver cannot tell.
        self.exchange = exchange
        self.routing_key = routing_key
        self.problem: str | None = None
        self._settled: str | None = None
        self._sink: Callable[[IncomingMessage], None] | None = None
        if not headers:
            self.headers: dict[str, Any] = {}
        elif isinstance(headers, Mapping):
            self.headers = dict(headers)
        else:
            self.headers = {}
            self.problem = f"its headers are a {type(headers).__name__}, not a mapping"

    @property
    def settled(self) -> str | None:
        """``'ack'``, ``'requeue'``, ``'reject'`` or None while the message is still unsettled."""
        return self._settled

    def _settle(self, how: str) -> bool:
        with _SETTLE_LOCK:
            if self._settled is not None:
                return False
            self._settled = how
        sink = self._sink
        if sink is not None:
            sink(self)
        return True

    def _claim(self, how: str) -> bool:
        """The core's close path: settle as ``how`` unless settled first, without queueing it
        (the caller hands it to the driver itself). True if this call settled it."""
        with _SETTLE_LOCK:
            if self._settled is not None:
                return False
            self._settled = how
            return True

    def ack(self) -> bool:
        """Acknowledge: the message is done. Returns False if it was already settled."""
        return self._settle(ACK)

    def requeue(self) -> bool:
        """Hand the message back for another delivery. Returns False if already settled."""
        return self._settle(REQUEUE)

    def reject(self) -> bool:
        """Drop the message, or dead-letter it where the driver can. False if already settled."""
        return self._settle(REJECT)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} id={self.message_id!r} bytes={len(self.body)} "
                f"settled={self._settled!r}>")


Outcome = tuple[IncomingMessage, str]
"""A message and how to settle it: ``ACK``, ``REQUEUE`` or ``REJECT``."""


class Receiver(abc.ABC):
    """A driver's consumer for a set of bindings, as the no-pool group or a member of a pool.

    The core decides how many messages the listener holds (it never asks for more than
    ``prefetch`` minus what it holds), keeps them, settles each once and gives the unsettled
    ones back before ``close()``. The receiver only moves deliveries and outcomes.
    """

    @abc.abstractmethod
    def receive(self, max_messages: int, timeout: float) -> Sequence[IncomingMessage]:
        """Wait up to ``timeout`` seconds for deliveries; return at most ``max_messages``.

        Return as soon as at least one is there (with whatever else is already buffered, up to
        ``max_messages``), and never block longer than ``timeout``: that is how the core stops
        promptly and gets settlements out. Deliveries beyond ``max_messages`` that the broker
        already pushed stay buffered in the receiver for the next call. Raise
        ``TransportUnreachable`` when the connection is lost: the core reconnects.
        """

    @abc.abstractmethod
    def settle(self, outcomes: Sequence[Outcome]) -> None:
        """Apply ``outcomes`` (each message of this receiver, once) on the broker.

        Called on the poll thread with every settlement made since the last call, in the order
        they were made. How to batch them (one ``basic.ack multiple``, one XACK of many ids) is
        the driver's choice. The core hands back every unsettled message as ``REQUEUE`` before
        ``close()``. Raise ``TransportUnreachable`` when the connection is lost.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop consuming and release the connection. Deliveries the core never received
        (still buffered here) go back to the broker. Idempotent; must not hang on a dead
        connection."""

    def interrupt(self) -> None:  # noqa: B027 - optional hook
        """Optional, from any thread: make a blocked (or the next) ``receive()`` return now.

        The core calls it when a settlement arrives while the poll thread waits in
        ``receive()``, and on ``stop()``; a call may race with ``close()`` or come after it,
        and must then do nothing. A receiver that does not implement it gets short
        ``receive()`` timeouts whenever settlements may come, so they wait at most that long.
        """


class Driver(abc.ABC):
    """A transport driver, found by URL scheme through the ``tidings.drivers`` entry points.

    The core builds it with the parsed URL and the query options already converted to the types
    the driver declared in ``options`` (plus the core's own options, which it removes first).
    ``capabilities`` is a class attribute (what ``tidings drivers`` lists); a driver whose
    options change what it can promise (durable queues, a dead-letter exchange) sets
    ``self.capabilities`` in ``__init__``, and the core checks that instance's value.
    """

    name: ClassVar[str] = ""
    capabilities: Capabilities = Capabilities()
    options: ClassVar[Mapping[str, Option[Any]]] = {}
    max_message_size: int = 16 * 1024 * 1024
    """The transport's ``max_message_size`` option, set by the core once the driver is built
    (read it in ``send_batch()`` or ``receive()``, not in ``__init__``): a driver whose broker
    announces a body's size before sending it can refuse a larger one without reading it, and
    one whose broker has a smaller limit of its own can say so per message."""

    def __init__(self, url: TransportURL, options: Mapping[str, Any]) -> None:
        self.url = url
        self.conf = dict(options)

    @abc.abstractmethod
    def send_batch(self, messages: Sequence[OutgoingMessage],
                   timeout: float | None) -> list[BaseException | None]:
        """Deliver each message in one attempt; one result per message, in order: None when
        the broker has it (confirmed, where the broker confirms), else the exception.

        Publish them all before waiting for confirmations where the broker confirms
        asynchronously, so a batch costs one round trip. ``timeout`` bounds the attempt.
        Never retry here: the core retries the failures for which :meth:`retryable` is true,
        under the caller's retry policy, and raises the others.
        """

    def retryable(self, exc: BaseException) -> bool:
        """Whether waiting and sending again might cure ``exc`` (by default:
        ``TransportUnreachable``, i.e. the broker was unreachable or did not confirm)."""
        from tidings.transports.errors import TransportUnreachable

        return isinstance(exc, TransportUnreachable)

    @abc.abstractmethod
    def listen(self, bindings: Sequence[Binding], pool: str | None,
               prefetch: int) -> Receiver:
        """Start consuming ``bindings``: as the no-pool group when ``pool`` is None, else as a
        member of ``pool``. Return only once the subscription is in place (a message sent after
        this returns reaches the receiver). ``prefetch`` is what the core will hold at most;
        use it for the broker's own flow control (basic.qos, link credit). The core calls this
        only for features declared in capabilities, and again after a lost connection."""

    def cleanup(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads. Called once, by ``Transport.cleanup()``."""

    def describe(self) -> str:
        """One line for logs and the CLI; must not reveal passwords."""
        return f"{self.name} driver at {self.url.masked()}"
