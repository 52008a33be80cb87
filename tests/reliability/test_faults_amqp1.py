"""amqp:// (AMQP 1.0) under the same faults as rabbit://, with figures: a broker restart in the
middle of 10,000 durable, confirmed notifications, the retry rules while connections are refused,
a stream through repeated resets, a pool member SIGKILLed while it holds its window, a slow
consumer over a 20,000 backlog (memory bounded by link credit); and TLS against the package's
private node (a CA made by the test, hostname verification on by default), on both of the
driver's connections (the AMQP 0-9-1 one that declares queues, the AMQP 1.0 ones), with client
certificates on a second node that requires them.

tests/functional/test_amqp1_restart.py restarts a node under a smaller stream and
tests/functional/test_amqp1.py cuts single connections; these add the scale and the figures.
Single-threaded confirmed sends over AMQP 1.0 run at about 130/s on the 2-core machine, so the
10,000 go out from 16 threads sharing one Notifier (the driver pipelines them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import tidings
from tidings import Target, TransportUnreachable
from tidings.drivers.amqp1.topology import Amqp091Topology, QueuePlan
from tidings.testing.checker import DeliveryLog
from tidings.testing.rabbitnode import RabbitNode
from tidings.transports.base import Binding, OutgoingMessage

from .scenarios import (
    Driver,
    broker_restart,
    pool_member_sigkilled,
    refused_retry_rules,
    repeated_resets,
    slow_consumer_backlog,
)
from .support import WAIT, Recorder, SendStream, started, uid

pytestmark = pytest.mark.slow

Figures = Callable[..., dict[str, Any]]
AMQP1 = Driver("amqp", "tidings.transports.consumer", "reconnected")


def test_amqp1_broker_restart_mid_stream_of_10000(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    broker_restart(node, vhost, AMQP1, figures, n=10_000, threads=16, prefetch=64)


def test_amqp1_retry_rules_hold_while_the_connection_is_refused(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    refused_retry_rules(node, vhost, AMQP1, figures)


def test_amqp1_stream_through_repeated_connection_resets(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    repeated_resets(node, vhost, AMQP1, figures, n=2000, threads=8, prefetch=32, cuts=3)


def test_amqp1_pool_member_sigkilled_while_holding_messages(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    pool_member_sigkilled(node, vhost, AMQP1, figures)


def test_amqp1_slow_consumer_large_backlog_memory_bounded_by_prefetch(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    slow_consumer_backlog(node, vhost, AMQP1, figures)


def _round_trip(node: RabbitNode, host: str, query: str) -> None:
    """Send three notifications over TLS and receive them, or raise what the driver raised."""
    topic = f"tls-{uid()}"
    log = DeliveryLog()
    transport = tidings.get_notification_transport(
        f"amqp://guest:guest@{host}:{node.tls_port}/?ssl=true&connect_timeout=3&{query}")
    try:
        listener = tidings.get_notification_listener(transport, [Target(topic=topic)],
                                                     [Recorder(log)])
        with started(listener):
            notifier = tidings.Notifier(transport, "reliability", topics=[topic], retry=0,
                                        raise_on_failure=True)
            SendStream(notifier, log, range(3)).start().join()
            assert log.wait_acked(range(3), WAIT), log.report().counts
    finally:
        transport.cleanup()


def test_amqp1_tls_with_a_test_ca_and_hostname_verification_on_by_default(
        node: RabbitNode, pki: Path) -> None:
    """The private node's TLS listener serves AMQP 1.0 too; its certificate names DNS:localhost
    only, signed by a CA made by the test. The failures come from the first connection the
    driver opens, the AMQP 0-9-1 one that declares the queues (see the next test for the
    AMQP 1.0 connections), at once rather than after connect_timeout."""
    ca, other = pki / "ca.pem", pki / "other-ca.pem"
    _round_trip(node, "localhost", f"ssl_ca_file={ca}")
    started_at = time.monotonic()
    with pytest.raises(TransportUnreachable, match=re.compile("mismatch|hostname", re.I)) as err:
        _round_trip(node, "127.0.0.1", f"ssl_ca_file={ca}")
    assert "TLS handshake" in str(err.value) and "ssl_verify_hostname=false" in str(err.value)
    _round_trip(node, "127.0.0.1", f"ssl_ca_file={ca}&ssl_verify_hostname=false")
    with pytest.raises(TransportUnreachable, match=re.compile("certificate", re.I)) as err:
        _round_trip(node, "localhost", f"ssl_ca_file={other}")
    assert f"ssl_ca_file={other} holds the CA" in str(err.value), err.value
    assert time.monotonic() - started_at < 3 * WAIT


class _AlreadyDeclared(Amqp091Topology):
    """Declares nothing, so that the AMQP 1.0 connection is the first to meet the broker's
    certificate (the default topology's AMQP 0-9-1 connection would fail first)."""

    def _declare(self, plans: Sequence[QueuePlan]) -> None:
        pass


def _amqp10_failures(node: RabbitNode, host: str, query: str) -> tuple[str, str, float]:
    """(what send() raised, what listen() raised, the longest of the two) over AMQP 1.0."""
    transport = tidings.get_notification_transport(
        f"amqp://guest:guest@{host}:{node.tls_port}/?ssl=true&connect_timeout=3&{query}")
    driver: Any = transport._driver  # type: ignore[attr-defined]
    driver._topology = _AlreadyDeclared(driver._settings)
    try:
        started_at = time.monotonic()
        message = OutgoingMessage("openstack", f"tls-{uid()}.info", b"{}", uid())
        with pytest.raises(TransportUnreachable) as sent:
            error = driver.send_batch([message], 10)[0]
            if error is not None:
                raise error
        send_s = time.monotonic() - started_at
        started_at = time.monotonic()
        with pytest.raises(TransportUnreachable) as listened:
            driver.listen([Binding("openstack", f"tls-{uid()}.info")], None, 1).close()
        return str(sent.value), str(listened.value), max(send_s, time.monotonic() - started_at)
    finally:
        transport.cleanup()


def test_amqp1_tls_handshake_failures_on_the_amqp10_connection_name_tls_and_the_fix(
        node: RabbitNode, pki: Path) -> None:
    """proton reports every verification failure as 'certificate verify failed'; the driver's
    error names TLS and the checks that apply, and comes within connect_timeout (3 s here:
    send() fails at the first answer, listen() retries until connect_timeout)."""
    ca, other = pki / "ca.pem", pki / "other-ca.pem"
    sent, listened, took = _amqp10_failures(node, "127.0.0.1", f"ssl_ca_file={ca}")
    for text in (sent, listened):
        assert "TLS handshake with 127.0.0.1" in text, text
        assert "certificate verify failed" in text and "ssl_verify_hostname=false" in text, text
        assert "IP address" in text, text  # proton never matches an IP against a certificate
        assert "AMQP 1.0 plugin" not in text, text  # not the advice for a TLS failure
    sent, listened, took2 = _amqp10_failures(node, "localhost", f"ssl_ca_file={other}")
    for text in (sent, listened):
        assert f"TLS handshake with localhost:{node.tls_port}" in text, text
        assert f"ssl_ca_file={other} holds the CA" in text, text
    assert max(took, took2) < 3 + 2, (took, took2)


def test_amqp1_tls_without_ssl_ca_file_trusts_the_system_cas(node: RabbitNode, pki: Path) -> None:
    """No ssl_ca_file: the certificate is still verified, against OpenSSL's default CAs (both
    proton and Python's ssl module read them, and both honour $SSL_CERT_FILE, which stands in
    for the system's store here)."""
    url = f"amqp://guest:guest@localhost:{node.tls_port}/?ssl=true&connect_timeout=3"
    with pytest.raises(TransportUnreachable, match="system's CA certificates"):
        _round_trip(node, "localhost", "")
    script = ("import sys, tidings\n"
              "from tidings.transports.base import Binding\n"
              "t = tidings.get_notification_transport(sys.argv[1])\n"
              "t.listen([Binding('openstack', sys.argv[2])], None, 1).close()\n"
              "t.cleanup()\n")
    done = subprocess.run([sys.executable, "-c", script, url, f"tls-{uid()}.info"],
                          env={**os.environ, "SSL_CERT_FILE": str(pki / "ca.pem")},
                          capture_output=True, text=True, timeout=WAIT * 3)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def mtls_node(pki: Path) -> Iterator[RabbitNode]:
    """A second private node whose TLS listener requires a client certificate signed by the
    test CA (ssl_options.fail_if_no_peer_cert = true); about 5 s to start."""
    base = Path(tempfile.mkdtemp(prefix="tidings-mtls-"))
    n = RabbitNode(base, plugins=["rabbitmq_amqp1_0"])
    n.add_tls_listener(pki / "server.pem", pki / "server.key", pki / "ca.pem", verify_peer=True)
    try:
        with n:
            yield n
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_amqp1_tls_client_certificate_when_the_broker_requires_one(
        mtls_node: RabbitNode, pki: Path) -> None:
    """Without one the broker refuses the handshake: with TLS 1.3 the client sees either the
    broker's 'certificate required' alert or, when it finished its side first, only the
    connection closing; both errors say to add ssl_cert_file and ssl_key_file."""
    ca = pki / "ca.pem"
    with pytest.raises(TransportUnreachable, match="TLS handshake") as err:
        _round_trip(mtls_node, "localhost", f"ssl_ca_file={ca}")
    assert "client certificate, add ssl_cert_file and ssl_key_file" in str(err.value) or \
        "requires a client certificate: add ssl_cert_file and ssl_key_file" in str(err.value), \
        err.value
    _round_trip(mtls_node, "localhost", f"ssl_ca_file={ca}&ssl_cert_file={pki / 'client.pem'}"
                                        f"&ssl_key_file={pki / 'client.key'}")
    # and on the AMQP 1.0 connection alone
    sent, listened, _ = _amqp10_failures(mtls_node, "localhost", f"ssl_ca_file={ca}")
    for text in (sent, listened):
        assert "TLS handshake" in text and "add ssl_cert_file and ssl_key_file" in text, text
