"""The conformance suite against ``amqp://``: AMQP 1.0 through RabbitMQ's rabbitmq_amqp1_0 plugin
on 127.0.0.1:5672.

One fresh virtual host serves the whole module (created and deleted around it) instead of one per
test, as for ``rabbit://``: a vhost costs three ``rabbitmqctl`` runs (2-5 s on a loaded 2-core
machine), and every topic, exchange and pool name in the suite carries the test's own uid, so no
test can see another's messages.

The whole suite runs with oslo.messaging's queue names (the default), where the no-pool group's
queue is shared across exchanges, so ``exchanges`` is not declared and the isolation scenario is
skipped; that scenario runs again with ``isolate_exchanges=true``, which declares it (nothing else
in the suite depends on queue names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tidings.testing.brokers import rabbit_vhost, require_service
from tidings.testing.conformance import DriverConformance


@pytest.fixture(scope="module")
def _amqp1_conformance_vhost() -> Iterator[str]:
    require_service("rabbitmq")
    with rabbit_vhost("tidings-conf-amqp1") as vhost:
        yield vhost


def _factory(vhost: str, query: str = "") -> Callable[[], str]:
    host, port = require_service("rabbitmq")

    def make() -> str:
        return f"amqp://guest:guest@{host}:{port}/{vhost}{query}"

    return make


@pytest.fixture
def tidings_url_factory(_amqp1_conformance_vhost: str) -> Callable[[], str]:
    return _factory(_amqp1_conformance_vhost)


class TestAMQP1Conformance(DriverConformance):
    """amqp:// with oslo.messaging's queue names."""


class TestAMQP1IsolatedExchanges:
    """amqp:// with isolate_exchanges=true: the suite's exchange-isolation scenario."""

    timeout = DriverConformance.timeout
    quiet = DriverConformance.quiet
    tidings_harness = DriverConformance.tidings_harness
    test_exchange_isolation = DriverConformance.test_exchange_isolation

    @pytest.fixture
    def tidings_url_factory(self, _amqp1_conformance_vhost: str) -> Callable[[], str]:
        return _factory(_amqp1_conformance_vhost, "?isolate_exchanges=true")
