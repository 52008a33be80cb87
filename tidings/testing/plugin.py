"""pytest plugin (entry point ``pytest11: tidings``): what the conformance suite needs from pytest.

Loaded automatically wherever tidings is installed, so it stays cheap: it registers the markers
the suite uses and gives a clear error when a module enables the suite without saying which
transport to run it against, instead of pytest's bare "fixture not found".
"""

from __future__ import annotations

from typing import Any

import pytest

MARKERS = (
    "slow: a long test (throughput, 10,000 messages); still part of the default run",
    "conformance: a scenario of tidings.testing.conformance run against one driver",
)


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every conformance scenario, so ``-m conformance`` selects the suite runs."""
    from tidings.testing.conformance import DriverConformance

    for item in items:
        cls = getattr(item, "cls", None)
        if cls is not None and issubclass(cls, DriverConformance):
            item.add_marker(pytest.mark.conformance)


@pytest.fixture
def tidings_url_factory() -> Any:
    """Placeholder: a module that enables the conformance suite must define this fixture."""
    pytest.fail(
        "the conformance suite needs a `tidings_url_factory` fixture in your test module (or "
        "conftest.py): a callable that returns a new, isolated transport URL on each call "
        "(fresh vhost or key prefix) and cleans up after the test. See docs/conformance.md.",
        pytrace=False)
