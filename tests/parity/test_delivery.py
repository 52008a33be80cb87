"""Delivery to endpoints, side by side in one process: oslo.messaging 18 on ``fake:`` and
tidings on ``memory://``, same endpoints, same notifications. (``fake:`` hands Python objects
over without encoding them, so payloads here are JSON's own types; encoding is compared over
RabbitMQ in test_wire_rabbit.py.)"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from .conftest import Inbox, endpoint

NOTES = [  # (publisher_id, priority, event_type, payload)
    ("compute.host1", "info", "compute.instance.create.end", {"id": 1, "state": "active"}),
    ("compute.host1", "error", "compute.instance.error", {"id": 2, "state": "error"}),
    ("volume.host2", "info", "volume.create.end", {"id": 3, "state": "available"}),
    ("volume.host2", "warn", "volume.slow", {"id": 4, "state": 5}),
    ("network.host3", "audit", "port.update", {"id": 5}),
    ("network.host3", "sample", "port.bytes", {"id": 6}),
    ("compute.host1", "debug", "compute.instance.debug", "just a string"),
    ("compute.host1", "critical", "compute.instance.down", {"id": 8, "state": "active"}),
]


def topic() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def send_all(module: Any, transport: Any, topics: list[str]) -> None:
    for publisher, priority, event_type, payload in NOTES:
        notifier = module.Notifier(transport, publisher, driver="messagingv2", topics=topics)
        getattr(notifier, priority)(None, event_type, payload)


def listen(module: Any, transport: Any, topics: list[str], endpoints: list[Any],
           running: list[Any], **kw: Any) -> Any:
    listener = module.get_notification_listener(
        transport, [module.Target(topic=t) for t in topics], endpoints, executor="threading",
        **kw)
    listener.start()
    running.append(listener)
    return listener


def view(items: list[Any]) -> list[Any]:
    """Order-free, id-free: (priority, ctxt, publisher_id, event_type, payload, metadata keys)."""
    return sorted((repr(i[:5]), sorted(i[5])) for i in items)


def test_priorities_and_filters(pair: dict[str, Any], running: list[Any]) -> None:
    from tidings import NotificationFilter as OursFilter

    got = {}
    for lib, (module, transport) in pair.items():
        topics = [topic(), topic()]
        inboxes = [Inbox() for _ in range(4)]
        endpoints = [
            endpoint(inboxes[0], "audit", "debug", "info", "warn", "error", "critical",
                     "sample"),
            endpoint(inboxes[1], "info", "error",
                     filter_rule=module.NotificationFilter(event_type=r"^compute\.")),
            endpoint(inboxes[2], "info", "warn", filter_rule=module.NotificationFilter(
                publisher_id=r"^volume\.", payload={"state": "^avail"})),
            endpoint(inboxes[3], "info", "critical", filter_rule=module.NotificationFilter(
                payload={"state": "active"}, metadata={"message_id": "."})),
        ]
        listen(module, transport, topics, endpoints, running)
        send_all(module, transport, topics[:1])
        got[lib] = [view(inboxes[0].wait(len(NOTES)))] + \
            [view(inbox.settle(n)) for inbox, n in zip(inboxes[1:], (2, 1, 2), strict=True)]
    assert got["tidings"] == got["oslo"]
    assert OursFilter is not None


@pytest.mark.parametrize("allow_requeue", [True, False])
def test_requeue_and_failing_endpoints(pair: dict[str, Any], running: list[Any],
                                       allow_requeue: bool) -> None:
    """REQUEUE with allow_requeue=True: redelivered, then handled, in both. An endpoint that
    raises, or REQUEUE with allow_requeue=False: oslo.messaging acknowledges the message (it is
    gone); tidings rejects it (dead-lettered where the broker can) and logs its id (README)."""
    seen = {}
    for lib, (module, transport) in pair.items():
        inbox, attempts = Inbox(), {}

        def result(payload: Any, attempts: dict[int, int] = attempts,
                   module: Any = module) -> Any:
            attempts[payload["id"]] = attempts.get(payload["id"], 0) + 1
            if payload["id"] == 1 and attempts[1] == 1:
                return module.NotificationResult.REQUEUE
            if payload["id"] == 2:
                raise RuntimeError("endpoint failure")
            return None

        t = topic()
        listener = listen(module, transport, [t], [endpoint(inbox, "info", result=result)],
                          running, allow_requeue=allow_requeue)
        notifier = module.Notifier(transport, "p", driver="messagingv2", topics=[t])
        for i in (1, 2, 3):
            notifier.info(None, "e", {"id": i})
        expected = (5 if allow_requeue else 3)
        deadline = time.monotonic() + 2.0
        while sum(attempts.values()) < expected and time.monotonic() < deadline:
            inbox.settle(0, quiet=0.05)
        inbox.settle(expected if allow_requeue else 3, quiet=0.3)
        seen[lib] = dict(attempts)
        assert listener is not None
    if allow_requeue:  # id 2 raises every time: both libraries requeue it again and again
        assert seen["oslo"][1] == seen["tidings"][1] == 2
        assert seen["oslo"][3] == seen["tidings"][3] == 1
        assert seen["oslo"][2] > 1 and seen["tidings"][2] > 1
    else:
        assert seen["tidings"] == seen["oslo"] == {1: 1, 2: 1, 3: 1}
        stats = running[-1].stats.snapshot()
        assert stats["rejected"] == 2 and stats["acknowledged"] == 1


def test_pools_each_get_a_copy(pair: dict[str, Any], running: list[Any]) -> None:
    got = {}
    for lib, (module, transport) in pair.items():
        t = topic()
        group, a, b = Inbox(), Inbox(), Inbox()
        listen(module, transport, [t], [endpoint(group)], running)
        listen(module, transport, [t], [endpoint(a)], running, pool="a")
        listen(module, transport, [t], [endpoint(a)], running, pool="a")
        listen(module, transport, [t], [endpoint(b)], running, pool="b")
        notifier = module.Notifier(transport, "p", driver="messagingv2", topics=[t])
        for i in range(6):
            notifier.info(None, "e", {"id": i})
        got[lib] = [view(inbox.settle(6)) for inbox in (group, a, b)]
    assert got["tidings"] == got["oslo"]


def test_batches(pair: dict[str, Any], running: list[Any]) -> None:
    """A batch endpoint gets oslo.messaging's dicts (no 'priority' key), and the priorities of
    a batch in oslo.messaging's order (alphabetical)."""
    got = {}
    for lib, (module, transport) in pair.items():
        t = topic()
        calls: list[Any] = []
        inbox = Inbox()

        class Batch:
            def _got(self, prio: str, notes: list[dict[str, Any]], calls: list[Any] = calls,
                     inbox: Inbox = inbox) -> None:
                calls.append((prio, [sorted(n) for n in notes],
                              [n["payload"]["id"] for n in notes]))
                for _ in notes:
                    inbox.add(prio)

        for prio in ("audit", "critical", "debug", "error", "info", "sample", "warn"):
            setattr(Batch, prio, lambda self, notes, _p=prio: self._got(_p, notes))
        notifier = module.Notifier(transport, "p", driver="messagingv2", topics=[t])
        order = ["warn", "info", "audit", "info", "error", "critical", "sample", "debug"]
        listener = module.get_batch_notification_listener(
            transport, [module.Target(topic=t)], [Batch()], executor="threading",
            batch_size=len(order), batch_timeout=5)
        for i, prio in enumerate(order):
            getattr(notifier, prio)(None, "e", {"id": i})
        listener.start()
        running.append(listener)
        inbox.wait(len(order))
        got[lib] = calls
    assert got["tidings"] == got["oslo"]
    assert [c[0] for c in got["oslo"]] == sorted(c[0] for c in got["oslo"])
    assert got["oslo"][0][1][0] == ["ctxt", "event_type", "metadata", "payload", "publisher_id"]


def test_batch_without_size_or_timeout(pair: dict[str, Any], running: list[Any]) -> None:
    """batch_size=None, batch_timeout=None: oslo.messaging delivers nothing until stop();
    tidings delivers each notification at once, as a batch of one (README)."""
    got = {}
    for lib, (module, transport) in pair.items():
        t = topic()
        inbox = Inbox()

        class Batch:
            def info(self, notes: list[Any], inbox: Inbox = inbox) -> None:
                inbox.add(len(notes))

        listener = module.get_batch_notification_listener(
            transport, [module.Target(topic=t)], [Batch()], executor="threading")
        listener.start()
        notifier = module.Notifier(transport, "p", driver="messagingv2", topics=[t])
        notifier.info(None, "e", {"id": 1})
        notifier.info(None, "e", {"id": 2})
        before = inbox.settle(2 if lib == "tidings" else 0, quiet=1.0)  # oslo: none come
        listener.stop()
        listener.wait()
        got[lib] = (before, inbox.settle(len(before) if lib == "tidings" else 1, quiet=0.2))
    assert got["oslo"] == ([], [2])
    assert got["tidings"] == ([1, 1], [1, 1])


def test_endpoints_that_wait_on_io_overlap(pair: dict[str, Any], running: list[Any]) -> None:
    """Endpoints that wait (a database write, an HTTP call) run concurrently on the threading
    executor in both libraries, so tidings drains such a backlog no slower than oslo.messaging
    (each endpoint call here waits 50 ms; one at a time, 32 of them would take 1.6 s)."""
    took = {}
    for lib, (module, transport) in pair.items():
        t = topic()
        inbox = Inbox()
        io = threading.Event()  # never set: each call waits its full 50 ms, like a slow write

        class Slow:
            def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                     metadata: Any, inbox: Inbox = inbox, io: threading.Event = io) -> None:
                io.wait(0.05)
                inbox.add(payload["id"])

        notifier = module.Notifier(transport, "p", driver="messagingv2", topics=[t])
        listener = module.get_notification_listener(
            transport, [module.Target(topic=t)], [Slow()], executor="threading")
        for i in range(32):
            notifier.info(None, "e", {"id": i})
        began = time.monotonic()
        listener.start()
        running.append(listener)
        inbox.wait(32)
        took[lib] = time.monotonic() - began
    assert took["tidings"] < 32 * 0.05 / 2, took  # overlapped, not one at a time
    assert took["tidings"] <= took["oslo"] * 1.5 + 0.25, took
