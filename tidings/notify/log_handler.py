"""Python logging handlers that send log records as notifications (oslo.messaging's
``LoggingNotificationHandler`` and ``PublishErrorsHandler``), with oslo.messaging's arguments
and payloads. Their configuration comes from oslo.config's global ``cfg.CONF`` as there (a
subclass may set ``CONF``); without oslo.config installed, ``CONF`` is None and the URL given (or
$TIDINGS_TRANSPORT_URL) is used.
"""

from __future__ import annotations

import logging
from typing import Any

from tidings.notify.notifier import Notifier
from tidings.transports import conf as options
from tidings.transports.transport import get_notification_transport

__all__ = ["LoggingErrorNotificationHandler", "LoggingNotificationHandler",
           "PublishErrorsHandler"]


_MARKER: Any = object()


def _global_conf() -> Any:
    try:
        from oslo_config import cfg
    except ImportError:  # oslo.config is optional: tidings[oslo]
        return None
    return cfg.CONF


class LoggingNotificationHandler(logging.Handler):
    """Send every log record it handles as a ``logrecord`` notification at the record's level
    (``info``, ``warning``, ``error``, ``critical``, ``debug``), for a logging configuration::

        [handler_notifier]
        class=tidings.LoggingNotificationHandler
        level=ERROR
        args=('rabbit:///')
    """

    CONF: Any = _MARKER
    """The configuration used (oslo.config's ``cfg.CONF`` unless set); subclass to use
    another one."""

    def __init__(self, url: Any, publisher_id: str | None = None, driver: Any = None,
                 topic: Any = None, serializer: Any = None) -> None:
        conf = _global_conf() if self.CONF is _MARKER else self.CONF
        self.notifier = Notifier(
            get_notification_transport(conf, url),
            publisher_id, driver, serializer() if serializer else None,
            topics=(topic if isinstance(topic, list) or topic is None else [topic]))
        logging.Handler.__init__(self)

    def emit(self, record: logging.LogRecord) -> None:
        method = getattr(self.notifier, record.levelname.lower(), None)
        if not method:
            return
        method(None, "logrecord", {
            "name": record.name,
            "levelno": record.levelno,
            "levelname": record.levelname,
            "exc_info": record.exc_info,
            "pathname": record.pathname,
            "lineno": record.lineno,
            "msg": record.getMessage(),
            "funcName": record.funcName,
            "thread": record.thread,
            "processName": record.processName,
            "process": record.process,
            "extra": getattr(record, "extra", None),
        })


class LoggingErrorNotificationHandler(logging.Handler):
    """Send each record it handles as an ``error_notification`` at error priority, from
    publisher ``error.publisher``, over the transport configured in ``cfg.CONF``; does nothing
    when the ``log`` notifier driver is configured (a log record would notify, which would log,
    and so on)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        logging.Handler.__init__(self, *args, **kwargs)
        self._transport = get_notification_transport(_global_conf())
        self._notifier = Notifier(self._transport, publisher_id="error.publisher")

    def emit(self, record: logging.LogRecord) -> None:
        conf = self._transport.conf
        if conf is not None:
            drivers, _, _ = options.notifier_settings(conf)
        else:
            drivers = self._notifier._driver_names
        if "log" in drivers:
            return
        self._notifier.error({}, "error_notification", dict(error=record.msg))


PublishErrorsHandler = LoggingErrorNotificationHandler
