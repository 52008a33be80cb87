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
# of a memory:// benchmark round). Only delivered messages (at most prefetch per member) get a
# _Record.
_Waiting = tuple[bytes, str, "dict[str, str] | None", bool]


class _Record:
    """One copy of a message delivered to one member (each bound queue has its own copy)."""

    __slots__ = ("body", "headers", "message_id", "queue", "redelivered")

    def __init__(self, waiting: _Waiting, queue: _Queue) -> None:
        # headers (None when empty) are shared by the copies; IncomingMessage copies them again
        self.body, self.message_id, self.headers, self.redelivered = waiting
        self.queue = queue

    def waiting(self) -> _Waiting:
        """This copy as it goes back to the head of its queue: marked redelivered."""
        return (self.body, self.message_id, self.headers, True)


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
                member.deliver(_Record(messages.popleft(), q))
            return
        while messages and consumers:
            n = len(consumers)
            for i in range(n):
                idx = (q.next_consumer + i) % n
                member = consumers[idx]
                if len(member._held) < member._prefetch:
                    q.next_consumer = (idx + 1) % n
                    member.deliver(_Record(messages.popleft(), q))
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
    __slots__ = ("_listener", "_record")

    def __init__(self, listener: _MemoryListener, record: _Record) -> None:
        super().__init__(record.body, record.message_id, record.headers, record.redelivered)
        self._listener = listener
        self._record = record

    def _ack(self) -> None:
        self._listener.settle(self)

    def _reject(self) -> None:
        self._listener.settle(self)

    def _requeue(self) -> None:
        self._listener.release(self, requeue=True)


class _MemoryListener(Listener):
    def __init__(self, broker: _Broker, queues: list[_Queue], prefetch: int) -> None:
        self._broker = broker
        self._queues = queues
        self._prefetch = prefetch
        # Delivered records not yet polled. Only records move under the broker lock; poll()
        # wraps them into messages after letting go of it, so the lock is held for a few list
        # operations per message and the sending thread rarely finds it taken. (Each time it
        # does, the two threads trade the GIL and then wait for each other, several context
        # switches each time; runs of the memory:// benchmark with many of them were a third
        # slower.)
        self._ready: deque[_Record] = deque()
        # Delivered and not yet settled, in delivery order (a dict keeps insertion order), so
        # close() can put them back oldest first; the value is the message once poll() made it.
        self._held: dict[_Record, _MemoryMessage | None] = {}
        # Acks and rejects made by the polling thread, applied by its next poll() (or close()).
        self._done: list[_MemoryMessage] = []
        self._poller: int | None = None  # thread id of the last poll()
        self._wakeup = threading.Condition(broker.lock)
        self._closed = False
        with broker.lock:
            for q in queues:
                q.consumers.append(self)
            for q in queues:
                broker.pump(q)

    def deliver(self, record: _Record) -> None:
        """Caller holds the broker lock."""
        self._held[record] = None
        ready = self._ready
        ready.append(record)
        if len(ready) == 1:  # poll() only waits on an empty deque: wake it once
            self._wakeup.notify()

    def settle(self, msg: _MemoryMessage) -> None:
        """Ack or reject (the same here: the message is gone).

        From the polling thread (where the core settles) this only notes the message; the next
        poll() releases all of them under the one broker-lock acquisition it makes anyway. Taking
        the broker lock once per message instead lets the sending and the listening thread
        convoy on it, one GIL hand-off per message, which costs more than the whole broker.
        From any other thread the message is released at once.
        """
        if threading.get_ident() == self._poller:
            self._done.append(msg)
        else:
            self.release(msg, requeue=False)

    def _release_done(self) -> None:
        """Apply the acks and rejects noted by settle(). Caller holds the broker lock."""
        done, self._done = self._done, []
        held = self._held
        for msg in done:
            held.pop(msg._record, None)
        for q in self._queues:  # room was made: let waiting messages in
            if q.messages:
                self._broker.pump(q)

    def release(self, msg: _MemoryMessage, requeue: bool) -> None:
        record = msg._record
        with self._broker.lock:
            if record not in self._held:
                return
            del self._held[record]
            if requeue:
                record.queue.messages.appendleft(record.waiting())
                self._broker.pump(record.queue)
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
            records = list(ready)
            ready.clear()
        if not records:
            return []
        out = [_MemoryMessage(self, record) for record in records]
        with self._broker.lock:
            if self._closed:  # close() came in between and put the records back: hand out none
                for msg in out:
                    msg._settled = "requeue"
                return []
            held = self._held
            for msg in out:
                held[msg._record] = msg
        return out

    def close(self) -> None:
        with self._broker.lock:
            if self._closed:
                return
            self._closed = True
            self._poller = None  # from now on settle() releases at once
            for q in self._queues:
                if self in q.consumers:
                    q.consumers.remove(self)
            self._done.clear()  # acked or rejected: dropped below, by their settled state
            # Unsettled messages go back to the head of their queue, oldest first (records not
            # polled yet have no message: they go back as they are).
            for record, msg in reversed(self._held.items()):
                if msg is not None and msg._claim_for_return() != "requeue":
                    continue  # acked or rejected; its release may be on its way: gone
                record.queue.messages.appendleft(record.waiting())
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
