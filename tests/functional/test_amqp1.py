"""Functional tests of the ``amqp://`` driver against the RabbitMQ on 127.0.0.1:5672, through its
AMQP 1.0 plugin, in a fresh virtual host for this module (deleted afterwards).

Every test uses its own uuid'd exchange, topics and pools, so the tests share the virtual host
without seeing each other's messages. Queue depths are read over AMQP 0-9-1 (passive declares),
the way an operator would check them. Waits are bounded waits on events or on poll() deadlines,
never bare sleeps. Driver-level tests drive the driver's receiver by hand, as the core does
(``RawListener``); the others go through notification listeners.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import amqp
import pytest

import tidings
from tidings import NotificationResult, Target
from tidings.testing.brokers import rabbit_vhost, require_service
from tidings.testing.conformance_harness import RawListener
from tidings.testing.proxy import FaultProxy
from tidings.transports.base import Binding, IncomingMessage
from tidings.transports.errors import (
    InvalidTransportOption,
    MessageDeliveryFailure,
    TransportClosed,
    TransportUnreachable,
)
from tidings.transports.transport import Transport

WAIT = 15.0  # bound on every wait for something that must happen
QUIET = 0.5  # window watched for something that must not happen


# -- fixtures and helpers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    require_service("rabbitmq")
    with rabbit_vhost("tidings-amqp1") as name:
        yield name


@pytest.fixture
def make(vhost: str) -> Iterator[Callable[..., Transport]]:
    """Build transports on the module's vhost (optionally through a host:port), cleaned up after."""
    made: list[Transport] = []

    def build(query: str = "", host: str = "127.0.0.1", port: int = 5672,
              password: str = "guest", **kw: Any) -> Transport:
        url = f"amqp://guest:{password}@{host}:{port}/{vhost}"
        if query:
            url += "?" + query
        t = tidings.get_notification_transport(url, **kw)
        made.append(t)
        return t

    yield build
    for t in made:
        t.cleanup()


def uid() -> str:
    return uuid.uuid4().hex[:10]


def channel_to(vhost: str) -> tuple[amqp.Connection, Any]:
    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest",
                           virtual_host=vhost, connect_timeout=5)
    conn.connect()
    return conn, conn.channel()


def queue_depth(vhost: str, name: str) -> int:
    """Ready messages in a queue (unacknowledged ones are not counted)."""
    conn, ch = channel_to(vhost)
    try:
        return ch.queue_declare(name, passive=True).message_count
    finally:
        conn.close()


def queue_exists(vhost: str, name: str) -> bool:
    conn, ch = channel_to(vhost)
    try:
        ch.queue_declare(name, passive=True)
        return True
    except amqp.exceptions.NotFound:
        return False
    finally:
        conn.close()


def wait_until(check: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    ev = threading.Event()
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        ev.wait(0.05)  # re-check a broker-side condition no event can signal


def listen(t: Transport, bindings: Sequence[Binding], pool: str | None = None,
           prefetch: int = 64) -> RawListener:
    """The driver's receiver, driven as the core drives it (settlements go out on poll())."""
    return RawListener(t.listen(bindings, pool, prefetch), prefetch)


def take(listener: RawListener, n: int, timeout: float = WAIT) -> list[IncomingMessage]:
    """Poll until ``n`` messages arrived (fails after ``timeout``), settling none."""
    got: list[IncomingMessage] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"got {len(got)} of {n} messages within {timeout}s")
        got.extend(listener.poll(0.2))
    return got


def nothing_more(listener: RawListener, window: float = QUIET) -> list[IncomingMessage]:
    """Whatever arrives within ``window`` seconds (expected: nothing)."""
    got: list[IncomingMessage] = []
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        got.extend(listener.poll(min(0.1, max(0.0, deadline - time.monotonic()))))
    return got


def send(t: Transport, exchange: str, rk: str, key: str, **kw: Any) -> None:
    msg = {"message_id": key, "publisher_id": "test", "event_type": "amqp1.test",
           "priority": "INFO", "payload": {"key": key}, "timestamp": "2026-01-01 00:00:00"}
    t.send_raw(Target(topic=rk, exchange=exchange), tidings.transports.envelope.encode(msg),
               message_id=key, **kw)


def keys_of(msgs: Sequence[IncomingMessage]) -> list[str]:
    return [str(m.message_id) for m in msgs]


class Collector:
    """A notification endpoint that records payload keys per member, with bounded waits."""

    def __init__(self, inbox: queue.Queue[tuple[str, str]], member: str,
                 result: Callable[[str], Any] | None = None) -> None:
        self.inbox = inbox
        self.member = member
        self.result = result

    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> Any:
        self.inbox.put((self.member, payload["key"]))
        return self.result(payload["key"]) if self.result else None


def drain(inbox: queue.Queue[tuple[str, str]], n: int,
          timeout: float = WAIT) -> list[tuple[str, str]]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"got {len(out)} of {n} notifications: {out}")
        try:
            out.append(inbox.get(timeout=left))
        except queue.Empty:
            continue
    return out


# -- names and shares (no broker needed) -------------------------------------------------------
def test_queue_plan_refuses_names_amqp1_addresses_cannot_carry() -> None:
    from tidings.drivers._rabbitmq.queues import QueueModel
    from tidings.drivers.amqp1.topology import plan_queues

    plans = plan_queues(QueueModel(), [Binding("nova", "notifications.info")], "ceilo")
    assert [p.name for p in plans] == ["ceilo"]  # the core's oslo names, unchanged
    with pytest.raises(ValueError, match="contains '/'"):
        plan_queues(QueueModel(), [Binding("nova", "notifications.info")], "a/b")
    with pytest.raises(ValueError, match="contains '/'"):
        plan_queues(QueueModel(), [Binding("no/va", "notifications.info")], None)


def test_credit_is_granted_once_used_up_doubling_within_a_shared_window() -> None:
    from tidings.drivers.amqp1.receiving import credit_to_grant

    assert credit_to_grant(64, 3, 0, 8, []) == 0  # credit left: wait until it is used up
    assert credit_to_grant(64, 0, 10, 64, []) == 54  # one queue: up to prefetch
    assert credit_to_grant(64, 0, 0, 4, []) == 8  # doubling from the last grant
    # Seven queues, prefetch 4: each other link keeps its 1 in reserve, the busy one may take
    # the whole prefetch; its grants double while it keeps using them.
    idle = [(1, 0)] * 6
    assert credit_to_grant(4, 0, 1, 1, idle) == 2
    assert credit_to_grant(4, 0, 3, 2, idle) == 1
    assert credit_to_grant(4, 0, 0, 1, [(0, 4), *idle[1:]]) == 1  # its own 1, always
    assert credit_to_grant(4, 0, 1, 1, [(0, 4), *idle[1:]]) == 0  # the rest is taken


# -- URL, virtual host, capabilities -----------------------------------------------------------
def test_virtual_host_is_selected_and_group_queue_exists_from_first_send(
        make: Callable[..., Transport], vhost: str) -> None:
    """The message lands in the URL's vhost (RabbitMQ reads 'vhost:<name>' from the open frame),
    in the no-pool group's queue named like oslo.messaging's, declared by the send itself."""
    t = make()
    ex, rk = f"ex-{uid()}", f"topic-{uid()}.info"
    send(t, ex, rk, "k1")
    assert queue_depth(vhost, rk) == 1
    conn, ch = channel_to("/")
    try:
        with pytest.raises(amqp.exceptions.NotFound):
            ch.queue_declare(rk, passive=True)
    finally:
        conn.close()


def test_capabilities_follow_the_options(make: Callable[..., Transport]) -> None:
    caps = make().capabilities
    assert caps.pools and caps.requeue and caps.requeue_to_other_member
    assert caps.at_least_once and caps.confirmed_send and caps.prefetch
    assert caps.stores_without_listener
    assert not caps.exchanges and not caps.durable and not caps.dead_letter
    caps = make("isolate_exchanges=true&durable=true&dead_letter_exchange=dlx-" + uid()) \
        .capabilities
    assert caps.exchanges and caps.durable and caps.dead_letter


def test_bad_options_fail_fast_without_the_password(vhost: str) -> None:
    for query, name in [("queue_expiry=-1", "queue_expiry"), ("topology=nope", "topology"),
                        ("connect_timeout=0", "connect_timeout"),
                        ("reconnect_interval=2&reconnect_max_interval=1", "reconnect")]:
        with pytest.raises(InvalidTransportOption) as err:
            tidings.get_notification_transport(
                f"amqp://guest:s3cret-pw@127.0.0.1:5672/{vhost}?{query}")
        assert name in str(err.value) and "s3cret-pw" not in str(err.value)


def test_a_wrong_password_fails_at_once_and_says_so(make: Callable[..., Transport]) -> None:
    """A refused login is not retried and not blamed on declaring queues (as on rabbit://)."""
    transport = make(password="Wr0ng-pw-x9")
    notifier = tidings.Notifier(transport, "p", topics=["t"], retry=3, raise_on_failure=True)
    began = time.monotonic()
    with pytest.raises(TransportUnreachable) as err:
        notifier.info({}, "e", {})
    assert time.monotonic() - began < WAIT / 3  # no retries with backoff
    text = str(err.value)
    assert "refused the login" in text and "user and password" in text, text
    assert "Wr0ng-pw-x9" not in text and "declare" not in text, text
    class Endpoint:
        def info(self, *args: Any) -> None: ...

    listener = tidings.get_notification_listener(transport, [Target(topic="t")], [Endpoint()])
    with pytest.raises(TransportUnreachable, match="refused the login"):
        listener.start()


# -- sending and receiving -----------------------------------------------------------------
def test_notification_round_trip(make: Callable[..., Transport]) -> None:
    t = make()
    topic, ex = f"n-{uid()}", f"ex-{uid()}"
    got: queue.Queue[tuple[Any, ...]] = queue.Queue()

    class Endpoint:
        def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                 metadata: Any) -> None:
            got.put((ctxt, publisher_id, event_type, payload, metadata))

    listener = tidings.get_notification_listener(t, [Target(topic=topic, exchange=ex)],
                                                 [Endpoint()])
    listener.start()
    try:
        tidings.Notifier(t, "svc.host1", topics=[topic], exchange=ex,
                         raise_on_failure=True).info({"user": "u1"}, "thing.created",
                                                     {"id": 7, "name": "żółw"})
        ctxt, pub, event, payload, meta = got.get(timeout=WAIT)
    finally:
        listener.stop()
        assert listener.wait(WAIT)
    assert (ctxt, pub, event, payload) == ({"user": "u1"}, "svc.host1", "thing.created",
                                           {"id": 7, "name": "żółw"})
    assert meta["message_id"] and meta["timestamp"]


def test_headers_id_and_first_delivery_flag_reach_the_listener(
        make: Callable[..., Transport]) -> None:
    t = make()
    ex, rk = f"ex-{uid()}", f"h-{uid()}"
    listener = listen(t, [Binding(ex, rk)], prefetch=5)
    try:
        send(t, ex, rk, "with-headers", headers={"x-signature": "abc", "x-key-id": "k1"})
        (msg,) = take(listener, 1)
        assert msg.message_id == "with-headers"
        assert msg.headers == {"x-signature": "abc", "x-key-id": "k1"}
        assert msg.redelivered is False
        assert tidings.transports.envelope.decode(msg.body)["payload"] == {"key": "with-headers"}
        assert msg.ack()
    finally:
        listener.close()


def test_no_pool_group_splits_and_pools_each_get_a_copy(make: Callable[..., Transport],
                                                        vhost: str) -> None:
    t = make()
    ex, topic = f"ex-{uid()}", f"g-{uid()}"
    inbox: queue.Queue[tuple[str, str]] = queue.Queue()
    gate = threading.Barrier(2, timeout=5)

    def hold_first(member: str) -> Callable[[str], Any]:
        seen = []

        def result(key: str) -> None:
            if not seen:  # each group member waits on its first message for the other one,
                seen.append(key)  # so both of them must get a share
                try:
                    gate.wait()
                except threading.BrokenBarrierError:
                    pass
        return result

    listeners = [
        tidings.get_notification_listener(t, [Target(topic=topic, exchange=ex)],
                                          [Collector(inbox, m, hold_first(m))], prefetch=2)
        for m in ("group-a", "group-b")]
    pools = {f"pool1-{uid()}": ["p1-a", "p1-b"], f"pool2-{uid()}": ["p2"]}
    for pool, members in pools.items():
        listeners += [tidings.get_notification_listener(t, [Target(topic=topic, exchange=ex)],
                                                        [Collector(inbox, m)], pool=pool)
                      for m in members]
    for listener in listeners:
        listener.start()
    try:
        n = tidings.Notifier(t, "test", topics=[topic], exchange=ex, raise_on_failure=True)
        keys = [f"m{i}" for i in range(20)]
        for k in keys:
            n.info({}, "amqp1.group", {"key": k})
        got = drain(inbox, 3 * len(keys))
        assert nothing_more_from(inbox) == []
    finally:
        for listener in listeners:
            listener.stop()
        for listener in listeners:
            assert listener.wait(WAIT)
    by_member: dict[str, list[str]] = {}
    for member, key in got:
        by_member.setdefault(member, []).append(key)
    group = by_member.get("group-a", []) + by_member.get("group-b", [])
    pool1 = by_member.get("p1-a", []) + by_member.get("p1-b", [])
    assert Counter(group) == dict.fromkeys(keys, 1)
    assert Counter(pool1) == dict.fromkeys(keys, 1)
    assert Counter(by_member["p2"]) == dict.fromkeys(keys, 1)
    assert by_member.get("group-a") and by_member.get("group-b"), by_member.keys()
    # oslo.messaging's names: the group consumes '<topic>.info', a pool the pool's name.
    for name in [f"{topic}.info", *pools]:
        assert queue_exists(vhost, name), name


def nothing_more_from(inbox: queue.Queue[tuple[str, str]],
                      window: float = QUIET) -> list[tuple[str, str]]:
    extra = []
    try:
        extra.append(inbox.get(timeout=window))
    except queue.Empty:
        pass
    return extra


def test_exchanges_share_oslo_queues_unless_isolated(make: Callable[..., Transport]) -> None:
    """oslo naming: same routing key on two exchanges feeds one queue (why the driver does not
    declare 'exchanges'); isolate_exchanges=true keeps them apart."""
    rk = f"iso-{uid()}"
    xa, xb = f"xa-{uid()}", f"xb-{uid()}"
    shared = make()
    listener = listen(shared, [Binding(xa, rk)], prefetch=10)
    try:
        send(shared, xb, rk, "from-b")
        assert keys_of(take(listener, 1)) == ["from-b"]  # documented oslo behaviour
    finally:
        listener.close()
    iso = make("isolate_exchanges=true")
    la = listen(iso, [Binding(xa, rk)], prefetch=10)
    lb = listen(iso, [Binding(xb, rk)], prefetch=10)
    try:
        send(iso, xb, rk, "b1")
        send(iso, xa, rk, "a1")
        assert keys_of(take(la, 1)) == ["a1"]
        assert keys_of(take(lb, 1)) == ["b1"]
        assert nothing_more(la) == [] and nothing_more(lb) == []
    finally:
        la.close()
        lb.close()


# -- settlement ----------------------------------------------------------------------------
def test_requeue_comes_back_on_the_same_session(make: Callable[..., Transport],
                                                vhost: str) -> None:
    """requeue sends 'released' (not 'modified', which ends the session on RabbitMQ 3.x): the
    message comes back flagged redelivered, and the same listener keeps receiving."""
    t = make()
    ex, rk = f"ex-{uid()}", f"rq-{uid()}"
    listener = listen(t, [Binding(ex, rk)], prefetch=5)
    try:
        send(t, ex, rk, "again")
        (first,) = take(listener, 1)
        assert first.requeue()
        (second,) = take(listener, 1)
        assert second.message_id == "again" and second.redelivered is True
        assert second.ack()
        send(t, ex, rk, "next")
        (after,) = take(listener, 1)
        assert after.message_id == "next" and after.ack()
        assert nothing_more(listener) == []
    finally:
        listener.close()
    assert queue_depth(vhost, rk) == 0


def test_requeued_message_reaches_another_member_once_the_first_closes(
        make: Callable[..., Transport]) -> None:
    t = make()
    ex, rk, pool = f"ex-{uid()}", f"rq2-{uid()}", f"pool-{uid()}"
    first = listen(t, [Binding(ex, rk)], pool=pool, prefetch=5)
    send(t, ex, rk, "handover")
    (msg,) = take(first, 1)
    second = listen(t, [Binding(ex, rk)], pool=pool, prefetch=5)
    try:
        assert msg.requeue()
        first.close()
        (again,) = take(second, 1)
        assert again.message_id == "handover" and again.redelivered
        assert again.ack()
    finally:
        first.close()
        second.close()


def test_close_returns_unsettled_messages_to_the_queue(make: Callable[..., Transport],
                                                       vhost: str) -> None:
    t = make()
    ex, rk = f"ex-{uid()}", f"cl-{uid()}"
    listener = listen(t, [Binding(ex, rk)], prefetch=10)
    for i in range(4):
        send(t, ex, rk, f"c{i}")
    msgs = take(listener, 4)
    assert msgs[0].ack() and msgs[1].reject()
    listener.close()
    assert msgs[2].settled == "requeue"  # handed back by close()
    assert not msgs[3].ack()  # too late: a settlement after close is a no-op
    wait_until(lambda: queue_depth(vhost, rk) == 2, what="2 messages back in the queue")


def test_prefetch_bounds_unsettled_messages(make: Callable[..., Transport]) -> None:
    t = make()
    ex, rk = f"ex-{uid()}", f"pf-{uid()}"
    listener = listen(t, [Binding(ex, rk)], prefetch=3)
    try:
        for i in range(8):
            send(t, ex, rk, f"p{i}")
        held = take(listener, 3)
        assert nothing_more(listener) == []
        held[0].ack()
        held += take(listener, 1)
        assert nothing_more(listener) == []
        threading.Thread(target=held[1].ack).start()  # settling from another thread
        held += take(listener, 1)
        assert len({m.message_id for m in held}) == 5
    finally:
        listener.close()


def test_prefetch_smaller_than_the_queues_still_bounds_what_poll_hands_out(
        make: Callable[..., Transport]) -> None:
    """Three routing keys (three queues) with prefetch=1: each link needs a credit of 1, yet the
    listener is never handed more than 1 unsettled message."""
    t = make()
    ex = f"ex-{uid()}"
    rks = [f"multi-{uid()}.{p}" for p in ("info", "warn", "error")]
    listener = listen(t, [Binding(ex, rk) for rk in rks], prefetch=1)
    try:
        for rk in rks:
            send(t, ex, rk, rk)
        seen: list[str] = []
        for _ in rks:
            batch = take(listener, 1)
            assert len(batch) == 1
            assert nothing_more(listener, 0.3) == []
            seen.append(str(batch[0].message_id))
            batch[0].ack()
        assert sorted(seen) == sorted(rks)
    finally:
        listener.close()


def test_malformed_bodies_are_rejected_and_the_listener_goes_on(
        make: Callable[..., Transport], vhost: str) -> None:
    t = make()
    ex, topic = f"ex-{uid()}", f"bad-{uid()}"
    inbox: queue.Queue[tuple[str, str]] = queue.Queue()
    listener = tidings.get_notification_listener(t, [Target(topic=topic, exchange=ex)],
                                                 [Collector(inbox, "l")])
    listener.start()
    try:
        target = Target(topic=f"{topic}.info", exchange=ex)
        t.send_raw(target, b"\xff\xfe not utf-8", message_id="bad1")
        t.send_raw(target, b"[1, 2]", message_id="bad2")
        conn, ch = channel_to(vhost)  # an AMQP 0-9-1 publisher with a non-JSON body
        try:
            ch.basic_publish(amqp.Message(b"<xml/>", message_id="bad3"), ex, f"{topic}.info")
        finally:
            conn.close()
        tidings.Notifier(t, "p", topics=[topic], exchange=ex,
                         raise_on_failure=True).info({}, "ok", {"key": "good"})
        assert drain(inbox, 1) == [("l", "good")]
        assert nothing_more_from(inbox) == []
        assert listener.stats.snapshot()["rejected"] == 3
    finally:
        listener.stop()
        assert listener.wait(WAIT)
    assert queue_depth(vhost, f"{topic}.info") == 0  # rejected, not requeued


def test_rejected_messages_are_dead_lettered_when_asked(make: Callable[..., Transport],
                                                        vhost: str) -> None:
    dlx = f"dlx-{uid()}"
    t = make(f"dead_letter_exchange={dlx}")
    ex, topic = f"ex-{uid()}", f"dl-{uid()}"
    inbox: queue.Queue[tuple[str, str]] = queue.Queue()
    listener = tidings.get_notification_listener(
        t, [Target(topic=topic, exchange=ex)],
        [Collector(inbox, "l", lambda k: NotificationResult.REQUEUE)])
    listener.start()  # allow_requeue=False: REQUEUE means reject, here into the DLX
    try:
        tidings.Notifier(t, "p", topics=[topic], exchange=ex,
                         raise_on_failure=True).info({}, "x", {"key": "dead"})
        assert drain(inbox, 1) == [("l", "dead")]
        wait_until(lambda: queue_depth(vhost, dlx) == 1, what="the dead-lettered message")
    finally:
        listener.stop()
        assert listener.wait(WAIT)


def test_queue_options_reach_the_broker(make: Callable[..., Transport]) -> None:
    """queue_expiry declares x-expires: declaring the same queue without it is refused by the
    broker, and the driver says which options to align."""
    ex, rk = f"ex-{uid()}", f"exp-{uid()}"
    send(make("queue_expiry=60"), ex, rk, "k")
    with pytest.raises(InvalidTransportOption) as err:
        send(make(), ex, rk, "k2")
    assert "queue_expiry" in str(err.value) and rk in str(err.value)


def test_names_amqp1_cannot_address_are_refused(make: Callable[..., Transport]) -> None:
    t = make()
    with pytest.raises(ValueError, match="'/'"):
        listen(t, [Binding("a/b", "rk")])
    with pytest.raises(ValueError, match="'/'"):
        send(t, "a/b", "rk", "k")


# -- faults --------------------------------------------------------------------------------
def test_unreachable_broker_fails_listen_and_send_clearly(make: Callable[..., Transport],
                                                          vhost: str) -> None:
    with FaultProxy(("127.0.0.1", 5672)) as proxy:
        proxy.refuse(True)
        t = make("connect_timeout=2", port=proxy.port, password="pw-not-shown")
        began = time.monotonic()
        with pytest.raises(TransportUnreachable) as err:
            listen(t, [Binding(f"ex-{uid()}", "rk")])
        assert "pw-not-shown" not in str(err.value)
        n = tidings.Notifier(t, "p", topics=["t"], retry=1, raise_on_failure=True)
        with pytest.raises(MessageDeliveryFailure) as err2:
            n.info({}, "x", {"key": "k"})
        assert "pw-not-shown" not in str(err2.value)
        assert time.monotonic() - began < 10


def test_a_cut_connection_is_reported_and_a_new_receiver_gets_the_message_again(
        make: Callable[..., Transport], vhost: str) -> None:
    """Cut without a clean close: receive() and settle() raise TransportUnreachable (the stale
    ack is not sent), and the next listen(), what the core calls then, redeclares the queue and
    gets the unsettled message again, flagged redelivered."""
    with FaultProxy(("127.0.0.1", 5672)) as proxy:
        via_proxy = make(port=proxy.port)
        direct = make()
        ex, rk = f"ex-{uid()}", f"cut-{uid()}"
        receiver = via_proxy.listen([Binding(ex, rk)], None, 5)
        try:
            send(direct, ex, rk, "before")
            deadline = time.monotonic() + WAIT
            got: list[IncomingMessage] = []
            while not got and time.monotonic() < deadline:
                got.extend(receiver.receive(5, 0.2))
            assert keys_of(got) == ["before"]
            assert proxy.cut() >= 1
            with pytest.raises(TransportUnreachable, match="lost its connection"):
                while time.monotonic() < deadline:
                    receiver.receive(5, 0.2)
            with pytest.raises(TransportUnreachable):
                receiver.settle([(got[0], "ack")])
        finally:
            receiver.close()
        listener = listen(via_proxy, [Binding(ex, rk)], prefetch=5)
        try:
            send(direct, ex, rk, "after")
            got = take(listener, 2)
            assert sorted(keys_of(got)) == ["after", "before"]
            assert [m.redelivered for m in got if m.message_id == "before"] == [True]
            for m in got:
                assert m.ack()
            assert nothing_more(listener) == []
        finally:
            listener.close()
        wait_until(lambda: queue_depth(vhost, rk) == 0, what="an empty queue")


def test_a_hung_connection_is_noticed_by_the_idle_timeout(
        make: Callable[..., Transport], caplog: pytest.LogCaptureFixture) -> None:
    """No RST, no FIN: bytes just stop. With heartbeat=1 (the AMQP 1.0 idle timeout) the
    listener notices within seconds, and once the network is back it reconnects and resumes."""
    with FaultProxy(("127.0.0.1", 5672)) as proxy:
        via_proxy = make("heartbeat=1&connect_timeout=2&reconnect_interval=0.1"
                         "&reconnect_max_interval=0.5", port=proxy.port)
        direct = make()
        ex, topic = f"ex-{uid()}", f"hung-{uid()}"
        inbox: queue.Queue[tuple[str, str]] = queue.Queue()
        listener = tidings.get_notification_listener(via_proxy, [Target(topic=topic, exchange=ex)],
                                                     [Collector(inbox, "l")])
        notifier = tidings.Notifier(direct, "p", topics=[topic], exchange=ex,
                                    raise_on_failure=True)
        listener.start()
        try:
            notifier.info({}, "x", {"key": "before"})
            assert drain(inbox, 1) == [("l", "before")]
            with caplog.at_level("WARNING", logger="tidings.transports.consumer"):
                proxy.stall()
                wait_until(lambda: "lost its connection" in caplog.text,
                           what="the listener to notice the hung connection", timeout=10)
                proxy.cut()  # what a timed-out TCP stack would do eventually
                proxy.resume()
            notifier.info({}, "x", {"key": "after"})
            got = drain(inbox, 1)
            if got == [("l", "before")]:
                # Its acknowledgement went out on the hung connection and never arrived, so the
                # broker redelivers it (at least once); nothing sent afterwards may repeat.
                got = drain(inbox, 1)
            assert got == [("l", "after")], got
            assert nothing_more_from(inbox) == []
        finally:
            listener.stop()
            assert listener.wait(WAIT)


def test_sender_recovers_after_the_connection_is_cut(make: Callable[..., Transport]) -> None:
    with FaultProxy(("127.0.0.1", 5672)) as proxy:
        t = make(port=proxy.port)
        n = tidings.Notifier(t, "p", topics=[f"s-{uid()}"], raise_on_failure=True)
        n.info({}, "x", {"key": "1"})
        assert proxy.cut() >= 1
        n.info({}, "x", {"key": "2"})  # the retry policy reconnects
        assert n.stats.snapshot()["sent"] == 2


# -- lifecycle -----------------------------------------------------------------------------
def test_cleanup_closes_connections_and_threads(make: Callable[..., Transport]) -> None:
    with FaultProxy(("127.0.0.1", 5672)) as proxy:
        t = make(port=proxy.port)
        ex, topic = f"ex-{uid()}", f"cu-{uid()}"
        inbox: queue.Queue[tuple[str, str]] = queue.Queue()
        listener = tidings.get_notification_listener(t, [Target(topic=topic, exchange=ex)],
                                                     [Collector(inbox, "l")])
        listener.start()
        tidings.Notifier(t, "p", topics=[topic], exchange=ex).info({}, "x", {"key": "k"})
        assert drain(inbox, 1) == [("l", "k")]
        io_thread = t._driver._loop._thread  # type: ignore[attr-defined]
        assert io_thread.is_alive()
        listener.stop()
        assert listener.wait(WAIT)
        t.cleanup()
        with pytest.raises(TransportClosed):
            t.send_raw(Target(topic=topic, exchange=ex), b"{}", message_id="late")
        wait_until(lambda: proxy.open_connections == 0, what="connections to close")
        io_thread.join(WAIT)
        assert not io_thread.is_alive()
