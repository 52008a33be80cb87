"""Fixtures shared by the unit tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

import tidings


@pytest.fixture
def transport() -> Iterator[tidings.Transport]:
    """A memory:// transport on a virtual host of its own, so tests never see each other."""
    t = tidings.get_notification_transport(f"memory:///{uuid.uuid4().hex}")
    yield t
    t.cleanup()
