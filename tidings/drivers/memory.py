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

It carries encoded bytes like a real broker (so size limits, malformed bodies and signatures
behave as there). Its one real cost is that the sending and the listening thread share the GIL:
acks and rejects made in the polling thread are therefore applied by its next ``poll()``, under
the broker lock that call takes anyway, because a lock both threads take once per message
convoys them into one thread switch per message, which costs more than the broker itself.
"""

from __future__ import annotations

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


# A message waiting in a queue: (body, message_id, headers or None, redelivered). A plain tuple
# of bytes, str, bool and None is untracked by Python's cyclic GC after its first young
# collection, so a backlog of any length is never promoted and never rescanned; a backlog of
# objects made every full collection traverse it (30-60 ms for 20,000 waiting messages, a tenth
# of a memory:// benchmark round). Only delivered messages (at most prefetch per member) are
# objects.
_Waiting = tuple[bytes, str, "dict[str, str] | None", bool]


@dataclass(eq=False)
class _Queue:
    name: tuple[str, str]
    messages: deque[_Waiting] = field(default_factory=deque)
    consumers: list[_MemoryListener] = field(default_factory=list)
    next_consumer: int = 0


class _Broker:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.queues: dict[tuple[str, str], _Queue] = {}
        # (exchange, routing key) -> queues bound to it
        self.bindings: dict[tuple[str, str], list[_Queue]] = {}
        # (exchange, routing key) -> the (live) list of queues bound to it, once something was
        # sent there and its no-pool group queue exists: a send is then one dict lookup.
        self.routes: dict[tuple[str, str], list[_Queue]] = {}

    def queue(self, exchange: str, name: str) -> _Queue:
        q = self.queues.get((exchange, name))
        if q is None:
            q = self.queues[(exchange, name)] = _Queue((exchange, name))
        return q

    def bind(self, queue: _Queue, exchange: str, routing_key: str) -> None:
        bound = self.bindings.setdefault((exchange, routing_key), [])
        if queue not in bound:
            bound.append(queue)  # in place: routes holds this very list

    def publish(self, msg: OutgoingMessage) -> None:
        waiting = (msg.body, msg.message_id, dict(msg.headers) if msg.headers else None, False)
        key = (msg.exchange, msg.routing_key)
        with self.lock:
            bound = self.routes.get(key)
            if bound is None:
                # The no-pool group's queue exists from the first send, as RabbitMQ notifiers
                # declare it: a notification sent before its listeners start waits for them.
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
            while messages and len(member._held) < member._prefetch:
                member.deliver(_MemoryMessage(member, q, messages.popleft()))
            return
        while messages and consumers:
            n = len(consumers)
            for i in range(n):
                idx = (q.next_consumer + i) % n
                member = consumers[idx]
                if len(member._held) < member._prefetch:
                    q.next_consumer = (idx + 1) % n
                    member.deliver(_MemoryMessage(member, q, messages.popleft()))
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
    """One copy of a message delivered to one member (each bound queue has its own copy).

    Made at delivery, under the broker lock, so poll() only hands over what is ready.
    """

    __slots__ = ("_listener", "_queue", "_waiting")

    def __init__(self, listener: _MemoryListener, queue: _Queue, waiting: _Waiting) -> None:
        # (body, message_id, headers, redelivered). The base class by name: a zero-argument
        # super() builds a proxy object per call on Python 3.11, once per delivered message.
        IncomingMessage.__init__(self, *waiting)
        self._listener = listener
        self._queue = queue
        self._waiting = waiting

    def waiting(self) -> _Waiting:
        """This copy as it goes back to the head of its queue: marked redelivered."""
        body, message_id, headers, _ = self._waiting
        return (body, message_id, headers, True)

    def _ack(self) -> None:
        """Ack or reject (the same here: the message is gone).

        From the polling thread (where the core settles) this only notes the message; the next
        poll() releases all of them under the one broker-lock acquisition it makes anyway. Taking
        the broker lock once per message instead lets the sending and the listening thread
        convoy on it, one GIL hand-off per message, which costs more than the whole broker.
        From any other thread the message is released at once.
        """
        listener = self._listener
        if threading.get_ident() == listener._poller:
            listener._done.append(self)
        else:
            listener.release(self, requeue=False)

    _reject = _ack

    def _requeue(self) -> None:
        self._listener.release(self, requeue=True)


class _MemoryListener(Listener):
    def __init__(self, broker: _Broker, queues: list[_Queue], prefetch: int) -> None:
        self._broker = broker
        self._queues = queues
        self._prefetch = prefetch
        # Delivered and not yet polled. The broker lock is held for a few list operations per
        # message: each time the sending thread finds it taken, the two threads trade the GIL
        # and then wait for each other, several context switches each time.
        self._ready: deque[_MemoryMessage] = deque()
        # Delivered and not yet settled, in delivery order (a dict keeps insertion order), so
        # close() can put them back oldest first.
        self._held: dict[_MemoryMessage, None] = {}
        # Acks and rejects made in the polling thread (_MemoryMessage._ack), applied by its
        # next poll() (or close()).
        self._done: list[_MemoryMessage] = []
        self._poller: int | None = None  # thread id of the last poll()
        self._wakeup = threading.Condition(broker.lock)
        self._closed = False
        with broker.lock:
            for q in queues:
                q.consumers.append(self)
            for q in queues:
                broker.pump(q)

    def deliver(self, msg: _MemoryMessage) -> None:
        """Caller holds the broker lock."""
        self._held[msg] = None
        ready = self._ready
        ready.append(msg)
        if len(ready) == 1:  # poll() only waits on an empty deque: wake it once
            self._wakeup.notify()

    def _release_done(self) -> None:
        """Apply the acks and rejects noted by _MemoryMessage._ack. Caller holds the broker
        lock."""
        done, self._done = self._done, []
        held = self._held
        for msg in done:
            held.pop(msg, None)
        for q in self._queues:  # room was made: let waiting messages in
            if q.messages:
                self._broker.pump(q)

    def release(self, msg: _MemoryMessage, requeue: bool) -> None:
        with self._broker.lock:
            if msg not in self._held:
                return
            del self._held[msg]
            if requeue:
                msg._queue.messages.appendleft(msg.waiting())
                self._broker.pump(msg._queue)
            for q in self._queues:  # room was made: let waiting messages in
                if q.messages:
                    self._broker.pump(q)

    def poll(self, timeout: float) -> Sequence[IncomingMessage]:
        self._poller = threading.get_ident()
        with self._wakeup:
            if self._done:
                self._release_done()
            ready = self._ready
            if not ready and not self._closed:
                self._wakeup.wait(timeout)
            out = list(ready)
            ready.clear()
        # A close() from now on hands these back too: their settlement is then a no-op.
        return out

    def close(self) -> None:
        with self._broker.lock:
            if self._closed:
                return
            self._closed = True
            self._poller = None  # from now on an ack or reject releases at once
            for q in self._queues:
                if self in q.consumers:
                    q.consumers.remove(self)
            self._done.clear()  # acked or rejected: dropped below, by their settled state
            # Unsettled messages (polled or not) go back to the head of their queue, oldest first.
            for msg in reversed(self._held):
                if msg._claim_for_return() == "requeue":  # not acked or rejected first: back
                    msg._queue.messages.appendleft(msg.waiting())
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
