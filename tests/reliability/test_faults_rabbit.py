"""rabbit:// under faults, with figures: a broker restart in the middle of 10,000 durable,
confirmed notifications; connections cut without a close (retry rules, listeners resuming); a
pool member SIGKILLed while it holds unacknowledged messages; a slow consumer over a 20,000
message backlog (memory bounded by prefetch); a memory alarm blocking publishers.

Everything runs on the package's private node (conftest.py), never on the shared broker; the
FaultProxy sits between the client and that node. tests/functional/test_rabbit_reconnect.py
already pins down the small versions (a restart and a kill with a held message, failover, TLS
with a client certificate, an RST and a hung connection with 20-60 messages); these are the same
promises at scale, measured.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tidings
from tidings import MessageDeliveryFailure, Target, TransportUnreachable
from tidings.testing.checker import DeliveryLog
from tidings.testing.proxy import FaultProxy
from tidings.testing.rabbitnode import RabbitNode
from tidings.transports.base import Binding

from .scenarios import (
    FAST,
    Driver,
    broker_restart,
    pool_member_sigkilled,
    refused_retry_rules,
    repeated_resets,
    slow_consumer_backlog,
)
from .support import (
    WAIT,
    LogWatch,
    Recorder,
    SendStream,
    started,
    summary,
    uid,
    wait_until,
)

pytestmark = pytest.mark.slow

Figures = Callable[..., dict[str, Any]]
RETRY_LOG = "tidings.transports.retry"
RABBIT = Driver("rabbit", "tidings.transports.consumer", "reconnected")


# -- 1. a broker restart in the middle of 10,000 ------------------------------------------------
def test_rabbit_broker_restart_mid_stream_of_10000(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    """10,000 durable, confirmed notifications from 8 threads (retry=None); the node restarts
    after 3,000 while the listener holds 64 unacknowledged: none lost (see
    scenarios.broker_restart)."""
    broker_restart(node, vhost, RABBIT, figures, n=10_000, threads=8, prefetch=64)


# -- 2. connections cut without a close ------------------------------------------------------
def test_rabbit_retry_rules_hold_while_the_connection_is_refused(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    refused_retry_rules(node, vhost, RABBIT, figures)


def test_rabbit_stream_through_repeated_connection_resets(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    repeated_resets(node, vhost, RABBIT, figures, n=3000, threads=4, prefetch=32, cuts=3)


def test_rabbit_background_notifier_pipelines_through_connection_resets(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    """20,000 notifications queued in a BackgroundNotifier (pipeline 64, retry=None) while every
    connection is reset 3 times as the backlog drains: each cut fails a pipelined batch in
    flight, whose notifications are retried alone; flush() returns only when the broker has
    confirmed all of them, and the listener processes every one (at least once)."""
    n, cuts = 20_000, 3
    topic = f"pipelined-{uid()}"
    log = DeliveryLog()
    endpoint = Recorder(log)
    with FaultProxy(("127.0.0.1", node.amqp_port)) as proxy, \
            LogWatch(RETRY_LOG, "failed (attempt") as retries:
        transport = tidings.get_notification_transport(RABBIT.url(
            proxy.port, vhost, f"prefetch=32&send_timeout=5&{FAST}"))
        try:
            listener = tidings.get_notification_listener(transport, [Target(topic=topic)],
                                                         [endpoint])
            with started(listener):
                notifier = tidings.BackgroundNotifier(transport, "reliability", topics=[topic],
                                                      retry=None, queue_size=n, pipeline=64)
                began = time.monotonic()
                for key in range(n):
                    notifier.info({}, "reliability.tick", {"key": key})
                confirmed_at_cut = []
                for i in range(cuts):
                    goal = (i + 1) * n // (cuts + 2)
                    wait_until(lambda goal=goal: notifier.stats.snapshot()["sent"] >= goal,
                               f"{goal} confirmed sends")
                    assert proxy.cut() >= 1
                    confirmed_at_cut.append(notifier.stats.snapshot()["sent"])
                assert notifier.flush(WAIT), f"{notifier.pending()} still queued"
                drained_s = time.monotonic() - began
                stats = notifier.stats.snapshot()
                assert notifier.close(5)
                assert stats["sent"] == n and stats["failed"] == 0, stats
                # The cuts landed while the backlog was still draining (else this proves
                # nothing about pipelined batches).
                assert max(confirmed_at_cut) < n, confirmed_at_cut
                for key in range(n):
                    log.sent(key)
                assert log.wait_acked(range(n), WAIT), log.report().counts
        finally:
            transport.cleanup()
    report = log.report()
    row = figures("rabbit: pipelined BackgroundNotifier, 3 resets", **summary(report),
                  recovery_s=None, cuts=cuts, send_retries=retries.count,
                  confirmed_at_cuts="/".join(map(str, confirmed_at_cut)),
                  confirmed_per_s=round(n / drained_s), connections_made=proxy.connections_made)
    report.assert_valid(at_least_once=True, allow_duplicates=True)
    # Duplicates come from the listener's window at each cut and from pipelined sends whose
    # confirmation the cut swallowed (at most one batch per cut).
    assert row["duplicates"] <= cuts * (32 + 64), report.duplicated


# -- 3. a pool member killed while holding messages ---------------------------------------------
def test_rabbit_pool_member_sigkilled_while_holding_messages(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    pool_member_sigkilled(node, vhost, RABBIT, figures)


# -- 4. a slow consumer over a large backlog ------------------------------------------------------
def test_rabbit_slow_consumer_large_backlog_memory_bounded_by_prefetch(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    slow_consumer_backlog(node, vhost, RABBIT, figures)


# -- 5. a memory alarm blocks publishers -----------------------------------------------------------
def _alarms(node: RabbitNode) -> str:
    return node.ctl("eval", "rabbit_alarm:get_alarms().")


def test_rabbit_memory_alarm_bounded_failure_then_recovery(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    """The node raises its memory alarm (watermark 1e-7) and blocks every publishing connection.
    A notifier with retry=2 and send_timeout=1 fails with MessageDeliveryFailure after 3 attempts
    in about 3 s, naming the alarm (each attempt waits send_timeout; once the driver has seen
    connection.blocked it publishes nothing more on that connection and keeps it, instead of
    reconnecting and leaving one more copy per attempt). A retry=None send keeps trying, by its
    rule, and gets through once the alarm is lifted; the listener gets every notification."""
    retry, send_timeout = 2, 1.0
    topic = f"alarm-{uid()}"
    log = DeliveryLog()
    endpoint = Recorder(log)
    transport = tidings.get_notification_transport(node.url(
        vhost, query=f"send_timeout={send_timeout}&retry_interval=0.1"
                     f"&retry_max_interval=0.2&connect_timeout=2"))
    alarmed = False
    try:
        listener = tidings.get_notification_listener(transport, [Target(topic=topic)],
                                                     [endpoint])
        with started(listener):
            notifier = tidings.Notifier(transport, "reliability", topics=[topic],
                                        retry=retry, raise_on_failure=True)
            SendStream(notifier, log, range(10)).start().join()
            assert log.wait_acked(range(10), WAIT)

            node.ctl("set_vm_memory_high_watermark", "0.0000001")
            alarmed = True
            wait_until(lambda: "memory" in _alarms(node), "the memory alarm", every=0.3)
            began = time.monotonic()
            with pytest.raises(MessageDeliveryFailure) as err:
                notifier.info({}, "reliability.tick", {"key": 100})
            fail_s = time.monotonic() - began
            log.send_failed(100)
            assert f"after {retry + 1} attempt(s)" in str(err.value), err.value
            assert "blocking publishers" in str(err.value), err.value
            # (retry + 1) attempts of send_timeout each, the waits between them (0.1 +
            # 0.2 s), reconnecting, and slack for a loaded machine.
            assert fail_s < (retry + 1) * (send_timeout + 1.0) + 0.3 + 3.0, fail_s

            patient = notifier.prepare(retry=None)
            with LogWatch(RETRY_LOG, "failed (attempt") as warned:
                stream = SendStream(patient, log, [101]).start()
                assert warned.wait_for(2, WAIT), "the retry=None send did not retry"
                assert not stream.join(0.0), "a send got through a blocked broker"
                t_lift = time.monotonic()  # rabbitmqctl itself takes about a second
                node.ctl("set_vm_memory_high_watermark", "0.4")
                alarmed = False
                assert stream.join(WAIT) and not stream.failed and not stream.errors
                lifted_after = time.monotonic() - t_lift
                attempts_blocked = warned.count + 1
            SendStream(notifier, log, range(102, 112)).start().join()
            assert log.wait_acked([*range(10), 101, *range(102, 112)], WAIT)
    finally:
        if alarmed:
            node.ctl("set_vm_memory_high_watermark", "0.4")
        transport.cleanup()
    report = log.report()
    copies = {key: sum(1 for k, e in log.history if k == key and e == "ack")
              for key in (100, 101)}
    figures("rabbit: memory alarm blocks publishers", **summary(report),
            recovery_s=lifted_after, retry=retry, send_timeout=send_timeout,
            fail_after_s=fail_s, failed_send_copies=copies[100],
            patient_attempts=attempts_blocked, patient_send_copies=copies[101])
    report.assert_valid(at_least_once=True, allow_duplicates=True)
    # The broker reads the first publish on a connection before it blocks it, so the "failed"
    # send may still arrive once the alarm clears (recovered); after that the driver publishes
    # nothing on the blocked connection, so no attempt adds a copy, and the patient send arrives
    # once (twice if its first attempt came before the block). Nothing else is duplicated.
    assert set(report.duplicated) <= {101}, report.duplicated
    assert copies[100] <= 1 and 1 <= copies[101] <= 2, copies


def test_rabbit_disk_alarm_blocks_publishers_and_a_background_notifier_waits_it_out(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    """The node raises its disk alarm alone (disk_free_limit far above the free space). A
    Notifier with retry=1 fails naming the alarm; a pipelined BackgroundNotifier (retry=None)
    keeps taking notifications without blocking its caller and confirms none while the alarm
    holds; once the limit is lowered, flush() returns and the listener gets every one."""
    topic = f"disk-{uid()}"
    log = DeliveryLog()
    endpoint = Recorder(log)
    transport = tidings.get_notification_transport(node.url(
        vhost, query="send_timeout=1&retry_interval=0.1&retry_max_interval=0.2"
                     "&connect_timeout=2"))
    alarmed = False
    try:
        listener = tidings.get_notification_listener(transport, [Target(topic=topic)], [endpoint])
        with started(listener):
            notifier = tidings.Notifier(transport, "reliability", topics=[topic], retry=1,
                                        raise_on_failure=True)
            SendStream(notifier, log, range(5)).start().join()
            assert log.wait_acked(range(5), WAIT)

            node.ctl("set_disk_free_limit", "100000GB")
            alarmed = True
            wait_until(lambda: "disk" in _alarms(node), "the disk alarm", every=0.3)
            began = time.monotonic()
            with pytest.raises(MessageDeliveryFailure, match="blocking publishers"):
                notifier.info({}, "reliability.tick", {"key": 100})
            fail_s = time.monotonic() - began
            log.send_failed(100)

            background = tidings.BackgroundNotifier(transport, "reliability", topics=[topic],
                                                    retry=None)
            keys = range(200, 300)
            for key in keys:
                background.info({}, "reliability.tick", {"key": key})  # never blocks
            assert not background.flush(2.0), "sends were confirmed through a disk alarm"
            assert background.stats.snapshot()["sent"] == 0
            t_lift = time.monotonic()
            node.ctl("set_disk_free_limit", "50MB")
            alarmed = False
            assert background.flush(WAIT), f"{background.pending()} still unconfirmed"
            lifted_after = time.monotonic() - t_lift
            stats = background.stats.snapshot()
            assert background.close(5)
            assert stats["sent"] == len(keys) and stats["failed"] == 0, stats
            for key in keys:
                log.sent(key)
            assert log.wait_acked([*range(5), *keys], WAIT), log.report().counts
    finally:
        if alarmed:
            node.ctl("set_disk_free_limit", "50MB")
        transport.cleanup()
    report = log.report()
    copies = sum(1 for k, e in log.history if k == 100 and e == "ack")
    figures("rabbit: disk alarm, background notifier", **summary(report),
            recovery_s=lifted_after, fail_after_s=fail_s, failed_send_copies=copies,
            queued_during_alarm=len(keys))
    report.assert_valid(at_least_once=True, allow_duplicates=True)
    assert copies <= 1 and not set(report.duplicated) - {100}, report.duplicated


# -- TLS: hostname verification is on unless switched off -------------------------------------
def _tls_listen(node: RabbitNode, host: str, query: str) -> None:
    t = tidings.get_notification_transport(
        f"rabbit://guest:guest@{host}:{node.tls_port}/?ssl=true&connect_timeout=3&{query}")
    try:
        t.listen([Binding("openstack", f"tls-{uid()}.info")], None, 1).close()
    finally:
        t.cleanup()


def test_rabbit_tls_verifies_the_hostname_by_default(node: RabbitNode, pki: Path) -> None:
    """The node's certificate names DNS:localhost only. Connecting to 127.0.0.1 with the right
    CA is refused for the name mismatch unless ssl_verify_hostname=false; a CA that did not
    sign the certificate is refused whatever the name. (Client certificates and a certificate
    naming the IP are covered by tests/functional/test_rabbit_reconnect.py.)"""
    ca, other = pki / "ca.pem", pki / "other-ca.pem"
    with pytest.raises(TransportUnreachable, match=re.compile("mismatch", re.I)):
        _tls_listen(node, "127.0.0.1", f"ssl_ca_file={ca}")
    _tls_listen(node, "127.0.0.1", f"ssl_ca_file={ca}&ssl_verify_hostname=false")
    with pytest.raises(TransportUnreachable, match=re.compile("certificate verify failed", re.I)):
        _tls_listen(node, "127.0.0.1", f"ssl_ca_file={other}&ssl_verify_hostname=false")


def test_rabbit_tls_accepts_a_certificate_for_localhost(node: RabbitNode, pki: Path) -> None:
    _tls_listen(node, "localhost", f"ssl_ca_file={pki / 'ca.pem'}")
