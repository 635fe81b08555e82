"""The codec: field counts, encode, and the incremental decoder's framing rules.

Every codec test runs on both implementations: the pure-Python reference and the C
accelerator (``codec_impls.IMPLS``).
"""

from __future__ import annotations

import random
import struct

import pytest
from codec_impls import IMPLS, Impl

from gearoffload.errors import ProtocolError
from gearoffload.protocol import (
    FIELD_COUNTS,
    REQ,
    RES,
    Packet,
    PacketType,
)

T = PacketType

# docs/protocol.md §2, "Field-count summary for a codec".
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


@pytest.mark.parametrize("impl", IMPLS)
def test_worked_example_bytes(impl: Impl):
    # docs/protocol.md §9, byte for byte.
    assert impl.request(T.CAN_DO, b"upper") == bytes.fromhex(
        "0052455100000001000000057570706572")
    assert impl.request(T.SUBMIT_JOB, b"upper", b"", b"abc") == bytes.fromhex(
        "00524551000000070000000a7570706572000061626 3".replace(" ", ""))
    assert impl.response(T.JOB_ASSIGN, b"H:box:1", b"upper", b"abc") == bytes.fromhex(
        "005245530000000b00000011483a626f783a310075707065720061626 3".replace(" ", ""))
    assert impl.response(T.NOOP) == bytes.fromhex("005245530000000600000000")


@pytest.mark.parametrize("ptype", range(1, 43))
@pytest.mark.parametrize("impl", IMPLS)
def test_roundtrip_every_type(impl: Impl, ptype):
    count = FIELD_COUNTS[ptype]
    args = tuple(b"f%d" % i for i in range(count - 1)) + ((b"last\0with\0nuls",) if count else ())
    wire = impl.encode(REQ, ptype, args)
    assert list(impl.Decoder().feed(wire)) == [Packet(REQ, ptype, args)]


@pytest.mark.parametrize("impl", IMPLS)
def test_last_field_keeps_nuls_and_may_be_empty(impl: Impl):
    wire = impl.request(T.WORK_COMPLETE, b"H:x:1", b"a\0b\0\0")
    assert list(impl.Decoder().feed(wire))[0].args == (b"H:x:1", b"a\0b\0\0")
    wire = impl.request(T.SUBMIT_JOB, b"f", b"", b"")
    assert list(impl.Decoder().feed(wire))[0].args == (b"f", b"", b"")


@pytest.mark.parametrize("impl", IMPLS)
def test_one_field_packet_is_whole_payload_with_nuls(impl: Impl):
    wire = impl.request(T.CAN_DO, b"fu\0nc")
    assert list(impl.Decoder().feed(wire))[0].args == (b"fu\0nc",)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_field_packet_with_stray_payload_stays_in_sync(impl: Impl):
    stray = REQ + struct.pack(">II", T.GRAB_JOB, 3) + b"xyz"
    wire = stray + impl.request(T.ECHO_REQ, b"next")
    assert list(impl.Decoder().feed(wire)) == [
        Packet(REQ, T.GRAB_JOB, ()), Packet(REQ, T.ECHO_REQ, (b"next",))]


@pytest.mark.parametrize("impl", IMPLS)
def test_any_split_of_a_stream_gives_the_same_items(impl: Impl):
    wire = (impl.request(T.SUBMIT_JOB, b"f", b"u", b"x" * 300)
            + b"status\r\n"
            + impl.request(T.GRAB_JOB_UNIQ)
            + b"workers\n"
            + impl.request(T.WORK_COMPLETE, b"H:1", b"\0" * 10))
    expected = list(impl.Decoder().feed(wire))
    assert len(expected) == 5 and expected[1] == b"status" and expected[3] == b"workers"
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(wire)), rng.randint(1, 12)))
        decoder = impl.Decoder()
        items = []
        for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            items.extend(decoder.feed(wire[a:b]))
        assert items == expected
        assert decoder.buffered == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_byte_by_byte_partial_packet_is_buffered(impl: Impl):
    wire = impl.request(T.ECHO_REQ, b"hello")
    decoder = impl.Decoder()
    for i in range(len(wire) - 1):
        assert list(decoder.feed(wire[i:i + 1])) == []
    assert list(decoder.feed(wire[-1:])) == [Packet(REQ, T.ECHO_REQ, (b"hello",))]


@pytest.mark.parametrize("impl", IMPLS)
def test_feed_takes_data_even_if_not_iterated(impl: Impl):
    decoder = impl.Decoder()
    decoder.feed(impl.request(T.ECHO_REQ, b"a")[:7])
    assert list(decoder.feed(impl.request(T.ECHO_REQ, b"a")[7:])) == [
        Packet(REQ, T.ECHO_REQ, (b"a",))]


@pytest.mark.parametrize("impl", IMPLS)
def test_text_line_endings(impl: Impl):
    assert list(impl.Decoder().feed(b"status\r\nversion\nshow jobs\r\n")) == [
        b"status", b"version", b"show jobs"]
    # A line without its newline waits for it.
    decoder = impl.Decoder()
    assert list(decoder.feed(b"stat")) == []
    assert list(decoder.feed(b"us\n")) == [b"status"]


@pytest.mark.parametrize("garbage", [
    b"\0XYZ" + b"\0" * 8,
    b"\0RE",  # not yet decidable: no error, no packet
])
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_magic(impl: Impl, garbage):
    decoder = impl.Decoder()
    if len(garbage) < 4:
        assert list(decoder.feed(garbage)) == []
        with pytest.raises(ProtocolError, match="bad magic"):
            list(decoder.feed(b"X"))
        return
    with pytest.raises(ProtocolError, match="bad magic") as info:
        list(decoder.feed(garbage))
    assert info.value.code is None  # gearmand closes without a reply


@pytest.mark.parametrize("ptype", [0, 43, 0xFFFFFFFF])
@pytest.mark.parametrize("impl", IMPLS)
def test_unknown_type_is_an_error(impl: Impl, ptype):
    with pytest.raises(ProtocolError, match="unknown packet type") as info:
        list(impl.Decoder().feed(REQ + struct.pack(">II", ptype, 0)))
    assert info.value.code is None


@pytest.mark.parametrize("impl", IMPLS)
def test_missing_nuls_is_an_error_in_sync(impl: Impl):
    wire = REQ + struct.pack(">II", T.SUBMIT_JOB, 3) + b"abc" + impl.request(T.ECHO_REQ, b"x")
    decoder = impl.Decoder()
    items = decoder.feed(wire)
    with pytest.raises(ProtocolError, match="SUBMIT_JOB needs 3 fields") as info:
        next(items)
    assert info.value.in_sync and info.value.code == "INVALID_PACKET"
    # Parsing was bounded by the declared size: the next packet is intact.
    assert list(decoder.feed(b"")) == [Packet(REQ, T.ECHO_REQ, (b"x",))]


@pytest.mark.parametrize("impl", IMPLS)
def test_packet_over_the_size_limit_is_rejected_from_its_header(impl: Impl):
    header = REQ + struct.pack(">II", T.SUBMIT_JOB, 0xFFFFFFFF)
    with pytest.raises(ProtocolError, match="exceeds the limit") as info:
        list(impl.Decoder(max_packet_size=1 << 20).feed(header))
    assert info.value.code == "ARGUMENT_TOO_LARGE"


@pytest.mark.parametrize("impl", IMPLS)
def test_long_text_line_is_rejected_without_buffering_it_all(impl: Impl):
    decoder = impl.Decoder()
    with pytest.raises(ProtocolError, match="text line longer") as info:
        list(decoder.feed(b"x" * 10000))
    assert info.value.code == "LINE_TOO_LONG"
    assert list(impl.Decoder().feed(b"x" * 8191 + b"\n")) == [b"x" * 8191]


@pytest.mark.parametrize("impl", IMPLS)
def test_magic_restriction_and_binary_only(impl: Impl):
    with pytest.raises(ProtocolError, match="unexpected magic"):
        list(impl.Decoder(magic=RES).feed(impl.request(T.NOOP)))
    with pytest.raises(ProtocolError, match="expected a binary packet"):
        list(impl.Decoder(text=False).feed(b"status\n"))
    assert list(impl.Decoder(magic=RES).feed(impl.response(T.NOOP))) == [Packet(RES, T.NOOP, ())]


@pytest.mark.parametrize("impl", IMPLS)
def test_random_bytes_raise_only_protocol_error(impl: Impl):
    rng = random.Random(1234)
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        if rng.random() < 0.5:
            data = REQ + data
        decoder = impl.Decoder(max_packet_size=4096, max_line_size=64)
        try:
            for item in decoder.feed(data):
                assert isinstance(item, (Packet, bytes))
        except ProtocolError:
            pass
