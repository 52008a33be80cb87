"""Every Python snippet of the README runs as written: the "API by example" block against
memory:// and the real RabbitMQ, the others as they stand, so the first code a user copies
keeps working."""

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
README_URL = "rabbit://guest:guest@127.0.0.1:5672/?queue_expiry=60"
WAIT_LINE = "# ... until the service shuts down:"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


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


class Printed:
    """Stands in for print() in a snippet: records what it printed, signals each line."""

    def __init__(self) -> None:
        self.lines: list[tuple[Any, ...]] = []
        self.arrived = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.lines.append(args)
        self.arrived.set()


@pytest.mark.parametrize("driver", ["memory", "rabbit"])
def test_readme_api_example_runs_as_written(driver: str) -> None:
    printed = Printed()
    with _vhost(driver) as vhost:
        url = (f"rabbit://guest:guest@127.0.0.1:5672/{vhost}?queue_expiry=60" if driver == "rabbit"
               else f"memory:///readme-{uuid.uuid4().hex[:8]}")
        # Where the reader's service would run, the test waits (bounded) for the delivery.
        code = example().replace(README_URL, url).replace(
            WAIT_LINE, "assert printed.arrived.wait(30), 'the billing pool got nothing'")
        namespace: dict[str, Any] = {"print": printed, "printed": printed,
                                     "__name__": "readme_example"}
        exec(compile(code, str(README), "exec"), namespace)  # our own README
    # The info notification reached the billing pool once; the error one has no info method.
    assert printed.lines == [("charging", {"id": "i-1"})]


def test_every_other_readme_snippet_runs_as_written() -> None:
    others = [code for code in snippets() if WAIT_LINE not in code]
    assert len(others) >= 3, "the README lost its snippets"
    for code in others:
        printed = Printed()
        namespace: dict[str, Any] = {"print": printed, "__name__": "readme_snippet"}
        exec(compile(code, str(README), "exec"), namespace)  # our own README
        if "join_consumer_pool" in code:  # the batch/pool snippet printed both copies
            assert any(line[0] == "indexing" for line in printed.lines), printed.lines
