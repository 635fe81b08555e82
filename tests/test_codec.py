"""gearoffload.codec: JSON (bytes exact), msgpack, signed pickle, and refusals."""

from __future__ import annotations

import pickle

import pytest

from conftest import need_module
from gearoffload.codec import Codec, PayloadError, sign_payload, stable_hash, verify_payload

VALUES = [
    None, True, 0, -7, 2**70, 1.5, "", "héllo\0", b"", b"\x00\xff\x80raw",
    [1, "a", b"b", [None]], {"k": b"v", "n": {"x": [b"\x01"]}},
    {"\0": "a user key that looks like our tag"}, {"\0": ["b", "AAAA"]},
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_json_round_trip_is_exact(value):
    codec = Codec()
    data = codec.dumps(value)
    assert data[:1] == b"j"
    assert codec.loads(data) == value
    assert type(codec.loads(data)) is type(value)


def test_json_tuples_become_lists_and_bad_types_are_refused_with_advice():
    codec = Codec()
    assert codec.loads(codec.dumps((1, (2, b"3")))) == [1, [2, b"3"]]
    with pytest.raises(TypeError, match="msgpack, or pickle with a secret key"):
        codec.dumps({1, 2})
    with pytest.raises(TypeError, match="str dict keys"):
        codec.dumps({1: "int key"})


def test_msgpack_round_trip():
    need_module("msgpack")
    codec = Codec("msgpack")
    for value in VALUES:
        data = codec.dumps(value) if not isinstance(value, int) or value < 2**64 else None
        if data is None:
            continue
        assert data[:1] == b"m"
        assert codec.loads(data) == value
    # a JSON-only side still reads msgpack when it is installed
    assert Codec().loads(codec.dumps({"a": b"b"})) == {"a": b"b"}


def test_pickle_needs_a_key_and_is_verified_before_loading():
    with pytest.raises(ValueError, match="needs a secret key"):
        Codec("pickle")
    signed = Codec("pickle", secret_key="s3cret")
    value = {"set": {1, 2}, "tuple": (1, 2)}
    data = signed.dumps(value)
    assert signed.loads(data) == value
    # a receiver without the key, or with another key, refuses
    with pytest.raises(PayloadError, match="no secret key"):
        Codec().loads(data)
    with pytest.raises(PayloadError, match="bad signature"):
        Codec(secret_key="other").loads(data)
    # a forged pickle (valid pickle, wrong signature) is never unpickled
    evil = b"p" + b"\0" * 32 + pickle.dumps(print)
    with pytest.raises(PayloadError, match="bad signature"):
        signed.loads(evil)
    tampered = data[:-2] + bytes([data[-2] ^ 1]) + data[-1:]
    with pytest.raises(PayloadError):
        signed.loads(tampered)


@pytest.mark.parametrize("data", [b"", b"x{}", b"j{not json", b"j\xff\xfe",
                                  b'j{"\\u0000":["z",1]}', b'j{"\\u0000":["b","!!"]}',
                                  b"p" + b"short"])
def test_garbage_is_a_payload_error(data):
    with pytest.raises(PayloadError):
        Codec(secret_key="k").loads(data)


def test_unknown_format_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="json, msgpack, pickle"):
        Codec("yaml")


def test_stable_hash_ignores_dict_order_and_sequence_type():
    assert stable_hash("f", [1, 2], {"b": 1, "a": 2}) == stable_hash("f", (1, 2),
                                                                     {"a": 2, "b": 1})
    assert stable_hash("f", [1]) != stable_hash("f", [2])
    assert stable_hash(b"\x00") != stable_hash("\x00")
    assert len(stable_hash({1, 2})) == 40


def test_signed_payloads_are_checked_both_ways():
    signed = sign_payload("key", b"j{}")
    assert verify_payload("key", signed) == b"j{}"
    assert verify_payload(None, b"j{}") == b"j{}"  # no key on either side: plain payloads
    with pytest.raises(PayloadError, match="unsigned"):
        verify_payload("key", b"j{}")
    with pytest.raises(PayloadError, match="bad signature"):
        verify_payload("other", signed)
    with pytest.raises(PayloadError, match="bad signature"):
        verify_payload("key", signed[:-1] + b"]")
    with pytest.raises(PayloadError, match="no secret key"):
        verify_payload(None, signed)
