"""Signed notifications: sign, verify, reject what fails, stay readable by non-verifiers."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from typing import Any

import pytest

import tidings
from tidings import SigningKeys, Target
from tidings.transports.envelope import decode
from tidings.transports.signing import SIGNATURE_KEY

OLD = b"o" * 32
NEW = b"n" * 32
WAIT = 5.0


class Collect:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.cond = threading.Condition()

    def info(self, ctxt: Any, pub: Any, event_type: str, payload: Any, md: Any) -> None:
        with self.cond:
            self.events.append(event_type)
            self.cond.notify_all()

    def wait_for(self, n: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.events) >= n, WAIT)


def _pair(sender_keys: SigningKeys | None, listener_keys: SigningKeys | None
          ) -> tuple[tidings.Transport, tidings.Transport]:
    vhost = f"memory:///{uuid.uuid4().hex}"
    return (tidings.get_notification_transport(vhost, signing=sender_keys),
            tidings.get_notification_transport(vhost, signing=listener_keys))


def _consume(transport: tidings.Transport, sends: list[tuple[tidings.Transport, str]],
             expect: int) -> list[str]:
    ep = Collect()
    listener = tidings.get_notification_listener(transport, [Target(topic="s")], [ep])
    listener.start()
    for sender, event in sends:
        tidings.Notifier(sender, "p", topics=["s"]).info({}, event, {})
    tidings.Notifier(tidings.get_notification_transport(transport.url), "p",
                     topics=["s"]).info({}, "end", {})
    assert ep.wait_for(expect)
    listener.stop()
    assert listener.wait(WAIT)
    return ep.events


def test_required_signatures_reject_unsigned_tampered_and_unknown(
        caplog: pytest.LogCaptureFixture) -> None:
    verifier = SigningKeys({"old": OLD, "new": NEW}, require=True)
    signed, listening = _pair(SigningKeys({"new": NEW}, active="new"), verifier)
    unsigned = tidings.get_notification_transport(signed.url)
    stranger = tidings.get_notification_transport(
        signed.url, signing=SigningKeys({"other": b"x" * 32}, active="other"))
    forger = tidings.get_notification_transport(
        signed.url, signing=SigningKeys({"new": b"f" * 32}, active="new"))
    # The closing "end" notification is unsigned, so it is rejected too: count rejections.
    with caplog.at_level(logging.ERROR):
        ep = Collect()
        # One at a time, in order: once "good" is handled, the three before it are settled.
        listener = tidings.get_notification_listener(listening, [Target(topic="s")], [ep],
                                                     executor="blocking")
        listener.start()
        for sender, event in [(unsigned, "unsigned"), (stranger, "unknown-key"),
                              (forger, "tampered"), (signed, "good")]:
            tidings.Notifier(sender, "p", topics=["s"]).info({}, event, {})
        assert ep.wait_for(1)
        listener.stop()
        assert listener.wait(WAIT)
    assert ep.events == ["good"]
    assert listener.stats.snapshot()["rejected"] == 3
    assert "not signed" in caplog.text and "unknown key id 'other'" in caplog.text
    assert "does not match" in caplog.text


def test_rotation_accepts_old_and_new_keys() -> None:
    verifier = SigningKeys({"old": OLD, "new": NEW}, require=True)
    old_sender, listening = _pair(SigningKeys({"old": OLD}, active="old"), verifier)
    new_sender = tidings.get_notification_transport(
        old_sender.url, signing=SigningKeys({"new": NEW}, active="new"))
    ep = Collect()
    listener = tidings.get_notification_listener(listening, [Target(topic="s")], [ep])
    listener.start()
    tidings.Notifier(old_sender, "p", topics=["s"]).info({}, "a", {})
    tidings.Notifier(new_sender, "p", topics=["s"]).info({}, "b", {})
    assert ep.wait_for(2)
    listener.stop()
    assert listener.wait(WAIT)
    assert sorted(ep.events) == ["a", "b"]


def test_signed_messages_stay_readable_without_verification() -> None:
    signer = SigningKeys({"k": NEW}, active="k")
    sender, plain = _pair(signer, None)
    assert _consume(plain, [(sender, "signed")], 2) == ["signed", "end"]


def test_signature_is_in_the_v2_envelope_and_ignored_by_plain_decoders() -> None:
    from tidings.transports.envelope import encode

    keys = SigningKeys({"k": NEW}, active="k")
    body = encode({"priority": "INFO", "payload": {"x": "ü"}}, 2.0, keys, ("nova", "n.info"))
    outer = json.loads(body)
    field = outer["tidings.signature"]
    assert (field["kid"], field["ex"], field["rk"]) == ("k", "nova", "n.info")
    assert decode(body) == {"priority": "INFO", "payload": {"x": "ü"}}
    assert keys.verify(outer["oslo.message"], field, [("nova", "n.info")])


def test_v1_cannot_be_signed() -> None:
    sender, _ = _pair(SigningKeys({"k": NEW}, active="k"), None)
    with pytest.raises(ValueError, match="messagingv2"):
        tidings.Notifier(sender, "p", driver="messaging")


def test_keys_are_checked_and_never_shown() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        SigningKeys({"k": b"short"})
    with pytest.raises(ValueError, match="not among the keys"):
        SigningKeys({"k": NEW}, active="missing")
    with pytest.raises(ValueError, match="at least one key"):
        SigningKeys({})
    keys = SigningKeys({"k": "a-long-enough-secret-string"}, active="k")
    assert "a-long-enough" not in repr(keys)


# -- route binding, replay window, and which id the logs name --------------------------------

def _signed_body(keys: SigningKeys, route: tuple[str, str], *, message_id: str = "m-1",
                 event: str = "e", priority: str = "INFO", age: float = 0.0) -> bytes:
    """A signed v2 body made for ``route``, as if signed ``age`` seconds ago."""
    inner = json.dumps({"message_id": message_id, "publisher_id": "p", "event_type": event,
                        "priority": priority, "payload": {},
                        "timestamp": "2026-01-01 00:00:00.000000"})
    field = keys.sign(inner, *route, now=time.time() - age)
    return json.dumps({"oslo.version": "2.0", "oslo.message": inner,
                       SIGNATURE_KEY: field}).encode()


class Both(Collect):
    def error(self, ctxt: Any, pub: Any, event_type: str, payload: Any, md: Any) -> None:
        self.info(ctxt, pub, event_type, payload, md)


def _listen(transport: tidings.Transport, targets: list[Target]
            ) -> tuple[tidings.NotificationListener, Both]:
    ep = Both()
    # One at a time, in arrival order: once a later message is handled, the rejections of
    # those before it are counted.
    listener = tidings.get_notification_listener(transport, targets, [ep], executor="blocking")
    listener.start()
    return listener, ep


def test_a_signed_message_re_published_to_another_priority_or_exchange_is_rejected(
        caplog: pytest.LogCaptureFixture) -> None:
    keys = SigningKeys({"k": NEW}, active="k", require=True)
    sender, listening = _pair(keys, keys)
    listener, ep = _listen(listening, [Target(topic="s"), Target(exchange="other", topic="s")])
    captured = _signed_body(keys, ("openstack", "s.info"), message_id="cap-1", event="captured")
    with caplog.at_level(logging.ERROR):
        sender.send_raw(Target(topic="s.error"), captured, message_id="cap-1")
        sender.send_raw(Target(exchange="other", topic="s.info"), captured, message_id="cap-1")
        sender.send_raw(Target(topic="s.info"), captured, message_id="cap-1")  # where it belongs
        tidings.Notifier(sender, "p", topics=["s"]).error({}, "good", {})
        assert ep.wait_for(2)
        listener.stop()
        assert listener.wait(WAIT)
    assert sorted(ep.events) == ["captured", "good"]
    assert listener.stats.snapshot()["rejected"] == 2
    assert "signed for exchange 'openstack' routing key 's.info' but delivered via " \
           "'openstack'/'s.error'" in caplog.text
    assert "delivered via 'other'/'s.info'" in caplog.text


def test_each_target_of_a_signing_notifier_gets_a_signature_for_its_own_route() -> None:
    keys = SigningKeys({"k": NEW}, active="k", require=True)
    sender, listening = _pair(keys, keys)
    listener, ep = _listen(listening, [Target(topic="a"), Target(topic="b")])
    tidings.Notifier(sender, "p", topics=["a", "b"]).info({}, "both", {})
    assert ep.wait_for(2)
    listener.stop()
    assert listener.wait(WAIT)
    assert ep.events == ["both", "both"]
    assert listener.stats.snapshot()["rejected"] == 0


def test_max_age_rejects_replays_and_far_future_signatures(
        caplog: pytest.LogCaptureFixture) -> None:
    signer = SigningKeys({"k": NEW}, active="k")
    verifier = SigningKeys({"k": NEW}, require=True, max_age=60, max_clock_skew=5)
    sender, listening = _pair(signer, verifier)
    listener, ep = _listen(listening, [Target(topic="s")])
    route = ("openstack", "s.info")
    with caplog.at_level(logging.ERROR):
        for mid, event, age in [("old", "old", 120.0), ("future", "future", -30.0),
                                ("recent", "recent", 30.0), ("skewed", "skewed", -2.0)]:
            sender.send_raw(Target(topic="s.info"),
                            _signed_body(signer, route, message_id=mid, event=event, age=age),
                            message_id=mid)
        assert ep.wait_for(2)
        listener.stop()
        assert listener.wait(WAIT)
    assert sorted(ep.events) == ["recent", "skewed"]
    assert listener.stats.snapshot()["rejected"] == 2
    assert "over max_age=60 s" in caplog.text and "in the future" in caplog.text


def test_route_is_checked_against_the_bindings_when_the_driver_cannot_tell() -> None:
    from tidings.transports.base import Binding, IncomingMessage
    from tidings.transports.errors import MalformedMessage

    keys = SigningKeys({"k": NEW}, active="k", require=True)
    transport = tidings.get_notification_transport(f"memory:///{uuid.uuid4().hex}",
                                                   signing=keys)
    body = _signed_body(keys, ("nova", "n.info"))
    bound = [Binding("nova", "n.error"), Binding("nova", "n.info")]
    assert transport.decode(IncomingMessage(body, "m-1"), bound)["message_id"] == "m-1"
    with pytest.raises(MalformedMessage, match=re.escape(
            "signed for exchange 'nova' routing key 'n.info' but delivered via 'nova'/'n.error'")):
        transport.decode(IncomingMessage(body, "m-1"), [Binding("nova", "n.error")])
    with pytest.raises(MalformedMessage, match=re.escape("delivered via 'nova'/'n.error'")):
        # the broker's word wins over the bindings
        transport.decode(IncomingMessage(body, "m-1", exchange="nova", routing_key="n.error"),
                         bound)


def test_logs_name_the_signed_id_not_the_transport_property(
        caplog: pytest.LogCaptureFixture) -> None:
    from tidings.transports.base import Binding, IncomingMessage

    keys = SigningKeys({"k": NEW}, active="k", require=True)
    transport = tidings.get_notification_transport(f"memory:///{uuid.uuid4().hex}",
                                                   signing=keys)
    route = ("nova", "n.info")
    msg = IncomingMessage(_signed_body(keys, route, message_id="signed-7"), "property-id",
                          exchange="nova", routing_key="n.info")
    transport.decode(msg, [Binding(*route)])
    assert msg.message_id == "signed-7"
    # A failing signature: the id shown is the sender's claim, marked unverified and escaped.
    forged = IncomingMessage(_signed_body(SigningKeys({"k": OLD}, active="k"), route),
                             "innocent\nFAKE LOG LINE", exchange="nova", routing_key="n.info")
    with caplog.at_level(logging.ERROR):
        listener, ep = _listen(transport, [Target(exchange="nova", topic="n")])
        transport.send_raw(Target(exchange="nova", topic="n.info"), forged.body,
                           message_id="innocent\nFAKE LOG LINE")
        transport.send_raw(Target(exchange="nova", topic="n.info"),
                           _signed_body(keys, route, event="after"), message_id="after")
        assert ep.wait_for(1)
        listener.stop()
        assert listener.wait(WAIT)
    assert ep.events == ["after"] and listener.stats.snapshot()["rejected"] == 1
    assert "rejecting message with unverified id 'innocent\\nFAKE LOG LINE'" in caplog.text
    assert "\nFAKE LOG LINE" not in caplog.text
