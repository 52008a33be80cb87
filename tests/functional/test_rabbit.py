"""The rabbit:// driver against the RabbitMQ on 127.0.0.1:5672, one fresh vhost per module.

What is checked here, beyond the conformance suite: the AMQP properties and topology on the wire
(the layout oslo.messaging expects), pools and the no-pool group, requeue to another member,
prefetch across several queues, acknowledgements batched but exact, dead-lettering of rejected
bodies, confirms of unroutable messages, pipelined confirms from several threads, declaration
mismatches, bad credentials, failover past a dead host, heartbeats under a slow endpoint, the
queue options (durable, quorum, expiry, TTL) and exchange isolation. Every name carries a uuid,
so tests never see each other's messages; the vhost and everything in it is deleted at the end.
Broker restarts are in test_rabbit_reconnect.py, on a private node.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import amqp
import pytest

import tidings
from tidings import (
    InvalidTransportOption,
    MessageDeliveryFailure,
    NotificationResult,
    Target,
    TransportUnreachable,
)
from tidings.drivers.rabbit import RabbitDriver
from tidings.drivers.rabbit.listener import QueueMismatch
from tidings.testing.brokers import rabbit_vhost, require_service
from tidings.testing.conformance_harness import RawListener
from tidings.transports import envelope
from tidings.transports.base import Binding, IncomingMessage
from tidings.transports.url import TransportURL

WAIT = 15.0  # the bound on every wait; a healthy run needs a fraction of a second


# -- fixtures and helpers ----------------------------------------------------------------
@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    require_service("rabbitmq")
    with rabbit_vhost("tidings-rabbit") as name:
        yield name


@pytest.fixture
def make_url(vhost: str) -> Callable[..., str]:
    def make(query: str = "", hosts: str = "guest:guest@127.0.0.1:5672") -> str:
        return f"rabbit://{hosts}/{vhost}" + (f"?{query}" if query else "")
    return make


@pytest.fixture
def transports(make_url: Callable[..., str]) -> Iterator[Callable[..., tidings.Transport]]:
    """Build transports on the module's vhost; all cleaned up after the test."""
    made: list[tidings.Transport] = []
    listeners: list[Any] = []

    def build(query: str = "", **kw: Any) -> tidings.Transport:
        t = tidings.get_notification_transport(make_url(query), **kw)
        made.append(t)
        return t

    build.listeners = listeners  # type: ignore[attr-defined]
    yield build
    for listener in listeners:
        listener.stop()
    for listener in listeners:
        assert listener.wait(WAIT), "a listener did not stop within its bound"
    for t in made:
        t.cleanup()


@pytest.fixture
def amqp_channel(vhost: str) -> Iterator[Any]:
    """A plain py-amqp channel on the vhost, to look at the broker from outside the driver."""
    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest",
                           virtual_host=vhost)
    conn.connect()
    channel = conn.channel()
    channel.auto_decode = False  # bodies as bytes, as sent
    yield channel
    conn.close()


def uid() -> str:
    return uuid.uuid4().hex[:10]


def queue_depth(channel: Any, queue: str) -> int:
    """Messages ready in ``queue`` (unacknowledged ones are not counted)."""
    return int(channel.queue_declare(queue, passive=True).message_count)


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll a broker-side fact (a queue depth) that nothing can signal us about."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        threading.Event().wait(0.05)


def rabbitmqctl_queues(vhost: str) -> dict[str, dict[str, Any]]:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    out = subprocess.run([exe, "list_queues", "-p", vhost, "name", "durable", "auto_delete",
                          "arguments", "--formatter", "json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    queues = {}
    for q in json.loads(out):
        # arguments come as [[name, type, value], ...]; [] when there are none
        q["arguments"] = {a[0]: a[-1] for a in q["arguments"]}
        queues[q["name"]] = q
    return queues


class Recorder:
    """Endpoint calls per member, with a condition to wait on."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.got: list[tuple[str, Any, dict[str, Any]]] = []

    def endpoint(self, member: str, on: Callable[[Any], Any] | None = None) -> Any:
        recorder = self

        class Endpoint:
            def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                     metadata: Any) -> Any:
                result = on(payload) if on is not None else None
                with recorder.cond:
                    recorder.got.append((member, payload.get("key"), metadata))
                    recorder.cond.notify_all()
                return result

        return Endpoint()

    def keys(self, member: str | None = None) -> list[Any]:
        with self.cond:
            return [k for m, k, _ in self.got if member is None or m == member]

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                pytest.fail(f"timed out after {timeout}s waiting for {what}; got "
                            f"{Counter(m for m, _, _ in self.got)}")

    def wait_keys(self, keys: list[Any], member: str | None = None) -> None:
        want = Counter(keys)
        self.wait(lambda: not (want - Counter(k for m, k, _ in self.got
                                              if member is None or m == member)),
                  f"{len(keys)} keys at {member or 'any member'}")


def listen(transports: Any, t: tidings.Transport, topic: str, endpoint: Any,
           **kw: Any) -> Any:
    listener = tidings.get_notification_listener(t, [Target(topic=topic)], [endpoint], **kw)
    transports.listeners.append(listener)
    listener.start()
    return listener


def raw(t: tidings.Transport, bindings: list[Binding], pool: str | None,
        prefetch: int) -> RawListener:
    """A driver receiver driven by hand, as the core drives it (poll, settle, close)."""
    return RawListener(t.listen(bindings, pool, prefetch), prefetch)


def poll_until(listener: RawListener, count: int, timeout: float = WAIT) -> list[IncomingMessage]:
    got: list[IncomingMessage] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"got {len(got)} of {count} messages within {timeout}s")
        got.extend(listener.poll(0.2))
    return got


def poll_for(listener: RawListener, window: float) -> list[IncomingMessage]:
    """Everything that arrives within ``window`` (for checks that something does not)."""
    got: list[IncomingMessage] = []
    deadline = time.monotonic() + window
    while (left := deadline - time.monotonic()) > 0:
        got.extend(listener.poll(min(0.2, left)))
    return got


def wire(key: Any, priority: str = "INFO") -> tuple[str, bytes]:
    message_id = str(uuid.uuid4())
    return message_id, envelope.encode({
        "message_id": message_id, "publisher_id": "test", "event_type": "test.event",
        "priority": priority, "payload": {"key": key}, "timestamp": "2026-01-01 00:00:00"})


def send_keys(t: tidings.Transport, routing_key: str, keys: list[Any],
              exchange: str | None = None, retry: int | None = 3) -> None:
    """Send raw notifications carrying ``keys`` under ``routing_key`` (``<topic>.info``)."""
    for key in keys:
        message_id, body = wire(key)
        t.send_raw(Target(topic=routing_key, exchange=exchange), body, message_id=message_id,
                   retry=retry)


def key_of(msg: IncomingMessage) -> Any:
    return envelope.decode(msg.body)["payload"]["key"]


# -- the URL ------------------------------------------------------------------------------
def test_url_defaults_failover_hosts_and_tls_options() -> None:
    """No host is guest@localhost:5672; several hosts keep their own credentials; TLS options
    need ssl=true; nothing shows a password."""
    def settings(url: str) -> Any:
        parsed = TransportURL.parse(url)
        driver = RabbitDriver(parsed, {**{k: o.default for k, o in RabbitDriver.options.items()},
                                       **{k: RabbitDriver.options[k].convert(k, v)
                                          for k, v in parsed.query.items()}})
        return driver.settings

    s = settings("rabbit://")
    assert [(e.hostname, e.port, e.username, e.password) for e in s.endpoints] == \
        [("localhost", 5672, "guest", "guest")]
    assert s.virtual_host == "/"
    s = settings("rabbit://a:pw1@h1:5673,b:pw2@h2/vh?ssl=true&ssl_ca_file=/ca.pem")
    assert [(e.hostname, e.port, e.username) for e in s.endpoints] == [("h1", 5673, "a"),
                                                                 ("h2", 5671, "b")]
    assert s.virtual_host == "vh"
    assert s.ssl_options["ca_certs"] == "/ca.pem"
    assert "server_hostname" in s.ssl_options  # None: kombu fills in the host, py-amqp checks it
    assert "server_hostname" not in settings("rabbit://h/?ssl=true&ssl_verify_hostname=false"
                                             ).ssl_options
    assert "pw1" not in repr(s) and "pw2" not in repr(s) and "pw1" not in s.shown
    with pytest.raises(InvalidTransportOption, match="ssl=true"):
        tidings.get_notification_transport("rabbit://u:secret@h/?ssl_ca_file=/ca.pem")
    with pytest.raises(InvalidTransportOption, match="heartbeat") as err:
        tidings.get_notification_transport("rabbit://u:secret@h/?heartbeat=often")
    assert "secret" not in str(err.value)
    with pytest.raises(InvalidTransportOption, match="quorum=true"):
        tidings.get_notification_transport("rabbit://h/?quorum_delivery_limit=3")
    with pytest.raises(InvalidTransportOption, match="queue_expiry"):
        tidings.get_notification_transport("rabbit://h/?queue_expiry=-1")


def test_capabilities_follow_the_options(transports: Any) -> None:
    plain = transports().capabilities
    assert plain.pools and plain.requeue and plain.requeue_to_other_member
    assert plain.at_least_once and plain.stores_without_listener and plain.confirmed_send
    assert plain.prefetch
    assert not plain.durable and not plain.dead_letter and not plain.exchanges
    rich = transports(f"durable=true&dead_letter_exchange=dlx-{uid()}&isolate_exchanges=true")
    assert rich.capabilities.durable and rich.capabilities.dead_letter
    assert rich.capabilities.exchanges
    assert transports("quorum=true").capabilities.durable


# -- the wire -----------------------------------------------------------------------------
def test_publish_properties_and_queue_declared_on_send(transports: Any, amqp_channel: Any,
                                                       vhost: str) -> None:
    """A notification is a persistent application/json utf-8 message with its message id, on a
    topic exchange, in queue <topic>.<priority> declared by the send itself (as oslo does)."""
    t = transports()
    topic = f"wire-{uid()}"
    notifier = tidings.Notifier(t, "compute.host1", topics=[topic], raise_on_failure=True)
    notifier.info({"user": "u1"}, "compute.instance.create.end", {"key": "k1"})
    queue = f"{topic}.info"
    msg = amqp_channel.basic_get(queue, no_ack=True)  # nobody listened: the send declared it
    assert msg is not None
    assert msg.properties["content_type"] == "application/json"
    assert msg.properties["content_encoding"] == "utf-8"
    assert msg.properties["delivery_mode"] == 2
    assert msg.delivery_info["exchange"] == "openstack"
    assert msg.delivery_info["routing_key"] == queue
    outer = json.loads(msg.body)
    assert outer["oslo.version"] == "2.0"
    inner = json.loads(outer["oslo.message"])
    assert msg.properties["message_id"] == inner["message_id"]
    assert inner["_context_user"] == "u1" and inner["priority"] == "INFO"
    # The exchange is a non-durable topic exchange, as oslo.messaging declares it by default:
    # a passive declare with other flags would fail, an equivalent one passes.
    amqp_channel.exchange_declare("openstack", "topic", passive=True)
    info = rabbitmqctl_queues(vhost)[queue]
    assert info["durable"] is False and info["auto_delete"] is False
    assert info["arguments"] == {}


def test_queue_options_durable_quorum_expiry_ttl(transports: Any, vhost: str) -> None:
    """durable, quorum, queue_expiry and message_ttl become the declared flags and arguments."""
    topics = {name: f"opt-{name}-{uid()}" for name in ("durable", "quorum", "ttl")}
    # Each on an exchange of its own: "openstack" is already declared non-durable here.
    for name, query in (("durable", "durable=true"),
                        ("quorum", "quorum=true&quorum_delivery_limit=5"),
                        ("ttl", "queue_expiry=120&message_ttl=60")):
        transports(query).send_raw(
            Target(topic=f"{topics[name]}.info", exchange=f"x-{topics[name]}"), wire(1)[1],
            message_id=name)
    queues = rabbitmqctl_queues(vhost)
    durable = queues[f"{topics['durable']}.info"]
    assert durable["durable"] is True and durable["arguments"] == {}
    quorum = queues[f"{topics['quorum']}.info"]
    assert quorum["durable"] is True
    assert quorum["arguments"]["x-queue-type"] == "quorum"
    assert quorum["arguments"]["x-delivery-limit"] == 5
    ttl = queues[f"{topics['ttl']}.info"]
    assert ttl["arguments"]["x-expires"] == 120_000
    assert ttl["arguments"]["x-message-ttl"] == 60_000


def test_quorum_queues_consume_requeue_and_bound_prefetch(transports: Any) -> None:
    """Quorum queues refuse a channel-wide prefetch, so with two queues the bound is split
    between the consumers; requeue and acknowledgement work as on classic queues."""
    t = transports("quorum=true")
    exchange, topic = f"qx-{uid()}", f"quorum-{uid()}"
    bindings = [Binding(exchange, f"{topic}.info"), Binding(exchange, f"{topic}.error")]
    listener = raw(t, bindings, None, 4)
    try:
        for i in range(6):
            t.send_raw(Target(topic=f"{topic}.info", exchange=exchange), wire(f"i{i}")[1],
                       message_id=f"i{i}")
            t.send_raw(Target(topic=f"{topic}.error", exchange=exchange), wire(f"e{i}", "ERROR")[1],
                       message_id=f"e{i}")
        held = poll_until(listener, 4) + poll_for(listener, 0.5)
        assert len(held) == 4, f"prefetch=4 across two quorum queues, got {len(held)}"
        requeued = key_of(held[0])
        assert held[0].requeue()
        acked = set()
        for m in held[1:]:
            m.ack()
            acked.add(key_of(m))
        back: list[IncomingMessage] = []
        while len(acked) < 12:
            for m in poll_until(listener, 1):
                if key_of(m) == requeued:
                    back.append(m)
                m.ack()
                acked.add(key_of(m))
        assert len(back) == 1 and back[0].redelivered, "the requeued message came back once"
    finally:
        listener.close()


# -- groups and pools ---------------------------------------------------------------------
def test_pools_each_get_a_copy_members_split_and_group_once(transports: Any) -> None:
    t = transports("prefetch=2")
    topic = f"pools-{uid()}"
    rec = Recorder()
    both_busy = threading.Barrier(2)

    def first_waits(payload: Any) -> None:
        # Hold each pool-A member on its first message until the other has one too, so the
        # split is proven without timing: prefetch=2 keeps the rest for the other member.
        if payload["key"] in (0, 1):
            try:
                both_busy.wait(5.0)
            except threading.BrokenBarrierError:
                pass

    for name in ("A1", "A2"):
        listen(transports, t, topic, rec.endpoint(name, first_waits), pool=f"A-{topic}")
    listen(transports, t, topic, rec.endpoint("B"), pool=f"B-{topic}")
    listen(transports, t, topic, rec.endpoint("G1"))
    listen(transports, t, topic, rec.endpoint("G2"))
    keys = list(range(40))
    send_keys(t, f"{topic}.info", keys)
    rec.wait_keys(keys, "B")
    rec.wait(lambda: len([k for m, k, _ in rec.got if m in ("A1", "A2")]) >= 40, "pool A")
    rec.wait(lambda: len([k for m, k, _ in rec.got if m in ("G1", "G2")]) >= 40, "group")
    a1, a2 = rec.keys("A1"), rec.keys("A2")
    assert sorted(a1 + a2) == keys, "pool A must get every message exactly once"
    assert a1 and a2, "both members of pool A must take part"
    assert sorted(rec.keys("G1") + rec.keys("G2")) == keys
    assert sorted(rec.keys("B")) == keys


def test_pool_queue_is_named_after_the_pool_and_bound_to_every_topic(
        transports: Any, amqp_channel: Any) -> None:
    t = transports()
    pool = f"pool-{uid()}"
    t1, t2 = f"ta-{uid()}", f"tb-{uid()}"
    other = f"other-{uid()}"
    listener = raw(t, [Binding("openstack", f"{t1}.info"), Binding(other, f"{t2}.error")], pool,
                   10)
    try:
        amqp_channel.queue_declare(pool, passive=True)
        send_keys(t, f"{t1}.info", ["a"])
        t.send_raw(Target(topic=f"{t2}.error", exchange=other), wire("b")[1], message_id="b",
                   retry=3)
        got = poll_until(listener, 2)
        assert sorted(key_of(m) for m in got) == ["a", "b"]
        for m in got:
            assert m.ack()
    finally:
        listener.close()


# -- requeue ------------------------------------------------------------------------------
def test_requeue_comes_back_then_acknowledged(transports: Any, amqp_channel: Any) -> None:
    t = transports()
    topic = f"requeue-{uid()}"
    rec = Recorder()
    seen: Counter[Any] = Counter()

    def once_requeue(payload: Any) -> Any:
        seen[payload["key"]] += 1
        return NotificationResult.REQUEUE if seen[payload["key"]] == 1 else None

    listen(transports, t, topic, rec.endpoint("L", once_requeue), allow_requeue=True)
    send_keys(t, f"{topic}.info", ["r1", "r2"])
    rec.wait_keys(["r1", "r1", "r2", "r2"])
    assert seen == {"r1": 2, "r2": 2}
    wait_until(lambda: queue_depth(amqp_channel, f"{topic}.info") == 0, "an empty queue")


def test_requeue_and_close_hand_messages_to_another_member(transports: Any) -> None:
    """A member requeues one message and stops while holding two more: the other member gets
    all three, marked redelivered; settling after close is a no-op."""
    t = transports()
    topic = f"other-{uid()}.info"
    a = raw(t, [Binding("openstack", topic)], f"p-{topic}", 10)
    b: RawListener | None = None
    try:
        send_keys(t, topic, ["x", "y", "z"])
        got = poll_until(a, 3)
        by_key = {key_of(m): m for m in got}
        assert by_key["x"].requeue()
        a.close()  # while holding y, z (and maybe x again)
        assert by_key["y"].ack() is False, "a message of a closed listener is settled already"
        b = raw(t, [Binding("openstack", topic)], f"p-{topic}", 10)
        rest = poll_until(b, 3)
        assert sorted(key_of(m) for m in rest) == ["x", "y", "z"]
        assert all(m.redelivered for m in rest)
        for m in rest:
            assert m.ack()
        assert poll_for(b, 0.5) == []
    finally:
        a.close()
        if b is not None:
            b.close()


# -- prefetch and acknowledgements --------------------------------------------------------
def test_prefetch_bounds_unsettled_across_several_queues(transports: Any) -> None:
    """The no-pool group consumes one queue per priority; prefetch bounds them together."""
    t = transports()
    topic = f"prefetch-{uid()}"
    bindings = [Binding("openstack", f"{topic}.info"), Binding("openstack", f"{topic}.error")]
    listener = raw(t, bindings, None, 4)
    try:
        for key in range(10):
            t.send_raw(Target(topic=f"{topic}.info"), wire(f"i{key}")[1], message_id=f"i{key}")
            t.send_raw(Target(topic=f"{topic}.error"), wire(f"e{key}", "ERROR")[1],
                       message_id=f"e{key}")
        held = poll_until(listener, 4)
        held += poll_for(listener, 0.5)
        assert len(held) == 4, f"prefetch=4 but {len(held)} unsettled messages were handed out"
        for m in held[:2]:
            m.ack()
        more = poll_until(listener, 2)
        more += poll_for(listener, 0.3)
        assert len(more) == 2
        total = held + more
        while len(total) < 20:
            for m in total:
                m.ack()
            total += poll_until(listener, 1)
        for m in total:
            m.ack()
        assert len({key_of(m) for m in total}) == 20
    finally:
        listener.close()


def test_acknowledgements_are_batched_but_exact(transports: Any, amqp_channel: Any) -> None:
    """Out-of-order acks, requeues and rejects mixed in one poll batch: each message is settled
    exactly as asked (a multiple ack must never cover the requeued one)."""
    t = transports()
    topic = f"acks-{uid()}.info"
    listener = raw(t, [Binding("openstack", topic)], None, 50)
    try:
        send_keys(t, topic, list(range(30)))
        got = poll_until(listener, 30)
        by_key = {key_of(m): m for m in got}
        for k in range(29, 10, -1):          # acks in reverse order
            by_key[k].ack()
        by_key[3].requeue()                  # in the middle of what is acked next
        for k in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10):
            by_key[k].ack()
        back = poll_until(listener, 1)
        assert [key_of(m) for m in back] == [3] and back[0].redelivered
        back[0].ack()
        assert poll_for(listener, 0.5) == []
    finally:
        listener.close()
    assert queue_depth(amqp_channel, topic) == 0, "every message was acknowledged"


def test_settlement_from_another_thread_frees_the_slot(transports: Any) -> None:
    t = transports()
    topic = f"thread-{uid()}.info"
    listener = raw(t, [Binding("openstack", topic)], None, 1)
    try:
        send_keys(t, topic, ["a", "b"])
        first = poll_until(listener, 1)
        assert poll_for(listener, 0.3) == [], "prefetch=1 allows one unsettled message"
        acker = threading.Thread(target=first[0].ack)
        acker.start()
        acker.join(WAIT)
        second = poll_until(listener, 1)
        assert [key_of(m) for m in second] == ["b"]
        second[0].ack()
    finally:
        listener.close()


# -- rejection and dead-lettering ---------------------------------------------------------
def test_malformed_bodies_are_dead_lettered_and_the_listener_keeps_going(
        transports: Any, amqp_channel: Any) -> None:
    dlx = f"dlx-{uid()}"
    t = transports(f"dead_letter_exchange={dlx}")
    assert t.capabilities.dead_letter
    topic = f"bad-{uid()}"
    rec = Recorder()
    listen(transports, t, topic, rec.endpoint("L"))
    bad = [b"\xff\xfe not utf-8", b"not json", b"[1, 2]", b'{"oslo.version": "9.0"}']
    for i, body in enumerate(bad):
        t.send_raw(Target(topic=f"{topic}.info"), body, message_id=f"bad-{i}")
    send_keys(t, f"{topic}.info", ["good"])
    rec.wait_keys(["good"])
    wait_until(lambda: queue_depth(amqp_channel, dlx) == len(bad), "dead letters")
    dead = []
    while (msg := amqp_channel.basic_get(dlx, no_ack=True)) is not None:
        dead.append(msg)
    assert sorted(m.body for m in dead) == sorted(bad)
    assert sorted(m.properties["message_id"] for m in dead) == [f"bad-{i}"
                                                               for i in range(len(bad))]
    assert queue_depth(amqp_channel, f"{topic}.info") == 0


def test_rejected_without_a_dead_letter_exchange_is_dropped_not_requeued(
        transports: Any, amqp_channel: Any) -> None:
    t = transports()
    topic = f"drop-{uid()}.info"
    listener = raw(t, [Binding("openstack", topic)], None, 10)
    try:
        send_keys(t, topic, ["gone"])
        msg = poll_until(listener, 1)[0]
        assert msg.reject()
        assert poll_for(listener, 0.5) == []
    finally:
        listener.close()
    assert queue_depth(amqp_channel, topic) == 0


# -- publisher confirms -------------------------------------------------------------------
def test_unroutable_send_is_retried_after_redeclaring(transports: Any, amqp_channel: Any,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The send-side queue was deleted behind the driver's back: the broker returns the message,
    the attempt fails, and the retry declares the queue again; nothing is lost."""
    t = transports()
    topic = f"unroutable-{uid()}"
    queue = f"{topic}.info"
    send_keys(t, f"{topic}.info", ["before"])
    amqp_channel.queue_delete(queue)
    with caplog.at_level(logging.WARNING, logger="tidings.transports.retry"):
        send_keys(t, f"{topic}.info", ["after"], retry=2)
    assert any("unroutable" in r.getMessage() for r in caplog.records)
    msg = amqp_channel.basic_get(queue, no_ack=True)
    assert msg is not None and key_of(msg) == "after"
    with pytest.raises(MessageDeliveryFailure, match="unroutable"):
        amqp_channel.queue_delete(queue)
        send_keys(t, f"{topic}.info", ["lost"], retry=0)


def test_concurrent_senders_pipeline_confirms(transports: Any) -> None:
    t = transports("prefetch=200")
    topic = f"pipeline-{uid()}"
    rec = Recorder()
    listen(transports, t, topic, rec.endpoint("L"))
    notifier = tidings.Notifier(t, "host", topics=[topic], raise_on_failure=True)
    errors: list[BaseException] = []

    def send(base: int) -> None:
        try:
            for i in range(150):
                notifier.info({}, "pipeline", {"key": base + i})
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n * 1000,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    keys = [n * 1000 + i for n in range(4) for i in range(150)]
    rec.wait_keys(keys)
    assert sorted(rec.keys()) == keys
    assert notifier.stats.snapshot()["sent"] == 600


# -- declarations that do not match -------------------------------------------------------
def test_existing_exchange_with_other_flags_is_used_as_it_is(
        transports: Any, amqp_channel: Any, caplog: pytest.LogCaptureFixture) -> None:
    exchange = f"durable-x-{uid()}"
    amqp_channel.exchange_declare(exchange, "topic", durable=True, auto_delete=False)
    t = transports()  # declares exchanges non-durable: RabbitMQ says 406 to that
    topic = f"mismatch-{uid()}"
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="tidings.drivers.rabbit"):
        listener = tidings.get_notification_listener(t, [Target(topic=topic, exchange=exchange)],
                                                     [rec.endpoint("L")])
        transports.listeners.append(listener)
        listener.start()
        notifier = tidings.Notifier(t, "h", topics=[topic], exchange=exchange,
                                    raise_on_failure=True, retry=0)
        notifier.info({}, "e", {"key": "m1"})
    rec.wait_keys(["m1"])
    assert any("already exists with other settings" in r.getMessage() for r in caplog.records)


def test_listener_on_a_queue_with_other_arguments_says_what_to_do(transports: Any,
                                                                   amqp_channel: Any) -> None:
    topic = f"args-{uid()}"
    amqp_channel.queue_declare(f"{topic}.info", durable=False, auto_delete=False,
                               arguments={"x-max-length": 10})
    t = transports()
    with pytest.raises(QueueMismatch, match="delete_queue"):
        t.listen([Binding("openstack", f"{topic}.info")], None, 10)


# -- connections --------------------------------------------------------------------------
def test_bad_credentials_fail_fast_without_retrying_and_without_the_password(
        make_url: Callable[..., str]) -> None:
    t = tidings.get_notification_transport(make_url(hosts="guest:wrong-secret@127.0.0.1:5672"))
    try:
        notifier = tidings.Notifier(t, "h", topics=["t"], raise_on_failure=True)  # forever
        began = time.monotonic()
        with pytest.raises(MessageDeliveryFailure) as err:
            notifier.info({}, "e", {})
        assert time.monotonic() - began < 5, "a refused login must not be retried"
        assert "refused" in str(err.value) and "wrong-secret" not in str(err.value)
        with pytest.raises(TransportUnreachable) as err2:
            t.listen([Binding("openstack", "t.info")], None, 1)
        assert "wrong-secret" not in str(err2.value)
    finally:
        t.cleanup()


def test_unreachable_broker_raises_transport_unreachable(vhost: str) -> None:
    t = tidings.get_notification_transport(f"rabbit://guest:guest@127.0.0.1:1/{vhost}"
                                           f"?connect_timeout=1")
    try:
        with pytest.raises(MessageDeliveryFailure, match=r"127\.0\.0\.1:1"):
            t.send_raw(Target(topic="t"), wire(1)[1], message_id="m", retry=1)
        with pytest.raises(TransportUnreachable, match="cannot connect"):
            t.listen([Binding("openstack", "t.info")], None, 1)
    finally:
        t.cleanup()


def test_failover_skips_a_dead_host(transports: Any, make_url: Callable[..., str]) -> None:
    hosts = "guest:guest@127.0.0.1:1,guest:guest@127.0.0.1:5672"
    t = tidings.get_notification_transport(make_url("connect_timeout=1", hosts=hosts))
    try:
        topic = f"failover-{uid()}"
        rec = Recorder()
        listen(transports, t, topic, rec.endpoint("L"))
        send_keys(t, f"{topic}.info", ["via-second-host"], retry=0)
        rec.wait_keys(["via-second-host"])
    finally:
        for listener in transports.listeners:
            listener.stop()
            listener.wait(WAIT)
        t.cleanup()


@pytest.mark.slow
def test_heartbeats_keep_a_slow_endpoint_connected(transports: Any, amqp_channel: Any,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """heartbeat=1: RabbitMQ drops a connection silent for about 2 s. An endpoint busy for 4 s
    must not lose its connection (the heartbeat thread speaks for it), so its message is
    acknowledged once and never redelivered."""
    t = transports("heartbeat=1")
    topic = f"heartbeat-{uid()}"
    rec = Recorder()

    def slow(payload: Any) -> None:
        if payload["key"] == "slow":
            threading.Event().wait(4.0)  # the endpoint is slow on purpose: that is the test

    with caplog.at_level(logging.WARNING, logger="tidings.drivers.rabbit"):
        listen(transports, t, topic, rec.endpoint("L", slow))
        send_keys(t, f"{topic}.info", ["slow"])
        rec.wait_keys(["slow"])
        send_keys(t, f"{topic}.info", ["after"])  # also proves the idle publisher stayed usable
        rec.wait_keys(["after"])
    assert rec.keys() == ["slow", "after"]
    assert not [r for r in caplog.records if "lost its connection" in r.getMessage()]
    wait_until(lambda: queue_depth(amqp_channel, f"{topic}.info") == 0, "an empty queue")


# -- exchanges ----------------------------------------------------------------------------
def test_oslo_naming_shares_the_group_queue_across_exchanges(transports: Any) -> None:
    """Why ``exchanges`` is not declared by default: oslo.messaging names the no-pool group's
    queue by routing key only, so a listener on exchange A also gets B's same-topic messages."""
    t = transports()
    topic = f"shared-{uid()}"
    rec = Recorder()
    listen(transports, t, topic, rec.endpoint("A"))
    tidings.Notifier(t, "h", topics=[topic], exchange=f"xa-{uid()}").info({}, "e", {"key": 1})
    tidings.Notifier(t, "h", topics=[topic], exchange=f"xb-{uid()}").info({}, "e", {"key": 2})
    # The listener is bound to exchange "openstack" only, yet both arrive: each send declared
    # queue <topic>.info and bound it to its own exchange, and that is the listener's queue.
    rec.wait_keys([1, 2])


def test_isolate_exchanges_keeps_same_topic_apart(transports: Any) -> None:
    t = transports("isolate_exchanges=true")
    topic = f"iso-{uid()}"
    xa, xb = f"xa-{uid()}", f"xb-{uid()}"
    rec = Recorder()
    for name, exchange in (("A", xa), ("B", xb)):
        listener = tidings.get_notification_listener(t, [Target(topic=topic, exchange=exchange)],
                                                     [rec.endpoint(name)])
        transports.listeners.append(listener)
        listener.start()
    send_keys(t, f"{topic}.info", ["a1", "a2"], exchange=xa)
    send_keys(t, f"{topic}.info", ["b1"], exchange=xb)
    rec.wait_keys(["a1", "a2"], "A")
    rec.wait_keys(["b1"], "B")
    send_keys(t, f"{topic}.info", ["a-end"], exchange=xa)
    send_keys(t, f"{topic}.info", ["b-end"], exchange=xb)
    rec.wait_keys(["a-end"], "A")
    rec.wait_keys(["b-end"], "B")
    assert sorted(rec.keys("A")) == ["a-end", "a1", "a2"]
    assert sorted(rec.keys("B")) == ["b-end", "b1"]


# -- batches and join_consumer_pool ---------------------------------------------------------
def test_batch_listener_and_join_consumer_pool(transports: Any) -> None:
    t = transports()
    topic = f"batch-{uid()}"
    batches: list[list[Any]] = []
    cond = threading.Condition()

    class BatchEndpoint:
        def info(self, messages: list[dict[str, Any]]) -> None:
            with cond:
                batches.append([m["payload"]["key"] for m in messages])
                cond.notify_all()

    listener = tidings.get_batch_notification_listener(
        t, [Target(topic=topic)], [BatchEndpoint()], batch_size=5, batch_timeout=0.5)
    transports.listeners.append(listener)
    listener.start()
    whole: list[dict[str, Any]] = []
    handle = t.join_consumer_pool(lambda m: (whole.append(m), None)[1], f"jcp-{topic}",
                                  f"{topic}.info")
    try:
        send_keys(t, f"{topic}.info", list(range(12)))
        with cond:
            assert cond.wait_for(lambda: sum(map(len, batches)) >= 12, WAIT)
        assert sorted(k for b in batches for k in b) == list(range(12))
        assert max(map(len, batches)) == 5
        wait_until(lambda: len(whole) == 12, "the consumer pool")
        assert {"message_id", "publisher_id", "event_type", "priority", "payload",
                "timestamp"} <= set(whole[0])
    finally:
        assert handle.stop(WAIT)
