"""The conformance suite against the brokerless zmq driver, with listeners registered in the
Redis matchmaker (127.0.0.1:6379): each URL gets a fresh registry namespace, purged after.

zmq declares neither ``stores_without_listener`` nor ``durable`` (there is no broker to hold a
message nobody listens to), so those scenarios are skipped with the reason."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from tidings.matchmaker.base import get_matchmaker
from tidings.testing.brokers import require_service
from tidings.testing.conformance import DriverConformance


@pytest.fixture
def tidings_url_factory() -> Iterator[Callable[[], str]]:
    host, port = require_service("redis")
    made: list[str] = []

    def make() -> str:
        made.append(f"tidings-conf-{uuid.uuid4().hex[:12]}")
        return f"zmq+redis://{host}:{port}/0?namespace={made[-1]}"

    yield make
    for namespace in made:
        mm = get_matchmaker("redis", f"zmq+redis://{host}:{port}/0", namespace)
        try:
            mm.purge()  # type: ignore[attr-defined]
        finally:
            mm.close()


class TestZmqConformance(DriverConformance):
    """zmq over loopback TCP, registry in Redis."""
