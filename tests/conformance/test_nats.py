"""The conformance suite against nats:// (NATS JetStream on 127.0.0.1:4222), one namespace per
test (the URL's path), its streams deleted afterwards.

NATS refuses messages over the server's ``max_payload`` (1 MB by default), and the suite's
1 MiB scenario needs more, so that one scenario runs on a private nats-server started with
``max_payload: 8MB`` (skipped, naming the binary, when nats-server is not installed); the
refusal on a default server is tested in tests/functional/test_nats.py.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tidings.testing.brokers import in_ci, require_service
from tidings.testing.conformance import DriverConformance, Harness
from tidings.testing.managed import free_port

HOW = "nats-server -js -a 127.0.0.1 -p 4222 &"


def delete_streams(host: str, port: int, namespaces: list[str]) -> None:
    """Delete every stream tidings made under ``namespaces`` (named tidings_<ns>_<exchange>)."""
    if not namespaces:
        return
    import nats

    async def run() -> None:
        nc = await nats.connect(f"nats://{host}:{port}", connect_timeout=5,
                                allow_reconnect=False)
        try:
            js = nc.jetstream()
            names = await js.streams_info()
            for info in names:
                name = info.config.name or ""
                if any(name.startswith(f"tidings_{ns}_") for ns in namespaces):
                    await js.delete_stream(name)
        finally:
            await nc.close()

    asyncio.run(run())


def namespaced_urls(host: str, port: int) -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def make() -> str:
        made.append(f"conf-{uuid.uuid4().hex[:12]}")  # only [a-z0-9-]: the stream name as is
        return f"nats://{host}:{port}/{made[-1]}"

    yield make
    delete_streams(host, port, made)


@pytest.fixture
def tidings_url_factory() -> Iterator[Callable[[], str]]:
    host, port = require_service("nats", "127.0.0.1", 4222, how=HOW)
    yield from namespaced_urls(host, port)


@pytest.fixture(scope="module")
def big_payload_server() -> Iterator[tuple[str, int]]:
    """A private nats-server with JetStream and max_payload 8MB, stopped after the module."""
    exe = shutil.which("nats-server") or ("/usr/sbin/nats-server"
                                          if Path("/usr/sbin/nats-server").exists() else None)
    if exe is None:
        msg = "nats-server is not installed: the 1 MiB scenario needs a private server"
        if in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tidings-nats-") as store:
        conf = Path(store) / "nats.conf"
        conf.write_text(f'listen: "127.0.0.1:{port}"\nmax_payload: 8MB\n'
                        f'jetstream {{ store_dir: "{store}/js" }}\n')
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            while not _reachable(port):
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("the private nats-server did not start", pytrace=False)
                time.sleep(0.05)
            yield "127.0.0.1", port
        finally:
            proc.terminate()
            proc.wait(15)


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class TestNatsConformance(DriverConformance):
    """nats:// passes the whole suite."""

    def test_one_mib_payload(self, tidings_harness: Harness,  # type: ignore[override]
                             big_payload_server: tuple[str, int]) -> None:
        """A 1 MiB payload arrives intact, on a server whose max_payload allows it."""
        urls = namespaced_urls(*big_payload_server)
        h = Harness(next(urls)(), timeout=self.timeout, quiet=self.quiet)
        try:
            super().test_one_mib_payload(h)
        finally:
            h.close()
            for _ in urls:
                pass
