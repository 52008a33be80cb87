"""The broker scenarios that every broker driver runs the same way (rabbit:// and amqp://, both
against the package's private RabbitMQ node): a restart in the middle of a 10,000-message
stream, the retry rules while connections are refused, and a stream through repeated resets.

Each function runs one scenario for a URL scheme, asserts the promises and records the figures;
the test modules only choose the driver and its sizes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

import tidings
from tidings import MessageDeliveryFailure, Target
from tidings.testing.checker import DeliveryLog
from tidings.testing.proxy import FaultProxy
from tidings.testing.rabbitnode import RabbitNode

from .support import WAIT, LogWatch, Recorder, SendStream, first_after, started, summary, uid

__all__ = ["FAST", "Driver", "Gated", "broker_restart", "refused_retry_rules",
           "repeated_resets"]

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
                transport, [Target(topic, exchange)], [endpoint])
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
            listener = tidings.get_notification_listener(transport, [Target(topic)],
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
            listener = tidings.get_notification_listener(transport, [Target(topic)],
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
