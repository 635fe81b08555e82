"""The C codec (``gearoffload._codec``) against the pure-Python reference.

Differential: for any stream (valid packets of every type, text lines, garbage, bad
magics, huge sizes, short headers), any decoder options, any chunking and any input type
(bytes, bytearray, memoryview), both decoders give identical items, identical errors
(type, message, code, in_sync) and leave identical tails buffered, also after an error
or a callback raising, and ``encode`` gives identical bytes. Plus what only the C side
has to get right: re-entrant calls, reference counting, the build itself.
"""

from __future__ import annotations

import doctest
import gc
import importlib
import os
import struct
import tracemalloc

import pytest
from codec_impls import PY, C
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import IN_CI
from gearoffload import protocol
from gearoffload.protocol import (
    DEFAULT_MAX_PACKET_SIZE,
    FIELD_COUNTS,
    MAX_LINE_SIZE,
    REQ,
    RES,
    Packet,
    PacketType,
    ProtocolError,
    py_encode,
)

needs_c = pytest.mark.skipif(C is None, reason="C codec not active")
MANY = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))

# --- the build ------------------------------------------------------------------------


def test_c_codec_is_built():
    """CI must never run the suite on the pure codec alone without noticing."""
    try:
        importlib.import_module("gearoffload._codec")
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"gearoffload._codec is not importable under CI: {exc}")
        pytest.skip(f"gearoffload._codec not built: {exc}")
    pure = os.environ.get("GEAROFFLOAD_PURE_PYTHON", "") not in ("", "0")
    assert protocol.ACCELERATED is not pure


def test_doctests():
    """The module's examples (Decoder, Router) on the active codec."""
    result = doctest.testmod(protocol)
    assert result.attempted >= 5 and result.failed == 0


def test_public_names_use_the_active_codec():
    assert protocol.Decoder is (C or PY).Decoder
    assert protocol.encode is (C or PY).encode
    assert protocol.Router is (
        importlib.import_module("gearoffload._codec").Router if C else protocol.PyRouter)
    # encode_request/encode_response look ``encode`` up at call time: the fast one.
    assert protocol.encode_request.__globals__["encode"] is protocol.encode
    wire = protocol.encode_request(PacketType.SUBMIT_JOB, b"f", b"", b"x")
    assert wire == py_encode(REQ, PacketType.SUBMIT_JOB, (b"f", b"", b"x"))
    assert protocol.encode_response(PacketType.NOOP) == py_encode(RES, PacketType.NOOP)


# --- streams --------------------------------------------------------------------------

def _header(magic: bytes, ptype: int, size: int) -> bytes:
    return magic + struct.pack(">II", ptype, size)


@st.composite
def packets(draw) -> bytes:
    ptype = draw(st.integers(1, 42))
    count = FIELD_COUNTS[ptype]
    field = st.binary(max_size=12).map(lambda b: b.replace(b"\0", b""))
    args = [draw(field) for _ in range(max(count - 1, 0))]
    if count:
        args.append(draw(st.binary(max_size=20)))
    if count > 1 and draw(st.integers(0, 9)) == 0:
        args = [b"".join(args)]  # too few NULs: INVALID_PACKET
    if count == 0 and draw(st.booleans()):
        args = [draw(st.binary(min_size=1, max_size=5))]  # a stray payload
    return py_encode(draw(st.sampled_from([REQ, RES])), ptype, args)


MAGICS = st.sampled_from([REQ, RES, b"\0REX", b"\0\0\0\0", b"REQ\0", b"\0RE\n", b"\0RESX"])
FRAGMENTS = st.one_of(
    packets(),
    packets(),
    st.binary(max_size=30),
    st.builds(_header, MAGICS, st.sampled_from([0, 1, 7, 13, 42, 43, 0xFFFFFFFF]),
              st.one_of(st.integers(0, 40), st.sampled_from([0x7FFFFFFF, 0xFFFFFFFF]))),
    st.builds(lambda h, n: h[:n], packets(), st.integers(0, 11)),  # a short header
    st.builds(lambda n, end: b"x" * n + end, st.integers(0, 40),
              st.sampled_from([b"\n", b"\r\n", b"\r", b"\r\r\n", b""])),
    st.sampled_from([b"\0", b"\r\n", b"\n", b"\r", b"\0R", b"\0RE", b"\0REQ", b"\0RES\0"]),
)
STREAMS = st.one_of(st.binary(max_size=200), st.lists(FRAGMENTS, max_size=12).map(b"".join))
#: fuzz/fuzz_decoder.py's OPTIONS, and odd values the Python code also accepts.
OPTIONS = st.sampled_from([
    {},
    {"max_packet_size": 32, "max_line_size": 16},
    {"text": False},
    {"magic": REQ, "max_line_size": 8},
    {"magic": RES, "text": False, "max_packet_size": 0},
    {"max_line_size": 0},
    {"max_line_size": 1, "max_packet_size": 1},
    {"max_line_size": -1},
    {"max_line_size": -7},
    {"max_packet_size": -1},
    {"max_packet_size": 2**80, "max_line_size": 2**80},
    {"magic": bytearray(RES)},
    {"magic": b"nope"},
    {"text": 0, "magic": memoryview(REQ)},
])
KINDS = st.sampled_from([bytes, bytearray, memoryview])


def chunked(stream: bytes, points: list[int], kinds: list[type]) -> list:
    bounds = sorted({p % (len(stream) + 1) for p in points} | {0, len(stream)})
    pieces = [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)] or [b""]
    return [kinds[i % len(kinds)](piece) if kinds else piece for i, piece in enumerate(pieces)]


def describe(item):
    """An item with its exact type, so that a bytes subclass or tuple would show."""
    if isinstance(item, tuple):
        return (type(item), tuple(item), type(item.args))
    return (type(item), item)


def run(impl, options: dict, chunks: list, mode: str) -> list:
    """Everything observable: items, errors, ``buffered`` after each chunk. Decoding
    goes on after an error, so the tail left after it is compared too."""
    decoder = impl.Decoder(**options)
    log: list = []
    for chunk in chunks:
        try:
            if mode == "feed":
                log.extend(describe(item) for item in decoder.feed(chunk))
            else:
                decoder.dispatch(chunk, lambda p: log.append(("packet", describe(p))),
                                 lambda line: log.append(("line", describe(line))))
        except ProtocolError as exc:
            log.append(("error", type(exc), str(exc), exc.code, exc.in_sync))
        log.append(("buffered", decoder.buffered))
    return log


@needs_c
@MANY
@given(STREAMS, st.lists(st.integers(0, 10_000), max_size=20), OPTIONS,
       st.lists(KINDS, max_size=4), st.sampled_from(["feed", "dispatch"]))
def test_differential_any_stream_any_split(stream, points, options, kinds, mode):
    chunks = chunked(stream, points, kinds)
    assert run(C, options, chunks, mode) == run(PY, options, chunks, mode)


@needs_c
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(STREAMS, OPTIONS)
def test_differential_byte_by_byte(stream, options):
    chunks = [stream[i:i + 1] for i in range(len(stream))]
    assert run(C, options, chunks, "feed") == run(PY, options, chunks, "feed")


def _long_lines() -> list[bytes]:
    near = [MAX_LINE_SIZE - 1, MAX_LINE_SIZE, MAX_LINE_SIZE + 1, MAX_LINE_SIZE + 2]
    return ([b"y" * n + b"\n" for n in near] + [b"y" * n + b"\r\n" for n in near]
            + [b"z" * (MAX_LINE_SIZE + 3)])


@needs_c
@pytest.mark.parametrize("stream", _long_lines(), ids=lambda s: f"{len(s)}B")
@pytest.mark.parametrize("step", [1000, 4096, 9000])
def test_differential_line_length_limit(stream, step):
    chunks = [stream[i:i + step] for i in range(0, len(stream), step)]
    assert run(C, {}, chunks, "dispatch") == run(PY, {}, chunks, "dispatch")


class Boom(Exception):
    pass


@needs_c
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(STREAMS, st.lists(st.integers(0, 10_000), max_size=6), st.integers(0, 6), OPTIONS)
def test_callback_raising_leaves_the_same_tail(stream, points, raise_at, options):
    def drive(impl) -> list:
        decoder = impl.Decoder(**options)
        log: list = []
        calls = [0]

        def callback(item) -> None:
            calls[0] += 1
            log.append(describe(item))
            if calls[0] == raise_at:
                raise Boom(calls[0])

        for chunk in chunked(stream, points, []):
            try:
                decoder.dispatch(chunk, callback, callback)
            except (Boom, ProtocolError) as exc:
                log.append((type(exc), str(exc)))
            log.append(decoder.buffered)
        return log

    assert drive(C) == drive(PY)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("impl", [PY, pytest.param(C, marks=needs_c)], ids=["py", "c"])
def test_bytearray_and_memoryview_input(impl, kind):
    wire = (py_encode(REQ, PacketType.SUBMIT_JOB, (b"f", b"u", b"data")) + b"status\r\n"
            + py_encode(REQ, PacketType.ECHO_REQ, (b"x",)))
    expected = [Packet(REQ, 7, (b"f", b"u", b"data")), b"status", Packet(REQ, 16, (b"x",))]
    assert list(impl.Decoder().feed(kind(wire))) == expected
    decoder = impl.Decoder()
    got = [item for i in range(0, len(wire), 5) for item in decoder.feed(kind(wire[i:i + 5]))]
    assert got == expected and decoder.buffered == 0
    # A memoryview slice of a larger buffer, as a recv_into() loop would pass.
    big = bytearray(b"JUNK" + wire + b"JUNK")
    assert list(impl.Decoder().feed(memoryview(big)[4:-4])) == expected
    assert all(type(x) in (Packet, bytes) for x in impl.Decoder().feed(kind(wire)))


@needs_c
def test_wrong_input_types_raise_type_error():
    decoder = C.Decoder()
    for bad in ["text\n", 12, None, [b"x"]]:
        with pytest.raises(TypeError):
            decoder.dispatch(bad, print, print)
        with pytest.raises(TypeError):
            decoder.feed(bad)
    assert decoder.buffered == 0
    decoder.feed(b"\0RE")
    with pytest.raises(TypeError):
        decoder.feed("Q")
    assert decoder.buffered == 3


# --- re-entrancy ----------------------------------------------------------------------

@needs_c
@pytest.mark.parametrize("pending", [b"", b"stat"])
@pytest.mark.parametrize("how", ["dispatch", "feed", "init"])
def test_reentrant_call_raises_runtime_error(pending, how):
    decoder = C.Decoder()
    decoder.feed(pending)
    wire = b"us\n" + py_encode(REQ, PacketType.ECHO_REQ, (b"x" * 5000,)) + b"more\n"
    seen: list = []

    def on_line(line: bytes) -> None:
        seen.append(line)
        if how == "dispatch":
            decoder.dispatch(wire * 3, seen.append, seen.append)
        elif how == "feed":
            decoder.feed(wire)
        else:
            decoder.__init__()

    with pytest.raises(RuntimeError):
        decoder.dispatch(wire, print, on_line)
    # The first line was consumed before its callback ran; the rest is intact.
    assert seen == [pending + b"us"]
    assert decoder.buffered == len(wire) - 3
    assert list(decoder.feed(b"")) == [Packet(REQ, 16, (b"x" * 5000,)), b"more"]


@needs_c
def test_attributes_can_change_from_a_callback():
    # Like the Python code, text and max_line_size are read per item.
    decoder = C.Decoder()

    def on_line(line: bytes) -> None:
        decoder.text = False
        decoder.max_packet_size = 0
        decoder.magic = RES

    wire = b"a\nb\n"
    with pytest.raises(ProtocolError, match="expected a binary packet"):
        decoder.dispatch(wire, print, on_line)
    assert decoder.buffered == 2


# --- attributes -----------------------------------------------------------------------

@needs_c
def test_attributes_and_defaults_match():
    for impl in (PY, C):
        d = impl.Decoder()
        assert (d.max_packet_size, d.text, d.magic, d.max_line_size, d.buffered) == (
            DEFAULT_MAX_PACKET_SIZE, True, None, MAX_LINE_SIZE, 0)
        d = impl.Decoder(5, text=False, magic=RES, max_line_size=3)
        assert (d.max_packet_size, d.text, d.magic, d.max_line_size) == (5, False, RES, 3)
        d.max_packet_size, d.text, d.magic, d.max_line_size = 7, 1, REQ, 9
        assert (d.max_packet_size, d.text, d.magic, d.max_line_size) == (7, 1, REQ, 9)
        with pytest.raises(TypeError):
            impl.Decoder(1, False)  # the options are keyword-only
        with pytest.raises(AttributeError):
            d.other = 1  # no __dict__, like the __slots__ class
        with pytest.raises(AttributeError):
            d.buffered = 1
    with pytest.raises(TypeError):
        C.Decoder(max_packet_size="big")
    with pytest.raises(TypeError):
        C.Decoder().max_line_size = 1.5


# --- encode ---------------------------------------------------------------------------

FIELDS = st.lists(st.binary(max_size=30), max_size=9)


@needs_c
@settings(max_examples=400, deadline=None)
@given(st.sampled_from([REQ, RES, b"", b"\0R", b"\0REQX", bytearray(RES)]),
       st.integers(0, 2**32 - 1), FIELDS, st.sampled_from([tuple, list]),
       st.lists(KINDS, max_size=3))
def test_encode_same_bytes(magic, ptype, fields, container, kinds):
    fields = [kinds[i % len(kinds)](f) if kinds else f for i, f in enumerate(fields)]
    args = container(fields)
    assert C.encode(magic, ptype, args) == py_encode(magic, ptype, args)
    assert C.encode(magic=magic, ptype=ptype, args=args) == py_encode(magic, ptype, args)


@needs_c
def test_encode_errors():
    assert C.encode(REQ, 6) == py_encode(REQ, 6) == REQ + struct.pack(">II", 6, 0)
    assert C.encode(REQ, True, ()) == py_encode(REQ, True, ())
    for bad in [
        ("REQ", 1, ()),        # magic not bytes
        (REQ, "1", ()),        # ptype not an int
        (REQ, 1.0, ()),
        (REQ, 1, None),        # args not a sequence
        (REQ, 1, [1]),         # a field not bytes
        (REQ, 1, ["text"]),
        (REQ, 1, [b"a", "text"]),
        (REQ, 1, (b"a", None)),
    ]:
        with pytest.raises(TypeError):
            C.encode(*bad)
        with pytest.raises((TypeError, struct.error)):
            py_encode(*bad)
    for ptype in (-1, 2**32, 2**100):
        with pytest.raises(struct.error):
            C.encode(REQ, ptype, ())
        with pytest.raises(struct.error):
            py_encode(REQ, ptype, ())
    with pytest.raises(TypeError):
        C.encode(REQ)
    with pytest.raises(TypeError):
        C.encode(REQ, 1, (), 4)
    with pytest.raises(TypeError):
        C.encode(REQ, 1, bogus=())
    many = [b"x"] * 100  # more fields than the C code keeps on its stack
    assert C.encode(REQ, 1, many) == py_encode(REQ, 1, many)


def retained_bytes(work, rounds: int) -> int:
    """Bytes still allocated after ``work(rounds)`` (and a collection), once ``work(200)``
    has warmed up caches and free lists: what a leak per call would grow."""
    work(200)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        work(rounds)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


# --- Router ---------------------------------------------------------------------------

C_ROUTER = protocol.Router if C else None
ROUTERS = [pytest.param(protocol.PyRouter, id="py"),
           pytest.param(C_ROUTER, id="c", marks=needs_c)]


def _routing_table(calls: list) -> list:
    table = [None] * (protocol.MAX_TYPE + 1)
    for ptype in (PacketType.SUBMIT_JOB, PacketType.GRAB_JOB, PacketType.ECHO_REQ):
        table[ptype] = lambda ctx, p, t=ptype: calls.append((t, ctx, p)) or t
    return table


@pytest.mark.parametrize("router", ROUTERS)
def test_router_sends_each_packet_to_its_handler(router):
    calls: list = []
    route = router(_routing_table(calls), "ctx", REQ,
                   lambda ctx, p: calls.append(("otherwise", ctx, p)) or "o")
    sub = Packet(REQ, PacketType.SUBMIT_JOB, (b"f", b"", b"x"))
    echo = Packet(REQ, PacketType.ECHO_REQ, (b"e",))
    res = Packet(RES, PacketType.ECHO_REQ, (b"e",))
    assert route(sub) == PacketType.SUBMIT_JOB  # the handler's return value
    assert route(res) == "o"
    assert route(echo) == PacketType.ECHO_REQ
    assert calls == [(PacketType.SUBMIT_JOB, "ctx", sub), ("otherwise", "ctx", res),
                     (PacketType.ECHO_REQ, "ctx", echo)]
    assert (route.handlers[7] is not None, route.context, route.magic) == (True, "ctx", REQ)
    # Straight from the decoder, in stream order, lines to their own callback.
    calls.clear()
    lines: list = []
    wire = py_encode(REQ, PacketType.GRAB_JOB) + b"status\n" + py_encode(RES, 16, (b"x",))
    (C or PY).Decoder().dispatch(wire, route, lines.append)
    assert [c[0] for c in calls] == [PacketType.GRAB_JOB, "otherwise"]
    assert lines == [b"status"]


@pytest.mark.parametrize("router", ROUTERS)
def test_router_errors_are_the_handlers_and_the_tables(router):
    def boom(ctx, p):
        raise Boom(ctx)

    table = [boom] * 3
    route = router(table, "ctx", REQ, boom)
    with pytest.raises(Boom):
        route(Packet(REQ, 1, ()))
    with pytest.raises(Boom):
        route(Packet(RES, 1, ()))
    with pytest.raises(IndexError):
        route(Packet(REQ, 7, ()))  # past the end of the table
    with pytest.raises(TypeError):
        route(Packet(REQ, 2, ()), 1)  # one packet per call
    dict_route = router({5: lambda ctx, p: "five"}, None, REQ, boom)
    assert dict_route(Packet(REQ, 5, ())) == "five"  # any mapping or sequence
    with pytest.raises(KeyError):
        dict_route(Packet(REQ, 6, ()))
    # A magic compared by value, not identity, and of any type.
    assert router([None, lambda c, p: "req"], 0, REQ, boom)(Packet(bytes(REQ), 1, ())) == "req"
    assert router([None, lambda c, p: "x"], 0, "m", boom)(Packet("m", 1, ())) == "x"


@pytest.mark.parametrize("router", ROUTERS)
def test_router_handler_may_change_the_table(router):
    """A handler that replaces entries (or empties the table) while it runs: the running
    call is unaffected, the next packet sees the change."""
    table: list = []

    def first(ctx, p):
        table[:] = [None, lambda c, q: "second"]
        return "first"

    table[:] = [None, first]
    route = router(table, None, REQ, lambda c, p: None)
    assert route(Packet(REQ, 1, ())) == "first"
    assert route(Packet(REQ, 1, ())) == "second"


@pytest.mark.parametrize("router", ROUTERS)
def test_router_reads_the_packet_as_python_does(router):
    """``packet[0]``/``packet[1]`` through the packet's own subscript: any sequence, a
    tuple subclass overriding ``__getitem__``, short packets (``packet[1]`` only read when
    the magic matches), a packet passed as ``packet=``."""
    route = router([None, lambda c, p: "one"], None, REQ, lambda c, p: "otherwise")
    assert route([REQ, 1]) == "one"
    assert route((RES,)) == "otherwise"
    assert route(packet=Packet(REQ, 1, ())) == "one"

    class Lying(tuple):
        def __getitem__(self, i):
            return (RES, 0)[i]

    assert route(Lying((REQ, 1, ()))) == "otherwise"
    with pytest.raises(IndexError):
        route((REQ,))
    with pytest.raises(IndexError):
        route(())
    with pytest.raises(TypeError):
        route(5)
    with pytest.raises(TypeError):
        route(packet=Packet(REQ, 1, ()), other=1)
    with pytest.raises(TypeError):
        route(pkt=Packet(REQ, 1, ()))
    assert route(Packet(REQ, -1, ())) is not None  # a negative index, as a list takes it


@pytest.mark.parametrize("router", ROUTERS)
def test_router_compares_the_magic_with_eq_only(router):
    """``packet[0] == magic`` has no identity shortcut: a NaN is not its own magic, an
    ``__eq__`` that raises or says False is called even on the very same object."""
    table = [None, lambda c, p: "handler"]
    nan = float("nan")
    assert router(table, None, nan, lambda c, p: "otherwise")((nan, 1)) == "otherwise"

    class Raising:
        def __eq__(self, other):
            raise Boom("eq")

        __hash__ = object.__hash__

    magic = Raising()
    with pytest.raises(Boom):
        router(table, None, magic, lambda c, p: None)((magic, 1))

    class Unequal(bytes):
        def __eq__(self, other):
            return False

        __hash__ = bytes.__hash__

    magic = Unequal(REQ)
    assert router(table, None, magic, lambda c, p: "otherwise")((magic, 1)) == "otherwise"


@pytest.mark.slow  # 3 s of CPU each: under CI=true, or --run-slow
@pytest.mark.parametrize("router", ROUTERS)
def test_router_long_chain_is_freed_without_recursion(router):
    """A million routers, each the context of the next, freed at once (the C one through
    the trashcan, as a Python object is): no C stack overflow."""
    route = None
    for _ in range(1_000_000):
        route = router([], route, REQ, None)
    del route


@needs_c
def test_router_no_leak_and_cycles_are_collected():
    Router = C_ROUTER

    class Ctx:
        pass

    def work(rounds: int) -> None:
        for _ in range(rounds):
            ctx = Ctx()
            ctx.route = Router([None, lambda c, p: (c, p)], ctx, REQ, lambda c, p: None)
            ctx.route(Packet(REQ, 1, (b"x",)))
            ctx.route(Packet(RES, 1, ()))
            try:
                ctx.route(Packet(REQ, 2, ()))
            except IndexError:
                pass

    grown = retained_bytes(work, 5000)
    assert grown < 64 * 1024, f"{grown} bytes retained after 5000 routers in cycles"


# --- reference counting ---------------------------------------------------------------

@needs_c
def test_no_leak_over_many_calls():
    """Every path (items, errors, feed's error iterator, callbacks raising, encode)
    returns every object it creates: memory does not grow with the number of calls."""
    sub = py_encode(REQ, PacketType.SUBMIT_JOB, (b"f", b"u", b"x" * 64))
    bad_fields = REQ + struct.pack(">II", PacketType.SUBMIT_JOB, 1) + b"x"
    streams = [sub * 3 + b"status\r\n" + sub[:20], sub[20:], bad_fields, b"\0BAD" + sub,
               bytearray(sub), memoryview(sub + b"li"), b"ne\n", b"x" * 9000]

    def boom(item) -> None:
        raise Boom()

    def work(rounds: int) -> None:
        for _ in range(rounds):
            d = C.Decoder(max_line_size=100)
            for s in streams:
                try:
                    list(d.feed(s))
                except ProtocolError:
                    pass
                try:
                    d.dispatch(s, len, len)
                except ProtocolError:
                    pass
                try:
                    d.dispatch(s, boom, boom)
                except (Boom, ProtocolError):
                    pass
            C.encode(REQ, 7, (b"f", bytearray(b"u"), memoryview(b"x" * 64)))
            C.encode(RES, 8, [b"H:1"])

    grown = retained_bytes(work, 3000)
    assert grown < 64 * 1024, f"{grown} bytes retained after 3000 rounds"


@needs_c
def test_subclass_and_cycles_are_collected():
    """A Python subclass (heap type over the static C type) and a decoder in a reference
    cycle: created and collected many times without a crash or a leak of the type."""

    class Sub(C.Decoder):
        def __init__(self, **options) -> None:
            super().__init__(**options)
            self.extra = self  # a cycle through the instance dict

    for _ in range(2000):
        d = Sub(max_line_size=20)
        d.text = [d]  # a cycle through a decoder attribute (truthy: text stays on)
        assert list(d.feed(b"abc\n" + py_encode(REQ, 6))) == [b"abc", Packet(REQ, 6, ())]
    del d
    gc.collect()
    assert isinstance(Sub(), C.Decoder) and Sub().buffered == 0


# --- review: adversarial cases --------------------------------------------------------

@needs_c
@pytest.mark.parametrize("size", [2**31 - 1, 2**31, 2**31 + 1, 2**32 - 13, 2**32 - 1])
@pytest.mark.parametrize("ptype", [PacketType.NOOP, PacketType.ECHO_REQ, PacketType.SUBMIT_JOB])
def test_sizes_near_2_32_wait_for_the_payload(size, ptype):
    # With the limit raised past them, sizes from 2**31 on must wait for their payload
    # like any other (a 32-bit Py_ssize_t cast made them negative: pos went backwards).
    wire = b"ok\n" + _header(REQ, ptype, size) + b"p" * 40
    for step in (1, 7, len(wire)):
        chunks = [wire[i:i + step] for i in range(0, len(wire), step)]
        for mode in ("feed", "dispatch"):
            got = run(C, {"max_packet_size": 2**32}, chunks, mode)
            assert got == run(PY, {"max_packet_size": 2**32}, chunks, mode)
            assert got[-1] == ("buffered", len(wire) - 3)


@pytest.mark.slow  # 4.5 s and 4 GiB of address space: under CI=true, or --run-slow
@needs_c
def test_encode_total_over_4_gib_raises_without_copying():
    big = b"x" * 2**30  # the same object four times: 4 GiB + 3 of fields, nothing copied
    with pytest.raises(struct.error):
        C.encode(REQ, PacketType.SUBMIT_JOB, (big, big, big, big))
    with pytest.raises(struct.error):
        C.encode(REQ, PacketType.ECHO_REQ, [big] * 4 + [b""])


@needs_c
def test_failed_bind_leaves_the_tables_unchanged():
    from gearoffload import _codec

    names = (None, *(PacketType(t).name for t in range(1, 43)))
    counts = list(FIELD_COUNTS)
    counts[PacketType.SUBMIT_JOB] = 1  # valid, but must not be applied ...
    counts[PacketType.GRAB_JOB_UNIQ] = 99  # ... since this one is rejected
    sub = py_encode(REQ, PacketType.SUBMIT_JOB, (b"f", b"u", b"d"))
    try:
        with pytest.raises(ValueError):
            _codec.bind(packet=Packet, protocol_error=ProtocolError, field_counts=tuple(counts),
                        names=names, items_then_raise=protocol._items_then_raise,
                        struct_error=struct.error, req=REQ, res=RES,
                        max_packet_size=DEFAULT_MAX_PACKET_SIZE, max_line_size=MAX_LINE_SIZE)
        assert list(C.Decoder().feed(sub)) == list(PY.Decoder().feed(sub))
    finally:
        assert protocol._load_accelerator() is not None  # bind() again, as at import


@needs_c
def test_stale_build_without_router_falls_back(monkeypatch):
    """A ``_codec`` built before ``Router`` existed (its ``bind()`` is the same): the pure
    implementations with a warning, not an AttributeError at import."""
    from gearoffload import _codec

    monkeypatch.delattr(_codec, "Router")
    with pytest.warns(RuntimeWarning, match="Router"):
        assert protocol._load_accelerator() is None


def _set_from_callback(plan: list):
    """A callback factory: the n-th callback sets attribute ``plan[n][0]`` to ``plan[n][1]``."""
    def make(decoder, log):
        def callback(item) -> None:
            log.append(describe(item))
            if len(log) <= len(plan) and plan[len(log) - 1] is not None:
                setattr(decoder, *plan[len(log) - 1])
        return callback
    return make


_ECHO = py_encode(REQ, PacketType.ECHO_REQ, (b"x" * 30,))
_MIXED = b"ab\n" + _ECHO + b"c" * 40 + b"\n" + _ECHO + b"dd\n" + b"e" * 100 + b"\n" + _ECHO


@needs_c
@pytest.mark.parametrize("plan", [
    [("max_line_size", 5), ("max_line_size", -3), ("max_line_size", 2**70),
     ("max_line_size", 0), ("max_line_size", -2**70), ("max_line_size", 1)],
    [("max_line_size", 3)],
    [("magic", RES), ("magic", REQ), ("magic", None)],
    [("max_packet_size", 0), ("max_packet_size", 1), ("max_packet_size", 2**64)],
    [None, ("text", False)],
], ids=["line-sizes", "line-3", "magic", "packet-sizes", "text-off"])
@pytest.mark.parametrize("step", [1, 7, 50, 1000])
@pytest.mark.parametrize("pending", [b"", b"q"])
def test_attributes_set_from_a_callback_match_python(plan, step, pending):
    # max_line_size and text are read per item, magic and max_packet_size per call, in
    # both; the buffered and the direct path must give the same items, errors and tails.
    chunks = [pending] + [_MIXED[i:i + step] for i in range(0, len(_MIXED), step)]

    def drive(impl) -> list:
        decoder, log = impl.Decoder(), []
        callback = _set_from_callback(plan)(decoder, log)
        for chunk in chunks:
            try:
                decoder.dispatch(chunk, callback, callback)
            except ProtocolError as exc:
                log.append((str(exc), exc.code, exc.in_sync))
            log.append(decoder.buffered)
        return log

    assert drive(C) == drive(PY)


@needs_c
@pytest.mark.parametrize("reenter", [False, True])
def test_limit_formatting_touching_the_decoder(reenter):
    # The LINE_TOO_LONG/ARGUMENT_TOO_LARGE messages format the limit: an int subclass's
    # __format__ runs Python code inside feed() (no callback at all) and may change the
    # limits; same items, errors and tails as the reference. Re-entering is refused by C
    # (the reference has no guard: there it is undefined), without losing any bytes.
    def drive(impl) -> list:
        log: list = []

        class Limit(int):
            def __format__(self, spec: str) -> str:
                if reenter:
                    with pytest.raises(RuntimeError):
                        decoder.feed(b"zz")
                decoder.max_line_size = 3
                decoder.max_packet_size = 5
                gc.collect()
                return "L" + int.__format__(self, spec)

        decoder = impl.Decoder(max_line_size=Limit(2), max_packet_size=Limit(3))
        for chunk in (b"abcdefgh", b"q" + _ECHO, _ECHO, b"ab\n"):
            try:
                log.extend(decoder.feed(chunk))
            except ProtocolError as exc:
                log.append((str(exc), exc.code, exc.in_sync))
            log.append(decoder.buffered)
        return log

    c_log = drive(C)
    if not reenter:
        assert c_log == drive(PY)
    assert c_log[:2] == [("text line longer than L2 bytes", "LINE_TOO_LONG", True), 8]
