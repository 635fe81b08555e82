"""The pure codec: field counts, encode, and the incremental decoder's framing rules."""

from __future__ import annotations

import random
import struct

import pytest

from gearoffload.errors import ProtocolError
from gearoffload.protocol import (
    FIELD_COUNTS,
    REQ,
    RES,
    Decoder,
    Packet,
    PacketType,
    encode,
    encode_request,
    encode_response,
)

T = PacketType

# PROTOCOL.md §2, "Field-count summary for a codec".
EXPECTED_FIELDS = {
    0: (3, 4, 5, 6, 9, 10, 24, 30, 39),
    1: (1, 2, 8, 14, 15, 16, 17, 22, 26, 27, 41),
    2: (13, 19, 23, 25, 28, 29),
    3: (7, 11, 12, 18, 21, 32, 33, 34),
    4: (31, 36),
    5: (20, 37, 38, 40),
    6: (42,),
    8: (35,),
}


def test_every_type_1_to_42_has_its_field_count():
    seen = set()
    for count, types in EXPECTED_FIELDS.items():
        for ptype in types:
            assert FIELD_COUNTS[ptype] == count, PacketType(ptype).name
            seen.add(ptype)
    assert seen == set(range(1, 43))
    assert [int(t) for t in PacketType] == list(range(1, 43))


def test_worked_example_bytes():
    # PROTOCOL.md §9, byte for byte.
    assert encode_request(T.CAN_DO, b"upper") == bytes.fromhex(
        "0052455100000001000000057570706572")
    assert encode_request(T.SUBMIT_JOB, b"upper", b"", b"abc") == bytes.fromhex(
        "00524551000000070000000a7570706572000061626 3".replace(" ", ""))
    assert encode_response(T.JOB_ASSIGN, b"H:box:1", b"upper", b"abc") == bytes.fromhex(
        "005245530000000b00000011483a626f783a310075707065720061626 3".replace(" ", ""))
    assert encode_response(T.NOOP) == bytes.fromhex("005245530000000600000000")


@pytest.mark.parametrize("ptype", range(1, 43))
def test_roundtrip_every_type(ptype):
    count = FIELD_COUNTS[ptype]
    args = tuple(b"f%d" % i for i in range(count - 1)) + ((b"last\0with\0nuls",) if count else ())
    wire = encode(REQ, ptype, args)
    assert list(Decoder().feed(wire)) == [Packet(REQ, ptype, args)]


def test_last_field_keeps_nuls_and_may_be_empty():
    wire = encode_request(T.WORK_COMPLETE, b"H:x:1", b"a\0b\0\0")
    assert list(Decoder().feed(wire))[0].args == (b"H:x:1", b"a\0b\0\0")
    wire = encode_request(T.SUBMIT_JOB, b"f", b"", b"")
    assert list(Decoder().feed(wire))[0].args == (b"f", b"", b"")


def test_one_field_packet_is_whole_payload_with_nuls():
    wire = encode_request(T.CAN_DO, b"fu\0nc")
    assert list(Decoder().feed(wire))[0].args == (b"fu\0nc",)


def test_zero_field_packet_with_stray_payload_stays_in_sync():
    stray = REQ + struct.pack(">II", T.GRAB_JOB, 3) + b"xyz"
    wire = stray + encode_request(T.ECHO_REQ, b"next")
    assert list(Decoder().feed(wire)) == [
        Packet(REQ, T.GRAB_JOB, ()), Packet(REQ, T.ECHO_REQ, (b"next",))]


def test_any_split_of_a_stream_gives_the_same_items():
    wire = (encode_request(T.SUBMIT_JOB, b"f", b"u", b"x" * 300)
            + b"status\r\n"
            + encode_request(T.GRAB_JOB_UNIQ)
            + b"workers\n"
            + encode_request(T.WORK_COMPLETE, b"H:1", b"\0" * 10))
    expected = list(Decoder().feed(wire))
    assert len(expected) == 5 and expected[1] == b"status" and expected[3] == b"workers"
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(wire)), rng.randint(1, 12)))
        decoder = Decoder()
        items = []
        for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            items.extend(decoder.feed(wire[a:b]))
        assert items == expected
        assert decoder.buffered == 0


def test_byte_by_byte_partial_packet_is_buffered():
    wire = encode_request(T.ECHO_REQ, b"hello")
    decoder = Decoder()
    for i in range(len(wire) - 1):
        assert list(decoder.feed(wire[i:i + 1])) == []
    assert list(decoder.feed(wire[-1:])) == [Packet(REQ, T.ECHO_REQ, (b"hello",))]


def test_feed_takes_data_even_if_not_iterated():
    decoder = Decoder()
    decoder.feed(encode_request(T.ECHO_REQ, b"a")[:7])
    assert list(decoder.feed(encode_request(T.ECHO_REQ, b"a")[7:])) == [
        Packet(REQ, T.ECHO_REQ, (b"a",))]


def test_text_line_endings():
    assert list(Decoder().feed(b"status\r\nversion\nshow jobs\r\n")) == [
        b"status", b"version", b"show jobs"]
    # A line without its newline waits for it.
    decoder = Decoder()
    assert list(decoder.feed(b"stat")) == []
    assert list(decoder.feed(b"us\n")) == [b"status"]


@pytest.mark.parametrize("garbage", [
    b"\0XYZ" + b"\0" * 8,
    b"\0RE",  # not yet decidable: no error, no packet
])
def test_bad_magic(garbage):
    decoder = Decoder()
    if len(garbage) < 4:
        assert list(decoder.feed(garbage)) == []
        with pytest.raises(ProtocolError, match="bad magic"):
            list(decoder.feed(b"X"))
        return
    with pytest.raises(ProtocolError, match="bad magic") as info:
        list(decoder.feed(garbage))
    assert info.value.code is None  # gearmand closes without a reply


@pytest.mark.parametrize("ptype", [0, 43, 0xFFFFFFFF])
def test_unknown_type_is_an_error(ptype):
    with pytest.raises(ProtocolError, match="unknown packet type") as info:
        list(Decoder().feed(REQ + struct.pack(">II", ptype, 0)))
    assert info.value.code is None


def test_missing_nuls_is_an_error_in_sync():
    wire = REQ + struct.pack(">II", T.SUBMIT_JOB, 3) + b"abc" + encode_request(T.ECHO_REQ, b"x")
    decoder = Decoder()
    items = decoder.feed(wire)
    with pytest.raises(ProtocolError, match="SUBMIT_JOB needs 3 fields") as info:
        next(items)
    assert info.value.in_sync and info.value.code == "INVALID_PACKET"
    # Parsing was bounded by the declared size: the next packet is intact.
    assert list(decoder.feed(b"")) == [Packet(REQ, T.ECHO_REQ, (b"x",))]


def test_packet_over_the_size_limit_is_rejected_from_its_header():
    header = REQ + struct.pack(">II", T.SUBMIT_JOB, 0xFFFFFFFF)
    with pytest.raises(ProtocolError, match="exceeds the limit") as info:
        list(Decoder(max_packet_size=1 << 20).feed(header))
    assert info.value.code == "ARGUMENT_TOO_LARGE"


def test_long_text_line_is_rejected_without_buffering_it_all():
    decoder = Decoder()
    with pytest.raises(ProtocolError, match="text line longer") as info:
        list(decoder.feed(b"x" * 10000))
    assert info.value.code == "LINE_TOO_LONG"
    assert list(Decoder().feed(b"x" * 8191 + b"\n")) == [b"x" * 8191]


def test_magic_restriction_and_binary_only():
    with pytest.raises(ProtocolError, match="unexpected magic"):
        list(Decoder(magic=RES).feed(encode_request(T.NOOP)))
    with pytest.raises(ProtocolError, match="expected a binary packet"):
        list(Decoder(text=False).feed(b"status\n"))
    assert list(Decoder(magic=RES).feed(encode_response(T.NOOP))) == [Packet(RES, T.NOOP, ())]


def test_random_bytes_raise_only_protocol_error():
    rng = random.Random(1234)
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        if rng.random() < 0.5:
            data = REQ + data
        decoder = Decoder(max_packet_size=4096, max_line_size=64)
        try:
            for item in decoder.feed(data):
                assert isinstance(item, (Packet, bytes))
        except ProtocolError:
            pass
