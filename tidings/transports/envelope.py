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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tidings.transports.errors import MalformedMessage
from tidings.transports.signing import SIGNATURE_KEY, SigningKeys

__all__ = ["CONTEXT_PREFIX", "Notification", "context_of", "decode", "decode_envelope", "encode",
           "pack_context", "unpack_context"]

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
# What decode() recognises without a general JSON parse of the envelope: our own (and
# oslo.messaging's) exact v2 layout, up to the opening quote of the oslo.message string.
_V2_PREFIX = _V2_HEAD + '"'
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]
# The C scanner behind json.loads, called directly: it skips loads()' per-call type checks
# and whitespace regexes, which cost as much as the parse of a small notification.
_scan_once = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _make_fast_dumps() -> Any:
    """The C encoder _dumps builds on every call, built once (None without the C module).

    It is made without a circular-reference table (a shared one is not thread-safe and keeps
    stale ids after an error), so a cyclic payload surfaces as RecursionError; encode() then
    reruns the checked encoder, which reports the cycle exactly as json.dumps does.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None or _quote is not getattr(json.encoder, "c_encode_basestring", None):
        return None
    try:
        fast = make(None, str, _quote, None, ": ", ", ", False, False, True)
        sample = {"k": ["\u00e9\n", 1.5, None, True, {"d": object}], "n": float("nan")}
        if "".join(fast(sample, 0)) != _dumps(sample):
            return None
    except Exception:  # another Python's C encoder signature: keep the portable one
        return None
    return fast


_fast_dumps = _make_fast_dumps()


def _dumps_inner(message: dict[str, Any]) -> str:
    if _fast_dumps is None:
        return _dumps(message)
    try:
        return "".join(_fast_dumps(message, 0))
    except RecursionError:
        return _dumps(message)  # ValueError for a cycle; RecursionError if just too deep


def pack_context(message: dict[str, Any], ctxt: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten ``ctxt`` into ``_context_<key>`` entries of ``message``, as oslo.messaging does."""
    for key, value in ctxt.items():
        message[CONTEXT_PREFIX + str(key)] = value
    return message


def context_of(message: dict[str, Any]) -> dict[str, Any]:
    """The ``_context_<key>`` entries of a wire message (string keys, as JSON gives), as a
    context dict.

    A loop rather than a comprehension (no comprehension frame), and a look at the first
    character before the ``startswith`` method call: the six fields every notification has
    do not begin with an underscore, so most keys cost one comparison.
    """
    cut = len(CONTEXT_PREFIX)
    ctxt = {}
    for key, value in message.items():
        if key[:1] == "_" and key.startswith(CONTEXT_PREFIX):
            ctxt[key[cut:]] = value
    return ctxt


def unpack_context(message: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a wire message into (context, message without the ``_context_`` entries)."""
    ctxt = context_of(message)
    if not ctxt:
        return ctxt, message
    cut = len(CONTEXT_PREFIX)
    return ctxt, {k: v for k, v in message.items() if k[:cut] != CONTEXT_PREFIX}


def encode(message: dict[str, Any], version: float = 2.0,
           signer: SigningKeys | None = None) -> bytes:
    """Encode a wire message (context already packed) for the given envelope version.

    With a ``signer`` that has an active key, the v2 envelope carries a signature over the
    ``oslo.message`` string (see tidings.transports.signing); v1 bodies cannot be signed.
    """
    if version >= 2.0:
        inner = _dumps_inner(message)
        signature = signer.sign(inner) if signer is not None else None
        tail = "}" if signature is None else f", \"{SIGNATURE_KEY}\": {_dumps(signature)}}}"
        return (_V2_HEAD + _quote(inner) + tail).encode("utf-8")
    if signer is not None and signer.active is not None:
        raise ValueError("signed notifications need the v2 envelope: use the notifier driver "
                         "'messagingv2', not 'messaging'")
    return _dumps_inner(message).encode("utf-8")


def decode(body: bytes | str) -> dict[str, Any]:
    """Decode a body into the wire message (envelope removed). Raise MalformedMessage saying why.

    Accepts v1 (a bare object) and v2 envelopes; anything else (not UTF-8, not JSON, not an
    object, an envelope version other than 2.x) is malformed and must be rejected, not requeued.
    """
    if type(body) is bytes:  # the common case, straight to the fast path
        try:
            fast = _decode_v2_exact(body.decode("utf-8"))
        except UnicodeDecodeError:
            fast = None  # decode_envelope says why
        if fast is not None:
            return fast[0]
    return decode_envelope(body)[0]


def _decode_v2_exact(text: str) -> tuple[dict[str, Any], str] | None:
    """The common case in one pass: ``text`` is exactly ``{"oslo.version": "2.0",
    "oslo.message": "<string>"}`` as encode() writes it, and the string holds exactly one
    JSON object. Returns (message, inner string), or None for anything else, which the general
    path then parses (and, if need be, rejects with the precise reason).

    Equivalent to json.loads for what it accepts: the same C string scanner (strict, so control
    characters are refused) and the same C value scanner, on input with no whitespace or
    trailing data to skip; a duplicate key or a signature field never matches the layout.
    """
    if not text.startswith(_V2_PREFIX) or text[-2:] != '"}':
        return None
    try:
        inner, end = _scanstring(text, len(_V2_PREFIX), True)
        if end != len(text) - 1:
            return None
        message, end = _scan_once(inner, 0)
    except (ValueError, StopIteration, RecursionError):
        return None
    if end != len(inner) or type(message) is not dict:
        return None
    return message, inner


def decode_envelope(body: bytes | str) -> tuple[dict[str, Any], str | None, Any]:
    """Like :func:`decode`, also returning the raw ``oslo.message`` string (None for v1) and
    the signature field (None when absent), which signature checks need."""
    try:
        if isinstance(body, memoryview):
            body = bytes(body)
        text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
        if isinstance(text, str):
            fast = _decode_v2_exact(text)
            if fast is not None:
                return fast[0], fast[1], None
        outer = _loads(text)
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


@dataclass(slots=True)
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
        # The fields are read from the whole message: no "_context_" key can shadow them, so
        # only the context needs a pass over the keys (unpack_context's second dict is skipped).
        ctxt = context_of(message)
        get = message.get
        priority = get("priority")
        if not isinstance(priority, str):
            raise MalformedMessage(f"notification has no string 'priority' "
                                   f"(got {type(priority).__name__})")
        return cls(ctxt, get("publisher_id"), get("event_type"), priority.lower(),
                   get("payload"), {"message_id": get("message_id"),
                                    "timestamp": get("timestamp")})

    def as_dict(self) -> dict[str, Any]:
        """The dict a batch endpoint receives, with oslo.messaging's keys."""
        return {"ctxt": self.ctxt, "publisher_id": self.publisher_id,
                "event_type": self.event_type, "priority": self.priority,
                "payload": self.payload, "metadata": self.metadata}
