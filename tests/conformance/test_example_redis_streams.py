"""The conformance suite against the example third-party plugin (examples/tidings-redis-streams),
loaded by scheme through its own entry point, on the Redis at 127.0.0.1:6379.

Outside CI the module skips, naming the install command, when the plugin is not installed; in
CI (``CI`` set) a missing plugin or Redis fails, as every broker test does."""

from __future__ import annotations

import ast
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tidings.testing.brokers import in_ci, require_service
from tidings.testing.conformance import DriverConformance, Harness, Inbox, RecordingEndpoint
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
        crashed = t.listen([binding], None, 10)  # never closed: stands for a dead process
        h.send_raw_keys(t, h.target(f"{h.topic}.info"), ["orphan"])
        [orphan] = h.poll_until(crashed, 1)
        assert not orphan.redelivered
        inbox = Inbox()
        h.listener([RecordingEndpoint(inbox, "survivor")], transport=t)
        got = inbox.wait_keys(["orphan"], h.timeout, member="survivor")
        assert len(got) == 1
    finally:
        h.close()
