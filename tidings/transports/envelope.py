"""The wire format: oslo.messaging's notification message and its v1/v2 envelopes.

Encoding and decoding live here once, so every driver carries the same bytes and tidings can
consume (and feed) real OpenStack notification streams. A notification message is a JSON object::

    {"message_id": "...", "publisher_id": "compute.host1", "event_type": "compute.instance.create",
     "priority": "INFO", "payload": {...}, "timestamp": "2026-11-22 10:00:00.123456",
     "_context_user_id": "...", ...}

``messaging`` (v1) sends that object as the body; ``messagingv2`` wraps it as
``{"oslo.version": "2.0", "oslo.message": "<the object as a JSON string>"}``.

Values JSON cannot carry are written as oslo.messaging writes them on RabbitMQ: in v2 as
``jsonutils.to_primitive`` converts them (a datetime becomes ``2024-01-02T03:04:05.123456``); in
v1 as kombu's JSON marks them (``{"__type__": "datetime", "__value__": "2024-01-02T03:04:05"}``),
which decoding turns back into the value, as oslo.messaging's listeners do.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import decimal
import functools
import inspect
import io
import itertools
import json
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tidings.transports.errors import MalformedMessage
from tidings.transports.signing import SIGNATURE_KEY, SigningKeys

__all__ = ["CONTEXT_PREFIX", "Notification", "context_of", "decode", "decode_envelope", "encode",
           "pack_context", "to_primitive", "unpack_context"]

CONTEXT_PREFIX = "_context_"
VERSION_KEY = "oslo.version"
MESSAGE_KEY = "oslo.message"
SUPPORTED_VERSION = "2.0"

_NASTY_TYPE_TESTS: list[Callable[..., bool]] = [
    inspect.ismodule, inspect.isclass, inspect.ismethod, inspect.isfunction,
    inspect.isgeneratorfunction, inspect.isgenerator, inspect.istraceback, inspect.isframe,
    inspect.iscode, inspect.isbuiltin, inspect.isroutine, inspect.isabstract,
]
_SIMPLE_TYPES = (str, int, type(None), bool, float)


def to_primitive(value: Any, convert_instances: bool = False, convert_datetime: bool = True,
                 level: int = 0, max_depth: int = 3, encoding: str = "utf-8",
                 fallback: Callable[[Any], Any] | None = None) -> Any:
    """``oslo_serialization.jsonutils.to_primitive`` (oslo.serialization 5; Apache-2.0,
    Copyright OpenStack Foundation), reproduced: what oslo.messaging writes for a value JSON
    cannot carry. A datetime becomes ``2024-01-02T03:04:05.123456``, a date ``2024-01-02``,
    bytes their UTF-8 text, a set or other iterable a list, a UUID, Decimal or IP address its
    string, an exception its repr, a mapping a dict, a module, class or function its str; an
    object that is none of these raises ValueError (as there: oslo.messaging then logs and
    sends nothing; tidings raises it to the caller). It is the encoder's ``default``, so it
    costs nothing for JSON's own types.
    """
    orig_fallback = fallback
    if fallback is None:
        fallback = str
    if isinstance(value, _SIMPLE_TYPES):
        return value
    if isinstance(value, bytes):
        return value.decode(encoding=encoding)
    xmlrpc = sys.modules.get("xmlrpc.client")
    if xmlrpc is not None and isinstance(value, xmlrpc.DateTime):
        value = datetime.datetime(*tuple(value.timetuple())[:6])
    if isinstance(value, datetime.datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%S.%f") if convert_datetime else value
    if isinstance(value, datetime.date):
        return value.strftime("%Y-%m-%d") if convert_datetime else value
    if isinstance(value, uuid.UUID):
        return str(value)
    netaddr = sys.modules.get("netaddr")  # no netaddr object exists unless it was imported
    if netaddr is not None and isinstance(value, (netaddr.IPAddress, netaddr.IPNetwork,
                                                  netaddr.IPRange)):
        return str(value)
    ipaddress = sys.modules.get("ipaddress")
    if ipaddress is not None and isinstance(value, (ipaddress.IPv4Address,
                                                    ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, Exception):
        return repr(value)
    if type(value) is itertools.count:
        return fallback(value)
    if any(test(value) for test in _NASTY_TYPE_TESTS):
        return fallback(value)
    if level > max_depth:
        return None
    try:
        recursive = functools.partial(to_primitive, convert_instances=convert_instances,
                                      convert_datetime=convert_datetime, level=level,
                                      max_depth=max_depth, encoding=encoding,
                                      fallback=orig_fallback)
        if isinstance(value, dict):
            return {recursive(k): recursive(v) for k, v in value.items()}
        elif hasattr(value, "items"):
            return recursive(dict(value.items()), level=level + 1)
        elif hasattr(value, "__iter__") and not isinstance(value, io.IOBase):
            return list(map(recursive, value))
        elif convert_instances and hasattr(value, "__dict__"):
            return recursive(value.__dict__, level=level + 1)
    except TypeError:
        return fallback(value)
    if orig_fallback is None:
        raise ValueError(f"Cannot convert {value!r} to primitive")
    return orig_fallback(value)


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": "),
                          default=to_primitive).encode


def _kombu_default(value: Any) -> Any:
    """What oslo.messaging's rabbit driver writes for a value JSON cannot carry in a v1 body
    (``messaging`` driver): kombu's JSON encoder, which marks the type so that the receiving
    side (kombu, and :func:`decode` here) turns it back into the object."""
    reducer = getattr(value, "__json__", None)
    if reducer is not None:
        return reducer()
    for kind, marker, encode in _KOMBU_ENCODERS:
        if isinstance(value, kind):
            return {"__type__": marker, "__value__": encode(value)}
    if isinstance(value, bytes):
        try:
            return {"__type__": "bytes", "__value__": value.decode("utf-8")}
        except UnicodeDecodeError:
            return {"__type__": "base64", "__value__": base64.b64encode(value).decode("utf-8")}
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_KOMBU_ENCODERS: tuple[tuple[type, str, Callable[[Any], Any]], ...] = (
    (datetime.datetime, "datetime", datetime.datetime.isoformat),
    (datetime.date, "date", datetime.date.isoformat),
    (datetime.time, "time", datetime.time.isoformat),
    (decimal.Decimal, "decimal", str),
    (uuid.UUID, "uuid", lambda u: {"hex": u.hex}),
)
_KOMBU_DECODERS: dict[str, Callable[[Any], Any]] = {
    "bytes": lambda v: v.encode("utf-8"),
    "base64": lambda v: base64.b64decode(v.encode("utf-8")),
    "datetime": datetime.datetime.fromisoformat,
    "date": lambda v: datetime.datetime.fromisoformat(v).date(),
    "time": datetime.time.fromisoformat,
    "decimal": decimal.Decimal,
    "uuid": lambda v: uuid.UUID(**v),
}


def _kombu_hook(obj: dict[str, Any]) -> Any:
    """kombu's ``object_hook``: a ``{"__type__": ..., "__value__": ...}`` object back into its
    value; an unknown type makes the body undecodable, as there."""
    if obj.keys() == {"__type__", "__value__"}:
        decoder = _KOMBU_DECODERS.get(obj["__type__"])
        if decoder is None:
            raise ValueError(f"unsupported kombu type marker {str(obj['__type__'])[:40]!r}")
        return decoder(obj["__value__"])
    return obj


_dumps_v1 = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": "),
                             default=_kombu_default).encode
_dumps_v1_ascii = json.JSONEncoder(ensure_ascii=True, separators=(", ", ": "),
                                   default=_kombu_default).encode
# For a body that cannot be UTF-8 (a lone surrogate in a string): escaped to ASCII, as
# oslo.messaging always writes.
_dumps_ascii = json.JSONEncoder(ensure_ascii=True, separators=(", ", ": "),
                                default=to_primitive).encode
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
        fast = make(None, to_primitive, _quote, None, ": ", ", ", False, False, True)
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
           signer: SigningKeys | None = None, route: tuple[str, str] = ("", "")) -> bytes:
    """Encode a wire message (context already packed) for the given envelope version.

    With a ``signer`` that has an active key, the v2 envelope carries a signature over the
    ``oslo.message`` string and ``route``, the (exchange, routing key) it is sent to (see
    tidings.transports.signing): a signed body is made for one route; v1 bodies cannot be signed.
    """
    if version >= 2.0:
        inner = _dumps_inner(message)
        signature = signer.sign(inner, *route) if signer is not None else None
        tail = "}" if signature is None else f", \"{SIGNATURE_KEY}\": {_dumps(signature)}}}"
        try:
            return (_V2_HEAD + _quote(inner) + tail).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: escape it, as oslo.messaging does
            inner = _dumps_ascii(message)
            signature = signer.sign(inner, *route) if signer is not None else None
            tail = "}" if signature is None else \
                f", \"{SIGNATURE_KEY}\": {_dumps(signature)}}}"
            return (_V2_HEAD + _quote(inner) + tail).encode("utf-8")
    if signer is not None and signer.active is not None:
        raise ValueError("signed notifications need the v2 envelope: use the notifier driver "
                         "'messagingv2', not 'messaging'")
    try:
        return _dumps_v1(message).encode("utf-8")
    except UnicodeEncodeError:
        return _dumps_v1_ascii(message).encode("utf-8")


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
        if '"__type__"' in text:  # kombu's typed values (oslo.messaging's v1 over RabbitMQ)
            try:
                outer = _loads(text, object_hook=_kombu_hook)
            except (ValueError, TypeError, binascii.Error) as exc:
                raise MalformedMessage(f"body has a bad typed value: {str(exc)[:120]}") \
                    from None
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
