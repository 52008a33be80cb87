"""Fixtures of the parity suite: oslo.messaging 18 and tidings side by side on the same inputs.

oslo.messaging is a test dependency. Its ``fake:`` driver and tidings' ``memory://`` are the
in-process pair; RabbitMQ (a fresh virtual host per module) is the real broker both speak to.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import tidings
from tidings.testing.brokers import rabbit_vhost, require_service

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # oslo's eventlet deprecation notice
    import oslo_messaging
    from oslo_config import cfg
    from oslo_context import context as oslo_context

WAIT = 15.0


def new_conf(**defaults: Any) -> Any:
    """A fresh ConfigOpts, parsed with no files and no arguments; ``defaults`` are
    ``group__name`` (or ``name`` for [DEFAULT]) overrides applied after both libraries
    registered their options."""
    conf = cfg.ConfigOpts()
    conf([], project="tidings-parity")
    return conf


def override(conf: Any, **values: Any) -> None:
    """Set options (``group__name=value``) once both libraries' options exist on ``conf``."""
    from tidings.transports import conf as options

    options.register_transport_opts(conf)
    options.register_notifier_opts(conf)
    for key, value in values.items():
        group, _, name = key.rpartition("__")
        conf.set_override(name, value, group=group or None)


def request_context(**kw: Any) -> Any:
    args = {"user_id": "u-42", "project_id": "p-7", "request_id": "req-0f9e",
            "roles": ["member", "reader"], "auth_token": "SECRET-TOKEN"}
    args.update(kw)
    return oslo_context.RequestContext(**args)


class Inbox:
    """What endpoints received, thread-safe, with bounded waits."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: list[Any] = []

    def add(self, item: Any) -> None:
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def wait(self, count: int, timeout: float = WAIT) -> list[Any]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.items) >= count, timeout):
                pytest.fail(f"timed out waiting for {count} item(s); have {self.items}")
            return list(self.items)

    def settle(self, count: int, quiet: float = 0.3) -> list[Any]:
        """Wait for ``count`` items, then make sure no more arrive within ``quiet`` seconds."""
        self.wait(count)
        with self.cond:
            self.cond.wait_for(lambda: len(self.items) > count, quiet)
            return list(self.items)


def endpoint(inbox: Inbox, *priorities: str, result: Callable[..., Any] | None = None,
             filter_rule: Any = None) -> Any:
    """An endpoint recording (priority, ctxt, publisher_id, event_type, payload, metadata)."""
    attrs: dict[str, Any] = {"filter_rule": filter_rule}
    for prio in priorities or ("info",):
        def method(self: Any, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                   metadata: Any, _prio: str = prio) -> Any:
            inbox.add((_prio, ctxt, publisher_id, event_type, payload, dict(metadata)))
            return result(payload) if result else None
        attrs[prio] = method
    return type("Endpoint", (), attrs)()


@pytest.fixture
def running() -> Iterator[list[Any]]:
    """Listeners of both libraries, stopped and waited for after the test."""
    items: list[Any] = []
    yield items
    for listener in items:
        listener.stop()
    for listener in items:
        listener.wait()


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """oslo.messaging on ``fake:`` and tidings on ``memory://``, each from its own ConfigOpts
    (the fake driver's exchanges are process-global: each test uses its own topic names)."""
    oslo_conf, tidings_conf = new_conf(), new_conf()
    oslo_t = oslo_messaging.get_notification_transport(oslo_conf, url="fake:")
    tidings_t = tidings.get_notification_transport(tidings_conf, url="memory:///parity-"
                                                   + request.node.name[:60])
    yield {"oslo": (oslo_messaging, oslo_t), "tidings": (tidings, tidings_t)}
    oslo_t.cleanup()
    tidings_t.cleanup()


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    require_service("rabbitmq")
    with rabbit_vhost("tidings-parity") as name:
        yield name


@pytest.fixture(scope="module")
def rabbit_url(vhost: str) -> str:
    return f"rabbit://guest:guest@127.0.0.1:5672/{vhost}"
