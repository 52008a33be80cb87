"""The conformance suite against the example third-party plugin (examples/tidings-redis-streams),
loaded by scheme through its own entry point, on the Redis at 127.0.0.1:6379.

Outside CI the module skips, naming the install command, when the plugin is not installed; in
CI (``CI`` set) a missing plugin or Redis fails, as every broker test does."""

from __future__ import annotations

import ast
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tidings.testing.brokers import in_ci, require_service
from tidings.testing.conformance import (
    DriverConformance,
    Harness,
    Inbox,
    Received,
    RecordingEndpoint,
)
from tidings.transports.base import Binding
from tidings.transports.loader import available_drivers, load_driver_class

SCHEME = "redisstreams"
INSTALL = "pip install -e examples/tidings-redis-streams"
PLUGIN_DIR = Path(__file__).resolve().parents[2] / "examples" / "tidings-redis-streams"


def require_plugin() -> None:
    if SCHEME not in available_drivers():
        msg = (f"the example driver plugin (scheme {SCHEME!r}) is not installed; "
               f"run `{INSTALL}`")
        if in_ci():
            pytest.fail(f"CI runs the conformance suite against the example plugin: {msg}",
                        pytrace=False)
        pytest.skip(msg)


@pytest.fixture
def tidings_url_factory() -> Iterator[Callable[[], str]]:
    """A fresh key namespace (the URL's virtual host) per call; its keys are deleted after."""
    require_plugin()
    host, port = require_service("redis")
    import redis

    made: list[str] = []

    def make() -> str:
        made.append(f"tidings-conf-{uuid.uuid4().hex[:12]}")
        return f"{SCHEME}://{host}:{port}/{made[-1]}"

    yield make
    client = redis.Redis(host=host, port=port)
    try:
        for namespace in made:
            keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i:i + 500])
    finally:
        client.close()


class TestRedisStreamsConformance(DriverConformance):
    """The example plugin passes the whole suite, as any driver must."""


def test_plugin_is_found_through_its_own_entry_point() -> None:
    require_plugin()
    cls = load_driver_class(SCHEME)
    assert cls.__module__ == "tidings_redis_streams.driver"
    assert cls.name == SCHEME


def test_plugin_imports_only_the_driver_contract() -> None:
    """A third-party driver needs tidings.transports.* and nothing else from tidings."""
    sources = sorted((PLUGIN_DIR / "tidings_redis_streams").glob("*.py"))
    assert sources, f"no plugin sources under {PLUGIN_DIR}"
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name == "tidings" or name.startswith("tidings."):
                    assert name.startswith("tidings.transports."), \
                        f"{path.name} imports {name}; a driver may use only tidings.transports"


def test_messages_of_a_vanished_consumer_are_taken_over(
        tidings_url_factory: Callable[[], str]) -> None:
    """A consumer that dies without close() keeps its messages pending; another member claims
    them once they have been idle for claim_idle seconds (XAUTOCLAIM)."""
    h = Harness(tidings_url_factory(), timeout=15.0, quiet=0.6)
    try:
        t = h.transport(claim_idle=0.5)
        binding = Binding(h.default_exchange, f"{h.topic}.info")
        # Never closed during the test: it stands for a process that died.
        crashed = h.raw_listener(t, [binding], None, 10)
        h.send_raw_keys(t, h.target(f"{h.topic}.info"), ["orphan"])
        [orphan] = h.poll_until(crashed, 1)
        assert not orphan.redelivered
        inbox = Inbox()
        h.listener([RecordingEndpoint(inbox, "survivor")], transport=t)
        got = inbox.wait_keys(["orphan"], h.timeout, member="survivor")
        assert len(got) == 1
    finally:
        h.close()


def test_an_entry_that_cannot_be_unwrapped_is_rejected_alone(
        tidings_url_factory: Callable[[], str]) -> None:
    """Stream entries not written by tidings (headers that are not JSON or not an object, no
    body) reach the core with ``problem`` set: each is rejected (XACKed, never redelivered) and
    the good entries around them arrive as usual."""
    h = Harness(tidings_url_factory(), timeout=15.0, quiet=0.6)
    try:
        t = h.transport()
        inbox = Inbox()
        listener = h.listener([RecordingEndpoint(inbox)], transport=t)
        driver: Any = t._driver  # the plug-in's RedisStreamsDriver
        key = driver.stream_key(h.default_exchange, f"{h.topic}.info")
        h.send_raw_keys(t, h.target(f"{h.topic}.info"), ["before"])
        inbox.wait_keys(["before"], h.timeout)
        good_id, good = h.wire("after")
        client = driver.connect()
        try:
            for fields in ({b"body": good, b"id": b"bad-1", b"h": b"{not json"},
                           {b"body": good, b"id": b"bad-2", b"h": b"[1, 2]"},
                           {b"id": b"bad-3"},
                           {b"body": good, b"id": good_id.encode()}):
                client.xadd(key, fields)
            inbox.wait_keys(["after"], h.timeout)
            h.stop(listener)
            stats = listener.stats.snapshot()
            assert (stats["rejected"], stats["acknowledged"]) == (3, 2), stats
            assert stats["received"] == 5, f"a rejected entry came back: {stats}"
            assert inbox.keys() == ["before", "after"]
            assert client.xpending(key, "group")["pending"] == 0
        finally:
            client.close()
    finally:
        h.close()


def test_listener_reconnects_after_redis_drops_its_connection(
        tidings_url_factory: Callable[[], str]) -> None:
    """CLIENT KILL of this test's connections (its own database, so no other test's): the
    receiver raises TransportUnreachable, the core listens again, later messages arrive, and the
    message in a handler at that moment is delivered again at once (close() parked it), not
    after claim_idle (60 s here)."""
    import redis

    db = 9
    h = Harness(tidings_url_factory(), timeout=15.0, quiet=0.6)
    admin = redis.Redis(*require_service("redis"), db=db)
    release = threading.Event()
    try:
        t = h.transport(db=db)
        inbox = Inbox()

        def hold(received: Received) -> None:
            if received.key == "held":  # still in its handler when the connection goes
                release.wait(h.timeout)

        listener = h.listener([RecordingEndpoint(inbox, on_message=hold)], transport=t)
        n = h.notifier(t)
        n.info({}, "streams.reconnect", {"key": "held"})
        inbox.wait_keys(["held"], h.timeout)
        me = admin.client_id()
        killed = [c["id"] for c in admin.client_list()
                  if int(c["db"]) == db and int(c["id"]) != me]
        assert killed, "no connection of the listener found"
        for client_id in killed:
            admin.client_kill_filter(_id=client_id)
        keys = [f"k{i}" for i in range(5)]
        for key in keys:
            n.info({}, "streams.reconnect", {"key": key})
        inbox.wait_keys(keys, h.timeout)
        inbox.wait_for(lambda items: [r.key for r in items].count("held") == 2, h.timeout,
                       "the held message again")
        release.set()
        h.stop(listener)
        assert sorted(inbox.keys()) == sorted(["held", "held", *keys])
        stats = listener.stats.snapshot()
        assert stats["lost_with_connection"] != 0 and stats["in_flight"] == 0, stats
    finally:
        release.set()
        try:
            h.close()
        finally:
            namespace = h.base_url.virtual_host
            found = list(admin.scan_iter(match=f"{namespace}:*", count=1000))
            if found:
                admin.delete(*found)
            admin.close()


def test_delivery_count_is_what_redis_counted(tidings_url_factory: Callable[[], str]) -> None:
    """A requeued entry comes back with the delivery count Redis keeps for it (XPENDING), so
    the core's max_deliveries holds even when each delivery goes to another member."""
    h = Harness(tidings_url_factory(), timeout=15.0, quiet=0.6)
    try:
        t = h.transport()
        binding = Binding(h.default_exchange, f"{h.topic}.info")
        first = h.raw_listener(t, [binding], None, 10)
        h.send_raw_keys(t, h.target(f"{h.topic}.info"), ["m"])
        [m] = h.poll_until(first, 1)
        assert (m.redelivered, m.delivery_count) == (False, 1)
        assert m.requeue()
        h.close_raw(first)
        for expected in (2, 3):
            member = h.raw_listener(t, [binding], None, 10)
            [again] = h.poll_until(member, 1)
            assert h.key_of(again) == "m"
            assert (again.redelivered, again.delivery_count) == (True, expected)
            assert again.requeue() if expected == 2 else again.ack()
            h.close_raw(member)
    finally:
        h.close()
