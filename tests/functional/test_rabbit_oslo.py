"""rabbit:// and oslo.messaging 18 on one broker: each reads what the other sends, and their
pools and no-pool groups share queues, because both declare the same exchanges and queues with
the same flags.

Every comparison is against what oslo.messaging's own listener makes of the same message (an
oslo pool and a tidings pool each get a copy), so "the same ctxt, publisher_id, event_type,
payload and metadata" is checked against oslo.messaging itself, not against our reading of it.
"""

from __future__ import annotations

import threading
import uuid
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


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    require_service("rabbitmq")
    with rabbit_vhost("tidings-oslo") as name:
        yield name


@pytest.fixture(scope="module")
def url(vhost: str) -> str:
    return f"rabbit://guest:guest@127.0.0.1:5672/{vhost}"


@pytest.fixture(scope="module")
def oslo_transport(url: str) -> Iterator[Any]:
    conf = cfg.ConfigOpts()
    conf([], project="tidings-tests")  # no files, no arguments: oslo.messaging's defaults
    transport = oslo_messaging.get_notification_transport(conf, url=url)
    yield transport
    transport.cleanup()


@pytest.fixture(scope="module")
def tidings_transport(url: str) -> Iterator[tidings.Transport]:
    transport = tidings.get_notification_transport(url)
    yield transport
    transport.cleanup()


class Inbox:
    """Notifications as (library, ctxt, publisher_id, event_type, payload, metadata)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: list[tuple[str, dict[str, Any], Any, Any, Any, dict[str, Any]]] = []

    def endpoint(self, who: str, before: Callable[[], None] | None = None) -> Any:
        inbox = self

        class Endpoint:
            def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                     metadata: Any) -> None:
                if before is not None:
                    before()
                with inbox.cond:
                    inbox.items.append((who, dict(ctxt), publisher_id, event_type, payload,
                                        dict(metadata)))
                    inbox.cond.notify_all()

        return Endpoint()

    def wait(self, count: int, who: str | None = None) -> list[Any]:
        def mine() -> list[Any]:
            return [i for i in self.items if who is None or i[0] == who]

        with self.cond:
            if not self.cond.wait_for(lambda: len(mine()) >= count, WAIT):
                pytest.fail(f"timed out waiting for {count} notification(s) at "
                            f"{who or 'any listener'}; have {[i[0] for i in self.items]}")
            return mine()


@pytest.fixture
def listeners() -> Iterator[list[Any]]:
    """Listeners of both libraries, stopped after the test."""
    running: list[Any] = []
    yield running
    for listener in running:
        listener.stop()
    for listener in running:
        if isinstance(listener, tidings.NotificationListener):
            assert listener.wait(WAIT)
        else:
            listener.wait()


def oslo_listener(transport: Any, topic: str, endpoint: Any, running: list[Any],
                  pool: str | None = None) -> None:
    listener = oslo_messaging.get_notification_listener(
        transport, [oslo_messaging.Target(topic=topic)], [endpoint], executor="threading",
        pool=pool)
    listener.start()
    running.append(listener)


def tidings_listener(transport: tidings.Transport, topic: str, endpoint: Any,
                     running: list[Any], pool: str | None = None) -> None:
    listener = tidings.get_notification_listener(transport, [tidings.Target(topic=topic)],
                                                 [endpoint], pool=pool)
    listener.start()
    running.append(listener)


def request_context() -> Any:
    return oslo_context.RequestContext(user_id="u-42", project_id="p-7",
                                       request_id="req-0f9e", roles=["member", "reader"])


def same_notification(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    """Equal ctxt, publisher_id, event_type, payload and metadata (message id, timestamp).

    oslo.messaging's listener adds ``client_timeout: None`` to every context (an RPC field,
    popped from ``_timeout``, which notifications never carry); it is not on the wire.
    """
    def view(item: tuple[Any, ...]) -> tuple[Any, ...]:
        ctxt = dict(item[1])
        if item[0].startswith("oslo"):
            assert ctxt.pop("client_timeout", None) is None
        return (ctxt, *item[2:])

    assert view(a) == view(b), f"{a[0]} and {b[0]} differ:\n{a[1:]}\n{b[1:]}"


@pytest.mark.parametrize("driver", ["messagingv2", "messaging"])
def test_oslo_notifier_reaches_tidings_listener(driver: str, oslo_transport: Any,
                                                tidings_transport: tidings.Transport,
                                                listeners: list[Any]) -> None:
    topic = f"from-oslo-{uuid.uuid4().hex[:8]}"
    inbox = Inbox()
    oslo_listener(oslo_transport, topic, inbox.endpoint("oslo"), listeners, pool="oslo-view")
    tidings_listener(tidings_transport, topic, inbox.endpoint("tidings"), listeners,
                     pool="tidings-view")
    notifier = oslo_messaging.Notifier(oslo_transport, "compute.host-1", driver=driver,
                                       topics=[topic])
    payload = {"instance_id": "i-1", "state": "active", "n": 3, "ratio": 0.5, "tags": ["a"],
               "nested": {"unicode": "héllo ✓"}}
    notifier.info(request_context(), "compute.instance.create.end", payload)
    (theirs,) = inbox.wait(1, "oslo")
    (ours,) = inbox.wait(1, "tidings")
    same_notification(ours, theirs)
    assert ours[2] == "compute.host-1" and ours[3] == "compute.instance.create.end"
    assert ours[4] == payload
    assert ours[1]["user"] == "u-42" and ours[1]["request_id"] == "req-0f9e"
    assert ours[1]["roles"] == ["member", "reader"]
    assert ours[5]["message_id"] and ours[5]["timestamp"]


@pytest.mark.parametrize("driver", ["messagingv2", "messaging"])
def test_tidings_notifier_reaches_oslo_listener(driver: str, oslo_transport: Any,
                                                tidings_transport: tidings.Transport,
                                                listeners: list[Any]) -> None:
    topic = f"from-tidings-{uuid.uuid4().hex[:8]}"
    inbox = Inbox()
    oslo_listener(oslo_transport, topic, inbox.endpoint("oslo"), listeners, pool="oslo-view")
    tidings_listener(tidings_transport, topic, inbox.endpoint("tidings"), listeners,
                     pool="tidings-view")
    notifier = tidings.Notifier(tidings_transport, "network.host-2", driver=driver,
                                topics=[topic], raise_on_failure=True)
    ctxt = {"user_id": "u-1", "project_id": "p-1", "request_id": "req-1", "is_admin": False}
    notifier.info(ctxt, "port.create.end", {"port": {"id": "p1", "fixed_ips": []}})
    (theirs,) = inbox.wait(1, "oslo")
    (ours,) = inbox.wait(1, "tidings")
    same_notification(theirs, ours)
    assert {k: v for k, v in theirs[1].items() if k != "client_timeout"} == ctxt
    assert theirs[2:5] == ("network.host-2", "port.create.end",
                           {"port": {"id": "p1", "fixed_ips": []}})


def test_pools_of_both_libraries_split_one_stream(oslo_transport: Any,
                                                  tidings_transport: tidings.Transport,
                                                  listeners: list[Any]) -> None:
    """An oslo.messaging member and a tidings member of one pool share its queue: every
    message once, each member some (a barrier holds each on its first until both have one)."""
    topic = f"split-{uuid.uuid4().hex[:8]}"
    pool = f"shared-pool-{uuid.uuid4().hex[:8]}"
    inbox = Inbox()
    both = threading.Barrier(2)
    first: dict[str, bool] = {}

    def hold(who: str) -> Callable[[], None]:
        def before() -> None:
            if not first.setdefault(who, False):
                first[who] = True
                try:
                    both.wait(5.0)
                except threading.BrokenBarrierError:
                    pass
        return before

    oslo_listener(oslo_transport, topic, inbox.endpoint("oslo", hold("oslo")), listeners, pool)
    tidings_listener(tidings_transport, topic, inbox.endpoint("tidings", hold("tidings")),
                     listeners, pool)
    # Both libraries also keep a no-pool group on the topic; it shares queue <topic>.info.
    oslo_listener(oslo_transport, topic, inbox.endpoint("oslo-group"), listeners)
    tidings_listener(tidings_transport, topic, inbox.endpoint("tidings-group"), listeners)
    oslo_notifier = oslo_messaging.Notifier(oslo_transport, "h", driver="messagingv2",
                                            topics=[topic])
    tidings_notifier = tidings.Notifier(tidings_transport, "h", topics=[topic],
                                        raise_on_failure=True)
    for i in range(40):
        (oslo_notifier if i % 2 else tidings_notifier).info({}, "split", {"i": i})

    def keys(*who: str) -> list[int]:
        return sorted(item[4]["i"] for item in inbox.items if item[0] in who)

    with inbox.cond:
        assert inbox.cond.wait_for(lambda: len(keys("oslo", "tidings")) >= 40
                                   and len(keys("oslo-group", "tidings-group")) >= 40, WAIT)
    assert keys("oslo", "tidings") == list(range(40)), "the pool got each message once"
    assert keys("oslo") and keys("tidings"), "both libraries' members took part in the pool"
    assert keys("oslo-group", "tidings-group") == list(range(40))


def test_durable_queues_interoperate(url: str, listeners: list[Any],
                                     caplog: pytest.LogCaptureFixture) -> None:
    """oslo.messaging's amqp_durable_queues and durable=true here declare the same exchange and
    queue: no 406, no fallback, and the message arrives."""
    exchange = f"durable-{uuid.uuid4().hex[:8]}"
    topic = f"durable-{uuid.uuid4().hex[:8]}"
    ours = tidings.get_notification_transport(f"{url}?durable=true")
    conf = cfg.ConfigOpts()
    conf([], project="tidings-tests")
    oslo_messaging.get_notification_transport(conf, url=url).cleanup()  # registers the options
    conf.set_override("amqp_durable_queues", True, group="oslo_messaging_rabbit")
    conf.set_override("control_exchange", exchange)
    theirs = oslo_messaging.get_notification_transport(conf, url=url)
    try:
        inbox = Inbox()
        listener = tidings.get_notification_listener(
            ours, [tidings.Target(topic=topic, exchange=exchange)], [inbox.endpoint("tidings")])
        listener.start()
        listeners.append(listener)
        oslo_messaging.Notifier(theirs, "h", driver="messagingv2",
                                topics=[topic]).info({}, "durable.event", {"k": 1})
        (item,) = inbox.wait(1, "tidings")
        assert item[3] == "durable.event" and item[4] == {"k": 1}
        assert not [r for r in caplog.records if "non durable" in r.getMessage()
                    or "other settings" in r.getMessage()]
    finally:
        theirs.cleanup()
        ours.cleanup()
