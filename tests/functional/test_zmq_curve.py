"""CURVE on zmq://, over real TCP sockets on loopback: a sender with a key the listener trusts
gets through; one with an unknown key, with no key, or a raw ZeroMQ peer without CURVE is
refused and the listener logs it; a sender does not send to a listener whose key it does not
trust (a forged registry entry); one URL serves a deployment in which every process both sends
and listens; the options fail early and clearly; and no secret key reaches a log line, a repr
or an exception.

Keys are made per test with ``zmq.auth.create_certificates``; the registry is in memory
(``zmq+memory:///<uuid>``), shared by the transports of the test. Across processes, CURVE runs
the process tests of test_zmq_processes.py (its ``curve`` registry).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import zmq
import zmq.auth as zmq_auth
from zmq.utils import z85

import tidings
from tidings import InvalidTransportOption, Target, Transport
from tidings.drivers.zmq import ZmqDriver, protocol
from tidings.drivers.zmq.listener import ZmqReceiver
from tidings.transports.base import Binding

if not zmq.has("curve"):
    pytest.skip("this libzmq has no CURVE", allow_module_level=True)

WAIT = 15.0  # the bound on every wait


class Keys:
    """Certificates in tmp_path: ``secret(name)`` and ``public(name)`` paths, ``trust(dir,
    *names)`` copies public certificates into a directory, ``secrets`` every secret key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.secrets: list[str] = []

    def make(self, *names: str) -> None:
        for name in names:
            zmq_auth.create_certificates(str(self.root), name)
            Path(self.secret(name)).chmod(0o600)  # pyzmq leaves it to the umask
            secret = zmq_auth.load_certificate(self.secret(name))[1]
            assert secret is not None
            self.secrets.append(secret.decode())

    def secret(self, name: str) -> str:
        return str(self.root / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.root / f"{name}.key")

    def trust(self, directory: str, *names: str) -> str:
        path = self.root / directory
        path.mkdir(exist_ok=True)
        for name in names:
            shutil.copy(self.public(name), path)
        return str(path)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    k = Keys(tmp_path)
    k.make("alice", "bob", "mallory")
    return k


@pytest.fixture
def registry() -> str:
    return f"zmq+memory:///curve-{uuid.uuid4().hex[:12]}"


class Capture(logging.Handler):
    """Every record of every logger at DEBUG, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []
        self.cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        with self.cond:
            self.records.append(record)
            self.texts.append(text)
            self.cond.notify_all()

    def wait_for(self, logger: str, needle: str, timeout: float = WAIT) -> str:
        def found() -> str | None:
            return next((r.getMessage() for r in self.records
                         if r.name == logger and needle in r.getMessage()), None)

        with self.cond:
            if not self.cond.wait_for(lambda: found() is not None, timeout):
                pytest.fail(f"no log line of {logger} with {needle!r} in {timeout}s: "
                            f"{self.texts[-10:]}")
            return found() or ""


@pytest.fixture
def capture() -> Iterator[Capture]:
    handler = Capture()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


class Inbox:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.got: list[Any] = []

    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any,
             metadata: Any) -> None:
        with self.cond:
            self.got.append(payload["i"])
            self.cond.notify_all()

    def wait(self, expected: list[Any]) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: sorted(self.got) == expected, WAIT):
                pytest.fail(f"expected {expected} within {WAIT}s, got {self.got}")

    def quiet(self, seconds: float) -> list[Any]:
        """What arrived within ``seconds`` (waiting on the condition, not sleeping)."""
        with self.cond:
            self.cond.wait_for(lambda: bool(self.got), seconds)
            return list(self.got)


def curve_url(registry: str, keys: Keys, name: str, trusted: str | None = None,
              server: str | None = None, **extra: Any) -> str:
    query = [f"curve_secret_key={keys.secret(name)}"]
    if trusted:
        query.append(f"curve_public_keys_dir={trusted}")
    if server:
        query.append(f"curve_server_key={keys.public(server)}")
    query += [f"{k}={v}" for k, v in extra.items()]
    return registry + "?" + "&".join(query)


def listen(t: Transport, inbox: Inbox, topic: str = "t") -> tidings.NotificationListener:
    lst = tidings.get_notification_listener(t, [Target(topic=topic)], [inbox])
    lst.start()
    return lst


def send(t: Transport, ids: range, topic: str = "t") -> None:
    n = tidings.Notifier(t, "curve-test", topics=[topic], retry=0, raise_on_failure=True)
    for i in ids:
        n.info({}, "curve.event", {"i": i})


def test_a_trusted_sender_gets_through_and_unknown_ones_are_refused(
        keys: Keys, registry: str, capture: Capture) -> None:
    """The listener (alice) lets in bob; mallory's key is not in its directory: mallory's
    copies never arrive, the listener logs the refusal, mallory's sender logs that it was
    refused; bob's go through, also after mallory tried."""
    allowed = keys.trust("alice-allows", "alice", "bob")
    listening = tidings.get_notification_transport(curve_url(registry, keys, "alice", allowed))
    bob = tidings.get_notification_transport(curve_url(registry, keys, "bob", server="alice"))
    # mallory trusts alice's public key (public keys are public), but alice does not know her.
    mallory = tidings.get_notification_transport(
        curve_url(registry, keys, "mallory", server="alice", flush_timeout=0))
    inbox = Inbox()
    lst = listen(listening, inbox)
    try:
        send(bob, range(3))
        inbox.wait([0, 1, 2])
        send(mallory, range(100, 103))  # queued in mallory's window: the handshake fails
        warning = capture.wait_for("tidings.drivers.zmq.listener", "refused a sender")
        assert "not in curve_public_keys_dir" in warning
        capture.wait_for("tidings.drivers.zmq.sender", "refused our handshake (CURVE")
        send(bob, range(3, 6))
        inbox.wait([0, 1, 2, 3, 4, 5])
        assert not set(inbox.got) & {100, 101, 102}
    finally:
        lst.stop()
        lst.wait(WAIT)
        for t in (mallory, bob, listening):
            t.cleanup()
    assert_no_secret(keys, capture, listening, bob, mallory)


def test_peers_without_curve_are_refused_and_logged(keys: Keys, registry: str,
                                                    capture: Capture) -> None:
    """A tidings sender without keys does not send to a CURVE listener (it says why); a raw
    ZeroMQ peer that connects anyway with the NULL mechanism gets nothing in, and the
    listener logs it."""
    allowed = keys.trust("alice-allows", "alice")
    listening = tidings.get_notification_transport(curve_url(registry, keys, "alice", allowed))
    plain = tidings.get_notification_transport(f"{registry}?flush_timeout=0")
    drv = listening._driver
    assert isinstance(drv, ZmqDriver)
    rcv = drv.listen([Binding("openstack", "t.info")], None, 8)
    assert isinstance(rcv, ZmqReceiver)
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    try:
        send(plain, range(2))
        capture.wait_for("tidings.drivers.zmq.sender", "it requires CURVE")
        endpoint, lid, _, key = protocol.parse_member(rcv.address)
        assert key == zmq_auth.load_certificate(keys.public("alice"))[0]
        rogue.linger = 0
        rogue.connect(endpoint)
        rogue.send(protocol.data_frame(1, False, lid, b"rogue", b"", b"{}"))
        deadline = time.monotonic() + WAIT
        while not any("refused a sender" in t for t in capture.texts):
            assert time.monotonic() < deadline, "the listener did not log the refusal"
            assert not rcv.receive(10, 0.05), "a copy from a peer without CURVE got in"
        # Which side notices the mismatch first varies: the listener sees either.
        assert "no CURVE key" in capture.wait_for("tidings.drivers.zmq.listener",
                                                  "refused a sender")
    finally:
        rogue.close()
        ctx.term()
        rcv.close()
        plain.cleanup()
        listening.cleanup()
    assert_no_secret(keys, capture, listening, plain)


def test_a_sender_sends_only_to_listeners_it_trusts(keys: Keys, registry: str,
                                                    capture: Capture) -> None:
    """A listener registered with a key the sender does not trust (a registry entry forged by
    someone with their own key pair) gets nothing: the sender logs why and skips it."""
    forged = tidings.get_notification_transport(
        curve_url(registry, keys, "mallory", keys.trust("mallory-allows", "bob")))
    bob = tidings.get_notification_transport(
        curve_url(registry, keys, "bob", keys.trust("bob-trusts", "alice"), flush_timeout=0))
    inbox = Inbox()
    lst = listen(forged, inbox)
    try:
        send(bob, range(2))
        line = capture.wait_for("tidings.drivers.zmq.sender", "not sending to the listener")
        assert "neither curve_public_keys_dir nor curve_server_key" in line
        assert inbox.quiet(0.5) == []
    finally:
        lst.stop()
        lst.wait(WAIT)
        bob.cleanup()
        forged.cleanup()
    assert_no_secret(keys, capture, forged, bob)


@pytest.mark.parametrize("shared", [True, False], ids=["one-key-pair", "a-key-pair-each"])
def test_one_url_for_processes_that_send_and_listen(keys: Keys, registry: str,
                                                     capture: Capture, shared: bool) -> None:
    """Every process has curve_secret_key=<its .key_secret> and curve_public_keys_dir=<the
    deployment's public certificates>, the same URL (one shared key pair, or the same path
    holding each process's own): each listens and each sends to the other."""
    if shared:
        trusted = keys.trust("deployment", "alice")
        urls = [curve_url(registry, keys, "alice", trusted)] * 2
    else:
        trusted = keys.trust("deployment", "alice", "bob")
        urls = [curve_url(registry, keys, name, trusted) for name in ("alice", "bob")]
    one, two = (tidings.get_notification_transport(u) for u in urls)
    inbox_one, inbox_two = Inbox(), Inbox()
    lst_one, lst_two = listen(one, inbox_one, "to-one"), listen(two, inbox_two, "to-two")
    try:
        send(two, range(5), topic="to-one")
        send(one, range(10, 15), topic="to-two")
        inbox_one.wait(list(range(5)))
        inbox_two.wait(list(range(10, 15)))
        assert "CURVE" in one._driver.describe()
    finally:
        for lst in (lst_one, lst_two):
            lst.stop()
            lst.wait(WAIT)
        one.cleanup()
        two.cleanup()
    assert not [t for t in capture.texts if "refused" in t]
    assert_no_secret(keys, capture, one, two)


def test_curve_options_fail_early_and_clearly(keys: Keys, registry: str,
                                              capture: Capture) -> None:
    trusted = keys.trust("deployment", "alice")
    alice_secret = keys.secrets[0]
    cases = [
        (f"curve_public_keys_dir={trusted}", "need curve_secret_key too"),
        (f"curve_secret_key={keys.public('alice')}&curve_public_keys_dir={trusted}",
         "holds no secret key"),
        (f"curve_secret_key={keys.root}/nothing.key_secret&curve_public_keys_dir={trusted}",
         "cannot read a CURVE certificate"),
        # The key itself instead of a file: refused without being repeated.
        (f"curve_secret_key={quote(alice_secret, safe='')}&curve_public_keys_dir={trusted}",
         "cannot read a CURVE certificate"),
        (f"curve_secret_key={keys.secret('alice')}", "needs curve_public_keys_dir"),
        (f"curve_secret_key={keys.secret('alice')}&curve_public_keys_dir={keys.root}/none",
         "is not a directory"),
    ]
    errors = []
    for query, match in cases:
        with pytest.raises(InvalidTransportOption, match=match) as caught:
            tidings.get_notification_transport(f"{registry}?{query}")
        errors.append(caught.value)
    # A sender-only configuration (curve_server_key, no directory) cannot listen.
    sender_only = tidings.get_notification_transport(
        curve_url(registry, keys, "bob", server="alice"))
    try:
        with pytest.raises(InvalidTransportOption, match="needs curve_public_keys_dir"):
            sender_only._driver.listen([Binding("ex", "rk")], None, 4)
    finally:
        sender_only.cleanup()
    for exc in errors:
        capture.texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    assert not [t for t in capture.texts if "chmod 600" in t]
    Path(keys.secret("alice")).chmod(0o644)
    tidings.get_notification_transport(curve_url(registry, keys, "alice", trusted)).cleanup()
    capture.wait_for("tidings.drivers.zmq.curve", "can be read by other users: chmod 600")
    assert_no_secret(keys, capture, sender_only)


def assert_no_secret(keys: Keys, capture: Capture, *transports: Transport) -> None:
    """No secret key (Z85, or its bytes in hex) in any log line, repr or description."""
    texts = list(capture.texts)
    for t in transports:
        drv = t._driver
        texts += [repr(t), repr(drv), drv.describe(), repr(getattr(drv, "_curve", None)),
                  repr(t.url), str(vars(drv).get("conf"))]
    secrets = keys.secrets + [z85.decode(s.encode()).hex() for s in keys.secrets]
    leaks = [t for t in texts if any(s in t for s in secrets)]
    assert not leaks, leaks[:3]
