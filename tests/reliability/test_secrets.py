"""Passwords never appear in logs, reprs, exception messages, tracebacks or CLI output.

A user with a distinctive password is created on the package's private RabbitMQ node; real
scenarios then run with DEBUG logging for every logger (a round trip, a failover URL, a wrong
password, an unreachable host, bad options, an unparsable URL) over rabbit://, amqp:// and
zmq+redis://, and the ``tidings`` CLI runs the same in subprocesses with ``--verbose``.
Everything produced -- formatted log records with their tracebacks, ``str``/``repr`` and the
full traceback (causes included) of every exception, ``repr`` of transports, drivers, URLs and
their parts, the CLI's stdout and stderr -- is searched for each secret, raw and URL-encoded.

``str(TransportURL)`` is the one place a password is meant to be: it is the URL itself, handed to
the driver, so it is not searched.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

import tidings
from tidings import Target
from tidings.testing.checker import DeliveryLog
from tidings.testing.rabbitnode import RabbitNode
from tidings.transports.base import Binding

from .support import WAIT, Recorder, RedisServer, SendStream, free_port, started, uid

pytestmark = pytest.mark.slow

SECRET = f"Pw-{uuid.uuid4().hex}"
"""The user's real password: only unreserved characters, so the URL carries it as it is."""
WRONG = f"Wrong-{uuid.uuid4().hex}"
"""A wrong password is a secret too (often a real one, mistyped or from another system)."""
ODD = f"p@ss/w:rd%{uuid.uuid4().hex[:8]}"
"""A password that must be percent-encoded in a URL: searched raw and encoded."""
SECRETS = (SECRET, WRONG, ODD, quote(ODD, safe=""))


class Capture(logging.Handler):
    """Every record of every logger at DEBUG, formatted with its traceback, plus any text the
    test adds (exceptions, reprs). ``leaks()`` names the texts that contain a secret."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.texts: list[str] = []
        self._levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.texts.append(self.format(record))
        except Exception as exc:  # a record that cannot be formatted is itself a finding
            self.texts.append(f"unformattable record {record.name}: {exc!r}")

    def exception(self, exc: BaseException) -> None:
        self.texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]

    def reprs(self, *objects: object) -> None:
        self.texts += [repr(o) for o in objects]

    def leaks(self) -> list[str]:
        return [t for t in self.texts if any(s in t for s in SECRETS)]

    def __enter__(self) -> Capture:
        root = logging.getLogger()
        self._levels[""] = root.level
        root.setLevel(logging.DEBUG)
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger) and logger.level > logging.DEBUG:
                self._levels[name] = logger.level
                logger.setLevel(logging.DEBUG)
        root.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)
        for name, level in self._levels.items():
            logging.getLogger(name or None).setLevel(level)


@pytest.fixture(scope="module")
def account(node: RabbitNode, vhost: str) -> Iterator[tuple[str, str]]:
    """(user, vhost) on the private node: a user whose password is SECRET, with permissions on
    the package's vhost; deleted afterwards."""
    user = f"tidings-secret-{uid()}"
    node.ctl("add_user", user, SECRET)
    try:
        node.ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield user, vhost
    finally:
        node.ctl("delete_user", user)


def _expect_failure(capture: Capture, action: Callable[[], object],
                    kinds: tuple[type[BaseException], ...]) -> BaseException:
    with pytest.raises(kinds) as err:
        action()
    capture.exception(err.value)
    return err.value


def _round_trip(capture: Capture, url: str) -> None:
    """Listen, send three notifications, receive them; capture reprs of everything built."""
    topic = f"secret-{uid()}"
    log = DeliveryLog()
    transport = tidings.get_notification_transport(url)
    try:
        listener = tidings.get_notification_listener(transport, [Target(topic=topic)],
                                                     [Recorder(log)])
        notifier = tidings.Notifier(transport, "secrets", topics=[topic], retry=3,
                                    raise_on_failure=True)
        with started(listener):
            SendStream(notifier, log, range(3)).start().join()
            assert log.wait_acked(range(3), WAIT), log.report().counts
        driver = transport._driver
        capture.reprs(transport, transport.url, transport.url.hosts, driver, vars(driver),
                      driver.describe(), listener, notifier, notifier.stats.snapshot())
        capture.texts.append(transport.url.masked())
    finally:
        transport.cleanup()


@pytest.mark.parametrize("scheme", ["rabbit", "amqp"])
def test_no_secret_in_logs_reprs_or_errors(node: RabbitNode, account: tuple[str, str],
                                           scheme: str) -> None:
    user, vhost = account
    port, dead = node.amqp_port, free_port()
    good = f"{scheme}://{user}:{SECRET}@127.0.0.1:{port}/{vhost}?connect_timeout=2"
    with Capture() as capture:
        _round_trip(capture, good)
        # Failover: a dead first host, then the live one, each with its credentials.
        _round_trip(capture, f"{scheme}://{user}:{SECRET}@127.0.0.1:{dead},"
                             f"{user}:{SECRET}@127.0.0.1:{port}/{vhost}?connect_timeout=2")
        failing = {
            "wrong password": f"{scheme}://{user}:{WRONG}@127.0.0.1:{port}/{vhost}"
                              f"?connect_timeout=2",
            "unreachable": f"{scheme}://{user}:{SECRET}@127.0.0.1:{dead}/{vhost}"
                           f"?connect_timeout=1&retry_interval=0.05",
            "odd password": f"{scheme}://{user}:{quote(ODD, safe='')}@127.0.0.1:{port}/{vhost}"
                            f"?connect_timeout=2",
        }
        for url in failing.values():
            transport = tidings.get_notification_transport(url)
            try:
                capture.reprs(transport, transport.url, transport._driver,
                              vars(transport._driver))
                _expect_failure(capture, lambda t=transport: t.listen(
                    [Binding("openstack", f"secret-{uid()}.info")], None, 1),
                    (tidings.TransportUnreachable, tidings.MessageDeliveryFailure))
                notifier = tidings.Notifier(transport, "secrets", topics=["t"], retry=1,
                                            raise_on_failure=True)
                _expect_failure(capture, lambda n=notifier: n.info({}, "x", {"key": 1}),
                                (tidings.MessageDeliveryFailure,))
                quiet = tidings.Notifier(transport, "secrets", topics=["t"], retry=0)
                quiet.info({}, "x", {"key": 2})  # logged, not raised
            finally:
                transport.cleanup()
        for bad in (f"{scheme}://{user}:{SECRET}@127.0.0.1:{port}/?heartbeat=soon",
                    f"{scheme}://{user}:{SECRET}@127.0.0.1:{port}/?no_such_option=1",
                    f"{scheme}://{user}:{SECRET}@127.0.0.1:notaport/",
                    f"{scheme}://{user}:{SECRET}@[::1/",
                    f"{scheme}://{user}:{quote(ODD, safe='')}@127.0.0.1:{port}/?bogus=x"):
            _expect_failure(capture, lambda u=bad: tidings.get_notification_transport(u),
                            (tidings.InvalidTransportURL,))
    assert len(capture.texts) > 20, "the scenarios produced almost nothing to search"
    assert any("DEBUG" in t for t in capture.texts), "DEBUG logging did not reach the capture"
    leaks = capture.leaks()
    assert not leaks, "a password appeared in:\n" + "\n---\n".join(leaks[:5])


def test_no_secret_from_the_redis_matchmaker(tmp_path: Path) -> None:
    """zmq+redis:// against a private redis-server that requires a password: a round trip
    with the right one, then a wrong one (refused when the listener registers and when the
    notifier looks listeners up)."""
    with RedisServer(tmp_path, "--requirepass", SECRET) as redis, Capture() as capture:
        ns = f"secrets-{uid()}"
        _round_trip(capture, f"zmq+redis://:{SECRET}@127.0.0.1:{redis.port}/0?namespace={ns}")
        transport = tidings.get_notification_transport(
            f"zmq+redis://:{WRONG}@127.0.0.1:{redis.port}/0?namespace={ns}")
        try:
            capture.reprs(transport, transport._driver, vars(transport._driver))
            _expect_failure(capture, lambda: transport.listen(
                [Binding("openstack", "t.info")], None, 1), (tidings.TidingsError,))
            notifier = tidings.Notifier(transport, "secrets", topics=["t"], retry=1,
                                        raise_on_failure=True)
            _expect_failure(capture, lambda: notifier.info({}, "x", {"key": 1}),
                            (tidings.TidingsError,))
        finally:
            transport.cleanup()
    leaks = capture.leaks()
    assert not leaks, "a password appeared in:\n" + "\n---\n".join(leaks[:5])


def _cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TIDINGS_TRANSPORT_URL", None)
    return subprocess.run([sys.executable, "-m", "tidings.cli", "--verbose", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_no_secret_in_cli_output(node: RabbitNode, account: tuple[str, str]) -> None:
    """``tidings --verbose`` (DEBUG logs and tracebacks) in subprocesses: notify and listen
    round trips, the demo, a wrong password, an unreachable host, a bad option."""
    user, vhost = account
    port, dead = node.amqp_port, free_port()
    good = f"rabbit://{user}:{SECRET}@127.0.0.1:{port}/{vhost}?connect_timeout=2"
    topic = f"cli-{uid()}"
    runs = {
        "notify": _cli("notify", good, "--topic", topic, "--event-type", "secret.test",
                       "--payload", '{"key": 1}', "--count", "2", "--retry", "0"),
        "listen": _cli("listen", good, "--topic", topic, "--count", "2", "--json"),
        "demo": _cli("demo", good, "--count", "6", "--timeout", "30"),
        "wrong password": _cli("notify", good.replace(SECRET, WRONG), "--event-type", "x",
                               "--retry", "0"),
        "unreachable": _cli("notify", f"rabbit://{user}:{SECRET}@127.0.0.1:{dead}/"
                                      f"?connect_timeout=1", "--event-type", "x", "--retry", "1"),
        "bad option": _cli("listen", good + "&heartbeat=soon", "--topic", "t", "--count", "1"),
        "amqp wrong password": _cli("notify", f"amqp://{user}:{WRONG}@127.0.0.1:{port}/{vhost}"
                                              f"?connect_timeout=2", "--event-type", "x",
                                    "--retry", "0"),
    }
    assert runs["notify"].returncode == 0, runs["notify"].stderr[-2000:]
    assert runs["listen"].returncode == 0 and runs["listen"].stdout.count("secret.test") == 2, \
        runs["listen"].stdout[-2000:] + runs["listen"].stderr[-2000:]
    assert runs["demo"].returncode == 0, runs["demo"].stdout[-2000:] + runs["demo"].stderr[-2000:]
    for name in ("wrong password", "unreachable", "bad option", "amqp wrong password"):
        assert runs[name].returncode != 0 and "error" in runs[name].stderr, (name, runs[name])
    assert any("DEBUG" in r.stderr for r in runs.values()), "--verbose logged nothing"
    leaks = [f"{name}: {line}" for name, r in runs.items()
             for line in (r.stdout + r.stderr).splitlines() if any(s in line for s in SECRETS)]
    assert not leaks, "a password appeared in CLI output:\n" + "\n".join(leaks[:10])
