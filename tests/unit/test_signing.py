"""Signed notifications: sign, verify, reject what fails, stay readable by non-verifiers."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Any

import pytest

import tidings
from tidings import SigningKeys, Target
from tidings.transports.envelope import decode

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
        listener = tidings.get_notification_listener(listening, [Target(topic="s")], [ep])
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
    body = encode({"priority": "INFO", "payload": {"x": "ü"}}, 2.0, keys)
    outer = json.loads(body)
    assert outer["tidings.signature"]["kid"] == "k"
    assert decode(body) == {"priority": "INFO", "payload": {"x": "ü"}}
    keys.verify(outer["oslo.message"], outer["tidings.signature"])


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
