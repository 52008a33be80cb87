"""The drop-in test: an oslo.messaging billing service (billing_service.py: oslo.config options,
a RequestContext serializer, two endpoints with filter rules, one returning REQUEUE, nova and
cinder targets, a pool, a notifier whose driver, topics and retry come from config) runs
unchanged except its import line, fed by real oslo.messaging notifiers over RabbitMQ, and sees
and emits exactly what it does on oslo.messaging 18."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tidings.testing.brokers import rabbit_vhost, require_service

from .conftest import WAIT, Inbox, new_conf, oslo_messaging, override, request_context

SERVICE = Path(__file__).with_name("billing_service.py")
IMPORT_LINE = "import oslo_messaging  # the import line"
NOTIFICATIONS = [  # (exchange, publisher_id, priority, event_type, payload)
    ("nova", "compute.host1", "info", "compute.instance.create.end",
     {"id": "i-1", "flavor": "m1.small", "created_at": "2024-01-02T03:04:05.000001"}),
    ("nova", "compute.host1", "info", "compute.instance.delete.start", {"id": "i-2"}),
    ("nova", "image.host1", "info", "image.upload", {"id": "img-1"}),
    ("cinder", "volume.host1", "info", "volume.create.end", {"id": "v-1", "state": "available"}),
    ("cinder", "volume.host1", "info", "volume.attach",
     {"id": "v-2", "state": "available", "requeue_once": True}),
    ("cinder", "volume.host1", "info", "volume.create.end", {"id": "v-3", "state": "error"}),
    ("cinder", "volume.host1", "error", "volume.error", {"id": "v-4", "state": "available"}),
]
EXPECTED = 5  # i-1, i-2, v-1, v-2 (after one requeue), v-4


def run_service(library: str, tmp_path: Path) -> dict[str, Any]:
    """Run the service with ``library`` on a fresh vhost, feed it, return what it saw and what
    it emitted (both sorted, without message ids and timestamps)."""
    with rabbit_vhost(f"tidings-billing-{library}") as vhost:
        url = f"rabbit://guest:guest@127.0.0.1:5672/{vhost}"
        source = SERVICE.read_text()
        if library == "tidings":
            source = source.replace(IMPORT_LINE, "import tidings as oslo_messaging")
        program = tmp_path / f"billing_{library}.py"
        program.write_text(source)
        config = tmp_path / f"billing_{library}.conf"
        config.write_text(f"[DEFAULT]\ntransport_url = {url}\n"
                          f"[oslo_messaging_notifications]\ndriver = messagingv2\n"
                          f"topics = billing_notifications\nretry = 3\n"
                          f"[billing]\npool = billing\nexpected = {EXPECTED}\n")
        # The observer: a real oslo.messaging listener on what the service emits.
        observer_conf = new_conf()
        observer_t = oslo_messaging.get_notification_transport(observer_conf, url=url)
        emitted = Inbox()

        class Observer:
            def info(self, ctxt: Any, publisher_id: Any, event_type: Any, payload: Any,
                     metadata: Any) -> None:
                ctxt = {k: v for k, v in ctxt.items() if k != "client_timeout"}
                emitted.add({"ctxt": ctxt, "publisher_id": publisher_id,
                             "event_type": event_type, "payload": payload})

        observer = oslo_messaging.get_notification_listener(
            observer_t, [oslo_messaging.Target(topic="billing_notifications")], [Observer()],
            executor="threading", pool="observer")
        observer.start()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-W", "ignore", str(program), "--config-file",
                                 str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert json.loads(first or "{}").get("ready"), proc.stderr.read() if proc.stderr \
                else first
            senders: dict[str, Any] = {}
            for exchange, publisher, priority, event_type, payload in NOTIFICATIONS:
                if exchange not in senders:
                    conf = new_conf()
                    override(conf, control_exchange=exchange)
                    senders[exchange] = oslo_messaging.get_notification_transport(conf, url=url)
                notifier = oslo_messaging.Notifier(senders[exchange], publisher,
                                                   driver="messagingv2",
                                                   topics=["notifications"])
                getattr(notifier, priority)(request_context(), event_type, payload)
            out, err = proc.communicate(timeout=WAIT * 3)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            for t in senders.values() if "senders" in locals() else ():
                t.cleanup()
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert lines[-1] == {"done": True}, err[-3000:]
        got = emitted.wait(2)
        observer.stop()
        observer.wait()
        observer_t.cleanup()
        return {"seen": sorted(json.dumps(r, sort_keys=True) for r in lines[:-1]),
                "emitted": sorted(json.dumps(r, sort_keys=True) for r in got)}


@pytest.mark.slow
def test_billing_service_runs_unchanged_on_tidings(tmp_path: Path) -> None:
    require_service("rabbitmq")
    oslo = run_service("oslo", tmp_path)
    ours = run_service("tidings", tmp_path)
    assert len(oslo["seen"]) == EXPECTED and len(oslo["emitted"]) == 2
    assert ours["seen"] == oslo["seen"]
    assert ours["emitted"] == oslo["emitted"]
    # What oslo.messaging itself shows, so the comparison is not vacuous: the RequestContext
    # arrives redacted, the datetime and the set as jsonutils writes them.
    charge = json.loads(oslo["emitted"][0])
    assert charge["payload"]["billed_at"] == "2024-01-02T03:04:05.123456"
    assert charge["payload"]["tags"] == ["vm"]
    assert charge["ctxt"]["auth_token"] is None and charge["ctxt"]["user"] == "u-42"
    assert all(json.loads(s)["ctxt"][4] is None for s in oslo["seen"])


def test_import_line_is_the_only_change() -> None:
    source = SERVICE.read_text()
    assert source.count(IMPORT_LINE) == 1
    assert "tidings" not in source.replace("import tidings as oslo_messaging", "")
