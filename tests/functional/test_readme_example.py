"""The README's "API by example" block, run as written against memory:// and the real RabbitMQ,
so the first code a user copies keeps working."""

from __future__ import annotations

import re
import threading
import uuid
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytest

from tidings.testing.brokers import rabbit_vhost

README = Path(__file__).resolve().parents[2] / "README.md"
README_URL = "rabbit://guest:guest@127.0.0.1:5672/"
WAIT_LINE = "# ... until the service shuts down:"


def example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## The API by example"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README lost its API example"
    code = match.group(1)
    assert README_URL in code and WAIT_LINE in code, "the test below needs updating with it"
    return code


def _vhost(driver: str) -> AbstractContextManager[str]:
    return rabbit_vhost("tidings-readme") if driver == "rabbit" else nullcontext("")


@pytest.mark.parametrize("driver", ["memory", "rabbit"])
def test_readme_api_example_runs_as_written(driver: str) -> None:
    charged: list[Any] = []
    arrived = threading.Event()

    def charge(payload: Any) -> None:
        charged.append(payload)
        arrived.set()

    with _vhost(driver) as vhost:
        url = (f"rabbit://guest:guest@127.0.0.1:5672/{vhost}" if driver == "rabbit"
               else f"memory:///readme-{uuid.uuid4().hex[:8]}")
        # Where the reader's service would run, the test waits (bounded) for the delivery.
        code = example().replace(README_URL, url).replace(
            WAIT_LINE, "assert arrived.wait(30), 'the billing pool got nothing'")
        namespace: dict[str, Any] = {"charge": charge, "index": lambda notes: None,
                                     "arrived": arrived, "__name__": "readme_example"}
        exec(compile(code, str(README), "exec"), namespace)  # our own README
    # The info notification reached the billing pool once; the error one has no info method.
    assert charged == [{"id": "i-1"}]
