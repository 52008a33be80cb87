"""The error types every layer of tidings raises.

They live in the core so that callers catch one family whatever driver is loaded, and so a
driver never needs to invent its own: a driver raises these, the core decides what to retry.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DriverLoadFailure", "InvalidTarget", "InvalidTransportOption", "InvalidTransportURL",
           "ListenerLifecycleError", "MalformedMessage", "MessageDeliveryFailure",
           "MessageTooLarge", "MessageUndeliverable", "MessagingException", "MessagingTimeout",
           "TidingsError", "TransportClosed", "TransportUnreachable"]


class TidingsError(Exception):
    """Base of every error tidings raises on purpose (oslo.messaging's ``MessagingException``,
    which is the same class, so OpenStack code that catches that catches these)."""


#: oslo.messaging's name for the base of its errors: the same class as TidingsError.
MessagingException = TidingsError


class MessagingTimeout(TidingsError):
    """Raised if message sending times out (oslo.messaging's name)."""


class InvalidTarget(TidingsError, ValueError):
    """A target cannot be used as asked (no topic, for instance). oslo.messaging's constructor:
    ``InvalidTarget(msg, target)``; the message reads ``msg:target`` and ``.target`` is kept."""

    def __init__(self, msg: str, target: Any) -> None:
        super().__init__(msg + ":" + str(target))
        self.target = target


class MessageUndeliverable(Exception):
    """A message was not routed with the mandatory flag (oslo.messaging's class and
    constructor; like there, not a MessagingException)."""

    def __init__(self, exception: Any, exchange: Any, routing_key: Any, message: Any) -> None:
        super().__init__()
        self.exception = exception
        self.exchange = exchange
        self.routing_key = routing_key
        self.message = message


class InvalidTransportURL(TidingsError, ValueError):
    """A transport URL could not be parsed; the message says which part and why.

    Also takes oslo.messaging's arguments, ``InvalidTransportURL(url, msg)``, which keep the
    URL as ``.url``."""

    def __init__(self, *args: Any) -> None:
        if len(args) == 2 and isinstance(args[1], str):
            self.url: Any = args[0]
            super().__init__(args[1])
        else:
            self.url = None
            super().__init__(*args)


class InvalidTransportOption(InvalidTransportURL):
    """A query option is unknown to the driver or has a value of the wrong type."""


class DriverLoadFailure(TidingsError):
    """No driver is installed for a URL's scheme, or the driver failed to import.

    Also takes oslo.messaging's arguments, ``DriverLoadFailure(driver, ex)``: the message is
    then oslo's, and ``.driver`` and ``.ex`` are kept."""

    def __init__(self, *args: Any) -> None:
        self.driver: Any = None
        self.ex: Any = None
        if len(args) == 2 and isinstance(args[1], BaseException):
            self.driver, self.ex = args
            super().__init__(f'Failed to load transport driver "{args[0]}": {args[1]}')
        else:
            super().__init__(*args)


class TransportClosed(TidingsError):
    """The transport was cleaned up; build a new one with get_notification_transport()."""


class MessageDeliveryFailure(TidingsError):
    """Sending failed and the retry policy is exhausted (or forbade retrying)."""


class TransportUnreachable(MessageDeliveryFailure):
    """A single attempt could not reach the broker. Drivers raise it; the core retries it."""


class MessageTooLarge(TidingsError, ValueError):
    """An encoded message exceeds the transport's max_message_size option."""


class MalformedMessage(TidingsError, ValueError):
    """An incoming body is not a notification tidings can decode (bad JSON, unknown envelope)."""


class ListenerLifecycleError(TidingsError, RuntimeError):
    """start(), stop() or wait() was called in an order that cannot work."""
