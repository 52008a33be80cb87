"""The nats:// driver against the NATS JetStream on 127.0.0.1:4222, one namespace per test.

Beyond the conformance suite: the URL (hosts, credentials, TLS, options, masking), the layout
on the server (one stream per exchange, a durable consumer per group and routing key, created by
the first send), pools and the no-pool group, exchange isolation, headers and message ids,
filters, requeue with JetStream's delivery count across members, batches, join_consumer_pool,
per-topic de-duplication, a message over the server's max_payload refused alone, unreachable
servers, and memory storage declaring itself not durable. Every wait is bounded; every stream a
test made is deleted after it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import tidings
from tidings import NotificationResult, Target
from tidings.drivers.nats import NatsDriver
from tidings.testing.brokers import require_service
from tidings.testing.conformance_harness import RawListener, poll_until
from tidings.transports import envelope
from tidings.transports.base import Binding, IncomingMessage, OutgoingMessage
from tidings.transports.errors import (
    InvalidTransportOption,
    InvalidTransportURL,
    MessageTooLarge,
    TransportUnreachable,
)
from tidings.transports.url import TransportURL

WAIT = 15.0
HOW = "nats-server -js -a 127.0.0.1 -p 4222 &"


def uid() -> str:
    return uuid.uuid4().hex[:10]


def js_call(fn: Callable[[Any], Any]) -> Any:
    """Run ``await fn(jetstream)`` on a connection of its own, to look at the server."""
    import nats

    async def run() -> Any:
        nc = await nats.connect("nats://127.0.0.1:4222", allow_reconnect=False)
        try:
            return await fn(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(run())


@pytest.fixture
def namespace() -> Iterator[str]:
    require_service("nats", "127.0.0.1", 4222, how=HOW)
    name = f"fn-{uid()}"
    yield name

    async def drop(js: Any) -> None:
        for info in await js.streams_info():
            stream = info.config.name or ""
            if stream.startswith(f"tidings_{name}_"):
                await js.delete_stream(stream)

    js_call(drop)


@pytest.fixture
def transports(namespace: str) -> Iterator[Callable[..., tidings.Transport]]:
    made: list[tidings.Transport] = []
    listeners: list[Any] = []

    def build(query: str = "", **kw: Any) -> tidings.Transport:
        url = f"nats://127.0.0.1:4222/{namespace}" + (f"?{query}" if query else "")
        t = tidings.get_notification_transport(url, **kw)
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

    def wait_keys(self, keys: list[Any], member: str | tuple[str, ...] | None = None) -> None:
        want = Counter(keys)
        members = (member,) if isinstance(member, str) else member
        with self.cond:
            ok = self.cond.wait_for(lambda: not (want - Counter(
                k for m, k, _ in self.got if members is None or m in members)), WAIT)
        if not ok:
            pytest.fail(f"timed out waiting for {keys} at {member or 'any member'}; got "
                        f"{self.got}")


def listen(transports: Any, t: tidings.Transport, topic: str, endpoint: Any,
           **kw: Any) -> Any:
    listener = tidings.get_notification_listener(t, [Target(topic=topic)], [endpoint], **kw)
    transports.listeners.append(listener)
    listener.start()
    return listener


def wire(key: Any) -> tuple[str, bytes]:
    message_id = str(uuid.uuid4())
    return message_id, envelope.encode({
        "message_id": message_id, "publisher_id": "test", "event_type": "test.event",
        "priority": "INFO", "payload": {"key": key}, "timestamp": "2026-01-01 00:00:00"})


def send_keys(t: tidings.Transport, routing_key: str, keys: list[Any],
              exchange: str | None = None) -> None:
    for key in keys:
        message_id, body = wire(key)
        t.send_raw(Target(topic=routing_key, exchange=exchange), body, message_id=message_id)


def key_of(msg: IncomingMessage) -> Any:
    return envelope.decode(msg.body)["payload"]["key"]


def poll_for(listener: RawListener, window: float) -> list[IncomingMessage]:
    got: list[IncomingMessage] = []
    deadline = time.monotonic() + window
    while (left := deadline - time.monotonic()) > 0:
        got.extend(listener.poll(min(0.2, left)))
    return got


# -- the URL ------------------------------------------------------------------------------
def test_url_hosts_credentials_tls_and_masking() -> None:
    url = TransportURL.parse("nats+tls://alice:s%3Acret@n1:4222,n2/ns-1?token=tok&"
                             "tls_verify=false")
    d = NatsDriver(url, {**{k: o.default for k, o in NatsDriver.options.items()},
                         "token": "tok", "tls_verify": False})
    assert d.tls
    assert d.servers == ["tls://alice:s%3Acret@n1:4222", "tls://n2:4222"]
    assert d.namespace == "ns-1"
    assert d.stream_name("nova") == "tidings_ns-1_nova"
    assert d.subject("nova", "notifications.info") == "tidings.ns-1.nova.notifications.info"
    assert d.stream_name("a.b c") == "tidings_ns-1_a=2Eb=20c"
    assert "s:cret" not in d.describe() and "s%3Acret" not in d.describe()
    bare = NatsDriver(TransportURL.parse("nats://"), {k: o.default for k, o in
                                                      NatsDriver.options.items()})
    assert bare.servers == ["nats://127.0.0.1:4222"]
    assert bare.stream_name("x") == "tidings_=_x"
    assert bare.capabilities.durable


def test_bad_options_and_schemes_fail_fast_without_the_password() -> None:
    with pytest.raises(InvalidTransportOption) as info:
        tidings.get_notification_transport("nats://u:hunter2@127.0.0.1:4222/?storage=disk")
    assert "storage" in str(info.value) and "hunter2" not in str(info.value)
    with pytest.raises(InvalidTransportOption) as info:
        tidings.get_notification_transport("nats://u:hunter2@127.0.0.1:4222/?replicas=9")
    assert "replicas" in str(info.value)
    with pytest.raises(InvalidTransportOption) as info:
        tidings.get_notification_transport("nats://127.0.0.1:4222/?token=sekrit&tls=maybe")
    assert "sekrit" not in str(info.value)
    with pytest.raises(InvalidTransportURL) as bad_scheme:
        tidings.get_notification_transport("nats+ws://u:hunter2@127.0.0.1:4222/")
    assert "hunter2" not in str(bad_scheme.value)


def test_unreachable_server_is_retryable_and_masks_the_password() -> None:
    t = tidings.get_notification_transport("nats://bob:hunter2@127.0.0.1:1/?connect_timeout=1")
    try:
        driver: NatsDriver = t._driver  # type: ignore[assignment]
        [result] = driver.send_batch([OutgoingMessage("x", "t.info", b"{}", "id-1")], 2)
        assert isinstance(result, TransportUnreachable) and driver.retryable(result)
        assert "hunter2" not in str(result)
        with pytest.raises(TransportUnreachable) as info:
            t.listen([Binding("x", "t.info")])
        assert "hunter2" not in str(info.value)
    finally:
        t.cleanup()


def test_memory_storage_is_not_durable(transports: Any) -> None:
    assert transports().capabilities.durable
    t = transports("storage=memory")
    assert not t.capabilities.durable
    send_keys(t, "mem.info", ["m"])
    driver: NatsDriver = t._driver  # type: ignore[assignment]
    info = js_call(lambda js: js.stream_info(driver.stream_name("openstack")))
    assert info.config.storage == "memory"


# -- the layout on the server -------------------------------------------------------------
def test_first_send_makes_the_stream_and_the_group_consumer(transports: Any) -> None:
    t = transports()
    driver: NatsDriver = t._driver  # type: ignore[assignment]
    topic = f"lay-{uid()}"
    send_keys(t, f"{topic}.info", ["early"])
    stream = driver.stream_name("openstack")

    async def look(js: Any) -> Any:
        return await js.stream_info(stream), await js.consumers_info(stream)

    info, consumers = js_call(look)
    assert info.config.retention == "interest"
    assert info.config.subjects == [f"tidings.{driver.namespace}.openstack.>"]
    [group] = [c for c in consumers if c.name == f"g_{topic}=2Einfo"]
    assert group.config.filter_subject == driver.subject("openstack", f"{topic}.info")
    assert group.num_pending == 1  # waiting for the group's first listener
    rec = Recorder()
    listen(transports, t, topic, rec.endpoint("late"))
    rec.wait_keys(["early"])


def test_pools_each_get_a_copy_members_split_and_group_once(transports: Any) -> None:
    t = transports()
    topic = f"pools-{uid()}"
    rec = Recorder()
    hold = threading.Event()

    def slow(payload: Any) -> None:  # keep each member busy a moment so both take part
        hold.wait(0.05)

    for member in ("a1", "a2"):
        listener = tidings.get_notification_listener(
            t, [Target(topic=topic)], [rec.endpoint(member, slow)], pool="A")
        transports.listeners.append(listener)
        listener.start()
    listen(transports, t, topic, rec.endpoint("b"), pool="B")
    listen(transports, t, topic, rec.endpoint("g"))
    keys = list(range(40))
    send_keys(t, f"{topic}.info", keys)
    rec.wait_keys(keys, "b")
    rec.wait_keys(keys, "g")
    rec.wait_keys(keys, ("a1", "a2"))
    a = rec.keys("a1") + rec.keys("a2")
    assert sorted(a) == keys
    assert rec.keys("a1") and rec.keys("a2")


def test_exchange_isolation_uses_a_stream_each(transports: Any) -> None:
    t = transports()
    topic = f"iso-{uid()}"
    rec = Recorder()
    for ex in ("ex-a", "ex-b"):
        listener = tidings.get_notification_listener(
            t, [Target(topic=topic, exchange=ex)], [rec.endpoint(ex)])
        transports.listeners.append(listener)
        listener.start()
    send_keys(t, f"{topic}.info", ["a1", "a2"], exchange="ex-a")
    send_keys(t, f"{topic}.info", ["b1"], exchange="ex-b")
    rec.wait_keys(["a1", "a2"], "ex-a")
    rec.wait_keys(["b1"], "ex-b")
    assert sorted(rec.keys("ex-a")) == ["a1", "a2"] and rec.keys("ex-b") == ["b1"]
    driver: NatsDriver = t._driver  # type: ignore[assignment]
    assert driver.stream_name("ex-a") != driver.stream_name("ex-b")


# -- what a delivery carries ----------------------------------------------------------------
def test_message_id_and_headers_arrive(transports: Any) -> None:
    t = transports()
    topic = f"meta-{uid()}"
    receiver = RawListener(t.listen([Binding("openstack", f"{topic}.info")], None, 5), 5)
    try:
        message_id, body = wire("h")
        t.send_raw(Target(topic=f"{topic}.info"), body, message_id=message_id,
                   headers={"x-key-id": "k1", "x-other": "ü-2"})
        [msg] = poll_until(receiver, 1, WAIT)
        assert msg.message_id == message_id
        assert msg.headers == {"x-key-id": "k1", "x-other": "ü-2"}
        assert (msg.redelivered, msg.delivery_count) == (False, 1)
        assert msg.body == body
        assert msg.ack()
    finally:
        receiver.close()


def test_filters_and_metadata_reach_the_endpoint(transports: Any) -> None:
    t = transports()
    topic = f"filt-{uid()}"
    rec = Recorder()
    flt = tidings.NotificationFilter(event_type=r"^keep\.")
    endpoint = rec.endpoint("f")
    endpoint.filter_rule = flt
    listen(transports, t, topic, endpoint)
    n = tidings.Notifier(t, "pub.host", driver="messagingv2", topics=[topic])
    n.info({"request_id": "r1"}, "drop.me", {"key": "dropped"})
    n.info({"request_id": "r1"}, "keep.me", {"key": "kept"})
    rec.wait_keys(["kept"])
    [(_, _, metadata)] = [g for g in rec.got if g[1] == "kept"]
    assert metadata["message_id"] and metadata["timestamp"]
    assert rec.keys() == ["kept"]


def test_requeue_counts_deliveries_across_members(transports: Any) -> None:
    """JetStream counts deliveries (num_delivered), so max_deliveries holds across members."""
    t = transports()
    topic = f"rq-{uid()}"
    binding = Binding("openstack", f"{topic}.info")
    send_keys(t, f"{topic}.info", ["m"])
    for expected in (1, 2, 3):
        member = RawListener(t.listen([binding], None, 10), 10)
        try:
            [msg] = poll_until(member, 1, WAIT)
            assert key_of(msg) == "m"
            assert (msg.redelivered, msg.delivery_count) == (expected > 1, expected)
            assert msg.requeue() if expected < 3 else msg.ack()
            if expected == 3:
                member.poll(0.05)  # hand the ack over before closing
        finally:
            member.close()
    again = RawListener(t.listen([binding], None, 10), 10)
    try:
        assert poll_for(again, 0.6) == []
    finally:
        again.close()


def test_rejected_is_terminated_not_redelivered(transports: Any) -> None:
    t = transports()
    topic = f"rj-{uid()}"
    binding = Binding("openstack", f"{topic}.info")
    receiver = RawListener(t.listen([binding], None, 10), 10)
    try:
        send_keys(t, f"{topic}.info", ["bad", "good"])
        got = poll_until(receiver, 2, WAIT)
        for msg in got:
            assert msg.reject() if key_of(msg) == "bad" else msg.ack()
        assert poll_for(receiver, 0.6) == []
    finally:
        receiver.close()


def test_endpoint_requeue_comes_back(transports: Any) -> None:
    t = transports()
    topic = f"erq-{uid()}"
    rec = Recorder()
    seen: Counter[Any] = Counter()

    def once(payload: Any) -> Any:
        seen[payload["key"]] += 1
        return NotificationResult.REQUEUE if seen[payload["key"]] == 1 else None

    listen(transports, t, topic, rec.endpoint("r", once), allow_requeue=True)
    send_keys(t, f"{topic}.info", ["x"])
    rec.wait_keys(["x", "x"])


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
    got_all = threading.Event()

    def callback(m: dict[str, Any]) -> None:
        whole.append(m)
        if len(whole) == 12:
            got_all.set()

    handle = t.join_consumer_pool(callback, f"jcp-{topic}", f"{topic}.info")
    try:
        send_keys(t, f"{topic}.info", list(range(12)))
        with cond:
            assert cond.wait_for(lambda: sum(map(len, batches)) >= 12, WAIT)
        assert sorted(k for b in batches for k in b) == list(range(12))
        assert max(map(len, batches)) == 5
        assert got_all.wait(WAIT)
        assert {"message_id", "publisher_id", "event_type", "priority", "payload",
                "timestamp"} <= set(whole[0])
    finally:
        assert handle.stop(WAIT)


# -- sending -------------------------------------------------------------------------------
def test_same_message_id_on_two_topics_is_not_deduplicated_but_a_retry_is(
        transports: Any) -> None:
    t = transports()
    driver: NatsDriver = t._driver  # type: ignore[assignment]
    a, b = f"da-{uid()}", f"db-{uid()}"
    message_id, body = wire("same")
    out = [OutgoingMessage("openstack", f"{a}.info", body, message_id),
           OutgoingMessage("openstack", f"{b}.info", body, message_id),
           OutgoingMessage("openstack", f"{a}.info", body, message_id)]  # a retry of the first
    assert driver.send_batch(out, 5) == [None, None, None]
    for topic, count in ((a, 1), (b, 1)):
        r = RawListener(t.listen([Binding("openstack", f"{topic}.info")], None, 10), 10)
        try:
            got = poll_until(r, count, WAIT) + poll_for(r, 0.4)
            assert [m.message_id for m in got] == [message_id]
            for m in got:
                m.ack()
        finally:
            r.close()


def test_over_max_payload_is_refused_alone(transports: Any) -> None:
    t = transports()
    driver: NatsDriver = t._driver  # type: ignore[assignment]
    topic = f"big-{uid()}"
    small_id, small = wire("small")
    big = b"x" * (1024 * 1024 + 10)
    results = driver.send_batch([OutgoingMessage("openstack", f"{topic}.info", big, "big-1"),
                                 OutgoingMessage("openstack", f"{topic}.info", small,
                                                 small_id)], 5)
    assert isinstance(results[0], MessageTooLarge) and not driver.retryable(results[0])
    assert "max_payload" in str(results[0]) and "max_message_size=" in str(results[0])
    assert results[1] is None
    with pytest.raises(MessageTooLarge):
        t.send_raw(Target(topic=f"{topic}.info"), big, message_id="big-2")
    r = RawListener(t.listen([Binding("openstack", f"{topic}.info")], None, 10), 10)
    try:
        got = poll_until(r, 1, WAIT) + poll_for(r, 0.4)
        assert [m.message_id for m in got] == [small_id]
        got[0].ack()
    finally:
        r.close()


def test_a_deleted_stream_is_made_again_on_the_next_send(transports: Any) -> None:
    t = transports()
    driver: NatsDriver = t._driver  # type: ignore[assignment]
    topic = f"del-{uid()}"
    send_keys(t, f"{topic}.info", ["one"])
    js_call(lambda js: js.delete_stream(driver.stream_name("openstack")))
    send_keys(t, f"{topic}.info", ["two"])  # the core retries; the driver recreates
    rec = Recorder()
    listen(transports, t, topic, rec.endpoint("l"))
    rec.wait_keys(["two"])


def test_a_deleted_consumer_is_made_again_while_its_listener_pulls(transports: Any) -> None:
    t = transports()
    driver: NatsDriver = t._driver  # type: ignore[assignment]
    topic = f"delc-{uid()}"
    rec = Recorder()
    listen(transports, t, topic, rec.endpoint("l"))
    send_keys(t, f"{topic}.info", ["one"])
    rec.wait_keys(["one"])
    stream, durable = driver.stream_name("openstack"), "g_" + f"{topic}.info".replace(".", "=2E")
    js_call(lambda js: js.delete_consumer(stream, durable))

    async def made_again(js: Any) -> bool:
        try:
            await js.consumer_info(stream, durable)
            return True
        except Exception:
            return False

    # What is sent while no consumer exists has no interest and is dropped (the operator
    # deleted it): send once the listener made it again.
    poll_until_true(lambda: js_call(made_again), "the listener made its consumer again")
    send_keys(t, f"{topic}.info", ["two"])
    rec.wait_keys(["one", "two"])


# -- the sending loop: run by the senders, a keeper between sends ---------------------------
def test_senders_on_many_threads_are_each_confirmed(transports: Any) -> None:
    """Eight threads send at once through one transport: whichever thread runs the send loop,
    every send returns once its own publish ack is in, and every notification arrives once."""
    t = transports()
    topic = f"threads-{uid()}"
    rec = Recorder()
    listen(transports, t, topic, rec.endpoint("l"), executor="threading")
    notifier = tidings.Notifier(t, "test", topics=[topic], retry=0, raise_on_failure=True)
    errors: list[BaseException] = []

    def send(first: int) -> None:
        try:
            for key in range(first, first + 100):
                notifier.info({}, "test.event", {"key": key})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i * 100,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not errors and not any(thread.is_alive() for thread in threads), errors
    rec.wait_keys(list(range(800)))
    assert sorted(rec.keys()) == list(range(800))


def test_between_sends_a_keeper_runs_the_loop_and_gives_it_back(transports: Any) -> None:
    """After a send the keeper thread takes the send loop (so pings are answered and a lost
    connection is seen while nobody sends); the next send takes it back at once."""
    t = transports()
    driver: NatsDriver = t._driver  # type: ignore[assignment]
    topic = f"keeper-{uid()}"
    send_keys(t, f"{topic}.info", ["one"])
    io = driver.io_for_send()
    poll_until_true(lambda: io._runner == io._keeper.ident, "the keeper runs the loop")
    began = time.monotonic()
    send_keys(t, f"{topic}.info", ["two"])
    assert time.monotonic() - began < 1.0
    rec = Recorder()
    listen(transports, t, topic, rec.endpoint("l"))
    rec.wait_keys(["one", "two"])


def test_a_send_from_inside_a_running_asyncio_loop(transports: Any) -> None:
    """An application coroutine that calls the (blocking) notifier: its thread already runs an
    event loop, so the keeper runs the send loop for it."""
    t = transports()
    topic = f"async-{uid()}"
    notifier = tidings.Notifier(t, "test", topics=[topic], retry=0, raise_on_failure=True)

    async def app() -> None:
        for key in range(3):
            notifier.info({}, "test.event", {"key": key})

    asyncio.run(asyncio.wait_for(app(), WAIT))
    rec = Recorder()
    listen(transports, t, topic, rec.endpoint("l"))
    rec.wait_keys([0, 1, 2])


def poll_until_true(condition: Callable[[], bool], what: str) -> None:
    """Poll a state we cannot be notified of (which thread runs a loop), bounded."""
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.01)


# -- credentials against a real server --------------------------------------------------------
@pytest.fixture
def private_server(tmp_path: Any) -> Iterator[Callable[..., int]]:
    """Start a private nats-server with the given auth arguments; its client port."""
    import subprocess

    from tidings.testing.brokers import in_ci, service_up
    from tidings.testing.managed import free_port
    from tidings.testing.natscluster import nats_server_binary

    exe = nats_server_binary()
    if exe is None:
        msg = "nats-server is not installed (apt-get install nats-server)"
        if in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    procs: list[subprocess.Popen[bytes]] = []

    def start(*auth: str) -> int:
        port = free_port()
        store = tmp_path / f"s{port}"
        procs.append(subprocess.Popen([exe, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd",
                                       str(store), *auth], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 20
        while not service_up("127.0.0.1", port, timeout=0.2):
            assert time.monotonic() < deadline, f"private nats-server on {port} did not start"
            assert procs[-1].poll() is None, "private nats-server exited at start"
            time.sleep(0.05)
        return port

    yield start
    for p in procs:
        p.kill()
        p.wait(10)


def _round_trip(url: str) -> list[str]:
    t = tidings.get_notification_transport(url)
    try:
        got: list[str] = []
        done = threading.Event()

        class Endpoint:
            def info(self, ctxt: Any, pub: Any, event_type: str, payload: Any, md: Any) -> None:
                got.append(event_type)
                done.set()

        listener = tidings.get_notification_listener(t, [Target(topic="auth")], [Endpoint()])
        listener.start()
        tidings.Notifier(t, "p", topics=["auth"], retry=3).info({}, "auth.ok", {})
        assert done.wait(WAIT), "no notification through the authenticated server"
        listener.stop()
        assert listener.wait(WAIT)
        return got
    finally:
        t.cleanup()


def test_user_password_and_token_log_in_and_a_wrong_secret_is_refused_unmasked_never(
        private_server: Callable[..., int]) -> None:
    """user:pass in the URL (percent-encoded as any URL) and ``?token=`` log in to servers that
    require them; a wrong secret is refused at once, retryable, and never shown."""
    users = private_server("--user", "alice", "--pass", "s:cret/#1")
    tokens = private_server("--auth", "tok-9f2c")
    assert _round_trip(f"nats://alice:s%3Acret%2F%231@127.0.0.1:{users}/") == ["auth.ok"]
    assert _round_trip(f"nats://127.0.0.1:{tokens}/?token=tok-9f2c") == ["auth.ok"]
    for url, secret in [(f"nats://alice:wrong-pw-77@127.0.0.1:{users}/?connect_timeout=2",
                         "wrong-pw-77"),
                        (f"nats://127.0.0.1:{tokens}/?token=bad-tok-55&connect_timeout=2",
                         "bad-tok-55")]:
        t = tidings.get_notification_transport(url)
        try:
            driver: NatsDriver = t._driver  # type: ignore[assignment]
            [result] = driver.send_batch([OutgoingMessage("x", "t.info", b"{}", "id-1")], 5)
            assert result is not None, "a wrong secret was accepted"
            assert secret not in str(result) and secret not in repr(t)
        finally:
            t.cleanup()
