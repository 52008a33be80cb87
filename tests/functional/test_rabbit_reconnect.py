"""rabbit:// when the connection or the broker goes away: reconnect, redeclare, resume, and
lose nothing nor acknowledge anything twice (checked with the Jepsen-style DeliveryLog).

Broker restarts and kills happen on a PRIVATE node (tidings.testing.rabbitnode), never on the
shared one. Connection faults (an RST, a hung network) go through a FaultProxy in front of the
shared broker, in a fresh vhost. The TLS options are checked here too, on the same private node
(it listens for TLS with a throw-away CA made by the openssl command), since starting a node is
what costs: 5-10 s. Slow by nature, so marked slow, but part of the default run.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tidings
from tidings import Target, TransportUnreachable
from tidings.testing.brokers import in_ci, rabbit_vhost, require_service
from tidings.testing.checker import DeliveryLog
from tidings.testing.proxy import FaultProxy
from tidings.testing.rabbitnode import RabbitNode, rabbitmq_installed
from tidings.transports.base import Binding

pytestmark = pytest.mark.slow

WAIT = 30.0  # generous: a reconnect waits for a node to boot


def _unavailable(msg: str) -> None:
    if in_ci():
        pytest.fail(msg)
    pytest.skip(msg)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        _unavailable("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=tidings test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext",
                 cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-ca.key",
             "-out", "other-ca.pem", "-days", "2", "-subj", "/CN=another CA", cwd=d)
    return d


@pytest.fixture(scope="module")
def node(pki: Path) -> Iterator[RabbitNode]:
    if not rabbitmq_installed():
        _unavailable("RabbitMQ is not installed here, so no private node can be started")
    n = RabbitNode()
    # verify_peer without fail_if_no_peer_cert: a client certificate is checked if presented.
    n.add_tls_listener(pki / "server.pem", pki / "server.key", pki / "ca.pem", verify_peer=True)
    n.add_config("ssl_options.fail_if_no_peer_cert = false")
    with n:
        yield n


class Keyed:
    """An endpoint that records every delivery and acknowledgement by payload key.

    ``hold`` is a key the endpoint stops on until ``release`` is set (bounded), so a test can
    break the connection while that message, and the prefetched ones after it, are unsettled.
    """

    def __init__(self, log: DeliveryLog, hold: Any = None) -> None:
        self.log = log
        self.hold = hold
        self.holding = threading.Event()
        self.release = threading.Event()

    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> None:
        key = payload["key"]
        self.log.delivered(key)
        if key == self.hold and not self.release.is_set():
            self.holding.set()
            self.release.wait(WAIT)
        self.log.acked(key)  # returning None: the core acknowledges it now


def send(notifier: tidings.Notifier, log: DeliveryLog, keys: range) -> None:
    for key in keys:
        notifier.info({}, "reconnect.test", {"key": key})
        log.sent(key)


def start_listener(transport: tidings.Transport, topic: str, endpoint: Any,
                   executor: str = "threading") -> Any:
    listener = tidings.get_notification_listener(transport, [Target(topic=topic)], [endpoint],
                                                 executor=executor)
    listener.start()
    return listener


def stop(*listeners: Any) -> None:
    for listener in listeners:
        listener.stop()
    for listener in listeners:
        assert listener.wait(WAIT), "a listener did not stop"


# -- a private node restarted and killed ----------------------------------------------------
def test_broker_restart_loses_nothing_and_acks_nothing_twice(
        node: RabbitNode, caplog: pytest.LogCaptureFixture) -> None:
    """Durable queues and persistent messages; the broker restarts while the listener holds a
    message (and prefetched more) and a notifier keeps sending. Afterwards: every confirmed
    send acknowledged, duplicates only among what was unsettled at the restart."""
    topic = f"restart-{uuid.uuid4().hex[:8]}"
    log = DeliveryLog()
    endpoint = Keyed(log, hold=30)
    with node.vhost() as vhost:
        transport = tidings.get_notification_transport(
            node.url(vhost, query="durable=true&prefetch=10&reconnect_max_interval=1"))
        notifier = tidings.Notifier(transport, "h", topics=[topic], retry=None,
                                    raise_on_failure=True)  # retry forever across the restart
        listener = start_listener(transport, topic, endpoint)
        try:
            send(notifier, log, range(60))
            assert endpoint.holding.wait(WAIT), "the listener never reached the held message"
            during = threading.Thread(target=send, args=(notifier, log, range(100, 140)))
            with caplog.at_level(logging.INFO, logger="tidings"):
                node.restart()
                during.start()
                endpoint.release.set()  # its ack goes to a dead channel: dropped, redelivered
                during.join(WAIT * 2)
                assert not during.is_alive(), "the notifier did not get through after restart"
                send(notifier, log, range(200, 220))
                expected = [*range(60), *range(100, 140), *range(200, 220)]
                assert log.wait_acked(expected, WAIT), log.report().counts
        finally:
            stop(listener)
            transport.cleanup()
        report = log.report()
        report.assert_valid(at_least_once=True, allow_duplicates=True)
        # Only what the listener held at the restart (the held message and its prefetch) may
        # have been processed twice.
        assert set(report.duplicated) <= set(range(30, 41)), report.duplicated
        assert any("reconnected" in r.getMessage() for r in caplog.records)
    broker_log = node.log_tail(400)
    assert "unknown delivery tag" not in broker_log, "an ack reached the wrong channel"


def test_tls_with_ca_hostname_check_and_client_certificate(node: RabbitNode, pki: Path) -> None:
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    log = DeliveryLog()
    with node.vhost() as vhost:
        base = node.url(vhost, tls=True, query=f"ssl_ca_file={pki / 'ca.pem'}")
        for query in ("", f"&ssl_cert_file={pki / 'client.pem'}"
                          f"&ssl_key_file={pki / 'client.key'}"):
            transport = tidings.get_notification_transport(base + query)
            listener = start_listener(transport, topic, Keyed(log))
            try:
                keys = range(len(log.acked_ids()), len(log.acked_ids()) + 3)
                send(tidings.Notifier(transport, "h", topics=[topic], retry=0,
                                      raise_on_failure=True), log, keys)
                assert log.wait_acked(keys, WAIT)
            finally:
                stop(listener)
                transport.cleanup()
        # A broker certificate from a CA we do not trust is refused, and says so.
        untrusting = tidings.get_notification_transport(
            node.url(vhost, tls=True, query=f"ssl_ca_file={pki / 'other-ca.pem'}"))
        try:
            with pytest.raises(TransportUnreachable, match=r"(?i)certificate"):
                untrusting.listen([Binding("openstack", "t.info")], None, 1)
        finally:
            untrusting.cleanup()


def test_failover_to_the_next_host_when_a_node_dies(node: RabbitNode) -> None:
    """URL private-node,shared-node: the node is killed (SIGKILL) and the listener and the
    notifier carry on against the second host."""
    require_service("rabbitmq")
    topic = f"failover-{uuid.uuid4().hex[:8]}"
    log = DeliveryLog()
    with rabbit_vhost("tidings-failover") as vhost:
        node.ctl("add_vhost", vhost)
        node.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        url = (f"rabbit://guest:guest@127.0.0.1:{node.amqp_port},"
               f"guest:guest@127.0.0.1:5672/{vhost}?reconnect_max_interval=0.5&connect_timeout=2")
        transport = tidings.get_notification_transport(url)
        notifier = tidings.Notifier(transport, "h", topics=[topic], retry=None,
                                    raise_on_failure=True)
        listener = start_listener(transport, topic, Keyed(log))
        try:
            send(notifier, log, range(10))
            assert log.wait_acked(range(10), WAIT)
            node.kill()
            send(notifier, log, range(10, 20))  # the retry connects to the second host
            assert log.wait_acked(range(10, 20), WAIT), log.report().counts
        finally:
            stop(listener)
            transport.cleanup()
    log.report().assert_valid(at_least_once=False, allow_duplicates=False)


# -- connection faults in front of the shared broker ---------------------------------------
@pytest.fixture(scope="module")
def fault_vhost() -> Iterator[str]:
    require_service("rabbitmq")
    with rabbit_vhost("tidings-faults") as vhost:
        yield vhost


@pytest.fixture
def proxied(fault_vhost: str) -> Iterator[tuple[FaultProxy, str]]:
    """A fresh proxy in front of the shared broker (names in each test are unique)."""
    host, port = require_service("rabbitmq")
    with FaultProxy((host, port)) as proxy:
        yield proxy, f"rabbit://guest:guest@127.0.0.1:{proxy.port}/{fault_vhost}"


def test_reset_connections_reconnect_and_redeliver_held_messages(
        proxied: tuple[FaultProxy, str], caplog: pytest.LogCaptureFixture) -> None:
    proxy, url = proxied
    topic = f"cut-{uuid.uuid4().hex[:8]}"
    log = DeliveryLog()
    endpoint = Keyed(log, hold=5)
    transport = tidings.get_notification_transport(f"{url}?prefetch=4")
    notifier = tidings.Notifier(transport, "h", topics=[topic], retry=None,
                                raise_on_failure=True)
    # Blocking: at the cut the listener holds one batch of at most prefetch=4 messages, the
    # held one among them, and settles it after the cut (acknowledgements that must go to the
    # lost connection, never to the new one). With worker threads the messages behind the held
    # one would be processed meanwhile, the last of them racing the cut.
    listener = start_listener(transport, topic, endpoint, executor="blocking")
    try:
        with caplog.at_level(logging.INFO, logger="tidings"):
            send(notifier, log, range(20))
            assert endpoint.holding.wait(WAIT)
            assert proxy.cut() >= 2  # the listener's and the publisher's connections
            endpoint.release.set()
            send(notifier, log, range(20, 30))
            assert log.wait_acked(range(30), WAIT), log.report().counts
        lost = [r for r in caplog.records if "lost its connection" in r.getMessage()]
        assert len(lost) == 1, "one cut, one reconnection: a stale ack would cause a second"
    finally:
        stop(listener)
        transport.cleanup()
    report = log.report()
    report.assert_valid(at_least_once=True, allow_duplicates=True)
    # Processed twice: exactly the batch held at the cut (the held message and at most three
    # received with it, before or after it).
    duplicated = set(report.duplicated)
    assert 5 in duplicated and len(duplicated) <= 4, report.duplicated
    assert duplicated <= set(range(2, 9)), report.duplicated


def test_a_hung_connection_is_noticed_by_heartbeats(proxied: tuple[FaultProxy, str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """No RST, no FIN: bytes just stop. With heartbeat=1 the listener notices within a few
    seconds, and once the network is back it reconnects and resumes."""
    proxy, url = proxied
    topic = f"stall-{uuid.uuid4().hex[:8]}"
    log = DeliveryLog()
    transport = tidings.get_notification_transport(
        f"{url}?heartbeat=1&connect_timeout=1&reconnect_max_interval=0.5&send_timeout=3")
    listener = start_listener(transport, topic, Keyed(log))
    notifier = tidings.Notifier(transport, "h", topics=[topic], retry=None,
                                raise_on_failure=True)
    noticed = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "lost its connection" in record.getMessage():
                noticed.set()

    watch = Watch()
    logging.getLogger("tidings").addHandler(watch)
    try:
        send(notifier, log, range(5))
        assert log.wait_acked(range(5), WAIT)
        proxy.stall()
        assert noticed.wait(10.0), "a hung connection went unnoticed with heartbeat=1"
        proxy.cut()  # what a timed-out TCP stack would do eventually
        proxy.resume()
        send(notifier, log, range(5, 10))
        assert log.wait_acked(range(10), WAIT), log.report().counts
    finally:
        logging.getLogger("tidings").removeHandler(watch)
        stop(listener)
        transport.cleanup()
    report = log.report()
    report.assert_valid(at_least_once=True, allow_duplicates=True)
    # An acknowledgement still on its way when the network hung never reached the broker, so
    # the last message(s) before the stall may come again; nothing sent after it may.
    assert set(report.duplicated) <= set(range(5)), report.duplicated
