"""The plumbing behind the conformance suite: one :class:`Harness` per test.

Kept apart from the scenarios (``conformance.py``) so each scenario reads as the promise it
checks. The harness builds transports, notifiers and listeners from the driver's fresh URL,
remembers every one of them and tears them all down after the test, failing the test if a
listener does not stop within the bound: a driver whose ``poll()`` ignores its timeout, or whose
``close()`` hangs, is a broken driver, not a slow test.

Everything here waits on events (conditions, thread joins) with a bound; nothing sleeps to
synchronise. The only timed windows are the "nothing more arrives" checks, which can only ever
be checked for a while, and are kept short (``Harness.quiet``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from tidings.notify.dispatcher import PRIORITIES
from tidings.notify.filter import NotificationFilter
from tidings.notify.listener import (
    NotificationListener,
    get_batch_notification_listener,
    get_notification_listener,
)
from tidings.notify.notifier import Notifier
from tidings.transports import envelope
from tidings.transports.base import (
    REQUEUE,
    Binding,
    Capabilities,
    IncomingMessage,
    Receiver,
)
from tidings.transports.signing import SigningKeys
from tidings.transports.transport import (
    ConsumerPoolHandle,
    Target,
    Transport,
    get_notification_transport,
)
from tidings.transports.url import TransportURL

__all__ = ["Harness", "Inbox", "MemberGate", "Received", "RecordingBatchEndpoint",
           "RecordingEndpoint", "UrlFactory"]

#: What a driver's test module provides as the ``tidings_url_factory`` fixture: a callable that
#: returns a new, isolated transport URL each time it is called (fresh vhost, key prefix...).
UrlFactory = Callable[[], "str | TransportURL"]


@dataclass
class Received:
    """One notification as an endpoint got it, with the name of the member that got it."""

    member: str
    method: str
    ctxt: Any
    publisher_id: Any
    event_type: Any
    payload: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    batch: int | None = None

    @property
    def key(self) -> Any:
        """The test's own id for the message: ``payload['key']`` (None if absent)."""
        return self.payload.get("key") if isinstance(self.payload, dict) else None


class Inbox:
    """What the endpoints of a test received, in arrival order, and a way to wait for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[Any] = []

    def add(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    @property
    def items(self) -> list[Any]:
        with self._cond:
            return list(self._items)

    def keys(self, member: str | None = None) -> list[Any]:
        return [r.key for r in self.items if member is None or r.member == member]

    def wait_for(self, done: Callable[[list[Any]], bool], timeout: float, what: str) -> list[Any]:
        """Wait until ``done(items)`` holds; fail naming ``what`` and what did arrive."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done(self._items):
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [getattr(r, "key", r) for r in self._items]
                    shown = f"{seen[:20]}{' ...' if len(seen) > 20 else ''}"
                    raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}; "
                                         f"received {len(seen)}: {shown}")
                self._cond.wait(left)
            return list(self._items)

    def wait_keys(self, keys: Iterable[Any], timeout: float, member: str | None = None,
                  what: str | None = None) -> list[Any]:
        """Wait until every key in ``keys`` has arrived (at ``member`` if given)."""
        want = set(keys)

        def done(items: list[Any]) -> bool:
            return want <= {r.key for r in items if member is None or r.member == member}

        label = what or f"{len(want)} message(s) at {member or 'any member'}"
        return self.wait_for(done, timeout, label)


class MemberGate:
    """Hold each member on its first message until every member has one (or a bound passes).

    This is how the suite proves "every member gets some" without sleeping: a member blocked on
    its first message holds at most ``prefetch`` messages, so a driver that honours prefetch must
    hand the rest to the others. After the bound the gate opens anyway, and the test's own
    assertion then reports which member got nothing.
    """

    def __init__(self, members: Iterable[str], timeout: float) -> None:
        self._waiting = set(members)
        self._timeout = timeout
        self._cond = threading.Condition()

    def arrive(self, member: str) -> None:
        deadline = time.monotonic() + self._timeout
        with self._cond:
            self._waiting.discard(member)
            self._cond.notify_all()
            while self._waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._waiting.clear()  # open for everyone; the test will say who starved
                    self._cond.notify_all()
                    return
                self._cond.wait(left)


OnMessage = Callable[[Received], Any]


class RecordingEndpoint:
    """An endpoint with a method per priority that records into an :class:`Inbox`.

    ``on_message`` runs after recording and its return value is the endpoint's (so it can return
    ``NotificationResult.REQUEUE`` or raise); ``filter_rule`` is the usual NotificationFilter.
    """

    def __init__(self, inbox: Inbox, member: str = "L", on_message: OnMessage | None = None,
                 filter_rule: NotificationFilter | None = None,
                 priorities: Sequence[str] = PRIORITIES) -> None:
        self.inbox = inbox
        self.member = member
        self.on_message = on_message
        self.filter_rule = filter_rule
        for prio in priorities:
            setattr(self, prio, self._method(prio))

    def _method(self, prio: str) -> Callable[..., Any]:
        def method(ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                   metadata: Any) -> Any:
            got = Received(self.member, prio, ctxt, publisher_id, event_type, payload,
                           dict(metadata))
            self.inbox.add(got)
            return self.on_message(got) if self.on_message is not None else None
        return method


class RecordingBatchEndpoint:
    """A batch endpoint: records each notification of a batch with the batch's sequence number."""

    def __init__(self, inbox: Inbox, member: str = "L",
                 on_batch: Callable[[list[Received]], Any] | None = None,
                 priorities: Sequence[str] = PRIORITIES) -> None:
        self.inbox = inbox
        self.member = member
        self.on_batch = on_batch
        self.batches: list[list[Any]] = []
        self._lock = threading.Lock()
        for prio in priorities:
            setattr(self, prio, self._method(prio))

    def _method(self, prio: str) -> Callable[[list[dict[str, Any]]], Any]:
        def method(messages: list[dict[str, Any]]) -> Any:
            with self._lock:
                number = len(self.batches)
                got = [Received(self.member, prio, m["ctxt"], m["publisher_id"],
                                m["event_type"], m["payload"], dict(m["metadata"]), number)
                       for m in messages]
                self.batches.append([r.key for r in got])
            for r in got:
                self.inbox.add(r)
            return self.on_batch(got) if self.on_batch is not None else None
        return method


class RawListener:
    """A driver's receiver driven by hand, as the core drives it, for driver-level scenarios.

    ``poll()`` first hands the settlements made since the last call to ``settle()``, then asks
    for at most ``prefetch`` minus what it holds; ``close()`` hands back what is unsettled as
    ``REQUEUE`` and closes. Settle messages with their ``ack()``, ``requeue()``, ``reject()``.
    """

    def __init__(self, receiver: Receiver, prefetch: int) -> None:
        self.receiver = receiver
        self.prefetch = prefetch
        self.held: dict[IncomingMessage, None] = {}
        self._settled: list[IncomingMessage] = []
        self._closed = False

    def _flush(self) -> None:
        done = list(self._settled)
        del self._settled[:len(done)]
        batch = [(m, m.settled or REQUEUE) for m in done if self.held.pop(m, 0) is None]
        if batch:
            self.receiver.settle(batch)

    def poll(self, timeout: float) -> list[IncomingMessage]:
        self._flush()
        room = self.prefetch - len(self.held)
        if room <= 0:
            time.sleep(min(timeout, 0.05))
            return []
        got = list(self.receiver.receive(room, timeout))
        assert len(got) <= room, (f"receive({room}, ...) returned {len(got)} messages: a driver "
                                  f"must never return more than the core asks for")
        for msg in got:
            msg._sink = self._settled.append
            self.held[msg] = None
        return got

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._flush()
        returned = [(m, REQUEUE) for m in self.held if m._claim(REQUEUE)]
        self.held.clear()
        if returned:
            self.receiver.settle(returned)
        self.receiver.close()


def poll_until(listener: RawListener, count: int, timeout: float,
               describe: Callable[[IncomingMessage], Any] | None = None) -> list[IncomingMessage]:
    """Poll ``listener`` until ``count`` messages have come (more may come in the last poll);
    fail after ``timeout`` seconds, naming what came (``describe``, else message ids)."""
    got: list[IncomingMessage] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            shown = [(describe or (lambda m: m.message_id))(m) for m in got]
            raise AssertionError(f"timed out after {timeout}s waiting for {count} message(s) "
                                 f"from the driver listener; got {len(got)}: {shown}")
        got.extend(listener.poll(min(0.2, left)))
    return got


class Harness:
    """Builds everything a scenario needs from one fresh URL and tears it all down after.

    ``capabilities`` are read from a transport loaded from the URL, so the suite knows what the
    driver declares, never what its scheme suggests.
    """

    def __init__(self, url: str | TransportURL, *, timeout: float, quiet: float) -> None:
        self.base_url = TransportURL.parse(url)
        self.timeout = timeout
        self.quiet = quiet
        self.uid = uuid.uuid4().hex[:10]
        self.topic = f"conf-{self.uid}"
        self._transports: list[Transport] = []
        self._listeners: list[NotificationListener] = []
        self._handles: list[ConsumerPoolHandle] = []
        self._raw: list[RawListener] = []
        probe = self.transport()
        self.capabilities: Capabilities = probe.capabilities
        self.driver_name = probe.driver_name
        self.default_exchange = probe.default_exchange

    # -- capabilities -------------------------------------------------------------------
    def has(self, feature: str) -> bool:
        if feature not in Capabilities.names():
            raise ValueError(f"unknown capability {feature!r}; known: {Capabilities.names()}")
        return bool(getattr(self.capabilities, feature))

    def require(self, *features: str, instead: str = "") -> None:
        """Skip the test unless the driver declares every feature, saying which is missing."""
        missing = [f for f in features if not self.has(f)]
        if missing:
            extra = f"; {instead} checks the refusal instead" if instead else ""
            pytest.skip(f"the {self.driver_name!r} driver does not declare "
                        f"{', '.join(repr(m) for m in missing)} in its capabilities{extra}")

    def require_absent(self, feature: str, covered_by: str) -> None:
        """Skip a refusal test when the driver does declare the feature."""
        if self.has(feature):
            pytest.skip(f"the {self.driver_name!r} driver declares {feature!r}; "
                        f"{covered_by} test(s) check it works")

    # -- building -----------------------------------------------------------------------
    def url(self, **options: Any) -> TransportURL:
        """The test's URL with extra query options (replacing any of the same name)."""
        items = [(k, v) for k, v in self.base_url.query_items if k not in options]
        items += [(k, str(v).lower() if isinstance(v, bool) else str(v))
                  for k, v in options.items()]
        return self.base_url.with_query(items)

    def transport(self, *, default_exchange: str = "openstack",
                  signing: SigningKeys | None = None, **options: Any) -> Transport:
        t = get_notification_transport(self.url(**options), default_exchange=default_exchange,
                                       signing=signing)
        self._transports.append(t)
        return t

    def _default_transport(self) -> Transport:
        return self._transports[0]

    def target(self, topic: str | None = None, exchange: str | None = None) -> Target:
        return Target(topic=topic or self.topic, exchange=exchange)

    def notifier(self, transport: Transport | None = None, *, topics: Sequence[str] | None = None,
                 exchange: str | None = None, publisher_id: str = "conformance.host",
                 driver: str = "messagingv2") -> Notifier:
        return Notifier(transport or self._default_transport(), publisher_id, driver=driver,
                        topics=list(topics or [self.topic]), exchange=exchange, retry=3,
                        raise_on_failure=True)

    def listener(self, endpoints: Sequence[Any], targets: Sequence[Target] | None = None, *,
                 transport: Transport | None = None, pool: str | None = None,
                 allow_requeue: bool = False, prefetch: int | None = None,
                 start: bool = True, executor: str = "threading",
                 pool_size: int = 64) -> NotificationListener:
        listener = get_notification_listener(
            transport or self._default_transport(), list(targets or [self.target()]),
            list(endpoints), executor=executor, allow_requeue=allow_requeue, pool=pool,
            prefetch=prefetch, executor_thread_pool_size=pool_size)
        self._listeners.append(listener)
        if start:
            listener.start()
        return listener

    def batch_listener(self, endpoints: Sequence[Any], targets: Sequence[Target] | None = None,
                       *, batch_size: int | None, batch_timeout: float | None,
                       transport: Transport | None = None, pool: str | None = None,
                       prefetch: int | None = None, start: bool = True) -> NotificationListener:
        listener = get_batch_notification_listener(
            transport or self._default_transport(), list(targets or [self.target()]),
            list(endpoints), pool=pool, batch_size=batch_size, batch_timeout=batch_timeout,
            prefetch=prefetch)
        self._listeners.append(listener)
        if start:
            listener.start()
        return listener

    def join_pool(self, callback: Callable[[dict[str, Any]], Any], pool: str, topic: str, *,
                  transport: Transport | None = None,
                  exchange: str | None = None) -> ConsumerPoolHandle:
        handle = (transport or self._default_transport()).join_consumer_pool(
            callback, pool, topic, exchange)
        self._handles.append(handle)
        return handle

    def stop(self, *listeners: NotificationListener | ConsumerPoolHandle) -> None:
        """Stop listeners and wait (bounded) until each has closed its driver listener."""
        for listener in listeners:
            if isinstance(listener, NotificationListener):
                listener.stop()
        for listener in listeners:
            if isinstance(listener, ConsumerPoolHandle):
                stopped = listener.stop(self.timeout)
            else:
                stopped = listener.wait(self.timeout)
            assert stopped, (f"a listener did not stop within {self.timeout}s: the driver's "
                             f"poll() must return within its timeout and close() must not hang")

    # -- driver level -------------------------------------------------------------------
    def raw_listener(self, transport: Transport, bindings: Sequence[Binding],
                     pool: str | None = None, prefetch: int | None = None) -> RawListener:
        count = transport.options["prefetch"] if prefetch is None else prefetch
        listener = RawListener(transport.listen(list(bindings), pool, count), count)
        self._raw.append(listener)
        return listener

    def close_raw(self, listener: RawListener) -> None:
        listener.close()
        if listener in self._raw:
            self._raw.remove(listener)

    @staticmethod
    def wire(key: Any, *, priority: str = "INFO", event_type: str = "conformance.raw",
             payload: Mapping[str, Any] | None = None) -> tuple[str, bytes]:
        """A valid encoded notification (v2 envelope) carrying ``key``; returns (id, body)."""
        message_id = str(uuid.uuid4())
        body = envelope.encode({"message_id": message_id, "publisher_id": "conformance.raw",
                                "event_type": event_type, "priority": priority,
                                "payload": {"key": key, **(payload or {})},
                                "timestamp": "2026-01-01 00:00:00.000000"})
        return message_id, body

    @staticmethod
    def key_of(message: IncomingMessage) -> Any:
        return envelope.decode(message.body)["payload"]["key"]

    def send_raw_keys(self, transport: Transport, target: Target, keys: Iterable[Any]) -> None:
        for key in keys:
            message_id, body = self.wire(key)
            transport.send_raw(target, body, message_id=message_id, retry=3)

    def poll_until(self, listener: RawListener, count: int,
                   timeout: float | None = None) -> list[IncomingMessage]:
        """Poll until ``count`` messages have come (more may come in the last poll)."""
        return poll_until(listener, count, timeout or self.timeout, describe=self.key_of)

    def poll_quiet(self, listener: RawListener,
                   window: float | None = None) -> list[IncomingMessage]:
        """Everything that arrives within ``window`` seconds (expected: nothing)."""
        got: list[IncomingMessage] = []
        deadline = time.monotonic() + (self.quiet if window is None else window)
        while (left := deadline - time.monotonic()) > 0:
            got.extend(listener.poll(min(0.2, left)))
        return got

    # -- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop every listener, close raw listeners, clean up transports; report hangs."""
        problems: list[str] = []
        for listener in self._listeners:
            listener.stop()
        for listener in self._listeners:
            if not listener.wait(self.timeout):
                problems.append(f"listener on {listener.bindings} did not stop within "
                                f"{self.timeout}s")
        for handle in self._handles:
            if not handle.stop(self.timeout):
                problems.append(f"join_consumer_pool handle did not stop within {self.timeout}s")
        for raw in self._raw:
            try:
                raw.close()
            except Exception as exc:
                problems.append(f"closing a driver listener raised {exc!r}")
        for t in self._transports:
            t.cleanup()
        if problems:
            raise AssertionError("teardown: " + "; ".join(problems))
