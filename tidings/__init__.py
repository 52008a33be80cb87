"""tidings: send notifications and consume them in listener pools over pluggable transports.

Names and meaning follow oslo.messaging's notification API. A transport URL picks the broker:
``memory://`` (in this process), ``rabbit://`` and ``amqp://`` (RabbitMQ, AMQP 0-9-1 and 1.0),
``zmq://`` (ZeroMQ, no broker); ``tidings drivers`` lists what is installed. This example runs
as it is, with nothing installed beyond tidings::

    >>> import threading
    >>> import tidings
    >>> transport = tidings.get_notification_transport("memory:///example")
    >>> done = threading.Event()
    >>> class Audit:
    ...     def info(self, ctxt, publisher_id, event_type, payload, metadata):
    ...         print(publisher_id, event_type, payload)
    ...         done.set()
    >>> listener = tidings.get_notification_listener(
    ...     transport, [tidings.Target(topic="notifications")], [Audit()], pool="audit")
    >>> listener.start()
    >>> notifier = tidings.Notifier(transport, "compute.host1")
    >>> notifier.info({}, "compute.instance.create", {"id": 1})
    >>> done.wait(10)
    compute.host1 compute.instance.create {'id': 1}
    True
    >>> listener.stop(); listener.wait(10)
    True
    >>> transport.cleanup()

Every pool (here ``audit``) gets its own copy of each notification and one member of the pool
handles it; listeners without a pool share one copy. ``listener.stats.snapshot()`` and
``notifier.stats.snapshot()`` count what happened (:mod:`tidings.metrics` exports them to
Prometheus). The names below are the public API, re-exported; nothing else is defined here.
"""

from tidings._version import __version__ as __version__
from tidings.notify.dispatcher import NotificationResult
from tidings.notify.filter import NotificationFilter
from tidings.notify.listener import (
    NotificationListener,
    get_batch_notification_listener,
    get_notification_listener,
)
from tidings.notify.log_handler import (
    LoggingErrorNotificationHandler,
    LoggingNotificationHandler,
    PublishErrorsHandler,
)
from tidings.notify.notifier import BackgroundNotifier, Notifier
from tidings.notify.serializer import JsonPayloadSerializer, NoOpSerializer, Serializer
from tidings.transports.base import Capabilities
from tidings.transports.errors import (
    DriverLoadFailure,
    InvalidTarget,
    InvalidTransportOption,
    InvalidTransportURL,
    ListenerLifecycleError,
    MalformedMessage,
    MessageDeliveryFailure,
    MessageTooLarge,
    MessageUndeliverable,
    MessagingException,
    MessagingTimeout,
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
    set_transport_defaults,
)
from tidings.transports.url import TransportHost, TransportURL

__all__ = [
    "BackgroundNotifier",
    "Capabilities",
    "DriverLoadFailure",
    "InvalidTarget",
    "InvalidTransportOption",
    "InvalidTransportURL",
    "JsonPayloadSerializer",
    "ListenerLifecycleError",
    "LoggingErrorNotificationHandler",
    "LoggingNotificationHandler",
    "MalformedMessage",
    "MessageDeliveryFailure",
    "MessageTooLarge",
    "MessageUndeliverable",
    "MessagingException",
    "MessagingTimeout",
    "NoOpSerializer",
    "NotificationFilter",
    "NotificationListener",
    "NotificationResult",
    "Notifier",
    "PublishErrorsHandler",
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
    "set_transport_defaults",
]
