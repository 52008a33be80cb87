"""The envelope's fast paths must be invisible: encode() gives the bytes json.dumps would, and
decode_envelope() accepts, returns and rejects exactly what a plain json.loads parse does."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidings.transports import envelope
from tidings.transports.errors import MalformedMessage
from tidings.transports.signing import SigningKeys

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
wire_messages = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


def reference_decode(body: bytes) -> tuple[dict[str, Any], str | None, Any]:
    """decode_envelope as it was before the fast path: json.loads twice, checks in between."""
    try:
        outer = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedMessage(str(exc)) from None
    if not isinstance(outer, dict):
        raise MalformedMessage("not an object")
    if "oslo.version" not in outer:
        return outer, None, None
    version = outer["oslo.version"]
    if not isinstance(version, str) or version.split(".")[0] != "2":
        raise MalformedMessage("version")
    inner = outer.get("oslo.message")
    if not isinstance(inner, str):
        raise MalformedMessage("no string")
    try:
        message = json.loads(inner)
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(str(exc)) from None
    if not isinstance(message, dict):
        raise MalformedMessage("inner not an object")
    return message, inner, outer.get("tidings.signature")


def same_outcome(body: bytes) -> None:
    try:
        expected: Any = reference_decode(body)
    except MalformedMessage:
        expected = MalformedMessage
    try:
        got: Any = envelope.decode_envelope(body)
    except MalformedMessage:
        got = MalformedMessage
    # repr: NaN != NaN, but both sides must hold the same NaN-bearing structure
    assert repr(got) == repr(expected)
    try:
        message: Any = envelope.decode(body)
    except MalformedMessage:
        message = MalformedMessage
    assert repr(message) == repr(expected if expected is MalformedMessage else expected[0])


def _v2(inner: str) -> str:
    return json.dumps({"oslo.version": "2.0", "oslo.message": inner}, ensure_ascii=False)


# Small edits around the exact layout the fast path recognises: each may or may not still be
# valid JSON, and decode must agree with the reference either way.
EDITS = [
    lambda s: s, lambda s: s + " ", lambda s: " " + s, lambda s: s + "x", lambda s: s[:-1],
    lambda s: s.replace('\\"', '"', 1), lambda s: s.replace(": ", ":\n", 1),
    lambda s: s.replace('{\\"', '{\\n\\"', 1), lambda s: s.replace('{\\"', '{\n\\"', 1),
    lambda s: s.replace('{\\"', ' {\\"', 1), lambda s: s[:-2] + ' "}', lambda s: s[:-2] + '\\n"}',
    lambda s: s[:-2] + '\\u0020"}', lambda s: s[:-2] + '\\x"}', lambda s: s[:-2] + '\t"}',
    lambda s: s[:-1] + ', "oslo.message": "{}"}', lambda s: s[:-1] + ', "tidings.signature": 1}',
    lambda s: "\ufeff" + s, lambda s: s.replace("2.0", "3.0", 1),
]


@settings(max_examples=300, deadline=None)
@given(message=wire_messages, edit=st.sampled_from(range(len(EDITS))))
def test_decode_agrees_with_plain_json_loads(message: dict[str, Any], edit: int) -> None:
    body = EDITS[edit](_v2(json.dumps(message, ensure_ascii=False))).encode("utf-8", "replace")
    same_outcome(body)


@pytest.mark.parametrize("inner", [
    "[]", "1", '"s"', "{} {}", '{"a": 1}x', "{", '{"a": "\x01"}', '{"a": NaN}', "{}",
    '{"a": 1} ', ' {"a": 1}', "[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000,
])
def test_decode_edge_cases_agree(inner: str) -> None:
    same_outcome(_v2(inner).encode("utf-8"))


@settings(max_examples=300, deadline=None)
@given(message=wire_messages)
def test_encode_is_byte_identical_to_json_dumps(message: dict[str, Any]) -> None:
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": "), default=str).encode
    inner = dumps(message)
    assert envelope.encode(message) == dumps({"oslo.version": "2.0",
                                              "oslo.message": inner}).encode("utf-8")
    assert envelope.encode(message, 1.0) == inner.encode("utf-8")
    assert repr(envelope.decode(envelope.encode(message))) == repr(json.loads(inner))


def test_signed_bodies_take_the_general_path_and_verify() -> None:
    keys = SigningKeys({"k1": b"0123456789abcdef0123"}, active="k1", require=True)
    body = envelope.encode({"priority": "INFO", "payload": {"x": 1}}, 2.0, keys,
                           ("nova", "n.info"))
    message, inner, signature = envelope.decode_envelope(body)
    assert message["payload"] == {"x": 1} and signature["kid"] == "k1"
    assert keys.verify(inner, signature, [("nova", "n.info")])


def test_cycles_and_odd_values_fail_or_encode_as_json_dumps_does() -> None:
    cyclic: dict[str, Any] = {"priority": "INFO"}
    cyclic["payload"] = cyclic
    with pytest.raises(ValueError, match="Circular reference"):
        envelope.encode(cyclic)
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RecursionError):
        envelope.encode({"payload": deep})

    class Odd:
        def __str__(self) -> str:
            return "odd"

    # An object with nothing but __str__ is refused, as oslo.messaging's to_primitive does.
    with pytest.raises(ValueError, match="Cannot convert"):
        envelope.encode({"a": Odd()})
    shared = {"k": 1}  # the same object twice is not a cycle
    decoded = envelope.decode(envelope.encode({"b": [shared, shared], 3: 4.5}))
    assert decoded == {"b": [{"k": 1}, {"k": 1}], "3": 4.5}


def test_bytes_that_are_not_utf8_are_rejected_on_every_path() -> None:
    body = _v2('{"priority": "INFO", "a": "x"}').encode("utf-8").replace(b"x", b"\xff")
    same_outcome(body)
    with pytest.raises(MalformedMessage, match="not valid UTF-8"):
        envelope.decode(body)
