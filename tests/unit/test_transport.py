"""Loading drivers by scheme (including a separately distributed plug-in), URL options,
capability checks at build time, cleanup, and the retry policy."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from stevedore import ExtensionManager

import tidings
from tidings import (
    DriverLoadFailure,
    InvalidTransportOption,
    MessageDeliveryFailure,
    Target,
    TransportClosed,
    TransportUnreachable,
)
from tidings.transports.base import Binding, Capabilities, Driver, OutgoingMessage, Receiver
from tidings.transports.loader import available_drivers, load_driver_class
from tidings.transports.retry import call_with_retry, validate_retry

PLUGIN_MODULE = '''
"""A driver shipped by a separate distribution: tidings knows nothing about it."""
from tidings.transports.base import Capabilities, Driver, Option

SENT = []


class PlainDriver(Driver):
    name = "plaintest"
    capabilities = Capabilities(pools=False, requeue=False, prefetch=False)
    options = {"colour": Option(str, "blue", "a colour", choices=("blue", "red")),
               "level": Option(int, 1, "a level")}

    def send_batch(self, messages, timeout):
        SENT.extend(messages)
        return [None] * len(messages)

    def listen(self, bindings, pool, prefetch):
        raise AssertionError("the core must refuse before reaching the driver")
'''


@pytest.fixture(scope="module")
def plugin_distribution(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Install a tiny distribution (module + dist-info with an entry point) on sys.path."""
    root: Path = tmp_path_factory.mktemp("site")
    (root / "tidings_plaintest.py").write_text(PLUGIN_MODULE)
    info = root / "tidings_plaintest-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tidings-plaintest\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [tidings.drivers]
        plaintest = tidings_plaintest:PlainDriver
        """))
    (info / "RECORD").write_text("")
    sys.path.insert(0, str(root))
    # stevedore memoises entry points per namespace for the process; a plug-in installed
    # after the first lookup is seen by a new process, so forget what earlier tests loaded.
    ExtensionManager.ENTRY_POINT_CACHE.clear()
    try:
        yield "plaintest"
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("tidings_plaintest", None)
        ExtensionManager.ENTRY_POINT_CACHE.clear()


def test_builtin_schemes_are_registered() -> None:
    names = available_drivers()
    for scheme in ("memory", "fake", "rabbit", "amqp", "zmq"):
        assert scheme in names


def test_memory_and_fake_load() -> None:
    assert load_driver_class("memory") is load_driver_class("fake")
    transport = tidings.get_notification_transport("fake://")
    assert transport.driver_name == "memory"
    assert transport.capabilities.pools and transport.capabilities.requeue


def test_unknown_scheme_names_scheme_and_installed_drivers() -> None:
    with pytest.raises(DriverLoadFailure) as info:
        tidings.get_notification_transport("nosuchdriver://host/")
    assert "'nosuchdriver'" in str(info.value)
    assert "memory" in str(info.value) and "rabbit" in str(info.value)


def test_third_party_plugin_found_by_scheme(plugin_distribution: str) -> None:
    assert plugin_distribution in available_drivers()
    transport = tidings.get_notification_transport("plaintest+sub://h/?colour=red&level=3")
    assert transport.driver_name == "plaintest"
    assert transport._driver.conf == {"colour": "red", "level": 3}
    tidings.Notifier(transport, "pub").info({}, "x.y", {"a": 1})
    sent = sys.modules["tidings_plaintest"].SENT
    assert sent and sent[-1].routing_key == "notifications.info"
    assert sent[-1].exchange == "openstack"


def test_capability_checks_raise_when_listener_is_built(plugin_distribution: str) -> None:
    transport = tidings.get_notification_transport("plaintest://")

    class Endpoint:
        def info(self, *args: Any) -> None: ...

    with pytest.raises(NotImplementedError, match="'plaintest' driver does not support "
                                                  "listener pools"):
        tidings.get_notification_listener(transport, [Target(topic="t")], [Endpoint()], pool="p")
    with pytest.raises(NotImplementedError, match="cannot requeue"):
        tidings.get_notification_listener(transport, [Target(topic="t")], [Endpoint()],
                                          allow_requeue=True)
    with pytest.raises(NotImplementedError, match="pools"):
        tidings.get_batch_notification_listener(transport, [Target(topic="t")], [Endpoint()],
                                                pool="p", batch_size=2)
    with pytest.raises(NotImplementedError, match="pools"):
        transport.join_consumer_pool(lambda m: None, "p", "t.info")


@pytest.mark.parametrize("query, message", [
    ("colour=green", "is not one of blue, red"),
    ("level=high", "is not a valid int"),
    ("colur=red", "unknown option 'colur'"),
    ("prefetch=-", "is not a valid int"),
])
def test_bad_options_fail_fast(plugin_distribution: str, query: str, message: str) -> None:
    with pytest.raises(InvalidTransportOption, match=message) as info:
        tidings.get_notification_transport(f"plaintest://u:hunter2@h/?{query}")
    assert "hunter2" not in str(info.value)


def test_unknown_option_lists_accepted_ones() -> None:
    with pytest.raises(InvalidTransportOption) as info:
        tidings.get_notification_transport("memory://?prefech=3")
    assert "'prefech'" in str(info.value)
    assert "prefetch" in str(info.value) and "max_message_size" in str(info.value)


def test_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_TRANSPORT_URL", "memory:///from-env")
    assert tidings.get_notification_transport().url.virtual_host == "from-env"
    monkeypatch.delenv("TIDINGS_TRANSPORT_URL")
    with pytest.raises(InvalidTransportOption, match="TIDINGS_TRANSPORT_URL"):
        tidings.get_notification_transport()


def test_default_exchange_applies_to_targets_without_one() -> None:
    transport = tidings.get_notification_transport("memory:///ex", default_exchange="nova")
    assert transport.resolve(Target(topic="t")) == "nova"
    assert transport.resolve(Target(topic="t", exchange="glance")) == "glance"


def test_send_and_listen_after_cleanup_raise() -> None:
    transport = tidings.get_notification_transport("memory:///closed")
    transport.cleanup()
    transport.cleanup()  # idempotent

    class Endpoint:
        def info(self, *args: Any) -> None: ...

    with pytest.raises(TransportClosed, match="cleaned up"):
        transport.send_raw(Target(topic="t"), b"{}", message_id="m")
    with pytest.raises(TransportClosed, match="get_notification_transport"):
        tidings.get_notification_listener(transport, [Target(topic="t")], [Endpoint()])
    with pytest.raises(TransportClosed):
        transport.listen([Binding("e", "t.info")])


def test_message_too_large_is_refused_before_sending() -> None:
    transport = tidings.get_notification_transport("memory:///big?max_message_size=100")
    with pytest.raises(tidings.MessageTooLarge, match="over max_message_size=100"):
        tidings.Notifier(transport).info({}, "e", {"blob": "x" * 200})


def test_bad_target(transport: tidings.Transport) -> None:
    from tidings.transports.errors import InvalidTarget

    with pytest.raises(InvalidTarget, match="topic"):
        Target(topic=5)  # type: ignore[arg-type]
    class Endpoint:
        def info(self, *args: Any) -> None: ...

    # oslo.messaging builds a target without a topic; using it is what fails.
    with pytest.raises(InvalidTarget, match="topic"):
        tidings.get_notification_listener(transport, [Target(exchange="nova")], [Endpoint()])
    with pytest.raises(InvalidTarget, match="topic"):
        transport.send_raw(Target(topic=""), b"{}", message_id="m")


# -- retry policy -------------------------------------------------------------------------

class FlakyDriver(Driver):
    name = "flaky"
    capabilities = Capabilities()

    def __init__(self, failures: int) -> None:
        super().__init__(tidings.TransportURL.parse("flaky://"), {})
        self.failures = failures
        self.attempts = 0

    def send_batch(self, messages: Sequence[OutgoingMessage],
                   timeout: float | None) -> list[BaseException | None]:
        results: list[BaseException | None] = []
        for _ in messages:
            self.attempts += 1
            results.append(TransportUnreachable("rabbit://u:topsecret@h:5672/ refused the "
                                                "connection")
                           if self.attempts <= self.failures else None)
        return results

    def listen(self, bindings: Sequence[Binding], pool: str | None, prefetch: int) -> Receiver:
        raise NotImplementedError


def _flaky_transport(failures: int) -> tuple[tidings.Transport, FlakyDriver]:
    driver = FlakyDriver(failures)
    opts = {"prefetch": 1, "max_message_size": 1 << 20, "send_timeout": 1.0,
            "retry_interval": 0.001, "retry_max_interval": 0.002}
    return tidings.Transport(driver, driver.url, "openstack", opts), driver


@pytest.mark.parametrize("retry, failures, attempts, ok", [
    (0, 0, 1, True),
    (0, 1, 1, False),
    (2, 2, 3, True),
    (2, 3, 3, False),
    (None, 25, 26, True),
    (-1, 25, 26, True),
])
def test_retry_semantics(retry: int | None, failures: int, attempts: int, ok: bool) -> None:
    transport, driver = _flaky_transport(failures)
    notifier = tidings.Notifier(transport, "p", retry=retry, raise_on_failure=True)
    if ok:
        notifier.info({}, "e", {})
    else:
        with pytest.raises(MessageDeliveryFailure) as info:
            notifier.info({}, "e", {})
        assert f"failed after {attempts} attempt(s)" in str(info.value)
        assert "topsecret" not in str(info.value)
    assert driver.attempts == attempts


def test_exhausted_retry_is_logged_not_raised_by_default(caplog: pytest.LogCaptureFixture) -> None:
    transport, driver = _flaky_transport(5)
    notifier = tidings.Notifier(transport, "p", retry=1)
    notifier.error({}, "e", {})
    assert driver.attempts == 2
    assert "could not send notification" in caplog.text
    assert "topsecret" not in caplog.text
    assert notifier.stats.snapshot()["failed"] == 1


def test_cleanup_ends_an_endless_retry() -> None:
    transport, _ = _flaky_transport(10**9)
    transport.options["retry_interval"] = 0.05
    errors: list[BaseException] = []

    def send() -> None:
        try:
            transport.send_raw(Target(topic="t"), b"{}", message_id="m", retry=None)
        except BaseException as exc:  # recorded for the assertion
            errors.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    transport.cleanup()
    thread.join(5)
    assert not thread.is_alive()
    assert errors and isinstance(errors[0], MessageDeliveryFailure)


@pytest.mark.parametrize("bad", [-2, 1.5, "3", True])
def test_bad_retry_values(bad: Any) -> None:
    with pytest.raises(ValueError, match="retry="):
        validate_retry(bad)


def test_non_transient_errors_are_not_retried() -> None:
    calls = []

    def attempt() -> None:
        calls.append(1)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        call_with_retry(attempt, None, "x")
    assert len(calls) == 1


# -- the background notifier -----------------------------------------------------------------

def test_background_notifier_does_not_block_the_caller_while_the_broker_is_away() -> None:
    transport, driver = _flaky_transport(10**9)  # unreachable until we say otherwise
    transport.options["retry_interval"] = 0.01
    notifier = tidings.BackgroundNotifier(transport, "p", retry=None, queue_size=100)
    for i in range(50):
        notifier.info({}, "e", {"i": i})  # returns at once although nothing can be sent
    assert notifier.pending() == 50
    driver.failures = 0  # the broker is back: everything goes out, in order
    assert notifier.flush(10)
    assert notifier.stats.snapshot()["sent"] == 50
    assert notifier.close(5)
    with pytest.raises(RuntimeError, match="closed"):
        notifier.info({}, "e", {})


def test_background_notifier_full_queue_policies(caplog: pytest.LogCaptureFixture) -> None:
    import queue

    transport, driver = _flaky_transport(10**9)
    transport.options["retry_interval"] = 0.01
    # pipeline=1: the sending thread holds one notification outside the queue, so of five,
    # one is in flight, two wait in the queue and at least two find it full.
    dropping = tidings.BackgroundNotifier(transport, "p", queue_size=2, on_full="drop",
                                          pipeline=1)
    raising = tidings.BackgroundNotifier(transport, "p", queue_size=2, on_full="raise",
                                         pipeline=1)
    for _ in range(5):
        dropping.info({}, "e", {})
    assert dropping.stats.snapshot()["dropped"] >= 2
    assert "notifier queue full" in caplog.text
    with pytest.raises(queue.Full):
        for _ in range(5):
            raising.info({}, "e", {})
    driver.failures = 0
    assert dropping.close(10) and raising.close(10)
    with pytest.raises(ValueError, match="on_full"):
        tidings.BackgroundNotifier(transport, on_full="wait")


class BatchingDriver(FlakyDriver):
    """Records what each first (pipelined) attempt carried, and the attempts made again after
    a failure apart; fails the messages listed in ``refuse`` on their first attempt only."""

    def __init__(self) -> None:
        super().__init__(0)
        self.gate = threading.Event()
        self.batches: list[list[str]] = []
        self.again: list[list[str]] = []
        self.delivered: list[str] = []
        self.refuse: set[str] = set()
        self._seen: set[str] = set()

    def send_batch(self, messages: Sequence[OutgoingMessage],
                   timeout: float | None) -> list[BaseException | None]:
        assert self.gate.wait(10), "test did not open the gate"
        ids = [json.loads(m.body)["payload"]["i"] for m in messages]
        (self.again if self._seen.issuperset(ids) else self.batches).append(ids)
        self._seen.update(ids)
        results: list[BaseException | None] = []
        for i in ids:
            if i in self.refuse:
                self.refuse.discard(i)
                results.append(TransportUnreachable(f"no confirm for {i}"))
            else:
                self.delivered.append(i)
                results.append(None)
        return results


def test_background_notifier_pipelines_a_backlog_and_retries_failures_alone() -> None:
    driver = BatchingDriver()
    opts = {"prefetch": 1, "max_message_size": 1 << 20, "send_timeout": 1.0,
            "retry_interval": 0.001, "retry_max_interval": 0.002}
    transport = tidings.Transport(driver, driver.url, "openstack", opts)
    notifier = tidings.BackgroundNotifier(transport, "p", driver="messaging", retry=1,
                                          pipeline=50)
    driver.refuse = {7, 60}
    for i in range(120):  # the thread waits at the gate with the first one: a backlog builds
        notifier.info({}, "e", {"i": i})
    driver.gate.set()
    assert notifier.flush(10)
    assert notifier.close(5)
    # What the thread took before the gate, then the backlog in full batches of 50, in order.
    sizes = [len(b) for b in driver.batches]
    assert max(sizes) == 50 and sizes.count(50) >= 2, sizes
    assert [i for b in driver.batches for i in b] == list(range(120))
    # 7 and 60 failed their pipelined attempt and were sent again alone (retry=1 allows it).
    assert driver.again == [[7], [60]]
    assert sorted(driver.delivered) == list(range(120))
    assert notifier.stats.snapshot()["sent"] == 120
    assert notifier.stats.snapshot()["failed"] == 0


def test_background_notifier_counts_a_failure_the_retry_policy_gives_up_on(
        caplog: pytest.LogCaptureFixture) -> None:
    driver = BatchingDriver()
    driver.gate.set()
    opts = {"prefetch": 1, "max_message_size": 1 << 20, "send_timeout": 1.0,
            "retry_interval": 0.001, "retry_max_interval": 0.002}
    transport = tidings.Transport(driver, driver.url, "openstack", opts)
    notifier = tidings.BackgroundNotifier(transport, "p", driver="messaging", retry=0)
    driver.refuse = {3}
    for i in range(5):
        notifier.info({}, "e", {"i": i})
    assert notifier.close(5)
    assert sorted(driver.delivered) == [0, 1, 2, 4]  # retry=0: the pipelined try was the one
    assert notifier.stats.snapshot()["failed"] == 1
    assert "could not send notification" in caplog.text and "retry=0" in caplog.text


def test_background_notifier_rejects_a_bad_pipeline() -> None:
    transport, _ = _flaky_transport(0)
    with pytest.raises(ValueError, match="pipeline"):
        tidings.BackgroundNotifier(transport, pipeline=0)
