"""``memory://`` (also ``fake://``): an in-process broker, thread-safe, the embedded default.

It models a broker, so code tested on it behaves as on RabbitMQ: queues bound to (exchange,
routing key); the no-pool group shares one queue per routing key, created on first send so
nothing sent before a listener starts is lost; each pool has its own queue bound to every routing
key its members listen to; members get messages round-robin, at most ``prefetch`` unsettled each
(its basic.qos); what a closed receiver held goes back to the head of its queue. It carries
encoded bytes, so size limits, malformed bodies and signatures behave as on a broker. Transports
of one process with the same virtual host share a broker (``memory:///test-1`` isolates tests).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tidings.transports.base import (
    REQUEUE,
    Binding,
    Capabilities,
    Driver,
    IncomingMessage,
    Outcome,
    OutgoingMessage,
    Receiver,
)
from tidings.transports.url import TransportURL

__all__ = ["MemoryDriver"]


# A message waiting in a queue: (body, message_id, headers or None, redelivered, exchange,
# routing key). The GC stops tracking such tuples, so no collection ever rescans a backlog
# (objects made full collections traverse 20,000 waiting messages); only delivered messages (at
# most prefetch each) are objects.
_Waiting = tuple[bytes, str, "dict[str, str] | None", bool, str, str]


@dataclass(eq=False)
class _Queue:
    name: tuple[str, str]
    messages: deque[_Waiting] = field(default_factory=deque)
    consumers: list[_MemoryReceiver] = field(default_factory=list)
    next_consumer: int = 0


class _Broker:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.queues: dict[tuple[str, str], _Queue] = {}
        self.bindings: dict[tuple[str, str], list[_Queue]] = {}  # (exchange, key) -> queues
        # The same live lists, once a send made the no-pool queue: a send is one dict lookup.
        self.routes: dict[tuple[str, str], list[_Queue]] = {}

    def queue(self, exchange: str, name: str) -> _Queue:
        return self.queues.setdefault((exchange, name), _Queue((exchange, name)))

    def bind(self, queue: _Queue, exchange: str, routing_key: str) -> None:
        bound = self.bindings.setdefault((exchange, routing_key), [])
        if queue not in bound:
            bound.append(queue)  # in place: routes holds this very list

    def publish(self, msg: OutgoingMessage) -> None:
        waiting = (msg.body, msg.message_id, dict(msg.headers) if msg.headers else None, False,
                   msg.exchange, msg.routing_key)
        key = (msg.exchange, msg.routing_key)
        with self.lock:
            bound = self.routes.get(key)
            if bound is None:  # the no-pool queue exists from the first send, as on RabbitMQ
                group = self.queue(msg.exchange, "group:" + msg.routing_key)
                self.bind(group, msg.exchange, msg.routing_key)
                bound = self.routes[key] = self.bindings[key]
            for q in bound:
                q.messages.append(waiting)
                if q.consumers:
                    self.pump(q)

    @staticmethod
    def pump(q: _Queue) -> None:
        """Hand queued messages to members with room, round-robin. Caller holds the lock."""
        messages, consumers = q.messages, q.consumers
        if len(consumers) == 1:  # the common case, without the round-robin arithmetic
            member = consumers[0]
            while messages and member._unsettled < member._prefetch:
                member.deliver(q, messages.popleft())
            return
        while messages and consumers:
            n = len(consumers)
            for i in range(n):
                idx = (q.next_consumer + i) % n
                member = consumers[idx]
                if member._unsettled < member._prefetch:
                    q.next_consumer = (idx + 1) % n
                    member.deliver(q, messages.popleft())
                    break
            else:
                return


_BROKERS: dict[str, _Broker] = {}
_BROKERS_LOCK = threading.Lock()


def _broker_for(vhost: str) -> _Broker:
    with _BROKERS_LOCK:
        return _BROKERS.setdefault(vhost, _Broker())


class _MemoryReceiver(Receiver):
    def __init__(self, broker: _Broker, queues: list[_Queue], prefetch: int) -> None:
        self._broker = broker
        self._queues = queues
        self._prefetch = prefetch
        self._ready: deque[IncomingMessage] = deque()  # delivered, not received by the core
        self._unsettled = 0  # delivered and not yet settled: the broker's flow control
        self._wakeup = threading.Condition(broker.lock)
        self._interrupted = False
        self._closed = False
        with broker.lock:
            for q in queues:
                q.consumers.append(self)
                broker.pump(q)

    def deliver(self, q: _Queue, waiting: _Waiting) -> None:
        """Caller holds the broker lock. The queue is the message's token."""
        self._unsettled += 1
        ready = self._ready
        body, message_id, headers, redelivered, exchange, routing_key = waiting
        ready.append(IncomingMessage(body, message_id, headers, redelivered, q, None, exchange,
                                     routing_key))
        if len(ready) == 1:  # receive() only waits on an empty deque: wake it once
            self._wakeup.notify()

    def receive(self, max_messages: int, timeout: float) -> Sequence[IncomingMessage]:
        with self._wakeup:
            ready = self._ready
            if not ready and not self._closed and not self._interrupted:
                self._wakeup.wait(timeout)
            self._interrupted = False
            if len(ready) <= max_messages:
                out = list(ready)
                ready.clear()
            else:
                out = [ready.popleft() for _ in range(max_messages)]
        return out

    def interrupt(self) -> None:
        with self._wakeup:
            self._interrupted = True
            self._wakeup.notify()

    def settle(self, outcomes: Sequence[Outcome]) -> None:
        broker = self._broker
        with broker.lock:
            self._unsettled -= len(outcomes)
            _put_back([m for m, how in outcomes if how is REQUEUE])
            self._pump()  # room was made: let waiting messages in

    def close(self) -> None:
        broker = self._broker
        with broker.lock:
            if self._closed:
                return
            self._closed = True
            for q in self._queues:
                if self in q.consumers:
                    q.consumers.remove(self)
            _put_back(self._ready)  # delivered, never received by the core
            self._ready.clear()
            self._pump()
            self._wakeup.notify_all()

    def _pump(self) -> None:
        for q in self._queues:
            if q.messages:
                self._broker.pump(q)


def _put_back(messages: Sequence[IncomingMessage]) -> None:
    """Back to the head of their queues, the oldest first, marked redelivered."""
    for msg in reversed(messages):
        msg.token.messages.appendleft((msg.body, msg.message_id, msg.headers or None, True,
                                       msg.exchange, msg.routing_key))


class MemoryDriver(Driver):
    """In-process broker; see the module docstring for its model."""

    name = "memory"
    capabilities = Capabilities(pools=True, requeue=True, requeue_to_other_member=True,
                                at_least_once=True, stores_without_listener=True,
                                confirmed_send=True)

    def __init__(self, url: TransportURL, options: dict[str, Any]) -> None:
        super().__init__(url, options)
        self._broker = _broker_for(url.virtual_host or "")

    def send_batch(self, messages: Sequence[OutgoingMessage],
                   timeout: float | None) -> list[BaseException | None]:
        for message in messages:
            self._broker.publish(message)
        return [None] * len(messages)

    def listen(self, bindings: Sequence[Binding], pool: str | None,
               prefetch: int) -> Receiver:
        b = self._broker
        with b.lock:
            queues: dict[_Queue, None] = {}  # in first-bound order
            for binding in bindings:
                name = f"pool:{pool}" if pool is not None else f"group:{binding.routing_key}"
                q = b.queue(binding.exchange, name)
                b.bind(q, binding.exchange, binding.routing_key)
                queues[q] = None
            return _MemoryReceiver(b, list(queues), prefetch)
