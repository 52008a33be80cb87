"""oslo.messaging's configuration options, for ``get_notification_transport(conf)``.

The options are defined exactly as oslo.messaging 18 defines them (name, type, default, help,
flags), so tidings and oslo.messaging can register them on one ``ConfigOpts`` in either order
without ``DuplicateOptError``; where oslo.messaging is already imported its own option objects
are registered instead, so a ``set_transport_defaults()`` made there is kept. oslo.config is
optional: it is imported only when a ``ConfigOpts`` is passed in.

What tidings reads, as oslo.messaging does:

* ``[oslo_messaging_notifications] transport_url``, else ``[DEFAULT] transport_url``
  (default ``rabbit://``): the URL when none is passed;
* ``[DEFAULT] control_exchange`` (default ``openstack``): the transport's default exchange;
* ``[oslo_messaging_notifications] driver``, ``topics``, ``retry``: a Notifier's defaults;
* ``[oslo_messaging_notifications] routing_config``: the ``routing`` driver's YAML file;
* ``[DEFAULT] executor_thread_pool_size``: a listener's default pool size.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["GROUP", "is_conf", "notifier_settings", "pool_size", "register_notifier_opts",
           "register_pool_opts", "register_routing_opt", "register_transport_opts",
           "set_transport_defaults", "transport_settings"]

GROUP = "oslo_messaging_notifications"
_defaults: dict[str, Any] = {}  # set_transport_defaults() before the options were made
_made: dict[str, list[Any]] = {}


def is_conf(value: Any) -> bool:
    """True for an oslo.config ``ConfigOpts`` (or anything that registers options like one)."""
    return callable(getattr(value, "register_opts", None)) and \
        callable(getattr(value, "register_opt", None))


def _cfg() -> Any:
    from oslo_config import cfg  # optional: pip install 'tidings[oslo]'

    return cfg


def _oslo(module: str, name: str) -> Any:
    """oslo.messaging's own option list, when oslo.messaging is already imported."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _transport_opts() -> list[Any]:
    theirs = _oslo("oslo_messaging.transport", "_transport_opts")
    if theirs is not None:
        return list(theirs)
    if "transport" not in _made:
        cfg = _cfg()
        _made["transport"] = [
            cfg.StrOpt('transport_url',
                       default="rabbit://",
                       secret=True,
                       help='The network address and optional user credentials for '
                            'connecting to the messaging backend, in URL format. The '
                            'expected format is:\n\n'
                            'driver://[user:pass@]host:port[,[userN:passN@]hostN:'
                            'portN]/virtual_host?query\n\n'
                            'Example: rabbit://rabbitmq:password@127.0.0.1:5672//\n\n'
                            'For full details on the fields in the URL see the '
                            'documentation of oslo_messaging.TransportURL at '
                            'https://docs.openstack.org/oslo.messaging/latest/'
                            'reference/transport.html'),
            cfg.StrOpt('control_exchange',
                       default='openstack',
                       help='The default exchange under which topics are scoped. May '
                            'be overridden by an exchange name specified in the '
                            'transport_url option.'),
        ]
        if _defaults:
            cfg.set_defaults(_made["transport"], **_defaults)
    return _made["transport"]


def _notifier_opts() -> list[Any]:
    theirs = _oslo("oslo_messaging.notify.notifier", "_notifier_opts")
    if theirs is not None:
        return list(theirs)
    if "notifier" not in _made:
        cfg = _cfg()
        _made["notifier"] = [
            cfg.MultiStrOpt('driver',
                            default=[],
                            help='The Drivers(s) to handle sending notifications. '
                                 'Possible values are messaging, messagingv2, '
                                 'routing, log, test, noop'),
            cfg.StrOpt('transport_url',
                       secret=True,
                       help='A URL representing the messaging driver to use for '
                            'notifications. If not set, we fall back to the same '
                            'configuration used for RPC.'),
            cfg.ListOpt('topics',
                        default=['notifications', ],
                        help='AMQP topic used for OpenStack notifications.'),
            cfg.IntOpt('retry', default=-1,
                       help='The maximum number of attempts to re-send a notification '
                            'message which failed to be delivered due to a '
                            'recoverable error. 0 - No retry, -1 - indefinite'),
        ]
    return _made["notifier"]


def _routing_opt() -> Any:
    theirs = _oslo("oslo_messaging.notify._impl_routing", "router_config")
    if theirs is not None:
        return theirs
    if "routing" not in _made:
        cfg = _cfg()
        _made["routing"] = [cfg.StrOpt('routing_config', default='',
                                       help='RoutingNotifier configuration file location.')]
    return _made["routing"][0]


def _pool_opts() -> list[Any]:
    theirs = _oslo("oslo_messaging.server", "_pool_opts")
    if theirs is not None:
        return list(theirs)
    if "pool" not in _made:
        cfg = _cfg()
        _made["pool"] = [
            cfg.IntOpt('executor_thread_pool_size',
                       default=64,
                       deprecated_name="rpc_thread_pool_size",
                       help='Size of executor thread pool when'
                       ' executor is threading or eventlet.'),
        ]
    return _made["pool"]


def _register(conf: Any, opts: list[Any], group: str | None = None) -> None:
    """Register ``opts`` unless an option of that name is there already (registered by
    oslo.messaging with defaults changed by its set_transport_defaults(), for instance)."""
    cfg = _cfg()
    for opt in opts:
        try:
            conf.register_opt(opt, group=group)
        except cfg.DuplicateOptError:
            pass  # the same name, registered by someone else first: read theirs


def register_transport_opts(conf: Any) -> None:
    _register(conf, _transport_opts())


def register_notifier_opts(conf: Any) -> None:
    _register(conf, _notifier_opts(), GROUP)


def register_routing_opt(conf: Any) -> None:
    _register(conf, [_routing_opt()], GROUP)


def register_pool_opts(conf: Any) -> None:
    _register(conf, _pool_opts())


def set_transport_defaults(control_exchange: str) -> None:
    """oslo.messaging's ``set_transport_defaults``: the default of ``control_exchange``."""
    _defaults["control_exchange"] = control_exchange
    cfg = _cfg()
    cfg.set_defaults(_transport_opts(), control_exchange=control_exchange)


def transport_settings(conf: Any, url: Any) -> tuple[Any, str]:
    """(the URL to use, the default exchange) for ``get_notification_transport(conf, url)``:
    the given URL, else ``[oslo_messaging_notifications] transport_url``, else ``[DEFAULT]
    transport_url``; the exchange is ``[DEFAULT] control_exchange``."""
    register_notifier_opts(conf)
    register_transport_opts(conf)
    if not url:
        url = conf[GROUP].transport_url or conf.transport_url
    return url, conf.control_exchange


def notifier_settings(conf: Any) -> tuple[list[str], list[str], int]:
    """(drivers, topics, retry) from ``[oslo_messaging_notifications]``."""
    register_notifier_opts(conf)
    group = conf[GROUP]
    return list(group.driver), list(group.topics), group.retry


def pool_size(conf: Any) -> int:
    """``[DEFAULT] executor_thread_pool_size``."""
    register_pool_opts(conf)
    return int(conf.executor_thread_pool_size)
