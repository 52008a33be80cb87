"""The broker scenarios that every broker driver runs the same way (rabbit:// and amqp://, both
against the package's private RabbitMQ node): a restart in the middle of a 10,000-message
stream, the retry rules while connections are refused, a stream through repeated resets, and a
pool member SIGKILLed while it holds unacknowledged messages, and a slow consumer over a
large backlog (memory bounded by prefetch).

Each function runs one scenario for a URL scheme, asserts the promises and records the figures;
the test modules only choose the driver and its sizes.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import amqp
import pytest

import tidings
from tidings import MessageDeliveryFailure, Target
from tidings.testing.checker import DeliveryLog
from tidings.testing.proxy import FaultProxy
from tidings.testing.rabbitnode import RabbitNode
from tidings.transports import envelope

from .support import (
    WAIT,
    ListenerProcess,
    LogWatch,
    Recorder,
    SendStream,
    first_after,
    rss_bytes,
    started,
    summary,
    uid,
    wait_until,
)

__all__ = ["FAST", "Driver", "Gated", "broker_restart", "pool_member_sigkilled", "queue_counts",
           "refused_retry_rules", "repeated_resets", "slow_consumer_backlog"]

Figures = Callable[..., dict[str, Any]]
RETRY_LOG = "tidings.transports.retry"
FAST = ("connect_timeout=2&reconnect_interval=0.1&reconnect_max_interval=0.5"
        "&retry_interval=0.05&retry_max_interval=0.5")
"""Short reconnect and retry delays: recovery is measured, not waited out at the defaults."""


@dataclass(frozen=True)
class Driver:
    """A broker driver under test: its URL scheme, and the log line its listener writes when
    it has reconnected by itself."""

    scheme: str
    reconnect_logger: str
    reconnect_needle: str

    def url(self, port: int, vhost: str, query: str) -> str:
        return f"{self.scheme}://guest:guest@127.0.0.1:{port}/{vhost}?{query}"


class Gated(Recorder):
    """A Recorder whose endpoint blocks on the first message until ``gate`` opens, so the
    listener holds a full prefetch window of unacknowledged messages while the queue grows."""

    def __init__(self, log: DeliveryLog) -> None:
        super().__init__(log)
        self.gate = threading.Event()
        self.holding = threading.Event()

    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> None:
        if not self.gate.is_set():
            self.holding.set()
            self.gate.wait(WAIT)
        super().info(ctxt, publisher_id, event_type, payload, metadata)


def broker_restart(node: RabbitNode, vhost: str, driver: Driver, figures: Figures, *,
                   n: int = 10_000,
                   threads: int = 8, prefetch: int = 64, stop_after: int = 3000) -> None:
    """Durable queues, persistent messages, confirmed sends with retry=None from ``threads``
    threads. The node stops after ``stop_after`` sends, while the listener holds a full prefetch
    window and the queue holds a backlog; the notifier keeps going through the restart. Every
    confirmed notification is processed, none is lost; duplicates come only from the held
    window and from sends whose confirmation the restart swallowed."""
    topic = f"restart-{uid()}"
    exchange = f"durable-{uid()}"  # the vhost is shared: keep durable declarations apart
    log = DeliveryLog()
    endpoint = Gated(log)
    with LogWatch(RETRY_LOG, "failed (attempt") as retries:
        transport = tidings.get_notification_transport(driver.url(
            node.amqp_port, vhost, f"durable=true&prefetch={prefetch}&send_timeout=10&{FAST}"))
        try:
            assert transport.capabilities.durable
            listener = tidings.get_notification_listener(
                transport, [Target(topic=topic, exchange=exchange)], [endpoint])
            with started(listener):
                notifier = tidings.Notifier(transport, "reliability", topics=[topic],
                                            retry=None, raise_on_failure=True,
                                            exchange=exchange)
                stream = SendStream(notifier, log, range(n), threads=threads).start()
                assert endpoint.holding.wait(WAIT), "the listener got nothing"
                assert stream.wait_sent(stop_after), f"the stream stalled: {stream.errors}"
                t_stop = time.monotonic()
                sent_before_stop = len(stream.done_times())
                node.stop()
                endpoint.gate.set()  # the held message's ack goes to a dead link: dropped
                t_down = time.monotonic()
                node.start()
                t_up = time.monotonic()
                assert stream.join(WAIT * 2), "the notifier did not get through the restart"
                assert not stream.errors and not stream.failed, (stream.errors, stream.failed)
                sent = stream.sent_keys()
                assert len(sent) == n
                assert log.wait_acked(sent, WAIT), log.report().counts
        finally:
            transport.cleanup()
    report = log.report()
    row = figures(f"{driver.scheme}: broker restart mid-stream (durable, confirmed)",
                  **summary(report), recovery_s=first_after(endpoint.ack_times(), t_up),
                  first_send_after_up_s=first_after(stream.done_times(), t_up),
                  outage_s=t_up - t_stop, stop_s=t_down - t_stop,
                  sent_before_stop=sent_before_stop, send_retries=retries.count,
                  prefetch=prefetch, threads=threads)
    report.assert_valid(at_least_once=True, allow_duplicates=True)
    # Processed twice only: the window held at the restart, and sends whose confirmation was
    # lost with the connection (at most one in flight per sending thread).
    assert row["duplicates"] <= prefetch + threads, report.duplicated


def refused_retry_rules(node: RabbitNode, vhost: str, driver: Driver,
                        figures: Figures) -> None:
    """Through a FaultProxy: RST every connection and refuse new ones. retry=0 fails after one
    attempt, retry=N after N+1 (raising with raise_on_failure, logging otherwise), each within
    its bound; nothing refused reaches a listener; when the proxy accepts again the listener
    reconnects by itself and the next notifications arrive."""
    topic = f"refuse-{uid()}"
    log = DeliveryLog()
    endpoint = Recorder(log)
    with FaultProxy(("127.0.0.1", node.amqp_port)) as proxy:
        transport = tidings.get_notification_transport(driver.url(
            proxy.port, vhost, "connect_timeout=1&reconnect_interval=0.1"
                               "&reconnect_max_interval=0.5&retry_interval=0.05"
                               "&retry_max_interval=0.2&send_timeout=3"))
        try:
            listener = tidings.get_notification_listener(transport, [Target(topic=topic)],
                                                         [endpoint])
            with started(listener), \
                    LogWatch(driver.reconnect_logger, driver.reconnect_needle) as reconnected:
                notifier = tidings.Notifier(transport, "reliability", topics=[topic],
                                            retry=None, raise_on_failure=True)
                SendStream(notifier, log, range(50)).start().join()
                assert log.wait_acked(range(50), WAIT)

                proxy.refuse(True)
                assert proxy.cut() >= 2, "expected the listener's and the sender's links"
                attempts: dict[int, tuple[int, float]] = {}
                for retry, key in ((0, 1000), (3, 1001)):
                    strict = notifier.prepare(retry=retry)
                    with LogWatch(RETRY_LOG, "failed (attempt") as warned:
                        began = time.monotonic()
                        with pytest.raises(MessageDeliveryFailure) as err:
                            strict.info({}, "reliability.tick", {"key": key})
                        took = time.monotonic() - began
                    log.send_failed(key)
                    assert f"after {retry + 1} attempt(s) (retry={retry})" in str(err.value)
                    assert warned.count == retry, warned.messages()
                    # Each attempt is refused at once (connect_timeout=1 bounds it anyway);
                    # the waits between attempts are 0.05, 0.1, 0.2 s.
                    assert took < (retry + 1) * 1.0 + 0.35 + 2.0, took
                    attempts[retry] = (retry + 1, took)
                quiet = tidings.Notifier(transport, "reliability", topics=[topic], retry=2)
                with LogWatch("tidings.notify.notifier",
                              "could not send notification") as error_log:
                    quiet.info({}, "reliability.tick", {"key": 1002})  # logs, does not raise
                log.send_failed(1002)
                assert error_log.count == 1 and quiet.stats.snapshot()["failed"] == 1

                before = reconnected.count
                t_accept = time.monotonic()
                proxy.refuse(False)
                stream = SendStream(notifier, log, range(100, 150)).start()
                assert stream.join(WAIT) and not stream.failed
                assert log.wait_acked(range(100, 150), WAIT), log.report().counts
                assert reconnected.wait_for(before + 1, WAIT), \
                    "the listener did not log its reconnection"
        finally:
            transport.cleanup()
    report = log.report()
    report.assert_valid(at_least_once=True, allow_duplicates=True)
    # An acknowledgement still waiting to be grouped with others when the connection was cut
    # never reached the broker: such a message comes again (at least once). Only those.
    assert set(report.duplicated) <= set(range(50)), report.duplicated
    assert not report.recovered, "a send refused by the proxy still reached the listener"
    figures(f"{driver.scheme}: connection refused, retry rules", **summary(report),
            recovery_s=first_after(endpoint.ack_times(), t_accept),
            retry0_attempts=attempts[0][0], retry0_s=attempts[0][1],
            retry3_attempts=attempts[3][0], retry3_s=attempts[3][1])


def repeated_resets(node: RabbitNode, vhost: str, driver: Driver, figures: Figures, *,
                    n: int = 3000, threads: int = 4, prefetch: int = 32, cuts: int = 3) -> None:
    """``n`` notifications from ``threads`` threads with retry=None while every connection is
    reset (RST) ``cuts`` times mid-stream: nothing lost; duplicates only from the window the
    listener held at each cut and from sends whose confirmation the cut swallowed."""
    topic = f"resets-{uid()}"
    log = DeliveryLog()
    endpoint = Recorder(log)
    cut_times: list[float] = []
    with FaultProxy(("127.0.0.1", node.amqp_port)) as proxy, \
            LogWatch(RETRY_LOG, "failed (attempt") as retries:
        transport = tidings.get_notification_transport(driver.url(
            proxy.port, vhost, f"prefetch={prefetch}&send_timeout=5&{FAST}"))
        try:
            listener = tidings.get_notification_listener(transport, [Target(topic=topic)],
                                                         [endpoint])
            with started(listener):
                notifier = tidings.Notifier(transport, "reliability", topics=[topic],
                                            retry=None, raise_on_failure=True)
                stream = SendStream(notifier, log, range(n), threads=threads).start()
                for i in range(cuts):
                    assert stream.wait_sent((i + 1) * n // (cuts + 1)), stream.errors
                    cut_times.append(time.monotonic())
                    assert proxy.cut() >= 1
                assert stream.join(WAIT) and not stream.errors and not stream.failed
                assert log.wait_acked(stream.sent_keys(), WAIT), log.report().counts
        finally:
            transport.cleanup()
    report = log.report()
    sent_at = {key: t for t, key in stream.done_times()}
    # Per cut: until a notification sent after it has been processed (both sides are back).
    after = [min(t for t, key in endpoint.ack_times() if sent_at.get(key, 0.0) > cut) - cut
             for cut in cut_times]
    row = figures(f"{driver.scheme}: {cuts} connection resets mid-stream", **summary(report),
                  recovery_s=max(after), cuts=cuts,
                  send_retries=retries.count, connections_made=proxy.connections_made)
    report.assert_valid(at_least_once=True, allow_duplicates=True)
    assert row["duplicates"] <= cuts * (prefetch + threads), report.duplicated


def queue_counts(node: RabbitNode, vhost: str, queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) of one queue, as the broker sees them."""
    out = node.ctl("list_queues", "-p", vhost, "--no-table-headers", "--quiet", "name",
                   "messages_ready", "messages_unacknowledged")
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == queue:
            return int(parts[1]), int(parts[2])
    raise AssertionError(f"queue {queue!r} not found in vhost {vhost!r}: {out!r}")


def pool_member_sigkilled(node: RabbitNode, vhost: str, driver: Driver, figures: Figures, *,
                          n: int = 600, prefetch: int = 20) -> None:
    """Two members of one pool: a child process (prefetch 20) that blocks on its 6th message
    and so holds up to 20 unacknowledged, and one in this process. SIGKILL the child: the
    broker hands what it held to the survivor. Nothing lost; processed twice only what the
    child had processed while its acknowledgement still waited to go out."""
    topic, pool = f"kill-{uid()}", f"workers-{uid()}"
    log = DeliveryLog()
    survivor = Recorder(log)
    url = driver.url(node.amqp_port, vhost, FAST)
    victim = ListenerProcess("victim", url, log, topic=topic, pool=pool,
                             prefetch=prefetch, hold_after=5)
    transport = tidings.get_notification_transport(url)
    try:
        victim.wait_ready()
        listener = tidings.get_notification_listener(
            transport, [Target(topic=topic)], [survivor], pool=pool, prefetch=prefetch)
        with started(listener):
            notifier = tidings.Notifier(transport, "reliability", topics=[topic],
                                        retry=None, raise_on_failure=True)
            stream = SendStream(notifier, log, range(n), threads=4).start()
            assert stream.join(WAIT) and not stream.failed
            assert victim.holding.wait(WAIT), "the victim never took a message"
            # Everything but what the victim sits on gets processed by the survivor, and the
            # broker shows only the victim's window unacknowledged.
            wait_until(lambda: len(log.acked_ids()) >= n - prefetch,
                       "the survivor to process all but the victim's window")

            def only_the_window_left() -> bool:
                # The victim's unprocessed messages plus, where the driver groups acks (rabbit),
                # the ones it processed whose ack was still waiting: never more than its window.
                ready, unacked = queue_counts(node, vhost, pool)
                return ready == 0 and n - len(log.acked_ids()) <= unacked <= prefetch

            wait_until(only_the_window_left, "the broker to show only the victim's window "
                       "unacknowledged", every=0.2)
            held = n - len(log.acked_ids())
            t_kill = time.monotonic()
            victim.kill()
            assert log.wait_acked(range(n), WAIT), log.report().counts
            recovery = time.monotonic() - t_kill
    finally:
        victim.stop()
        transport.cleanup()
    report = log.report()
    figures(f"{driver.scheme}: pool member SIGKILLed holding messages", **summary(report),
            recovery_s=recovery, held_unprocessed=held,
            victim_processed=len(victim.processed_keys()),
            survivor_processed=len(survivor.ack_times()))
    report.assert_valid(at_least_once=True, allow_duplicates=True)
    # Processed twice only if the victim processed it and its acknowledgement was still waiting
    # to be grouped with others when it was killed (at least once, as promised).
    assert set(report.duplicated) <= set(victim.processed_keys()), report.duplicated
    assert 0 < held <= prefetch, held


def fill_raw(node: RabbitNode, vhost: str, exchange: str, routing_key: str, log: DeliveryLog,
             keys: range, pad: str) -> None:
    """Queue a backlog fast: the bytes and properties the Notifier sends, published over py-amqp
    without a confirmation round trip per message (20,000 confirmed sends take 7-30 s on a
    loaded 2-core machine; these take about one). The caller checks the queue's count."""
    conn = amqp.Connection(f"127.0.0.1:{node.amqp_port}", userid="guest", password="guest",
                           virtual_host=vhost, connect_timeout=5)
    conn.connect()
    try:
        channel = conn.channel()
        for key in keys:
            message_id = str(uuid.uuid4())
            wire = {"message_id": message_id, "publisher_id": "reliability",
                    "event_type": "reliability.tick", "priority": "INFO",
                    "payload": {"key": key, "pad": pad}, "timestamp": "2026-01-01 00:00:00"}
            body = envelope.encode(envelope.pack_context(wire, {}), 2.0)
            channel.basic_publish(
                amqp.Message(body, content_type="application/json", content_encoding="utf-8",
                             delivery_mode=2, message_id=message_id),
                exchange=exchange, routing_key=routing_key)
            log.sent(key)
    finally:
        conn.close()


def slow_consumer_backlog(node: RabbitNode, vhost: str, driver: Driver, figures: Figures, *,
                          n: int = 20_000, prefetch: int = 50) -> None:
    """20,000 notifications of ~1 KB queued, a listener with prefetch 50 whose endpoint takes
    2 ms: the core's in-flight count, the driver's held messages and the broker's unacknowledged
    count never exceed 50, and the process's RSS stays flat while ~19,000 wait in the queue.
    Then the endpoint speeds up and drains everything: nothing lost."""
    pad = "x" * 1000
    topic = f"backlog-{uid()}"
    log = DeliveryLog()
    endpoint = Recorder(log, delay=0.002)
    transport = tidings.get_notification_transport(driver.url(node.amqp_port, vhost, FAST))
    try:
        notifier = tidings.Notifier(transport, "reliability", topics=[topic], retry=None,
                                    raise_on_failure=True)
        began = time.monotonic()
        # The first through tidings (it declares the exchange, queue and binding), the rest
        # published raw: the backlog is the setup here, not the path under test.
        SendStream(notifier, log, [0], payload={"pad": pad}).start().join()
        fill_raw(node, vhost, "openstack", f"{topic}.info", log, range(1, n), pad)
        wait_until(lambda: queue_counts(node, vhost, f"{topic}.info")[0] == n,
                   f"{n} notifications queued", every=0.3)
        fill_s = time.monotonic() - began

        driver_listeners: list[Any] = []
        open_listener = transport.listen

        def capture(*args: Any, **kwargs: Any) -> Any:
            made = open_listener(*args, **kwargs)
            driver_listeners.append(made)
            return made

        transport.listen = capture  # type: ignore[method-assign]  # to read its window
        gc.collect()
        baseline = rss_bytes()
        samples: list[tuple[int, int, int]] = []  # (core in flight, driver held, rss)
        stop_sampling = threading.Event()
        # Blocking: one message at a time is a slow consumer (worker threads would run the
        # whole window of 2 ms endpoints at once and drain the backlog in a second).
        listener = tidings.get_notification_listener(transport, [Target(topic=topic)],
                                                     [endpoint], prefetch=prefetch,
                                                     executor="blocking")

        def sample() -> None:
            while not stop_sampling.wait(0.02):
                held = len(driver_listeners[0]._held) if driver_listeners else 0
                samples.append((int(listener.stats.snapshot()["in_flight"]), held,
                                rss_bytes()))

        sampler = threading.Thread(target=sample, name="backlog-sampler", daemon=True)
        with started(listener):
            sampler.start()
            wait_until(lambda: len(log.acked_ids()) >= 200, "the slow consumer to start")
            broker_views = [queue_counts(node, vhost, f"{topic}.info") for _ in range(2)]
            slow_rss = max(s[2] for s in samples)
            slow_processed = len(log.acked_ids())
            endpoint.delay = 0.0
            t_fast = time.monotonic()
            assert log.wait_acked(range(n), WAIT), log.report().counts
            drain_s = time.monotonic() - t_fast
            stop_sampling.set()
            sampler.join(5)
    finally:
        transport.cleanup()
    report = log.report()
    max_core = max(s[0] for s in samples)
    max_driver = max(s[1] for s in samples)
    max_broker = max(unacked for _, unacked in broker_views)
    min_backlog = min(ready for ready, _ in broker_views)
    growth_mb = (slow_rss - baseline) / 2**20
    backlog_mb = n * (len(pad) + 300) / 2**20
    figures(f"{driver.scheme}: slow consumer, {n:,} backlog", **summary(report),
            recovery_s=None, prefetch=prefetch, max_in_flight_core=max_core,
            max_held_driver=max_driver, max_unacked_broker=max_broker,
            backlog_while_slow=min_backlog, rss_growth_mb=round(growth_mb, 1),
            backlog_mb=round(backlog_mb, 1), samples=len(samples), fill_s=fill_s,
            slow_processed=slow_processed, drain_s=drain_s)
    assert max_core <= prefetch and max_driver <= prefetch and max_broker <= prefetch
    assert min_backlog > n // 2, "the backlog drained before memory was measured"
    # Holding the backlog would take at least its bodies (~20 MB); prefetch 50 holds ~60 KB.
    assert growth_mb < backlog_mb / 2, (growth_mb, backlog_mb)
    report.assert_valid(at_least_once=True, allow_duplicates=False)
