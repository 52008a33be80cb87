"""Signed notifications: HMAC-SHA256 over the message, where it was sent and when.

The signature travels inside the v2 envelope, next to ``oslo.message``::

    {"oslo.version": "2.0", "oslo.message": "<message JSON>",
     "tidings.signature": {"alg": "hmac-sha256", "kid": "2026-11", "ts": 1796601600000,
                           "ex": "nova", "rk": "notifications.info", "sig": "<base64>"}}

The MAC covers the exchange (``ex``), the routing key (``rk``), the signing time in Unix
milliseconds (``ts``) and the exact ``oslo.message`` string as sent, so no canonical re-encoding
is needed. Binding the route means a captured signed message cannot be re-published to another
exchange or routing key (another priority, another service's topic): the verifier compares the
signed route with where the delivery actually came from (the broker's word, where the driver
reports it; otherwise the listener's own bindings). Binding the time lets a verifier with
``max_age`` refuse replays of old messages. It all lives in the body, so every driver carries it
unchanged; listeners that do not verify (oslo.messaging's included) ignore the extra key.

A transport built with ``SigningKeys(require=True)`` rejects unsigned, tampered, re-routed,
expired and unknown-key messages (logged with the id they claim, marked unverified, never
dispatched). Rotation: give listeners the old and the new key, switch the notifiers' ``active``
key, then drop the old one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Collection, Mapping
from typing import Any

from tidings.transports.errors import MalformedMessage

__all__ = ["SIGNATURE_KEY", "SignatureError", "SigningKeys"]

SIGNATURE_KEY = "tidings.signature"
ALGORITHM = "hmac-sha256"
MIN_KEY_BYTES = 16
_FIELDS = "{'alg': 'hmac-sha256', 'kid': str, 'ts': int, 'ex': str, 'rk': str, 'sig': str}"

Route = tuple[str, str]
"""(exchange, routing key)."""


class SignatureError(MalformedMessage):
    """A message failed signature verification: unsigned, tampered, re-routed, too old, or
    signed by an unknown key."""


def _signed_text(exchange: str, routing_key: str, ts: int, inner: str) -> bytes:
    # A JSON array cannot contain a raw newline, so the first one ends the header: no choice of
    # exchange or routing key can make two different (route, time, message) read the same.
    head = json.dumps([exchange, routing_key, ts])
    return (head + "\n" + inner).encode("utf-8")


class SigningKeys:
    """The keys a transport signs with (``active``) and verifies against (all of them).

    ``require``: reject messages that are unsigned or signed by a key not given here (without
    it, those pass; signed messages with a known key are still checked).
    ``max_age``: seconds; reject a signed message signed longer ago than this, so a captured
    message cannot be replayed later. A message that legitimately waits longer in a queue (a
    listener down for an hour) is rejected too, and dead-lettered where the queue has one: set it
    above the longest backlog you expect. None (the default) checks no age.
    ``max_clock_skew``: seconds a signing time may lie in the future of this host's clock before
    the message is refused (clocks of senders and listeners are never quite equal).
    """

    def __init__(self, keys: Mapping[str, bytes | str], active: str | None = None, *,
                 require: bool = False, max_age: float | None = None,
                 max_clock_skew: float = 60.0) -> None:
        if not keys:
            raise ValueError("SigningKeys needs at least one key: {'key-id': b'secret...'}")
        self._keys: dict[str, bytes] = {}
        for kid, secret in keys.items():
            raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
            if not isinstance(kid, str) or not kid:
                raise ValueError("signing key ids must be non-empty strings")
            if len(raw) < MIN_KEY_BYTES:
                raise ValueError(f"signing key {kid!r} is {len(raw)} bytes; use at least "
                                 f"{MIN_KEY_BYTES} random bytes (e.g. secrets.token_bytes(32))")
            self._keys[kid] = raw
        if active is not None and active not in self._keys:
            raise ValueError(f"active signing key {active!r} is not among the keys "
                             f"({', '.join(sorted(self._keys))})")
        if max_age is not None and not max_age > 0:
            raise ValueError(f"max_age={max_age!r}: give a number of seconds above 0, or None "
                             f"to check no age")
        if not max_clock_skew >= 0:
            raise ValueError(f"max_clock_skew={max_clock_skew!r}: give seconds, 0 or more")
        self.active = active
        self.require = require
        self.max_age = max_age
        self.max_clock_skew = max_clock_skew

    def __repr__(self) -> str:  # never the secrets
        age = "" if self.max_age is None else f", max_age={self.max_age}"
        return (f"SigningKeys(key_ids={sorted(self._keys)}, active={self.active!r}, "
                f"require={self.require}{age})")

    def sign(self, inner: str, exchange: str, routing_key: str, *,
             now: float | None = None) -> dict[str, Any] | None:
        """The signature field for an ``oslo.message`` string sent to (exchange, routing_key),
        or None with no active key."""
        if self.active is None:
            return None
        ts = int((time.time() if now is None else now) * 1000)
        mac = hmac.new(self._keys[self.active], _signed_text(exchange, routing_key, ts, inner),
                       hashlib.sha256).digest()
        return {"alg": ALGORITHM, "kid": self.active, "ts": ts, "ex": exchange,
                "rk": routing_key, "sig": base64.b64encode(mac).decode("ascii")}

    def verify(self, inner: str | None, field: Any, routes: Collection[Route], *,
               now: float | None = None) -> bool:
        """Raise SignatureError unless the message may be dispatched under this policy; True
        if its signature was verified, False if it passes unverified (unsigned, or signed by an
        unknown key, where the policy does not require signatures).

        ``routes``: where the message may have been sent: the delivery's own (exchange, routing
        key) when the driver reports it, else the listener's bindings. A signature made for any
        other route is refused, however valid its MAC.
        """
        if field is None:
            if self.require:
                raise SignatureError("message is not signed and signatures are required")
            return False
        if inner is None:
            raise SignatureError("a signature needs the v2 envelope; this body has none")
        if not isinstance(field, dict) or field.get("alg") != ALGORITHM \
                or not isinstance(field.get("kid"), str) or not isinstance(field.get("sig"), str) \
                or type(field.get("ts")) is not int or not isinstance(field.get("ex"), str) \
                or not isinstance(field.get("rk"), str):
            raise SignatureError(f"malformed '{SIGNATURE_KEY}' field; expected {_FIELDS}")
        kid = field["kid"]
        if kid not in self._keys:
            if self.require:
                raise SignatureError(f"signed with unknown key id {kid[:64]!r}")
            return False
        try:
            given = base64.b64decode(field["sig"], validate=True)
        except ValueError:
            raise SignatureError("signature is not valid base64") from None
        ts, exchange, routing_key = field["ts"], field["ex"], field["rk"]
        try:
            text = _signed_text(exchange, routing_key, ts, inner)
        except UnicodeEncodeError:  # a lone surrogate: no signer could have produced it
            raise SignatureError("the signed text is not valid Unicode (a lone surrogate); "
                                 "it cannot have been signed") from None
        expected = hmac.new(self._keys[kid], text, hashlib.sha256).digest()
        if not hmac.compare_digest(given, expected):
            raise SignatureError(f"signature does not match (key id {kid!r}): the message was "
                                 f"altered or signed with another secret")
        if (exchange, routing_key) not in routes:
            where = " or ".join(f"{e!r}/{r!r}" for e, r in sorted(routes)[:4]) or "nowhere"
            raise SignatureError(f"signed for exchange {exchange[:64]!r} routing key "
                                 f"{routing_key[:64]!r} but delivered via {where}: a signed "
                                 f"message re-published elsewhere")
        now = time.time() if now is None else now
        age = now - ts / 1000
        if -age > self.max_clock_skew:
            raise SignatureError(f"signed {-age:.0f} s in the future of this host's clock "
                                 f"(max_clock_skew={self.max_clock_skew:g} s): check the "
                                 f"clocks of sender and listener (NTP)")
        if self.max_age is not None and age > self.max_age:
            raise SignatureError(f"signed {age:.0f} s ago, over max_age={self.max_age:g} s: a "
                                 f"replay, or a message that waited longer than max_age allows")
        return True
