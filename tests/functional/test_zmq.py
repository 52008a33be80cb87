"""The zmq driver in one process, over real ZeroMQ TCP sockets on loopback: delivery to every
group and one member of each, exchange isolation, requeue, prefetch, the window, hand-back on
close, refusal of copies meant for a previous listener of a port, frames from a peer that is no
tidings sender, and the URL options. Driver-level tests drive a receiver by hand as the core
does (RawListener).

Each test uses its own in-memory registry (``zmq+memory:///<uuid>``); processes, the sqlite and
Redis registries, SIGKILL and TTL expiry are in test_zmq_processes.py, plain ``zmq://`` (the
per-user registry) in test_zmq_default.py and CURVE in test_zmq_curve.py.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import tidings
from tidings import (
    InvalidTransportOption,
    InvalidTransportURL,
    MessageDeliveryFailure,
    NotificationResult,
    Target,
    Transport,
)
from tidings.drivers.zmq import NoListener, ZmqDriver, protocol
from tidings.drivers.zmq.listener import ZmqReceiver
from tidings.matchmaker.base import Registration
from tidings.testing.conformance_harness import RawListener
from tidings.transports.base import Binding, IncomingMessage, OutgoingMessage
from tidings.transports.errors import MessageUndeliverable, TransportUnreachable

WAIT = 15.0  # the bound on every wait; a healthy run needs a fraction of a second


class Recorder:
    """What each named listener handled, with a condition to wait on."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.handled: dict[str, list[int]] = defaultdict(list)

    def add(self, name: str, i: int) -> None:
        with self.cond:
            self.handled[name].append(i)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                pytest.fail(f"timed out after {timeout}s waiting for {what}; handled so far: "
                            f"{ {k: len(v) for k, v in self.handled.items()} }")

    def ids(self, *names: str) -> list[int]:
        with self.cond:
            return sorted(i for n in names for i in self.handled[n])


class Endpoint:
    def __init__(self, rec: Recorder, name: str,
                 decide: Callable[[int], str | None] | None = None) -> None:
        self.rec, self.name, self.decide = rec, name, decide

    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any,
             metadata: Any) -> str | None:
        verdict = self.decide(payload["i"]) if self.decide else None
        if verdict != NotificationResult.REQUEUE:
            self.rec.add(self.name, payload["i"])
        return verdict


def url(**options: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"zmq+memory:///t-{uuid.uuid4().hex[:12]}" + (f"?{query}" if query else "")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def transport() -> Iterator[Transport]:
    t = tidings.get_notification_transport(url(ttl=2))
    yield t
    t.cleanup()


def driver_of(t: Transport) -> ZmqDriver:
    drv = t._driver
    assert isinstance(drv, ZmqDriver)
    return drv


def listen(drv: ZmqDriver, pool: str | None, prefetch: int) -> RawListener:
    """A receiver on ("ex", "rk") driven by hand as the core drives it: poll() hands the
    settlements made since the last call to settle(), then receives; close() hands back what
    is unsettled as requeued, then closes."""
    return RawListener(drv.listen([Binding("ex", "rk")], pool, prefetch), prefetch)


def receiver_of(lst: RawListener) -> ZmqReceiver:
    assert isinstance(lst.receiver, ZmqReceiver)
    return lst.receiver


def start_listener(t: Transport, rec: Recorder, name: str, *, pool: str | None = None,
                   exchange: str | None = None, topic: str = "notifications",
                   **kw: Any) -> tidings.NotificationListener:
    decide = kw.pop("decide", None)
    lst = tidings.get_notification_listener(t, [Target(topic=topic, exchange=exchange)],
                                            [Endpoint(rec, name, decide)], pool=pool, **kw)
    lst.start()
    return lst


def stop_all(*listeners: tidings.NotificationListener) -> None:
    for lst in listeners:
        lst.stop()
    for lst in listeners:
        assert lst.wait(WAIT)


def notify(t: Transport, ids: range, exchange: str | None = None,
           topic: str = "notifications") -> None:
    n = tidings.Notifier(t, publisher_id="test", topics=[topic], exchange=exchange, retry=3,
                         raise_on_failure=True)
    for i in ids:
        n.info({}, "test.event", {"i": i})


def test_capabilities_say_what_a_brokerless_transport_does() -> None:
    caps = ZmqDriver.capabilities
    assert caps.pools and caps.requeue and caps.requeue_to_other_member and caps.exchanges
    assert caps.prefetch and caps.at_least_once
    assert not caps.stores_without_listener and not caps.durable
    assert not caps.confirmed_send and not caps.dead_letter


def test_notifications_arrive_once_and_are_acknowledged(transport: Transport) -> None:
    rec = Recorder()
    lst = start_listener(transport, rec, "a")
    try:
        notify(transport, range(200))
        rec.wait(lambda: len(rec.handled["a"]) >= 200, "200 notifications")
        assert rec.ids("a") == list(range(200))
        # Every copy was acknowledged: the sender's window drains to zero.
        wait_until(lambda: driver_of(transport)._sender.unacknowledged == 0, "acks")
    finally:
        stop_all(lst)


def test_every_group_gets_one_copy_members_share(transport: Transport) -> None:
    """The no-pool group and each pool get every message once; members of a group rotate."""
    rec = Recorder()
    members = {"plain1": None, "plain2": None, "a1": "a", "a2": "a", "b1": "b"}
    # A small prefetch keeps the member that connects first from taking every message
    # before the other has finished its handshake.
    listeners = [start_listener(transport, rec, name, pool=pool, prefetch=8)
                 for name, pool in members.items()]
    try:
        n = 120
        groups = {"plain": ("plain1", "plain2"), "a": ("a1", "a2"), "b": ("b1",)}
        # One message first: the sender connects to every member when it first looks the
        # topic up, so by the time each group has handled it, rotation covers them all.
        notify(transport, range(1))
        for names in groups.values():
            rec.wait(lambda names=names: len(rec.ids(*names)) >= 1, f"group {names} warm")
        notify(transport, range(1, n))
        for names in groups.values():
            rec.wait(lambda names=names: len(rec.ids(*names)) >= n, f"group {names}")
        for group, names in groups.items():
            assert rec.ids(*names) == list(range(n)), f"group {group} got a wrong set"
        for name in ("plain1", "plain2", "a1", "a2"):
            assert rec.handled[name], f"{name} got nothing: members are not rotated"
    finally:
        stop_all(*listeners)


def test_members_still_connecting_get_their_share(transport: Transport) -> None:
    """Sent right after the members registered, fewer messages than the prefetch: the members
    of each group take strict turns (test_a_member_still_handshaking_keeps_its_turn makes one
    handshake slow on purpose; across processes, test_zmq_processes.py)."""
    rec = Recorder()
    members = {"plain1": None, "plain2": None, "p1": "p", "p2": "p", "p3": "p"}
    listeners = [start_listener(transport, rec, name, pool=pool, prefetch=64)
                 for name, pool in members.items()]
    try:
        n = 30  # below the prefetch: credit alone would let one member take them all
        notify(transport, range(n))
        groups = {"plain": ("plain1", "plain2"), "p": ("p1", "p2", "p3")}
        for names in groups.values():
            rec.wait(lambda names=names: len(rec.ids(*names)) >= n, f"group {names}")
        for group, names in groups.items():
            assert rec.ids(*names) == list(range(n)), f"group {group} got a wrong set"
        shares = {name: len(rec.handled[name]) for name in members}
        assert shares == {"plain1": 15, "plain2": 15, "p1": 10, "p2": 10, "p3": 10}, shares
    finally:
        stop_all(*listeners)


class HeldRelay:
    """A TCP relay on loopback to ``target_port`` (set it before releasing) that holds every
    connection until ``release`` is set: a listener whose connection handshake is slow, with
    the real driver on both sides."""

    def __init__(self) -> None:
        self.target_port = 0
        self.release = threading.Event()
        self._closed = False
        self._socks: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._socks.append(client)
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        self.release.wait()
        if self._closed:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        self._socks.append(upstream)
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self.release.set()
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() on Linux
        except OSError:
            pass
        self._server.close()
        for sock in self._socks:
            sock.close()


def test_a_member_still_handshaking_keeps_its_turn() -> None:
    """Two registered members, the second's handshake held back: the copies whose turn is the
    second wait for it (within connect_grace) instead of all going to the first, and once it
    connects the two alternate: with 20 messages and a prefetch of 64, 10 each, in turn."""
    sending = tidings.get_notification_transport(url(connect_grace=10))
    # The listeners register in another registry: the sender knows them only by the
    # addresses of the relays in front of them, registered below.
    receiving = tidings.get_notification_transport(url())
    drv, rdrv = driver_of(sending), driver_of(receiving)
    first = listen(rdrv, "pool", 64)
    second = listen(rdrv, "pool", 64)
    relays: list[HeldRelay] = []
    registrations: list[Registration] = []
    try:
        relays.extend((HeldRelay(), HeldRelay()))
        # Members rotate in the registry's order (by address): the relay whose address sorts
        # first fronts the first listener, so the first copy's turn is the listener let through.
        relays.sort(key=lambda r: f"tcp://127.0.0.1:{r.port}/")
        for lst, relay in zip((first, second), relays, strict=True):
            endpoint, lid, credit, _ = protocol.parse_member(receiver_of(lst).address)
            relay.target_port = int(endpoint.rsplit(":", 1)[1])
            registrations.append(Registration(
                "ex", "rk", "pool",
                protocol.format_member(f"tcp://127.0.0.1:{relay.port}", lid, credit)))
        drv.matchmaker.register(registrations, ttl=30)
        relays[0].release.set()
        send_raw(sending, range(20))
        got_first = poll_until(first, 1)  # copy 0 went to the first; copy 1 waits its turn
        relays[1].release.set()
        got_second: list[IncomingMessage] = []
        deadline = time.monotonic() + WAIT
        while len(got_first) + len(got_second) < 20:
            assert time.monotonic() < deadline, (
                f"only {len(got_first)} + {len(got_second)} of 20 arrived")
            got_first.extend(first.poll(0.02))
            got_second.extend(second.poll(0.02))
        assert sorted(int(m.body) for m in got_first) == list(range(0, 20, 2))
        assert sorted(int(m.body) for m in got_second) == list(range(1, 20, 2))
        for msg in got_first + got_second:
            msg.ack()
        while drv._sender.unacknowledged:  # acknowledgements leave with the next poll
            assert time.monotonic() < deadline, "acknowledgements never reached the sender"
            assert not first.poll(0.02) and not second.poll(0.02), "a copy arrived twice"
    finally:
        if registrations:
            drv.matchmaker.unregister(registrations)
        first.close()
        second.close()
        for relay in relays:
            relay.close()
        sending.cleanup()
        receiving.cleanup()


def test_a_registered_member_that_never_connects_delays_only_by_the_grace() -> None:
    """A registration whose listener is gone (nothing accepts on its port) keeps its turn for
    connect_grace seconds; then its copies go to the live member, woken by the grace timer."""
    t = tidings.get_notification_transport(url(connect_grace=0.3))
    drv = driver_of(t)
    real = listen(drv, "pool", 50)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ghost = protocol.format_member(f"tcp://127.0.0.1:{port}", uuid.uuid4().bytes, 50)
    drv.matchmaker.register([Registration("ex", "rk", "pool", ghost)], ttl=30)
    try:
        began = time.monotonic()
        send_raw(t, range(20))
        got = poll_until(real, 20, timeout=5.0)  # far below the registration's ttl of 30 s
        assert time.monotonic() - began >= 0.3 * 0.9  # it did keep the ghost's turn a while
        assert sorted(int(m.body) for m in got) == list(range(20))
        settle_all(real, got, drv)
    finally:
        drv.matchmaker.unregister([Registration("ex", "rk", "pool", ghost)])
        real.close()
        t.cleanup()


def test_exchanges_are_isolated(transport: Transport) -> None:
    rec = Recorder()
    on_a = start_listener(transport, rec, "A", exchange="exchange-a")
    on_b = start_listener(transport, rec, "B", exchange="exchange-b", pool="p")
    try:
        drv = driver_of(transport)
        assert drv.registered("exchange-a", "notifications.info") == {"": 1}
        assert drv.registered("exchange-b", "notifications.info") == {"p": 1}
        assert drv.registered("exchange-c", "notifications.info") == {}
        notify(transport, range(0, 30), exchange="exchange-a")
        notify(transport, range(100, 130), exchange="exchange-b")
        rec.wait(lambda: len(rec.handled["A"]) >= 30 and len(rec.handled["B"]) >= 30,
                 "both exchanges")
        assert rec.ids("A") == list(range(0, 30))
        assert rec.ids("B") == list(range(100, 130))
    finally:
        stop_all(on_a, on_b)


def failure_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__  # type: ignore[assignment]
    return chain


def test_a_send_without_listener_fails_saying_so(transport: Transport) -> None:
    """Nobody registered for (exchange, routing key): send_batch() returns NoListener (an
    oslo MessageUndeliverable and a MessageDeliveryFailure) instead of reporting success, and
    the core retries it under the caller's policy; nothing is kept, so a listener started
    later gets only what is sent after it."""
    drv = driver_of(transport)
    [failed] = drv.send_batch([OutgoingMessage("ex", "nobody", b"{}", "m1")], 5)
    assert isinstance(failed, NoListener) and isinstance(failed, MessageUndeliverable)
    assert isinstance(failed, MessageDeliveryFailure) and drv.retryable(failed)
    assert (failed.exchange, failed.routing_key, failed.message) == ("ex", "nobody", "m1")
    text = str(failed)
    assert "no listener is registered for ex/nobody" in text and "stores nothing" in text
    assert "memory matchmaker" in text and "m1" in text
    with pytest.raises(MessageDeliveryFailure) as caught:
        transport.send_raw(Target(topic="nobody", exchange="ex"), b"{}", message_id="m2",
                           retry=1)
    assert any(isinstance(e, NoListener) for e in failure_chain(caught.value))
    assert "failed after 2 attempt(s)" in str(caught.value)
    rec = Recorder()
    with pytest.raises(MessageDeliveryFailure, match="no listener is registered"):
        notify(transport, range(0, 1))
    lst = start_listener(transport, rec, "late")
    try:
        notify(transport, range(5, 10))  # seen at once: the listener registered in start()
        rec.wait(lambda: len(rec.handled["late"]) >= 5, "the messages sent after start")
        assert rec.ids("late") == list(range(5, 10))
    finally:
        stop_all(lst)


def test_wait_for_listener_false_fails_at_once() -> None:
    t = tidings.get_notification_transport(url(wait_for_listener="false"))
    try:
        assert not driver_of(t).retryable(NoListener("ex", "rk", "m", "registry"))
        assert driver_of(t).retryable(TransportUnreachable("down"))
        began = time.monotonic()
        with pytest.raises(NoListener, match="no listener is registered for ex/rk"):
            t.send_raw(Target(topic="rk", exchange="ex"), b"{}", message_id="m1", retry=None)
        assert time.monotonic() - began < 1.0  # not retried, even with retry=None
    finally:
        t.cleanup()


class Records(logging.Handler):
    """A logger's records; ``seen`` is set by the first WARNING that contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if record.levelno == logging.WARNING and self.text in self.messages[-1]:
            self.seen.set()


def test_a_send_with_retry_none_waits_for_a_listener_logging_each_retry() -> None:
    """retry=None retries for ever: the send waits for a listener, and is not silent: the
    retry policy logs every failed attempt at WARNING, saying that no listener is there."""
    where = url(retry_interval=0.05, retry_max_interval=0.1)
    sending = tidings.get_notification_transport(where)
    receiving = tidings.get_notification_transport(where)
    records = Records("no listener is registered for openstack/late.info")
    retry_log = logging.getLogger("tidings.transports.retry")
    retry_log.addHandler(records)
    done = threading.Event()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            tidings.Notifier(sending, "test", topics=["late"], retry=None,
                             raise_on_failure=True).info({}, "test.event", {"i": 7})
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    rec = Recorder()
    lst = None
    thread = threading.Thread(target=send, daemon=True)
    try:
        thread.start()
        assert records.seen.wait(WAIT), f"no retry was logged: {records.messages}"
        assert not done.is_set()  # still waiting for a listener
        lst = start_listener(receiving, rec, "late", topic="late")
        assert done.wait(WAIT) and not errors, errors
        rec.wait(lambda: rec.ids("late") == [7], "the message that waited")
    finally:
        retry_log.removeHandler(records)
        if lst is not None:
            stop_all(lst)
        sending.cleanup()
        receiving.cleanup()
        thread.join(WAIT)


def test_other_transports_of_the_process_see_a_new_listener_at_once() -> None:
    """Registrations made in this process invalidate every sender's cached lookups at once,
    even with a long lookup_interval (which only governs other processes' changes)."""
    where = url()
    sending = tidings.get_notification_transport(f"{where}?lookup_interval=600")
    receiving = tidings.get_notification_transport(f"{where}?ttl=5")
    rec = Recorder()
    lst = None
    target = Target(topic="notifications.info", exchange="openstack")
    try:
        with pytest.raises(MessageDeliveryFailure, match="no listener"):  # cached: nobody
            sending.send_raw(target, b"{}", message_id="m0", retry=0)
        lst = start_listener(receiving, rec, "r")
        notify(sending, range(3, 6))
        rec.wait(lambda: len(rec.handled["r"]) >= 3, "the messages sent after start")
        assert rec.ids("r") == [3, 4, 5]
    finally:
        if lst is not None:
            stop_all(lst)
        sending.cleanup()
        receiving.cleanup()


def test_requeued_messages_go_to_another_member(transport: Transport) -> None:
    rec = Recorder()
    refusing = start_listener(transport, rec, "refuser", pool="p", allow_requeue=True,
                              decide=lambda i: NotificationResult.REQUEUE)
    taking = None
    try:
        notify(transport, range(40))
        # Alone in its pool, the refuser gets every message back after requeueing it...
        wait_until(lambda: refusing.stats.snapshot()["requeued"] >= 40, "40 requeues")
        # ...and once another member joins, the requeued messages go there instead.
        taking = start_listener(transport, rec, "taker", pool="p", allow_requeue=True)
        rec.wait(lambda: len(rec.handled["taker"]) >= 40, "every message at the taker")
        assert rec.ids("taker") == list(range(40))
    finally:
        stop_all(refusing, *([taking] if taking else []))


def test_requeue_with_a_single_member_comes_back_to_it(transport: Transport) -> None:
    rec = Recorder()
    seen: Counter[int] = Counter()

    def once(i: int) -> str | None:
        seen[i] += 1
        return NotificationResult.REQUEUE if seen[i] == 1 else None

    lst = start_listener(transport, rec, "only", allow_requeue=True, decide=once)
    try:
        notify(transport, range(10))
        rec.wait(lambda: len(rec.handled["only"]) >= 10, "the requeued messages")
        assert rec.ids("only") == list(range(10))
        assert all(seen[i] == 2 for i in range(10))
    finally:
        stop_all(lst)


# -- driver-level: what poll() hands over --------------------------------------------------------
def send_raw(t: Transport, ids: range, exchange: str = "ex", topic: str = "rk") -> None:
    drv = driver_of(t)
    for i in ids:
        assert drv.send_batch([OutgoingMessage(exchange, topic, str(i).encode(), f"m{i}")],
                              5) == [None]


def poll_until(listener: RawListener, count: int,
               timeout: float = WAIT) -> list[IncomingMessage]:
    got: list[IncomingMessage] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"polled {len(got)} of {count} messages in {timeout}s")
        got.extend(listener.poll(0.05))
    return got


def settle_all(listener: RawListener, messages: list[IncomingMessage], drv: ZmqDriver) -> None:
    """Acknowledge, then keep polling (acks leave in the next poll) until the window is empty;
    nothing else may arrive meanwhile."""
    for msg in messages:
        msg.ack()
    deadline = time.monotonic() + WAIT
    while drv._sender.unacknowledged:
        assert time.monotonic() < deadline, "acknowledgements never reached the sender"
        assert not listener.poll(0.02), "a message arrived twice"


def test_prefetch_bounds_unsettled_messages(transport: Transport) -> None:
    drv = driver_of(transport)
    lst = listen(drv, None, 3)
    try:
        send_raw(transport, range(10))
        held = poll_until(lst, 3)
        assert len(held) == 3
        # Seven more are waiting, but none is handed over while three are unsettled.
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            assert not lst.poll(0.05)
        held[0].ack()
        more = poll_until(lst, 1)
        assert len(more) == 1
        for msg in held[1:] + more:
            msg.ack()
        rest: list[IncomingMessage] = []
        deadline = time.monotonic() + WAIT
        while len(rest) < 6 and time.monotonic() < deadline:
            batch = lst.poll(0.05)
            assert len(batch) <= 3
            for msg in batch:
                msg.ack()
            rest.extend(batch)
        assert sorted(int(m.body) for m in held + more + rest) == list(range(10))
    finally:
        lst.close()


def test_closing_a_listener_hands_its_messages_to_another_member(transport: Transport) -> None:
    drv = driver_of(transport)
    # A credit (prefetch) of 10 each: neither member can take all 40 before acknowledging,
    # whichever finishes its handshake with the sender first.
    first = listen(drv, "pool", 10)
    second = listen(drv, "pool", 10)
    try:
        send_raw(transport, range(40))
        held = poll_until(first, 10)
        assert not any(m.redelivered for m in held)
        first.close()  # unsettled: they go back, as if requeued
        assert all(m.settled == "requeue" for m in held)
        got: list[IncomingMessage] = []
        deadline = time.monotonic() + WAIT
        while len(got) < 40:
            assert time.monotonic() < deadline, f"the second member got {len(got)} of 40"
            batch = second.poll(0.05)
            for msg in batch:
                msg.ack()
            got.extend(batch)
        assert sorted(int(m.body) for m in got) == list(range(40))
        assert {int(m.body) for m in got if m.redelivered} >= {int(m.body) for m in held}
        settle_all(second, [], drv)
    finally:
        first.close()
        second.close()


def test_a_refused_copy_goes_to_the_right_listener(transport: Transport) -> None:
    """A copy addressed to a listener that used to hold the port is refused and resent."""
    drv = driver_of(transport)
    real = listen(drv, "pool", 50)
    assert isinstance(receiver_of(real).address, str)
    endpoint = receiver_of(real).endpoint
    ghost = protocol.format_member(endpoint, uuid.uuid4().bytes, 50)
    drv.matchmaker.register([Registration("ex", "rk", "pool", ghost)], ttl=30)
    try:
        send_raw(transport, range(30))
        got = poll_until(real, 30)
        assert sorted(int(m.body) for m in got) == list(range(30))
        settle_all(real, got, drv)
        # Nothing more arrives: each message went exactly once to the real listener.
        assert not real.poll(0.2)
    finally:
        drv.matchmaker.unregister([Registration("ex", "rk", "pool", ghost)])
        real.close()


def rogue_burst(endpoint: str, listener_id: bytes) -> tuple[Any, Any, set[int]]:
    """Connect a DEALER that is no tidings sender to ``endpoint`` and send a burst of broken
    frames; returns (context, socket, the sequence numbers of those that can be identified)."""
    import zmq

    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(endpoint)

    def data(seq: int, headers: bytes, message_id: bytes = b"rogue") -> bytes:
        return protocol.data_frame(seq, False, listener_id, message_id, headers, b"{}")

    identifiable = {
        1: [data(1, b"[1, 2]")],                            # headers: a JSON list
        2: [data(2, b'"a string"')],                        # headers: a JSON string
        3: [data(3, b"[" * 200_000 + b"]" * 200_000)],      # nesting too deep to parse
        4: [data(4, b""), b"an extra frame"],               # two frames, not one
        5: [data(5, b"{not json")],                         # headers that are no JSON
        6: [data(6, b"", message_id=b"\xff\xfe")],          # a message id that is no UTF-8
        7: [data(7, b'{"k": "v"}')[:-6]],                   # lengths past the frame's end
    }
    for frames in identifiable.values():
        rogue.send_multipart(frames)
    for junk in (b"", b"garbage", b"D" + b"\0" * 10):    # cannot even be identified
        rogue.send(junk)
    rogue.send(protocol.data_frame(8, False, uuid.uuid4().bytes, b"x", b"", b"{}"))  # not its id
    return ctx, rogue, set(identifiable)


def rogue_answers(rogue: Any, expected: dict[bytes, set[int]]) -> None:
    """Wait until the rogue peer heard back every sequence number it is owed, by kind."""
    heard: dict[bytes, set[int]] = defaultdict(set)
    deadline = time.monotonic() + WAIT
    while any(heard[k] != v for k, v in expected.items()):
        assert time.monotonic() < deadline, f"the rogue peer heard {dict(heard)}"
        if rogue.poll(50):
            kind, seqs = protocol.unpack_seqs(rogue.recv())
            heard[kind].update(seqs)


def test_rogue_frames_are_refused_and_a_good_copy_follows_promptly(
        transport: Transport, caplog: pytest.LogCaptureFixture) -> None:
    """Driver level: a burst of broken frames never raises out of receive(). A copy that can be
    identified comes back with ``problem`` set (the core rejects it, so its sender hears "done");
    one that cannot is dropped and logged; a copy meant for another listener is refused."""
    drv = driver_of(transport)
    lst = listen(drv, None, 50)
    receiver = receiver_of(lst)
    ctx, rogue, identifiable = rogue_burst(receiver.endpoint, receiver._id)
    try:
        with caplog.at_level(logging.ERROR, logger="tidings.drivers.zmq.listener"):
            got = poll_until(lst, len(identifiable))
            send_raw(transport, range(1))
            began = time.monotonic()
            [good] = poll_until(lst, 1, timeout=2.0)
            assert time.monotonic() - began < 1.0 and good.problem is None
        assert good.body == b"0" and good.message_id == "m0"
        assert {m.token[1] for m in got} == identifiable
        assert all(m.problem for m in got), [(m.token[1], m.problem) for m in got]
        assert caplog.text.count("dropping a malformed message") == 3, caplog.text
        for msg in got:
            msg.reject()
        lst.poll(0.01)  # hands the rejections to settle()
        rogue_answers(rogue, {protocol.ACK: identifiable, protocol.NOT_MINE: {8}})
        settle_all(lst, [good], drv)
    finally:
        lst.close()
        rogue.close()
        ctx.term()


def test_rogue_frames_do_not_stop_a_notification_listener(
        transport: Transport, caplog: pytest.LogCaptureFixture) -> None:
    """The same burst at a running listener: the core rejects what could be identified, the
    listener keeps its connection (no reconnect) and the next notification arrives promptly."""
    rec = Recorder()
    lst = start_listener(transport, rec, "a")
    [receiver] = driver_of(transport)._receivers
    ctx, rogue, identifiable = rogue_burst(receiver.endpoint, receiver._id)
    try:
        with caplog.at_level(logging.WARNING):
            rogue_answers(rogue, {protocol.ACK: identifiable, protocol.NOT_MINE: {8}})
            began = time.monotonic()
            notify(transport, range(1))
            rec.wait(lambda: rec.ids("a") == [0], "the good notification", timeout=2.0)
            assert time.monotonic() - began < 1.0
        assert lst.stats.snapshot()["rejected"] == len(identifiable)
        assert "reconnecting" not in caplog.text, caplog.text
    finally:
        stop_all(lst)
        rogue.close()
        ctx.term()


def test_a_full_window_makes_send_wait_then_fail() -> None:
    t = tidings.get_notification_transport(url(ack_window=4, send_timeout=0.3, flush_timeout=0))
    drv = driver_of(t)
    lst = listen(drv, None, 100)  # never polled: never acknowledges
    try:
        send_raw(t, range(4))
        began = time.monotonic()
        [failed] = drv.send_batch([OutgoingMessage("ex", "rk", b"5", "m5")], 0.3)
        assert isinstance(failed, TransportUnreachable) and "ack_window=4" in str(failed)
        assert time.monotonic() - began >= 0.25
        with pytest.raises(MessageDeliveryFailure):
            t.send_raw(Target(topic="rk", exchange="ex"), b"6", message_id="m6", retry=0)
    finally:
        lst.close()
        t.cleanup()


def test_cleanup_flushes_the_window() -> None:
    where = url()
    receiving = tidings.get_notification_transport(where)
    sending = tidings.get_notification_transport(where)
    rec = Recorder()
    lst = start_listener(receiving, rec, "r")
    try:
        notify(sending, range(300))
        sending.cleanup()  # returns once the 300 copies are acknowledged (or flush_timeout)
        assert driver_of(sending)._sender.unacknowledged == 0
        rec.wait(lambda: len(rec.handled["r"]) >= 300, "the flushed messages")
    finally:
        stop_all(lst)
        receiving.cleanup()


def test_copies_of_a_group_that_vanished_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    t = tidings.get_notification_transport(url(ttl=0.3))
    drv = driver_of(t)
    lst = listen(drv, "gone", 2)
    try:
        send_raw(t, range(6))
        poll_until(lst, 2)
        with caplog.at_level(logging.WARNING, logger="tidings.drivers.zmq.sender"):
            lst.close()  # hands back 2, and no member is left to take any of the 6
            wait_until(lambda: drv._sender.unacknowledged == 0, "the orphans to be dropped")
        assert "no registered listener" in caplog.text
    finally:
        t.cleanup()


def test_listener_binds_in_the_port_range() -> None:
    with socket.socket() as probe:  # find a free port to build a range of one around it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    t = tidings.get_notification_transport(url(port_min=port, port_max=port))
    drv = driver_of(t)
    lst = listen(drv, None, 4)
    try:
        assert receiver_of(lst).endpoint == f"tcp://127.0.0.1:{port}"
        with pytest.raises(OSError, match="no free port"):
            drv.listen([Binding("ex", "rk")], None, 4)
    finally:
        lst.close()
        t.cleanup()


@pytest.mark.parametrize("bad, match", [
    ("ttl=0", "ttl"),
    ("ack_window=0", "ack_window"),
    ("port_min=5000", "port_min"),
    ("port_min=10&port_max=5", "port_min"),
    ("ack_timeout=-1", "ack_timeout"),
    ("connect_grace=-1", "connect_grace"),
    ("colour=red", "unknown option"),
])
def test_bad_options_fail_when_the_transport_is_built(bad: str, match: str) -> None:
    with pytest.raises(InvalidTransportOption, match=match):
        tidings.get_notification_transport(f"zmq+memory:///x?{bad}")


def test_matchmaker_from_scheme_or_query(tmp_path: Any) -> None:
    by_query = tidings.get_notification_transport(f"zmq:///{tmp_path}/a.db?matchmaker=sqlite")
    by_scheme = tidings.get_notification_transport(f"zmq+sqlite:///{tmp_path}/a.db")
    try:
        assert driver_of(by_query).matchmaker.name == "sqlite"
        assert driver_of(by_scheme).matchmaker.name == "sqlite"
    finally:
        by_query.cleanup()
        by_scheme.cleanup()
    with pytest.raises(InvalidTransportOption, match="give one of them"):
        tidings.get_notification_transport("zmq+redis://127.0.0.1/0?matchmaker=sqlite")
    with pytest.raises(InvalidTransportURL, match="takes no host"):
        tidings.get_notification_transport("zmq://somehost/")
    with pytest.raises(tidings.DriverLoadFailure, match="no tidings matchmaker"):
        tidings.get_notification_transport("zmq+nosuch://")


def test_passwords_stay_out_of_descriptions() -> None:
    t = tidings.get_notification_transport("zmq+redis://user:s3cret@127.0.0.1:6379/0")
    try:
        assert "s3cret" not in driver_of(t).describe()
        assert "s3cret" not in repr(t)
    finally:
        t.cleanup()


def test_pool_name_must_not_be_empty(transport: Transport) -> None:
    with pytest.raises(ValueError, match="pool"):
        driver_of(transport).listen([Binding("ex", "rk")], "", 4)


def test_join_consumer_pool_over_zmq(transport: Transport) -> None:
    got: list[dict[str, Any]] = []
    done = threading.Event()

    def callback(message: dict[str, Any]) -> None:
        got.append(message)
        if len(got) == 20:
            done.set()

    handle = transport.join_consumer_pool(callback, "raw-pool", "notifications.info")
    try:
        notify(transport, range(20))
        assert done.wait(WAIT)
        assert sorted(m["payload"]["i"] for m in got) == list(range(20))
    finally:
        assert handle.stop(WAIT)


def test_an_unreachable_registry_fails_sends_and_listeners_clearly() -> None:
    t = tidings.get_notification_transport("zmq+redis://127.0.0.1:1/0?namespace=down")
    try:
        with pytest.raises(MessageDeliveryFailure, match="unreachable"):
            t.send_raw(Target(topic="rk", exchange="ex"), b"{}", message_id="m1", retry=0)
        lst = tidings.get_notification_listener(t, [Target(topic="notifications")],
                                                [Endpoint(Recorder(), "x")])
        with pytest.raises(TransportUnreachable, match="unreachable"):
            lst.start()  # the listener cannot register: it fails in start(), in the caller
    finally:
        t.cleanup()
