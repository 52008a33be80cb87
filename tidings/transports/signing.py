"""Signed notifications: HMAC-SHA256 over the encoded message, with key ids for rotation.

The signature travels inside the v2 envelope, next to ``oslo.message``::

    {"oslo.version": "2.0", "oslo.message": "<message JSON>",
     "tidings.signature": {"alg": "hmac-sha256", "kid": "2026-11", "sig": "<base64>"}}

It covers the exact ``oslo.message`` string as sent, so no canonical re-encoding is needed, and
it lives in the body, so every driver carries it unchanged. Listeners that do not verify
(oslo.messaging's included) ignore the extra key: a signing notifier stays readable by them.

A transport built with ``SigningKeys(require=True)`` rejects unsigned, tampered and unknown-key
messages (logged with the message id, never dispatched). Rotation: give listeners the old and
the new key, switch the notifiers' ``active`` key, then drop the old one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from tidings.transports.errors import MalformedMessage

__all__ = ["SIGNATURE_KEY", "SignatureError", "SigningKeys"]

SIGNATURE_KEY = "tidings.signature"
ALGORITHM = "hmac-sha256"
MIN_KEY_BYTES = 16


class SignatureError(MalformedMessage):
    """A message failed signature verification (unsigned, tampered or signed by an unknown key)."""


class SigningKeys:
    """The keys a transport signs with (``active``) and verifies against (all of them)."""

    def __init__(self, keys: Mapping[str, bytes | str], active: str | None = None, *,
                 require: bool = False) -> None:
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
        self.active = active
        self.require = require

    def __repr__(self) -> str:  # never the secrets
        return (f"SigningKeys(key_ids={sorted(self._keys)}, active={self.active!r}, "
                f"require={self.require})")

    def _mac(self, kid: str, text: str) -> bytes:
        return hmac.new(self._keys[kid], text.encode("utf-8"), hashlib.sha256).digest()

    def sign(self, inner: str) -> dict[str, str] | None:
        """The signature field for an ``oslo.message`` string, or None with no active key."""
        if self.active is None:
            return None
        sig = base64.b64encode(self._mac(self.active, inner)).decode("ascii")
        return {"alg": ALGORITHM, "kid": self.active, "sig": sig}

    def verify(self, inner: str | None, field: Any) -> None:
        """Raise SignatureError unless the message may be dispatched under this policy."""
        if field is None:
            if self.require:
                raise SignatureError("message is not signed and signatures are required")
            return
        if inner is None:
            raise SignatureError("a signature needs the v2 envelope; this body has none")
        if not isinstance(field, dict) or field.get("alg") != ALGORITHM \
                or not isinstance(field.get("kid"), str) or not isinstance(field.get("sig"), str):
            raise SignatureError(f"malformed '{SIGNATURE_KEY}' field; expected "
                                 f"{{'alg': '{ALGORITHM}', 'kid': ..., 'sig': ...}}")
        kid = field["kid"]
        if kid not in self._keys:
            if self.require:
                raise SignatureError(f"signed with unknown key id {kid[:64]!r}")
            return
        try:
            given = base64.b64decode(field["sig"], validate=True)
        except ValueError:
            raise SignatureError("signature is not valid base64") from None
        try:
            expected = self._mac(kid, inner)
        except UnicodeEncodeError:  # a lone surrogate: no signer could have produced it
            raise SignatureError("the signed text is not valid Unicode (a lone surrogate); "
                                 "it cannot have been signed") from None
        if not hmac.compare_digest(given, expected):
            raise SignatureError(f"signature does not match (key id {kid!r}): the message was "
                                 f"altered or signed with another secret")
