"""The shared queue model of the RabbitMQ drivers: oslo.messaging's names, the queue options,
the x-arguments they become and the capabilities they imply."""

from __future__ import annotations

from typing import Any

import pytest

from tidings.drivers._rabbitmq.queues import QUEUE_OPTIONS, QueueModel
from tidings.transports.base import Binding, Capabilities, Option
from tidings.transports.errors import InvalidTransportOption
from tidings.transports.transport import get_transport

BINDINGS = [Binding("nova", "notifications.info"), Binding("cinder", "notifications.info"),
            Binding("nova", "notifications.error")]


def _options(**given: str) -> dict[str, Any]:
    declared: dict[str, Option[Any]] = dict(QUEUE_OPTIONS)
    out = {k: o.default for k, o in declared.items()}
    out.update({k: declared[k].convert(k, v) for k, v in given.items()})
    return out


def test_oslo_names_by_default() -> None:
    model = QueueModel.from_options(_options())
    assert [(p.name, len(p.bindings)) for p in model.plan(BINDINGS, None)] == [
        ("notifications.info", 2), ("notifications.error", 1)]
    assert [(p.name, len(p.bindings)) for p in model.plan(BINDINGS, "ceilo")] == [("ceilo", 3)]
    assert model.group_queue("nova", "notifications.info") == "notifications.info"
    assert model.arguments == {} and not model.durable


def test_isolated_exchanges_prefix_every_queue() -> None:
    model = QueueModel.from_options(_options(isolate_exchanges="true"))
    assert [p.name for p in model.plan(BINDINGS, "ceilo")] == ["nova.ceilo", "cinder.ceilo"]
    assert [p.name for p in model.plan(BINDINGS, None)] == [
        "nova.notifications.info", "cinder.notifications.info", "nova.notifications.error"]


def test_options_become_queue_arguments_and_capabilities() -> None:
    model = QueueModel.from_options(
        _options(durable="true", queue_expiry="1.5", message_ttl="60", dead_letter_exchange="dlx"),
        arguments={"x-queue-type": "quorum"})
    assert model.arguments == {"x-queue-type": "quorum", "x-expires": 1500,
                               "x-message-ttl": 60000, "x-dead-letter-exchange": "dlx"}
    caps = model.capabilities(Capabilities(pools=True))
    assert caps.durable and caps.dead_letter and not caps.exchanges and caps.pools
    assert QueueModel.from_options(_options(), durable=True).durable  # e.g. quorum queues


@pytest.mark.parametrize("given, message", [
    ({"queue_expiry": "-1"}, "queue_expiry=-1 must be 0 \\(off\\)"),
    ({"message_ttl": "-0.5"}, "message_ttl=-0.5"),
])
def test_negative_durations_are_refused(given: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidTransportOption, match=message):
        QueueModel.from_options(_options(**given))


def test_reconnect_backoff_is_a_core_option_checked_once() -> None:
    t = get_transport("memory:///reconnect?reconnect_interval=0.5&reconnect_max_interval=2")
    assert (t.options["reconnect_interval"], t.options["reconnect_max_interval"]) == (0.5, 2.0)
    with pytest.raises(InvalidTransportOption, match="must be a positive number"):
        get_transport("memory://?reconnect_interval=0")
    with pytest.raises(InvalidTransportOption, match="must be at least"):
        get_transport("memory://?reconnect_interval=2&reconnect_max_interval=1")
