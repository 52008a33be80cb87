"""The wire format: oslo.messaging's notification message and its v1/v2 envelopes.

Encoding and decoding live here once, so every driver carries the same bytes and tidings can
consume (and feed) real OpenStack notification streams. A notification message is a JSON object::

    {"message_id": "...", "publisher_id": "compute.host1", "event_type": "compute.instance.create",
     "priority": "INFO", "payload": {...}, "timestamp": "2026-11-22 10:00:00.123456",
     "_context_user_id": "...", ...}

``messaging`` (v1) sends that object as the body; ``messagingv2`` wraps it as
``{"oslo.version": "2.0", "oslo.message": "<the object as a JSON string>"}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tidings.transports.errors import MalformedMessage
from tidings.transports.signing import SIGNATURE_KEY, SigningKeys

__all__ = ["CONTEXT_PREFIX", "Notification", "decode", "decode_envelope", "encode", "pack_context",
           "unpack_context"]

CONTEXT_PREFIX = "_context_"
VERSION_KEY = "oslo.version"
MESSAGE_KEY = "oslo.message"
SUPPORTED_VERSION = "2.0"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": "), default=str).encode
_loads = json.loads
# The C string encoder json.dumps itself uses: building the fixed two-key v2 envelope by hand
# gives byte-identical output to json.dumps without a second pass over a dict.
_quote = getattr(json.encoder, "c_encode_basestring", None) or json.encoder.encode_basestring
_V2_HEAD = f'{{"{VERSION_KEY}": "{SUPPORTED_VERSION}", "{MESSAGE_KEY}": '


def pack_context(message: dict[str, Any], ctxt: dict[str, Any]) -> dict[str, Any]:
    """Flatten ``ctxt`` into ``_context_<key>`` entries of ``message``, as oslo.messaging does."""
    for key, value in ctxt.items():
        message[CONTEXT_PREFIX + str(key)] = value
    return message


def unpack_context(message: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a wire message into (context, message without the ``_context_`` entries)."""
    cut = len(CONTEXT_PREFIX)
    ctxt = {k[cut:]: v for k, v in message.items() if k[:cut] == CONTEXT_PREFIX}
    if not ctxt:
        return ctxt, message
    return ctxt, {k: v for k, v in message.items() if k[:cut] != CONTEXT_PREFIX}


def encode(message: dict[str, Any], version: float = 2.0,
           signer: SigningKeys | None = None) -> bytes:
    """Encode a wire message (context already packed) for the given envelope version.

    With a ``signer`` that has an active key, the v2 envelope carries a signature over the
    ``oslo.message`` string (see tidings.transports.signing); v1 bodies cannot be signed.
    """
    if version >= 2.0:
        inner = _dumps(message)
        signature = signer.sign(inner) if signer is not None else None
        tail = "}" if signature is None else f", \"{SIGNATURE_KEY}\": {_dumps(signature)}}}"
        return (_V2_HEAD + _quote(inner) + tail).encode("utf-8")
    if signer is not None and signer.active is not None:
        raise ValueError("signed notifications need the v2 envelope: use the notifier driver "
                         "'messagingv2', not 'messaging'")
    return _dumps(message).encode("utf-8")


def decode(body: bytes | str) -> dict[str, Any]:
    """Decode a body into the wire message (envelope removed). Raise MalformedMessage saying why.

    Accepts v1 (a bare object) and v2 envelopes; anything else (not UTF-8, not JSON, not an
    object, an envelope version other than 2.x) is malformed and must be rejected, not requeued.
    """
    return decode_envelope(body)[0]


def decode_envelope(body: bytes | str) -> tuple[dict[str, Any], str | None, Any]:
    """Like :func:`decode`, also returning the raw ``oslo.message`` string (None for v1) and
    the signature field (None when absent), which signature checks need."""
    try:
        if isinstance(body, memoryview):
            body = bytes(body)
        outer = _loads(body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body)
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"body is not valid UTF-8 ({exc.reason} at byte {exc.start})") \
            from None
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(f"body is not JSON: {str(exc)[:120]}") from None
    if not isinstance(outer, dict):
        raise MalformedMessage(f"body is a JSON {type(outer).__name__}, not an object")
    if VERSION_KEY not in outer:
        return outer, None, None
    version = outer[VERSION_KEY]
    if not isinstance(version, str) or version.split(".")[0] != "2":
        raise MalformedMessage(f"unsupported envelope version {str(version)[:40]!r}; "
                               f"tidings reads {SUPPORTED_VERSION} and unversioned (1.0) bodies")
    inner = outer.get(MESSAGE_KEY)
    if not isinstance(inner, str):
        raise MalformedMessage(f"envelope {SUPPORTED_VERSION} lacks a string '{MESSAGE_KEY}'")
    try:
        message = _loads(inner)
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(f"'{MESSAGE_KEY}' is not JSON: {str(exc)[:120]}") from None
    if not isinstance(message, dict):
        raise MalformedMessage(f"'{MESSAGE_KEY}' is a JSON {type(message).__name__}, "
                               f"not an object")
    return message, inner, outer.get(SIGNATURE_KEY)


@dataclass
class Notification:
    """One notification as endpoints see it: oslo.messaging's (ctxt, publisher_id, event_type,
    payload, metadata) plus its priority (lower case, the endpoint method's name)."""

    ctxt: dict[str, Any]
    publisher_id: Any
    event_type: Any
    priority: str
    payload: Any
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Notification:
        ctxt, rest = unpack_context(message)
        priority = rest.get("priority")
        if not isinstance(priority, str):
            raise MalformedMessage(f"notification has no string 'priority' "
                                   f"(got {type(priority).__name__})")
        return cls(ctxt=ctxt, publisher_id=rest.get("publisher_id"),
                   event_type=rest.get("event_type"), priority=priority.lower(),
                   payload=rest.get("payload"),
                   metadata={"message_id": rest.get("message_id"),
                             "timestamp": rest.get("timestamp")})

    def as_dict(self) -> dict[str, Any]:
        """The dict a batch endpoint receives, with oslo.messaging's keys."""
        return {"ctxt": self.ctxt, "publisher_id": self.publisher_id,
                "event_type": self.event_type, "priority": self.priority,
                "payload": self.payload, "metadata": self.metadata}
