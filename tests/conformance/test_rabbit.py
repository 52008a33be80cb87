"""The conformance suite against ``rabbit://`` on the RabbitMQ at 127.0.0.1:5672.

One fresh virtual host serves the whole module (created and deleted around it) instead of one per
test: creating a vhost costs three ``rabbitmqctl`` runs (2-3 s on a loaded 2-core machine), which
would triple the suite's time. Tests stay isolated all the same, since every topic, exchange and
pool name in the suite carries the test's own uid, so no test can see another's messages.

Run with oslo.messaging's queue names (the default), where the no-pool group's queue is shared
across exchanges, so ``exchanges`` is not declared and the isolation scenario is skipped; the
driver's functional tests check ``isolate_exchanges=true``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tidings.testing.brokers import rabbit_vhost, require_service
from tidings.testing.conformance import DriverConformance


@pytest.fixture(scope="module")
def _rabbit_conformance_vhost() -> Iterator[str]:
    require_service("rabbitmq")
    with rabbit_vhost("tidings-conf-rabbit") as vhost:
        yield vhost


@pytest.fixture
def tidings_url_factory(_rabbit_conformance_vhost: str) -> Callable[[], str]:
    host, port = require_service("rabbitmq")

    def make() -> str:
        return f"rabbit://guest:guest@{host}:{port}/{_rabbit_conformance_vhost}"

    return make


class TestRabbitConformance(DriverConformance):
    """rabbit:// with oslo.messaging's exchange and queue layout."""
