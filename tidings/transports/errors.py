"""The error types every layer of tidings raises.

They live in the core so that callers catch one family whatever driver is loaded, and so a
driver never needs to invent its own: a driver raises these, the core decides what to retry.
"""

from __future__ import annotations


class TidingsError(Exception):
    """Base of every error tidings raises on purpose."""


class InvalidTransportURL(TidingsError, ValueError):
    """A transport URL could not be parsed; the message says which part and why."""


class InvalidTransportOption(InvalidTransportURL):
    """A query option is unknown to the driver or has a value of the wrong type."""


class DriverLoadFailure(TidingsError):
    """No driver is installed for a URL's scheme, or the driver failed to import."""


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
