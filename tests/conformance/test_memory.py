"""The conformance suite against memory://, twice: as the driver declares itself, and declaring
only the bare minimum, which exercises the other half of capability honesty (undeclared
features are skipped and their refusal tests run instead)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from tidings.drivers.memory import MemoryDriver
from tidings.testing.conformance import DriverConformance
from tidings.transports.base import Capabilities


def _fresh_memory_url() -> str:
    # Every memory:// transport with the same virtual host shares one in-process broker, so a
    # new virtual host per test is a new, empty broker.
    return f"memory:///conformance-{uuid.uuid4().hex}"


@pytest.fixture
def tidings_url_factory() -> Callable[[], str]:
    return _fresh_memory_url


class TestMemoryConformance(DriverConformance):
    """memory:// as it declares itself: every feature but durability and dead-lettering."""


MINIMAL = Capabilities(pools=False, requeue=False, requeue_to_other_member=False,
                       exchanges=True, at_least_once=False, durable=False,
                       stores_without_listener=False, dead_letter=False, prefetch=False,
                       confirmed_send=False)


class TestMemoryMinimalCapabilities(DriverConformance):
    """memory:// declaring the minimum: pools and requeue must now be refused at build time."""

    @pytest.fixture
    def tidings_url_factory(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], str]]:
        monkeypatch.setattr(MemoryDriver, "capabilities", MINIMAL)
        yield _fresh_memory_url
