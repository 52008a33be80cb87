"""amqp:// (AMQP 1.0) under the same faults as rabbit://, with figures: a broker restart in the
middle of 10,000 durable, confirmed notifications, the retry rules while connections are refused,
a stream through repeated resets; and TLS against the package's private node (a CA made by the
test, hostname verification on by default).

tests/functional/test_amqp1_restart.py restarts a node under a smaller stream and
tests/functional/test_amqp1.py cuts single connections; these add the scale and the figures.
Single-threaded confirmed sends over AMQP 1.0 run at about 130/s on the 2-core machine, so the
10,000 go out from 16 threads sharing one Notifier (the driver pipelines them).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tidings
from tidings import InvalidTransportOption, Target, TransportUnreachable
from tidings.testing.checker import DeliveryLog
from tidings.testing.rabbitnode import RabbitNode

from .scenarios import Driver, broker_restart, refused_retry_rules, repeated_resets
from .support import WAIT, Recorder, SendStream, started, uid

pytestmark = pytest.mark.slow

Figures = Callable[..., dict[str, Any]]
AMQP1 = Driver("amqp", "tidings.drivers.amqp1.receiving", "consuming again")


def test_amqp1_broker_restart_mid_stream_of_10000(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    broker_restart(node, vhost, AMQP1, figures, n=10_000, threads=16, prefetch=64)


def test_amqp1_retry_rules_hold_while_the_connection_is_refused(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    refused_retry_rules(node, vhost, AMQP1, figures)


def test_amqp1_stream_through_repeated_connection_resets(
        node: RabbitNode, vhost: str, figures: Figures) -> None:
    repeated_resets(node, vhost, AMQP1, figures, n=2000, threads=8, prefetch=32, cuts=3)


def _round_trip(node: RabbitNode, host: str, query: str) -> None:
    """Send three notifications over TLS and receive them, or raise what the driver raised."""
    topic = f"tls-{uid()}"
    log = DeliveryLog()
    transport = tidings.get_notification_transport(
        f"amqp://guest:guest@{host}:{node.tls_port}/?ssl=true&connect_timeout=3&{query}")
    try:
        listener = tidings.get_notification_listener(transport, [Target(topic)],
                                                     [Recorder(log)])
        with started(listener):
            notifier = tidings.Notifier(transport, "reliability", topics=[topic], retry=0,
                                        raise_on_failure=True)
            SendStream(notifier, log, range(3)).start().join()
            assert log.wait_acked(range(3), WAIT), log.report().counts
    finally:
        transport.cleanup()


@pytest.mark.xfail(strict=True, raises=InvalidTransportOption, reason=(
    "the amqp driver has no TLS options yet (docs/amqp1.md, Limits): ssl, ssl_ca_file, "
    "ssl_cert_file, ssl_key_file and ssl_verify_hostname, named as for rabbit://, are refused "
    "as unknown options"))
def test_amqp1_tls_with_a_test_ca_and_hostname_verification_on_by_default(
        node: RabbitNode, pki: Path) -> None:
    """The private node's TLS listener serves AMQP 1.0 too; its certificate names DNS:localhost
    only, signed by a CA made by the test."""
    ca, other = pki / "ca.pem", pki / "other-ca.pem"
    _round_trip(node, "localhost", f"ssl_ca_file={ca}")
    with pytest.raises(TransportUnreachable, match=re.compile("mismatch|hostname", re.I)):
        _round_trip(node, "127.0.0.1", f"ssl_ca_file={ca}")
    _round_trip(node, "127.0.0.1", f"ssl_ca_file={ca}&ssl_verify_hostname=false")
    with pytest.raises(TransportUnreachable, match=re.compile("certificate", re.I)):
        _round_trip(node, "localhost", f"ssl_ca_file={other}")
