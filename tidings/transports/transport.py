"""Transport: the portable type users hold, wrapping one driver.

Everything drivers would otherwise each re-implement happens here once: option checking, the
capability check when a listener is built, encoding and the size limit, the retry policy, the
closed-transport guard and the raw ``join_consumer_pool`` API.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from tidings.transports import conf as options
from tidings.transports import envelope
from tidings.transports.base import (
    Binding,
    Capabilities,
    Driver,
    IncomingMessage,
    Option,
    OutgoingMessage,
    Receiver,
)
from tidings.transports.consumer import Consumer, Handler
from tidings.transports.errors import (
    InvalidTarget,
    InvalidTransportOption,
    MalformedMessage,
    MessageTooLarge,
    TransportClosed,
    TransportUnreachable,
)
from tidings.transports.loader import load_driver_class
from tidings.transports.retry import call_with_retry
from tidings.transports.signing import SignatureError, SigningKeys
from tidings.transports.url import TransportURL, mask_password

__all__ = [
    "CORE_OPTIONS",
    "ConsumerPoolHandle",
    "Target",
    "Transport",
    "get_notification_transport",
    "get_transport",
    "set_transport_defaults",
]

LOG = logging.getLogger(__name__)
ENV_URL = "TIDINGS_TRANSPORT_URL"

CORE_OPTIONS: dict[str, Option[Any]] = {
    "prefetch": Option(int, 64, "the most unacknowledged messages one listener holds"),
    "max_message_size": Option(int, 16 * 1024 * 1024,
                               "largest encoded message in bytes, refused on send and receive"),
    "send_timeout": Option(float, 30.0, "seconds one send attempt may take"),
    "retry_interval": Option(float, 0.2, "first delay between send attempts, doubling"),
    "retry_max_interval": Option(float, 5.0, "longest delay between send attempts"),
    "reconnect_interval": Option(float, 0.2, "first delay before a listener reconnects after "
                                             "losing its connection, doubling each failure"),
    "reconnect_max_interval": Option(float, 5.0, "longest delay between a listener's "
                                                 "reconnection attempts"),
    "max_deliveries": Option(int, 5, "reject (or dead-letter) a message once it was delivered "
                                     "this many times without being handled (0: no limit)"),
    "requeue_delay": Option(float, 0.1, "first delay before a requeued message goes back, "
                                        "doubling with each of its deliveries"),
    "requeue_max_delay": Option(float, 1.0, "longest delay before a requeued message goes "
                                            "back"),
}


def _check_core_options(values: Mapping[str, Any]) -> None:
    """Combinations and ranges of the core's options, checked when the transport is built."""
    for name in ("prefetch", "max_message_size"):
        if values[name] < 1:
            raise InvalidTransportOption(f"URL option {name}={values[name]} must be a positive "
                                         f"integer")
    for name in ("send_timeout", "retry_interval", "retry_max_interval", "reconnect_interval",
                 "reconnect_max_interval"):
        if not values[name] > 0:
            raise InvalidTransportOption(f"URL option {name}={values[name]:g} must be a "
                                         f"positive number of seconds")
    if values["max_deliveries"] < 0:
        raise InvalidTransportOption(f"URL option max_deliveries={values['max_deliveries']} "
                                     f"must be 0 (no limit) or a positive number")
    if values["requeue_delay"] < 0:
        raise InvalidTransportOption(f"URL option requeue_delay={values['requeue_delay']:g} "
                                     f"must be 0 (at once) or a positive number of seconds")
    for first, longest in (("retry_interval", "retry_max_interval"),
                           ("reconnect_interval", "reconnect_max_interval"),
                           ("requeue_delay", "requeue_max_delay")):
        if values[longest] < values[first]:
            raise InvalidTransportOption(f"URL option {longest}={values[longest]:g} must be "
                                         f"at least {first}={values[first]:g}")


_TARGET_FIELDS = ("exchange", "topic", "namespace", "version", "server", "fanout")


class Target:
    """Where notifications go or come from: a topic on an exchange (oslo.messaging's class).

    The arguments, their order and their meaning are oslo.messaging's:
    ``Target(exchange=None, topic=None, namespace=None, version=None, server=None,
    fanout=None, legacy_namespaces=None)``, so ``Target('nova', 'notifications')`` is topic
    ``notifications`` on exchange ``nova``. ``exchange=None`` means the transport's default
    exchange (``control_exchange``, ``openstack`` unless configured). The RPC fields
    (namespace, version, server, fanout) are kept and, as in oslo.messaging, ignored by
    notifiers and listeners. A target without a topic can be built (and completed with
    ``target(topic=...)``) but not used: listeners and senders raise ``InvalidTarget``.
    Unlike oslo.messaging's, it is immutable and hashes by value.
    """

    __slots__ = (*_TARGET_FIELDS, "accepted_namespaces")

    exchange: str | None
    topic: str | None
    namespace: str | None
    version: str | None
    server: str | None
    fanout: bool | None
    accepted_namespaces: list[str | None]

    def __init__(self, exchange: str | None = None, topic: str | None = None,
                 namespace: str | None = None, version: str | None = None,
                 server: str | None = None, fanout: bool | None = None,
                 legacy_namespaces: Sequence[str] | None = None) -> None:
        for label, given in (("topic", topic), ("exchange", exchange)):
            if given is not None and not isinstance(given, str):
                raise InvalidTarget(f"Target {label} must be a string or None, not "
                                    f"{type(given).__name__}", given)
        setter = object.__setattr__
        for name, value in zip(_TARGET_FIELDS, (exchange, topic, namespace, version, server,
                                                fanout), strict=True):
            setter(self, name, value)
        setter(self, "accepted_namespaces", [namespace, *(legacy_namespaces or [])])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Target is immutable; use target({name}=...) for a changed copy")

    def __call__(self, **kwargs: Any) -> Target:
        """A copy with some fields changed (oslo.messaging's way)."""
        for name in _TARGET_FIELDS:
            kwargs.setdefault(name, getattr(self, name))
        return Target(**kwargs)

    def _key(self) -> tuple[Any, ...]:
        return (*(getattr(self, n) for n in _TARGET_FIELDS), tuple(self.accepted_namespaces))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Target):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash((self.exchange, self.topic))

    def __repr__(self) -> str:
        values = ", ".join(f"{n}={getattr(self, n)}" for n in _TARGET_FIELDS if getattr(self, n))
        return f"<Target {values}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_target, (self.exchange, self.topic, self.namespace, self.version, self.server,
                          self.fanout, self.accepted_namespaces[1:]))

    def require_topic(self, doing: str = "A target must have topic specified") -> str:
        """The topic, or InvalidTarget (oslo.messaging's message) when there is none."""
        if not self.topic:
            raise InvalidTarget(doing, self)
        return self.topic


def _target(*args: Any) -> Target:
    return Target(*args)


def _parse_options(url: TransportURL, declared: Mapping[str, Option[Any]]) -> dict[str, Any]:
    values = {name: opt.default for name, opt in declared.items()}
    for key, raw in url.query.items():
        opt = declared.get(key)
        if opt is None:
            raise InvalidTransportOption(
                f"unknown option {key!r} in {url.masked()} for driver {url.driver!r}; "
                f"accepted options: {', '.join(sorted(declared))}")
        values[key] = opt.convert(key, raw)
    return values


class Transport:
    """One driver behind the checks every driver shares. Build it with
    :func:`get_notification_transport`; share it between notifiers and listeners."""

    #: The oslo.config ConfigOpts the transport was built from (oslo.messaging's attribute),
    #: or None when it was built from a URL.
    conf: Any = None

    def __init__(self, driver: Driver, url: TransportURL, default_exchange: str,
                 options: Mapping[str, Any], signing: SigningKeys | None = None) -> None:
        self._driver = driver
        self.url = url
        self.default_exchange = default_exchange
        self.options = dict(options)
        self.signing = signing
        self._closed = threading.Event()  # what an endless retry waits on
        self._open = True  # the same fact as a plain attribute, for the per-message checks

    # -- what the driver is -------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return self._driver.capabilities

    @property
    def driver_name(self) -> str:
        return self._driver.name or self.url.driver

    def __repr__(self) -> str:
        return f"<Transport {self.driver_name} {self.url.masked()}>"

    def _ensure_open(self, doing: str) -> None:
        if not self._open:
            raise TransportClosed(f"cannot {doing}: transport {self.url.masked()} was cleaned "
                                  f"up; build a new one with get_notification_transport()")

    def check_features(self, *, pool: str | None = None, allow_requeue: bool = False) -> None:
        """Raise NotImplementedError now if the driver lacks a feature the listener needs."""
        caps = self.capabilities
        if pool is not None and not caps.pools:
            raise NotImplementedError(
                f"the {self.driver_name!r} driver does not support listener pools "
                f"(pool={pool!r}); use a driver whose capabilities declare 'pools'")
        if allow_requeue and not caps.requeue:
            raise NotImplementedError(
                f"the {self.driver_name!r} driver cannot requeue messages "
                f"(allow_requeue=True); use allow_requeue=False or a driver whose "
                f"capabilities declare 'requeue'")

    def resolve(self, target: Target) -> str:
        return target.exchange or self.default_exchange

    # -- sending ------------------------------------------------------------------------
    def _send_notification(self, target: Target, ctxt: Mapping[str, Any],
                           message: Mapping[str, Any], version: float = 2.0,
                           retry: int | None = None) -> None:
        """Send one notification (oslo.messaging's name): pack ctxt, encode, send with retry."""
        self._send_notifications((target,), ctxt, message, version, retry)

    def _send_notifications(self, targets: Sequence[Target], ctxt: Mapping[str, Any],
                            message: Mapping[str, Any], version: float = 2.0,
                            retry: int | None = None) -> None:
        """Send one notification to every target in turn, each under the retry policy.

        Packed and encoded once: every target carries the same bytes, unless this transport
        signs (a signature is made for one exchange and routing key). A target whose send
        fails for good raises MessageDeliveryFailure and the later ones are not tried.
        """
        self._ensure_open("send")
        signs = self.signing is not None and self.signing.active is not None
        body = b""
        message_id = str(message.get("message_id") or uuid.uuid4())
        for target in targets:
            topic = target.topic
            if not topic:  # oslo.messaging's check and message
                raise InvalidTarget("A topic is required to send", target)
            exchange = target.exchange or self.default_exchange
            if signs or not body:
                body = self._encode(ctxt, message, version, message_id, (exchange, topic))
            self._send_outgoing(OutgoingMessage(exchange, topic, body, message_id), retry)

    def _encode(self, ctxt: Mapping[str, Any], message: Mapping[str, Any], version: float,
                message_id: str, route: tuple[str, str]) -> bytes:
        """The body of a notification for ``route`` (exchange, routing key), its size checked."""
        wire = envelope.pack_context(dict(message), ctxt)  # reads ctxt, fills the copy
        body = envelope.encode(wire, version, self.signing, route)
        self._check_size(body, message_id)
        return body

    def _check_size(self, body: bytes, message_id: str) -> None:
        limit = self.options["max_message_size"]
        if len(body) > limit:
            raise MessageTooLarge(
                f"message {message_id} is {len(body)} bytes, over max_message_size={limit}; "
                f"send a smaller payload or raise the URL option max_message_size")

    def encode_notification(self, target: Target, ctxt: Mapping[str, Any],
                            message: Mapping[str, Any],
                            version: float = 2.0) -> OutgoingMessage:
        """The message :meth:`_send_notification` would send (for :meth:`send_many`)."""
        exchange = target.exchange or self.default_exchange
        topic = target.require_topic("A topic is required to send")
        message_id = str(message.get("message_id") or uuid.uuid4())
        body = self._encode(ctxt, message, version, message_id, (exchange, topic))
        return OutgoingMessage(exchange, topic, body, message_id)

    def send_raw(self, target: Target, body: bytes, *, message_id: str,
                 retry: int | None = None, headers: Mapping[str, str] | None = None) -> None:
        """Send an already encoded body to ``target`` under the retry policy."""
        self._ensure_open("send")
        self._send_outgoing(self._outgoing(target, body, message_id, headers), retry)

    def send_many(self, messages: Sequence[OutgoingMessage],
                  retry: int | None = None) -> list[BaseException | None]:
        """Send several messages with one pipelined attempt, then each failed one again alone
        under the retry policy. One result per message: None if sent, else the error.

        The driver publishes them all before waiting for the broker's confirmations (see
        ``Driver.send_batch``), so a batch costs about one round trip instead of one each. A
        message retried after a failure may arrive after later ones of its batch.
        """
        self._ensure_open("send")
        results = self._send_batch(messages)
        for i, exc in enumerate(results):
            if exc is not None and self._driver.retryable(exc):
                try:
                    self._send_outgoing(messages[i], retry, failed=exc)
                except Exception as again:
                    results[i] = again
                else:
                    results[i] = None
        return results

    def _send_batch(self, messages: Sequence[OutgoingMessage]) -> list[BaseException | None]:
        """One attempt for each message through the driver, its answer checked."""
        results = self._driver.send_batch(messages, self.options["send_timeout"])
        if len(results) != len(messages):
            raise RuntimeError(f"driver {self.driver_name!r} returned {len(results)} results "
                               f"for {len(messages)} messages from send_batch()")
        return results

    def _outgoing(self, target: Target, body: bytes, message_id: str,
                  headers: Mapping[str, str] | None) -> OutgoingMessage:
        self._check_size(body, message_id)
        return OutgoingMessage(target.exchange or self.default_exchange,
                               target.require_topic("A topic is required to send"), body,
                               message_id, headers=dict(headers) if headers else {})

    def _attempt(self, out: OutgoingMessage) -> None:
        """One attempt: raise TransportUnreachable (password masked) for what a retry may cure,
        anything else as the driver gave it."""
        exc = self._send_batch((out,))[0]
        if exc is None:
            return
        if self._driver.retryable(exc):
            failed = TransportUnreachable(mask_password(str(exc)))
            failed.__cause__ = exc
            raise failed
        raise exc

    def _send_outgoing(self, out: OutgoingMessage, retry: int | None,
                       failed: BaseException | None = None) -> None:
        if failed is None:
            # The first attempt inline: most sends succeed, and one that does should not pay
            # for the retry machinery (a closure and its log description per message).
            exc = self._driver.send_batch((out,), self.options["send_timeout"])[0]
            if exc is None:
                return
            if not self._driver.retryable(exc):
                raise exc
            failed = exc
        first = TransportUnreachable(mask_password(str(failed)))
        first.__cause__ = failed

        def attempt() -> None:
            self._ensure_open("send")
            self._attempt(out)

        call_with_retry(attempt, retry, f"sending {out.message_id} to {out.exchange}/"
                        f"{out.routing_key} via {self.driver_name}",
                        interval=self.options["retry_interval"],
                        max_interval=self.options["retry_max_interval"], stop=self._closed,
                        failed=first)

    # -- listening ----------------------------------------------------------------------
    def listen(self, bindings: Sequence[Binding], pool: str | None = None,
               prefetch: int | None = None) -> Receiver:
        """Open a driver receiver on ``bindings`` (features already checked by the caller)."""
        self._ensure_open("listen")
        if not bindings:
            raise ValueError("a listener needs at least one (exchange, topic) binding")
        self.check_features(pool=pool)
        return self._driver.listen(list(bindings), pool, self._prefetch(prefetch))

    def _prefetch(self, prefetch: int | None) -> int:
        count = self.options["prefetch"] if prefetch is None else prefetch
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"prefetch={count!r} must be a positive integer")
        return count

    def consumer(self, bindings: Sequence[Binding], pool: str | None, handle: Handler, *,
                 name: str, prefetch: int | None = None, workers: int = 0,
                 batch_size: int | None = None,
                 batch_timeout: float | None = None) -> Consumer:
        """A (not yet started) consumer of ``bindings`` that hands messages to ``handle``,
        reconnecting and redelivering under this transport's options."""
        count = self._prefetch(prefetch)
        bindings = list(bindings)
        opts = self.options
        return Consumer(lambda: self.listen(bindings, pool, count), handle, name=name,
                        prefetch=count, workers=workers, batch_size=batch_size,
                        batch_timeout=batch_timeout,
                        backoff=(opts["reconnect_interval"], opts["reconnect_max_interval"]),
                        max_deliveries=opts["max_deliveries"] or None,
                        requeue_delay=(opts["requeue_delay"], opts["requeue_max_delay"]),
                        retryable=self._driver.retryable)

    def decode(self, msg: IncomingMessage, bindings: Sequence[Binding] = ()) -> dict[str, Any]:
        """Decode an incoming body into the wire message, enforcing max_message_size and, with
        signing keys, the signature policy. Raises MalformedMessage (reject it) saying why.

        ``bindings``: what the listener consumes. A signature names the exchange and routing
        key it was made for; it must match the delivery's own where the driver reports them,
        else one of ``bindings``. Once a signature is verified, ``msg.message_id`` becomes the
        signed message id, so every later log line names the id the signer vouched for rather
        than a transport property any sender can set.
        """
        limit = self.options["max_message_size"]
        if len(msg.body) > limit:
            raise MalformedMessage(f"{len(msg.body)} bytes is over max_message_size={limit}")
        if self.signing is None:
            return envelope.decode(msg.body)
        message, inner, signature = envelope.decode_envelope(msg.body)
        if msg.exchange is not None and msg.routing_key is not None:
            routes: Collection[tuple[str, str]] = ((msg.exchange, msg.routing_key),)
        else:
            routes = [(b.exchange, b.routing_key) for b in bindings]
        try:
            verified = self.signing.verify(inner, signature, routes)
        except MalformedMessage:
            raise
        except Exception as exc:  # anything unforeseen in a hostile body
            raise MalformedMessage(f"its signature cannot be checked: {exc!r}") from exc
        if verified:
            signed_id = message.get("message_id")
            if isinstance(signed_id, str) and signed_id:
                msg.message_id = signed_id
        return message

    def join_consumer_pool(self, callback: Callable[[dict[str, Any]], Any], pool_name: str,
                           topic: str, exchange_name: str | None = None) -> ConsumerPoolHandle:
        """Consume routing value ``topic`` (e.g. ``notifications.info``) as a member of
        ``pool_name``: every pool gets each message once, one member of it takes the message.

        ``callback`` receives each message whole, as a dict (JSON decoded, envelope removed,
        context still in its ``_context_*`` keys), whatever the notification format. The message
        is acknowledged after the callback returns; if the callback raises, it is logged with its
        id and rejected. Callbacks run one at a time, in arrival order. Returns a started handle;
        ``stop()`` it when done.
        """
        self.check_features(pool=pool_name)
        bindings = [Binding(exchange_name or self.default_exchange, topic)]
        handle = ConsumerPoolHandle(self, callback, pool_name, bindings)
        handle.start()
        return handle

    def cleanup(self) -> None:
        """Close the driver. Later sends and listens raise TransportClosed. Idempotent."""
        if not self._open:
            return
        self._open = False
        self._closed.set()
        try:
            self._driver.cleanup()
        except Exception:
            LOG.exception("cleanup of %s failed", self)


class ConsumerPoolHandle:
    """A running ``join_consumer_pool`` member; ``stop()`` ends it and returns what it held."""

    def __init__(self, transport: Transport, callback: Callable[[dict[str, Any]], Any],
                 pool: str, bindings: list[Binding]) -> None:
        self._transport = transport
        self._callback = callback
        self._bindings = bindings
        self._consumer = transport.consumer(bindings, pool, self._handle,
                                            name=f"tidings-pool-{pool}")
        self.stats = self._consumer.stats

    def start(self) -> None:
        self._consumer.start()

    def _handle(self, messages: list[IncomingMessage]) -> None:
        for msg in messages:
            try:
                data = self._transport.decode(msg, self._bindings)
            except Exception as exc:
                log_rejected(msg, exc)
                msg.reject()
                continue
            try:
                self._callback(data)
            except Exception:
                LOG.exception("pool callback failed on message %s; rejecting it",
                              msg.message_id)
                msg.reject()
                continue
            msg.ack()

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Stop consuming and wait up to ``timeout`` seconds for the loop to end."""
        self._consumer.stop()
        return self._consumer.wait(timeout)


def shown_id(message_id: str | None) -> str:
    """A message id fit for a log line: any sender sets it, so anything unprintable or long is
    shown escaped and cut, and a log line can never be forged through it."""
    if not message_id:
        return "(no id)"
    if len(message_id) <= 200 and message_id.isprintable():
        return message_id
    return repr(message_id[:200])


def log_rejected(msg: IncomingMessage, exc: BaseException) -> None:
    """Log a delivery rejected because its body cannot be used. After a failed signature check
    nothing in it is vouched for, so its id is called what it is: unverified."""
    if isinstance(exc, SignatureError):
        LOG.error("rejecting message with unverified id %s: %s", shown_id(msg.message_id), exc)
    else:
        LOG.error("rejecting malformed message %s: %s", shown_id(msg.message_id), exc)


def _conf_and_url(conf: Any, url: Any) -> tuple[Any, Any]:
    """Tell oslo.messaging's ``(conf, url)`` from tidings' ``(url)`` first argument."""
    if conf is None or options.is_conf(conf):
        return conf, url
    if url is not None:
        raise TypeError(f"the first argument is a ConfigOpts or a URL, not both: got "
                        f"{type(conf).__name__} and url={url!r}")
    return None, conf


def get_transport(conf: Any = None, url: str | TransportURL | None = None,
                  allowed_remote_exmods: Sequence[str] | None = None, *,
                  default_exchange: str | None = None,
                  signing: SigningKeys | None = None) -> Transport:
    """Build a transport: load the driver by the URL's scheme, check the URL's options
    against what the driver and the core accept.

    oslo.messaging's arguments: ``conf`` is an oslo.config ``ConfigOpts`` (needs
    ``tidings[oslo]``), from which the URL (``[oslo_messaging_notifications] transport_url``,
    else ``[DEFAULT] transport_url``) and the default exchange (``[DEFAULT] control_exchange``)
    are read when not given, with the options registered exactly as oslo.messaging registers
    them; the transport keeps it as ``transport.conf``, where a Notifier finds its driver,
    topics and retry. ``allowed_remote_exmods`` is accepted and unused (RPC only). Without a
    ConfigOpts the first argument may be the URL itself (a string or a TransportURL); with
    neither, $TIDINGS_TRANSPORT_URL is read.

    ``default_exchange``: the exchange of targets that name none (default ``openstack``, or
    the configured ``control_exchange``). ``signing``: sign what this transport sends with the
    active key and verify what it receives (see tidings.transports.signing)."""
    conf, url = _conf_and_url(conf, url)
    if conf is not None:
        url, exchange = options.transport_settings(conf, url)
        if default_exchange is None:
            default_exchange = exchange
    if default_exchange is None:
        default_exchange = "openstack"
    if url is not None and not isinstance(url, (str, TransportURL)):
        url = str(url)  # oslo.messaging's TransportURL prints as the URL
    if url is None:
        url = os.environ.get(ENV_URL)
        if not url:
            raise InvalidTransportOption(
                f"no transport URL given and ${ENV_URL} is not set; pass a URL such as "
                f"'memory://' or 'rabbit://guest:guest@127.0.0.1:5672/', or set ${ENV_URL}")
    parsed = TransportURL.parse(url)
    if not isinstance(default_exchange, str) or not default_exchange:
        raise ValueError(f"default_exchange must be a non-empty string, "
                         f"not {default_exchange!r}")
    cls = load_driver_class(parsed.driver)
    clash = set(cls.options) & set(CORE_OPTIONS)
    if clash:
        raise TypeError(f"driver {cls.__name__} redeclares core option(s) {sorted(clash)}")
    values = _parse_options(parsed, {**CORE_OPTIONS, **cls.options})
    core = {k: values.pop(k) for k in CORE_OPTIONS}
    _check_core_options(core)
    try:
        driver = cls(parsed, values)
    except TransportUnreachable as exc:
        raise TransportUnreachable(mask_password(str(exc))) from exc
    driver.max_message_size = core["max_message_size"]
    transport = Transport(driver, parsed, default_exchange, core, signing)
    transport.conf = conf
    return transport


def get_notification_transport(conf: Any = None, url: str | TransportURL | None = None,
                               allowed_remote_exmods: Sequence[str] | None = None, *,
                               default_exchange: str | None = None,
                               signing: SigningKeys | None = None) -> Transport:
    """oslo.messaging's name and arguments for :func:`get_transport`: the transport
    notifications use. ``get_notification_transport(conf)``,
    ``get_notification_transport(conf, url)`` and ``get_notification_transport(url)`` all
    work."""
    return get_transport(conf, url, allowed_remote_exmods, default_exchange=default_exchange,
                         signing=signing)


def set_transport_defaults(control_exchange: str) -> None:
    """oslo.messaging's: the default of ``[DEFAULT] control_exchange`` (needs oslo.config)."""
    options.set_transport_defaults(control_exchange)
