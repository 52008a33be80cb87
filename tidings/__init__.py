"""tidings: send notifications and consume them in listener pools over pluggable transports.

The public API, re-exported; nothing is defined here. Names and meaning follow
oslo.messaging's notification API.
"""

from tidings.notify.dispatcher import NotificationResult
from tidings.notify.filter import NotificationFilter
from tidings.notify.listener import (
    NotificationListener,
    get_batch_notification_listener,
    get_notification_listener,
)
from tidings.notify.notifier import BackgroundNotifier, Notifier
from tidings.notify.serializer import JsonPayloadSerializer, NoOpSerializer, Serializer
from tidings.transports.base import Capabilities
from tidings.transports.errors import (
    DriverLoadFailure,
    InvalidTransportOption,
    InvalidTransportURL,
    ListenerLifecycleError,
    MalformedMessage,
    MessageDeliveryFailure,
    MessageTooLarge,
    TidingsError,
    TransportClosed,
    TransportUnreachable,
)
from tidings.transports.signing import SignatureError, SigningKeys
from tidings.transports.transport import (
    Target,
    Transport,
    get_notification_transport,
    get_transport,
)
from tidings.transports.url import TransportHost, TransportURL

__all__ = [
    "BackgroundNotifier",
    "Capabilities",
    "DriverLoadFailure",
    "InvalidTransportOption",
    "InvalidTransportURL",
    "JsonPayloadSerializer",
    "ListenerLifecycleError",
    "MalformedMessage",
    "MessageDeliveryFailure",
    "MessageTooLarge",
    "NoOpSerializer",
    "NotificationFilter",
    "NotificationListener",
    "NotificationResult",
    "Notifier",
    "Serializer",
    "SignatureError",
    "SigningKeys",
    "Target",
    "TidingsError",
    "Transport",
    "TransportClosed",
    "TransportHost",
    "TransportURL",
    "TransportUnreachable",
    "get_batch_notification_listener",
    "get_notification_listener",
    "get_notification_transport",
    "get_transport",
]
