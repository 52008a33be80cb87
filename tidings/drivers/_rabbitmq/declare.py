"""Declaring the family's exchanges and queues over AMQP 0-9-1 with a py-amqp channel, as
oslo.messaging does (``amqp://`` declares this way; RabbitMQ 3.x cannot over AMQP 1.0)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from tidings.drivers._rabbitmq.queues import QueueModel, QueuePlan
from tidings.drivers._rabbitmq.tls import ssl_error_text
from tidings.transports.errors import InvalidTransportOption, TransportUnreachable

__all__ = ["LoginRefused", "declare_on", "describe"]


class LoginRefused(TransportUnreachable):
    """The broker answered and refused the user name and password: a send is not retried (the
    driver's ``retryable()`` says no); a listener keeps reconnecting, at ERROR level."""


def declare_on(channel: Any, model: QueueModel, plans: Sequence[QueuePlan]) -> None:
    """The dead-letter exchange and queue (if any), the plans' exchanges, queues, bindings."""
    durable, dlx, args = model.durable, model.dead_letter_exchange, dict(model.arguments)
    if dlx:  # rejected messages go there and are kept, not silently dropped
        _guard(f"dead-letter exchange {dlx!r} (fanout, durable)", channel.exchange_declare,
               dlx, "fanout", durable=True, auto_delete=False)
        _guard(f"dead-letter queue {dlx!r} (durable)", channel.queue_declare, dlx,
               durable=True, auto_delete=False)
        channel.queue_bind(dlx, dlx, "")
    for exchange in dict.fromkeys(b.exchange for p in plans for b in p.bindings):
        _guard(f"exchange {exchange!r} (topic, durable={durable})", channel.exchange_declare,
               exchange, "topic", durable=durable, auto_delete=False)
    shown = ", ".join(f"{k}={v}" for k, v in args.items()) or "none"
    for plan in plans:
        _guard(f"queue {plan.name!r} (durable={durable}, arguments: {shown})",
               channel.queue_declare, plan.name, durable=durable, auto_delete=False,
               arguments=dict(args) or None)
        for b in plan.bindings:
            channel.queue_bind(plan.name, b.exchange, b.routing_key)


def describe(exc: BaseException) -> str:
    """A py-amqp connect or declare failure in a few words."""
    if isinstance(exc, socket.timeout):
        return "connect timed out"
    return ssl_error_text(exc) if isinstance(exc, ssl.SSLError) else str(exc) or type(exc).__name__


def _guard(what: str, declare: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    import amqp

    try:
        declare(*args, **kwargs)
    except amqp.exceptions.PreconditionFailed as exc:
        raise InvalidTransportOption(
            f"cannot declare {what}: the broker has it with other arguments ({exc.reply_text}). "
            f"Use the same durable/queue_expiry/message_ttl/dead_letter_exchange options as the "
            f"code that declared it (oslo.messaging: amqp_durable_queues), or delete it so it "
            f"can be declared again") from None
