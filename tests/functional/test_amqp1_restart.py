"""A broker restart under the ``amqp://`` driver, on a private RabbitMQ node (never the shared
one on 5672) with the AMQP 1.0 plugin: notifications keep flowing while the node restarts, and
with durable queues nothing confirmed is lost.

The node takes 5-10 s to start on a 2-core machine, and a restart twice that; the test is marked
slow but stays in the default run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

import tidings
from tidings.testing.brokers import in_ci
from tidings.testing.checker import DeliveryLog
from tidings.testing.rabbitnode import RabbitNode, rabbitmq_installed

WAIT = 90.0


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    if not rabbitmq_installed():
        msg = "RabbitMQ is not installed, so no private node can be started for restart tests"
        if in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    with RabbitNode(plugins=["rabbitmq_amqp1_0"]) as n:
        yield n


class Recorder:
    def __init__(self, log: DeliveryLog) -> None:
        self.log = log

    def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
             metadata: Any) -> None:
        self.log.delivered(payload["key"])
        self.log.acked(payload["key"])  # returning None: the listener acknowledges it


@pytest.mark.slow
def test_restart_mid_stream_loses_nothing_with_durable_queues(node: RabbitNode) -> None:
    after = 100  # notifications sent once the node is back, before the stream ends
    with node.vhost() as vhost:
        url = node.url(vhost, scheme="amqp",
                       query="durable=true&reconnect_interval=0.2&reconnect_max_interval=1"
                             "&connect_timeout=5&send_timeout=5")
        transport = tidings.get_notification_transport(url)
        try:
            assert transport.capabilities.durable
            log = DeliveryLog()
            listener = tidings.get_notification_listener(
                transport, [tidings.Target(topic="restart")], [Recorder(log)])
            listener.start()
            notifier = tidings.Notifier(transport, "restart-test", topics=["restart"],
                                        retry=None, raise_on_failure=True)
            flowing = threading.Event()
            restarted = threading.Event()
            sent: list[str] = []
            failures: list[BaseException] = []

            def send_until_well_after_the_restart() -> None:
                try:
                    since_restart = 0
                    while since_restart < after:
                        key = f"m{len(sent)}"
                        notifier.info({}, "restart.tick", {"key": key})  # retries forever
                        log.sent(key)
                        sent.append(key)
                        if len(sent) == 50:
                            flowing.set()
                        if restarted.is_set():
                            since_restart += 1
                except BaseException as exc:  # surfaced by the assertion below
                    failures.append(exc)
                    flowing.set()

            sender = threading.Thread(target=send_until_well_after_the_restart,
                                      name="restart-sender")
            sender.start()
            assert flowing.wait(WAIT), "notifications did not start flowing"
            node.restart()  # stop + start: the driver's connections drop and come back
            restarted.set()
            sender.join(WAIT)
            assert not sender.is_alive(), "sending did not finish after the restart"
            assert not failures, failures
            assert log.wait_acked(sent, WAIT), \
                f"{len(set(sent) - log.acked_ids())} notifications never processed"
            listener.stop()
            assert listener.wait(30)
            report = log.report()
            print(f"\nbroker restart, amqp://, durable: {report.counts}, "
                  f"{transport._driver.name} sent {len(sent)}")
            report.assert_valid(at_least_once=True, allow_duplicates=True)
        finally:
            transport.cleanup()
