"""Property-based tests (hypothesis) of the wire codec and the admin-line parser.

- every packet type round-trips through ``encode`` and ``Decoder``;
- the codec properties hold for both implementations (pure Python and the C accelerator);
- any byte stream, split at any points, gives packets/lines or a ``ProtocolError`` (never
  another exception), and the split never changes the result: same items, same error
  position, same tail left buffered;
- any admin line gets exactly one reply from ``AdminProtocol.handle``, never an exception.
"""

from __future__ import annotations

import pytest
from codec_impls import IMPLS, Impl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gearoffload.protocol import (
    FIELD_COUNTS,
    REQ,
    RES,
    Packet,
    PacketType,
    ProtocolError,
    PyDecoder,
    py_encode,
)
from gearoffload_server.admin import AdminProtocol, split_words
from gearoffload_server.config import ServerConfig
from gearoffload_server.state import JobServerState, ManualScheduler, Peer

MANY = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAGICS = st.sampled_from([REQ, RES])
TYPES = st.sampled_from(list(PacketType))
SHORT = st.binary(max_size=24)
NO_NUL = st.binary(max_size=24).map(lambda b: b.replace(b"\0", b""))


@st.composite
def packet_args(draw, ptype: int) -> tuple[bytes, ...]:
    """Arguments for ``ptype``: only the last field may contain NUL."""
    count = FIELD_COUNTS[ptype]
    if count == 0:
        return ()
    return tuple(draw(NO_NUL) for _ in range(count - 1)) + (draw(SHORT),)


@st.composite
def packets(draw) -> Packet:
    ptype = draw(TYPES)
    return Packet(draw(MAGICS), int(ptype), draw(packet_args(ptype)))


#: A text line as the decoder yields it: not starting with NUL, no newline, no final CR.
LINES = st.binary(max_size=40).map(
    lambda b: b.replace(b"\n", b"").rstrip(b"\r")).filter(lambda b: not b.startswith(b"\0"))


@st.composite
def items(draw) -> tuple[Packet | bytes, bytes]:
    """One decodable item and its wire form."""
    if draw(st.booleans()):
        p = draw(packets())
        return p, py_encode(p.magic, p.type, p.args)
    line = draw(LINES)
    return line, line + draw(st.sampled_from([b"\n", b"\r\n"]))


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` split at ``points`` (any ints; taken modulo len+1, sorted)."""
    bounds = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def run(decoder: PyDecoder, chunks: list[bytes]):
    """Feed ``chunks``; return (items, error or None, stream position reached).

    The position is where decoding stopped: the start of the bad packet after an error,
    else the start of the incomplete tail. Any exception but ``ProtocolError`` escapes.
    """
    out: list[Packet | bytes] = []
    fed = 0
    for chunk in chunks:
        fed += len(chunk)
        try:
            out.extend(decoder.feed(chunk))
        except ProtocolError as exc:
            return out, (str(exc), exc.code, exc.in_sync), fed - decoder.buffered
    return out, None, fed - decoder.buffered


# --- round trip -----------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.data())
@pytest.mark.parametrize("impl", IMPLS)
def test_round_trip_every_type(impl: Impl, data):
    for ptype in PacketType:  # each example covers all 42 types
        magic = data.draw(MAGICS)
        args = data.draw(packet_args(ptype))
        wire = impl.encode(magic, ptype, args)
        assert len(wire) == 12 + sum(map(len, args)) + max(len(args) - 1, 0)
        assert list(impl.Decoder().feed(wire)) == [Packet(magic, int(ptype), args)]
        assert list(impl.Decoder(magic=magic, text=False).feed(wire)) == [
            Packet(magic, int(ptype), args)]


@FAST
@given(st.lists(items(), max_size=12), st.lists(st.integers(0, 10_000), max_size=12))
@pytest.mark.parametrize("impl", IMPLS)
def test_round_trip_stream_split_anywhere(impl: Impl, seq, points):
    wire = b"".join(w for _, w in seq)
    expected = [item for item, _ in seq]
    got, error, pos = run(impl.Decoder(), cut(wire, points))
    assert error is None
    assert got == expected
    assert pos == len(wire)


@FAST
@given(st.lists(items(), max_size=6))
@pytest.mark.parametrize("impl", IMPLS)
def test_round_trip_byte_by_byte(impl: Impl, seq):
    wire = b"".join(w for _, w in seq)
    got, error, _ = run(impl.Decoder(), [wire[i:i + 1] for i in range(len(wire))])
    assert error is None
    assert got == [item for item, _ in seq]


# --- arbitrary streams ----------------------------------------------------------------

def _header(magic: bytes, ptype: int, size: int) -> bytes:
    return magic + ptype.to_bytes(4, "big") + size.to_bytes(4, "big")


#: Fragments that reach deep into the decoder: valid packets, lines, near-valid headers.
FRAGMENTS = st.one_of(
    items().map(lambda iw: iw[1]),
    st.binary(max_size=30),
    st.builds(_header, st.sampled_from([REQ, RES, b"\0REX", b"\0\0\0\0", b"REQ\0"]),
              st.integers(0, 45), st.integers(0, 80)),
    st.builds(lambda n: b"x" * n + b"\n", st.integers(0, 40)),
    st.just(b"\0"), st.just(b"\r\n"), st.just(b"\n"),
)
STREAMS = st.one_of(st.binary(max_size=200),
                    st.lists(FRAGMENTS, max_size=10).map(b"".join))
DECODERS = st.sampled_from([
    {},
    {"max_packet_size": 32, "max_line_size": 16},
    {"text": False},
    {"magic": REQ, "max_line_size": 8},
    {"magic": RES, "text": False, "max_packet_size": 0},
])


@MANY
@given(STREAMS, st.lists(st.integers(0, 10_000), max_size=20), DECODERS)
@pytest.mark.parametrize("impl", IMPLS)
def test_any_stream_split_anywhere_same_result(impl: Impl, stream, points, options):
    whole = run(impl.Decoder(**options), [stream])
    split = run(impl.Decoder(**options), cut(stream, points))
    assert split[0] == whole[0]  # same items
    assert split[2] == whole[2]  # same error position (or same incomplete tail)
    assert (split[1] is None) == (whole[1] is None)
    if whole[1] is not None:
        assert split[1][1:] == whole[1][1:]  # same code and in_sync
    for item in whole[0]:
        if isinstance(item, Packet):
            assert len(item.args) == FIELD_COUNTS[item.type]
        else:
            assert b"\n" not in item


@FAST
@given(STREAMS, DECODERS)
@pytest.mark.parametrize("impl", IMPLS)
def test_any_stream_byte_by_byte_same_result(impl: Impl, stream, options):
    whole = run(impl.Decoder(**options), [stream])
    single = run(impl.Decoder(**options), [stream[i:i + 1] for i in range(len(stream))])
    assert single[0] == whole[0] and single[2] == whole[2]
    assert (single[1] is None) == (whole[1] is None)


# --- admin lines ----------------------------------------------------------------------

WORDS = [b"status", b"prioritystatus", b"workers", b"show", b"jobs", b"unique", b"dead",
         b"cancel", b"job", b"create", b"drop", b"function", b"maxqueue", b"getpid",
         b"verbose", b"version", b"shutdown", b"graceful", b"requeue", b"f1", b"f2",
         b"H:t:1", b"H:t:2", b"-1", b"7", b"", b"\t", b"\0", b"\r", b"STATUS"]
ADMIN_LINES = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),
    st.lists(st.sampled_from(WORDS), max_size=7).map(b" ".join),
    st.lists(st.one_of(st.sampled_from(WORDS), st.binary(max_size=6)), max_size=6)
    .map(lambda ws: b"  ".join(ws).replace(b"\n", b" ")),
)


def _admin_fixture() -> tuple[AdminProtocol, Peer, list[bool]]:
    state = JobServerState(ServerConfig(handle_prefix="H:t", enable_shutdown=True),
                           ManualScheduler())
    shutdowns: list[bool] = []
    state.on_shutdown = shutdowns.append
    admin = AdminProtocol(state)
    worker = state.connect(Peer(fd=10, address="127.0.0.1"))
    client = state.connect(Peer(fd=11, address="10.0.0.1", loopback=False))
    state.handle(worker, Packet(REQ, PacketType.CAN_DO, (b"f1",)))
    for n in range(3):
        state.handle(client, Packet(REQ, PacketType.SUBMIT_JOB_BG, (b"f1", b"u%d" % n, b"x")))
    state.handle(client, Packet(REQ, PacketType.SUBMIT_JOB, (b"f2", b"", b"y")))
    state.handle(worker, Packet(REQ, PacketType.GRAB_JOB, ()))
    admin_peer = state.connect(Peer(fd=12, address="127.0.0.1"))
    remote = state.connect(Peer(fd=13, address="192.0.2.1", loopback=False))
    return admin, admin_peer, [remote, shutdowns]


def _check_reply(reply: bytes) -> None:
    assert reply.startswith((b"OK", b"ERR")) or reply.endswith(b".\n"), reply
    if reply.startswith(b"ERR"):
        assert reply.endswith(b"\r\n") and reply.count(b"\n") == 1, reply


@FAST
@given(st.lists(ADMIN_LINES, min_size=1, max_size=8))
def test_admin_any_line_exactly_one_reply(lines):
    admin, peer, (remote, _) = _admin_fixture()
    for line in lines:
        for who in (peer, remote):
            before = len(who.out)
            admin.handle(who, line)
            assert len(who.out) == before + 1, line
            _check_reply(who.out[-1])


@FAST
@given(ADMIN_LINES)
def test_split_words_never_has_spaces_or_empty_tail(line):
    words = split_words(line)
    assert words and all(b" " not in w for w in words)
    assert len(words) == 1 or words[-1] != b""
    assert b"".join(words) == line.replace(b" ", b"")
