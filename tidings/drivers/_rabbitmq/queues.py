"""The queue model of brokers with topic exchanges and named queues, with oslo.messaging's names.

RabbitMQ is reached by two drivers of this family (``rabbit://`` over AMQP 0-9-1 and
``amqp://`` over AMQP 1.0), and both must name, shape and bind queues exactly as oslo.messaging
does so that every library can share one broker: the no-pool group consumes queue
``<topic>.<priority>`` (the routing key), a pool consumes a queue named after the pool bound to
every routing key it listens to. The names, the URL options that shape queues, the x-arguments
they turn into and the capabilities they imply are decided here, once; a driver only declares
what this plans, with its own library. Pure logic: no broker library is imported."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tidings.transports.base import Binding, Capabilities, Option
from tidings.transports.errors import InvalidTransportOption

__all__ = ["QUEUE_OPTIONS", "QueueModel", "QueuePlan", "seconds"]

QUEUE_OPTIONS: dict[str, Option[Any]] = {
    "durable": Option(bool, False, "declare exchanges and queues durable (oslo.messaging's "
                                   "amqp_durable_queues); with persistent messages they survive "
                                   "a broker restart"),
    "queue_expiry": Option(float, 0.0, "delete a queue nobody has consumed for this many "
                                       "seconds (x-expires; 0: never), so the queues of pools "
                                       "that went away stop growing"),
    "message_ttl": Option(float, 0.0, "drop (or dead-letter) messages older than this many "
                                      "seconds (x-message-ttl; 0: keep them)"),
    "dead_letter_exchange": Option(str, "", "send rejected and expired messages to this "
                                            "exchange (x-dead-letter-exchange); the driver "
                                            "declares it as a durable fanout exchange with a "
                                            "queue of the same name, so they are kept"),
    "isolate_exchanges": Option(bool, False, "name queues after their exchange too, so a "
                                             "listener on exchange A never sees exchange B's "
                                             "messages on the same topic (not shared with "
                                             "oslo.messaging, which names queues by topic only)"),
}

def seconds(options: Mapping[str, Any], name: str, *, positive: bool = False) -> float:
    """A duration option, checked: never negative (0 means off) or, if ``positive``, above 0."""
    value = float(options[name])
    if value < 0 or (positive and value == 0):
        want = "a positive number of seconds" if positive else "0 (off) or a positive number " \
                                                              "of seconds"
        raise InvalidTransportOption(f"URL option {name}={value:g} must be {want}")
    return value


@dataclass(frozen=True)
class QueuePlan:
    """One queue a listener consumes (or a send makes sure of) and what is bound to it."""

    name: str
    bindings: tuple[Binding, ...]


@dataclass(frozen=True)
class QueueModel:
    """How queues are named, flagged and shaped, from the URL's QUEUE_OPTIONS."""

    durable: bool = False
    arguments: Mapping[str, Any] = field(default_factory=dict)
    """Queue declare arguments (x-expires, x-message-ttl, x-dead-letter-exchange, ...)."""
    dead_letter_exchange: str = ""
    isolate_exchanges: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *,
                     arguments: Mapping[str, Any] | None = None,
                     durable: bool = False) -> QueueModel:
        """Build the model; ``arguments`` and ``durable`` add a driver's own reasons (quorum
        queues are durable and carry x-queue-type)."""
        args: dict[str, Any] = dict(arguments or {})
        expiry = seconds(options, "queue_expiry")
        if expiry:
            args["x-expires"] = max(1, int(expiry * 1000))
        ttl = seconds(options, "message_ttl")
        if ttl:
            args["x-message-ttl"] = int(ttl * 1000)
        dlx = str(options["dead_letter_exchange"] or "")
        if dlx:
            args["x-dead-letter-exchange"] = dlx
        return cls(durable=bool(options["durable"]) or durable, arguments=args,
                   dead_letter_exchange=dlx,
                   isolate_exchanges=bool(options["isolate_exchanges"]))

    def group_queue(self, exchange: str, routing_key: str) -> str:
        """The queue the no-pool group consumes and every send makes sure exists."""
        return f"{exchange}.{routing_key}" if self.isolate_exchanges else routing_key

    def pool_queue(self, exchange: str, pool: str) -> str:
        """A pool's queue on ``exchange``."""
        return f"{exchange}.{pool}" if self.isolate_exchanges else pool

    def plan(self, bindings: Sequence[Binding], pool: str | None) -> list[QueuePlan]:
        """The queues a listener on ``bindings`` consumes, in first-seen order.

        oslo naming: a pool is one queue bound to every binding (whatever the exchange); the
        no-pool group is one queue per routing key, bound on every exchange that carries it.
        With isolate_exchanges: one queue per (exchange, pool) or per (exchange, routing key).
        """
        grouped: dict[str, list[Binding]] = {}
        for b in bindings:
            name = (self.group_queue(b.exchange, b.routing_key) if pool is None
                    else self.pool_queue(b.exchange, pool))
            bound = grouped.setdefault(name, [])
            if b not in bound:
                bound.append(b)
        return [QueuePlan(name, tuple(bs)) for name, bs in grouped.items()]

    def capabilities(self, base: Capabilities) -> Capabilities:
        """What this configuration can honestly promise on top of the driver's ``base``."""
        return replace(base, exchanges=self.isolate_exchanges, durable=self.durable,
                       dead_letter=bool(self.dead_letter_exchange))
