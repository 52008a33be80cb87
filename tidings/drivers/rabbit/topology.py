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
from typing import Any

import kombu

from tidings.drivers._rabbitmq.queues import QueuePlan
from tidings.drivers.rabbit.options import Settings
from tidings.transports.base import Binding

__all__ = ["QueuePlan", "Topology"]


class Topology:
    """Declares, with kombu, what the core's queue model (tidings.drivers._rabbitmq.queues) plans:
    oslo.messaging's names, flags and arguments, from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.model = settings.queues
        self.durable = self.model.durable
        self.arguments: dict[str, Any] = dict(self.model.arguments)
        self.dead_letter_exchange = self.model.dead_letter_exchange

    # -- names --------------------------------------------------------------------------
    def group_queue(self, exchange: str, routing_key: str) -> str:
        """The queue the no-pool group consumes and every send declares."""
        return self.model.group_queue(exchange, routing_key)

    def plan(self, bindings: Sequence[Binding], pool: str | None) -> list[QueuePlan]:
        """The queues a listener on ``bindings`` consumes, in first-seen order."""
        return self.model.plan(bindings, pool)

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
