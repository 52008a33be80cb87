"""``memory://`` (also ``fake://``): an in-process broker, thread-safe, the embedded default.

It models a broker rather than short-cutting one, so code tested on it behaves the same on
RabbitMQ: queues bound to (exchange, routing key); the no-pool group shares one queue per routing
key, created on first send so nothing sent before a listener starts is lost; each pool has its own
queue bound to every routing key its members listen to; members of a queue get messages
round-robin, never more than ``prefetch`` unsettled each; a closed listener's unsettled messages go
back to the head of their queue for the others.

Every ``memory://`` transport in a process with the same virtual host shares one broker, so a
notifier and a listener built from separate transports reach each other; use a distinct virtual
host (``memory:///test-1``) to isolate tests.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tidings.transports.base import (
    Binding,
    Capabilities,
    Driver,
    IncomingMessage,
    Listener,
    OutgoingMessage,
)
from tidings.transports.url import TransportURL

__all__ = ["MemoryDriver"]


@dataclass
class _Record:
    body: bytes
    message_id: str
    headers: dict[str, str]
    redelivered: bool = False


@dataclass(eq=False)
class _Queue:
    name: tuple[str, str]
    messages: deque[_Record] = field(default_factory=deque)
    consumers: list[_MemoryListener] = field(default_factory=list)
    next_consumer: int = 0


class _Broker:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.queues: dict[tuple[str, str], _Queue] = {}
        # (exchange, routing key) -> queues bound to it
        self.bindings: dict[tuple[str, str], list[_Queue]] = {}

    def queue(self, exchange: str, name: str) -> _Queue:
        q = self.queues.get((exchange, name))
        if q is None:
            q = self.queues[(exchange, name)] = _Queue((exchange, name))
        return q

    def bind(self, queue: _Queue, exchange: str, routing_key: str) -> None:
        bound = self.bindings.setdefault((exchange, routing_key), [])
        if queue not in bound:
            bound.append(queue)

    def publish(self, msg: OutgoingMessage) -> None:
        record = _Record(msg.body, msg.message_id, dict(msg.headers))
        with self.lock:
            # The no-pool group's queue exists from the first send, as RabbitMQ notifiers
            # declare it: a notification sent before its listeners start waits for them.
            group = self.queue(msg.exchange, "group:" + msg.routing_key)
            self.bind(group, msg.exchange, msg.routing_key)
            for q in self.bindings[(msg.exchange, msg.routing_key)]:
                q.messages.append(record if q is group else _Record(**record.__dict__))
                self.pump(q)

    @staticmethod
    def pump(q: _Queue) -> None:
        """Hand queued messages to members with room, round-robin. Caller holds the lock."""
        messages, consumers = q.messages, q.consumers
        while messages and consumers:
            n = len(consumers)
            for i in range(n):
                idx = (q.next_consumer + i) % n
                member = consumers[idx]
                if len(member._held) < member._prefetch:
                    q.next_consumer = (idx + 1) % n
                    member.deliver(q, messages.popleft())
                    break
            else:
                return


_BROKERS: dict[str, _Broker] = {}
_BROKERS_LOCK = threading.Lock()


def _broker_for(vhost: str) -> _Broker:
    with _BROKERS_LOCK:
        broker = _BROKERS.get(vhost)
        if broker is None:
            broker = _BROKERS[vhost] = _Broker()
        return broker


class _MemoryMessage(IncomingMessage):
    __slots__ = ("_listener", "_queue", "_record", "tag")

    def __init__(self, listener: _MemoryListener, queue: _Queue, record: _Record,
                 tag: int) -> None:
        super().__init__(record.body, record.message_id, record.headers, record.redelivered)
        self._listener = listener
        self._queue = queue
        self._record = record
        self.tag = tag

    def _ack(self) -> None:
        self._listener.release(self, requeue=False)

    def _reject(self) -> None:
        self._listener.release(self, requeue=False)

    def _requeue(self) -> None:
        self._listener.release(self, requeue=True)


class _MemoryListener(Listener):
    def __init__(self, broker: _Broker, queues: list[_Queue], prefetch: int) -> None:
        self._broker = broker
        self._queues = queues
        self._prefetch = prefetch
        self._ready: deque[_MemoryMessage] = deque()
        self._held: dict[int, _MemoryMessage] = {}  # delivered and not yet settled
        self._tags = itertools.count(1)
        self._wakeup = threading.Condition(broker.lock)
        self._closed = False
        with broker.lock:
            for q in queues:
                q.consumers.append(self)
            for q in queues:
                broker.pump(q)

    def deliver(self, queue: _Queue, record: _Record) -> None:
        msg = _MemoryMessage(self, queue, record, next(self._tags))
        self._held[msg.tag] = msg
        self._ready.append(msg)
        self._wakeup.notify()

    def release(self, msg: _MemoryMessage, requeue: bool) -> None:
        with self._broker.lock:
            if self._held.pop(msg.tag, None) is None:
                return
            if requeue:
                msg._record.redelivered = True
                msg._queue.messages.appendleft(msg._record)
                self._broker.pump(msg._queue)
            for q in self._queues:  # room was made: let waiting messages in
                if q.messages:
                    self._broker.pump(q)

    def poll(self, timeout: float) -> Sequence[IncomingMessage]:
        with self._wakeup:
            if not self._ready and not self._closed:
                self._wakeup.wait(timeout)
            out = list(self._ready)
            self._ready.clear()
            return out

    def close(self) -> None:
        with self._broker.lock:
            if self._closed:
                return
            self._closed = True
            for q in self._queues:
                if self in q.consumers:
                    q.consumers.remove(self)
            # Unsettled messages go back to the head of their queue, oldest first.
            for msg in sorted(self._held.values(), key=lambda m: m.tag, reverse=True):
                with msg._lock:
                    if msg._settled is None:
                        msg._settled = "requeue"
                msg._record.redelivered = True
                msg._queue.messages.appendleft(msg._record)
            self._held.clear()
            self._ready.clear()
            for q in self._queues:
                self._broker.pump(q)
            self._wakeup.notify_all()


class MemoryDriver(Driver):
    """In-process broker; see the module docstring for its model."""

    name = "memory"
    capabilities = Capabilities(
        pools=True, requeue=True, requeue_to_other_member=True, exchanges=True,
        at_least_once=True, durable=False, stores_without_listener=True, dead_letter=False,
        prefetch=True, confirmed_send=True)
    options: dict[str, Any] = {}

    def __init__(self, url: TransportURL, options: dict[str, Any]) -> None:
        super().__init__(url, options)
        self._broker = _broker_for(url.virtual_host or "")

    def send(self, message: OutgoingMessage, timeout: float | None = None) -> None:
        self._broker.publish(message)

    def listen(self, bindings: Sequence[Binding], pool: str | None,
               prefetch: int) -> Listener:
        b = self._broker
        with b.lock:
            queues: list[_Queue] = []
            for binding in bindings:
                name = f"pool:{pool}" if pool is not None else f"group:{binding.routing_key}"
                q = b.queue(binding.exchange, name)
                b.bind(q, binding.exchange, binding.routing_key)
                if q not in queues:
                    queues.append(q)
            return _MemoryListener(b, queues, prefetch)
