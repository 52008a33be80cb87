"""Exchanges and queues, named and declared the way oslo.messaging does by default.

oslo.messaging 18 (``impl_rabbit``) declares, for notifications:

* a ``topic`` exchange named by the target's exchange (default ``openstack``), durable only with
  ``amqp_durable_queues`` (or quorum queues), never auto-deleted;
* on send, a queue named after the routing key (``<topic>.<priority>``) bound to it, so nothing
  is lost before a listener starts; same durable/auto-delete flags, no TTL argument;
* on listen, the no-pool group consumes that same queue; a pool consumes a queue named after the
  pool, bound to every routing key it listens to.

Declaring with the same flags and arguments is what lets both libraries share a broker: RabbitMQ
refuses (406 PRECONDITION_FAILED) a declaration that differs from an existing one. The options
``queue_expiry``, ``message_ttl``, ``quorum`` and ``dead_letter_exchange`` add arguments, so they
must be used on both sides (or the queues deleted) when switching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import kombu

from tidings.drivers.rabbit.options import Settings
from tidings.transports.base import Binding

__all__ = ["QueuePlan", "Topology"]


@dataclass(frozen=True)
class QueuePlan:
    """One queue a listener consumes and the (exchange, routing key) pairs bound to it."""

    name: str
    bindings: tuple[Binding, ...]


class Topology:
    """Names, flags and arguments of everything the driver declares, from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.durable = settings.durable
        self.arguments: dict[str, Any] = dict(settings.queue_arguments)
        self.isolate = settings.isolate_exchanges
        self.dead_letter_exchange = settings.dead_letter_exchange

    # -- names --------------------------------------------------------------------------
    def group_queue(self, exchange: str, routing_key: str) -> str:
        """The queue the no-pool group consumes and every send declares."""
        return f"{exchange}.{routing_key}" if self.isolate else routing_key

    def pool_queue(self, exchange: str, pool: str) -> str:
        return f"{exchange}.{pool}" if self.isolate else pool

    def plan(self, bindings: Sequence[Binding], pool: str | None) -> list[QueuePlan]:
        """The queues a listener on ``bindings`` consumes, in first-seen order."""
        queues: dict[str, list[Binding]] = {}
        for b in bindings:
            name = (self.group_queue(b.exchange, b.routing_key) if pool is None
                    else self.pool_queue(b.exchange, pool))
            bound = queues.setdefault(name, [])
            if b not in bound:
                bound.append(b)
        return [QueuePlan(name, tuple(bs)) for name, bs in queues.items()]

    # -- declarations (channel is a py-amqp channel; kombu entities do the work) ----------
    def exchange(self, name: str) -> kombu.Exchange:
        return kombu.Exchange(name, type="topic", durable=self.durable, auto_delete=False)

    def queue(self, name: str) -> kombu.Queue:
        return kombu.Queue(name, durable=self.durable, auto_delete=False,
                           queue_arguments=dict(self.arguments) or None)

    def declare_exchange(self, channel: Any, name: str, passive: bool = False) -> None:
        self.exchange(name)(channel).declare(passive=passive)

    def declare_queue(self, channel: Any, name: str, passive: bool = False) -> None:
        self.queue(name)(channel).queue_declare(passive=passive)

    def bind(self, channel: Any, queue: str, exchange: str, routing_key: str) -> None:
        self.queue(queue)(channel).bind_to(exchange=exchange, routing_key=routing_key)

    def declare_dead_letter(self, channel: Any) -> None:
        """The dead-letter exchange (fanout, durable) and a queue of its name that keeps what
        arrives, so rejected messages are stored rather than silently dropped."""
        name = self.dead_letter_exchange
        if not name:
            return
        kombu.Exchange(name, type="fanout", durable=True, auto_delete=False)(channel).declare()
        q = kombu.Queue(name, durable=True, auto_delete=False)(channel)
        q.queue_declare()
        q.bind_to(exchange=name, routing_key="")
