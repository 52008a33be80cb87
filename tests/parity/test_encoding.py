"""tidings' reproductions of oslo's helpers against the originals, on the same inputs:
``to_primitive`` (oslo_serialization.jsonutils, what oslo.messaging writes for values JSON cannot
carry), the v2 body (oslo.messaging's jsonutils.dumps of the message) and the password masking
(oslo_utils.strutils, what the log driver masks and what tidings masks in dict contexts)."""

from __future__ import annotations

import datetime
import decimal
import ipaddress
import json
import types
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oslo_serialization import jsonutils
from oslo_utils import strutils

from tidings.transports import envelope, masking

FIXED = [
    datetime.datetime(2024, 1, 2, 3, 4, 5, 123456), datetime.datetime(2024, 1, 2),
    datetime.date(1999, 12, 31), b"bytes \xc3\xa9", {1, 2}, frozenset(["a"]), (1, (2,)),
    uuid.UUID(int=5), decimal.Decimal("3.14"), ValueError("x"), KeyError(1),
    ipaddress.IPv4Address("1.2.3.4"), ipaddress.IPv6Address("fe80::1"), int, len, json,
    types.MappingProxyType({"a": {"b": datetime.date(2020, 1, 1)}}), range(3),
    {"deep": {"er": {"still": {"deeper": {"x": datetime.date(2020, 1, 1)}}}}},
]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(),
    st.binary().filter(lambda b: _utf8(b)), st.datetimes(), st.dates(), st.uuids(),
    st.decimals(allow_nan=False, allow_infinity=False),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner),
    st.dictionaries(st.text(max_size=8), inner, max_size=4),
    st.frozensets(st.one_of(st.integers(), st.text(max_size=4)), max_size=3)), max_leaves=12)


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("value", FIXED, ids=lambda v: type(v).__name__)
def test_to_primitive_as_oslo(value: Any) -> None:
    assert envelope.to_primitive(value) == jsonutils.to_primitive(value)
    assert envelope.to_primitive(value, convert_instances=True) == \
        jsonutils.to_primitive(value, convert_instances=True)


def test_iterators_as_oslo() -> None:
    assert envelope.to_primitive(iter([1, b"x"])) == jsonutils.to_primitive(iter([1, b"x"]))
    assert envelope.to_primitive(x for x in "ab").startswith("<generator object")


def test_unconvertible_raises_as_oslo() -> None:
    with pytest.raises(ValueError) as theirs:
        jsonutils.to_primitive(object())
    with pytest.raises(ValueError) as ours:
        envelope.to_primitive(object())
    assert str(ours.value).split(" at ")[0] == str(theirs.value).split(" at ")[0]


@settings(max_examples=300, deadline=None)
@given(values)
def test_v2_body_decodes_as_oslos(payload: Any) -> None:
    message = {"message_id": "m", "publisher_id": "p", "event_type": "e", "priority": "INFO",
               "payload": payload, "timestamp": "t", "_context_user": "u"}
    inner = json.loads(envelope.encode(message))["oslo.message"]
    assert json.loads(inner) == json.loads(jsonutils.dumps(message))


key_parts = st.sampled_from(["password", "Token", "auth", "_", "x", "secret", "KEY", "pass",
                             "user", "sslkey", "1", "-", " ", "=", "'", '"', ":", "<", ">",
                             "--", "uuid", "é"])
texts = st.lists(key_parts, max_size=8).map("".join)
dicts = st.recursive(
    st.one_of(st.none(), st.integers(), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner),
                            st.dictionaries(texts, inner, max_size=4)), max_leaves=10)


@settings(max_examples=400, deadline=None)
@given(texts)
def test_mask_password_as_oslo(text: str) -> None:
    assert masking.mask_password(text) == strutils.mask_password(text)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(texts, dicts, max_size=5))
def test_mask_dict_password_and_contexts_as_oslo(data: dict[str, Any]) -> None:
    expected = strutils.mask_dict_password(data)
    assert masking.mask_dict_password(data) == expected
    assert masking.mask_context(data) == expected
    assert masking.mask_context(data) == expected  # again, from what was remembered


def test_mask_context_examples() -> None:
    for ctxt in ({"request_id": "req-1"}, {"auth_token": "t"}, {"user": "u", "n": 1},
                 {"note": "password=abc"}, {"nested": {"token": "x"}}, {"roles": ["a"]},
                 {1: "x"}, {"flag": True, "f": 1.5, "none": None}):
        assert masking.mask_context(ctxt) == strutils.mask_dict_password(ctxt)
        assert masking.mask_context(ctxt) == strutils.mask_dict_password(ctxt)
