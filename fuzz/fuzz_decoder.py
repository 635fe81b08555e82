"""Fuzz the incremental ``Decoder``: any input gives packets/lines or ``ProtocolError``.

The first byte picks the decoder options and split points; the rest is the stream. The
stream is decoded whole and in pieces, and both must give the same items, the same
error (code, in_sync) and stop at the same position. Any other exception is a bug.

When the C codec (``gearoffload._codec``) is active, the pure-Python reference
(``PyDecoder``) decodes the same chunks too, and both must agree exactly: same items,
same error message, code and in_sync, same tail left buffered.

    .venv/bin/python fuzz/fuzz_decoder.py -max_total_time=60       # atheris if installed
    .venv/bin/python fuzz/fuzz_decoder.py --plain -max_total_time=60
"""

from __future__ import annotations

import sys

from _common import instrumented, main

with instrumented():
    from gearoffload.protocol import (
        ACCELERATED,
        REQ,
        RES,
        Decoder,
        PacketType,
        ProtocolError,
        PyDecoder,
        encode,
    )

OPTIONS = [
    {},
    {"max_packet_size": 32, "max_line_size": 16},
    {"text": False},
    {"magic": REQ, "max_line_size": 8},
    {"magic": RES, "text": False, "max_packet_size": 0},
]


def _run(options: dict, chunks: list[bytes], decoder_class: type = Decoder):
    decoder = decoder_class(**options)
    out, fed = [], 0
    for chunk in chunks:
        fed += len(chunk)
        try:
            out.extend(decoder.feed(chunk))
        except ProtocolError as exc:
            return out, (exc.code, exc.in_sync, str(exc)), fed - decoder.buffered
    return out, None, fed - decoder.buffered


def test_one_input(data: bytes) -> None:
    if not data:
        return
    control, stream = data[0], data[1:]
    options = OPTIONS[control % len(OPTIONS)]
    step = (control >> 3) + 1  # 1..32
    chunks = [stream[i:i + step] for i in range(0, len(stream), step)]
    whole = _run(options, [stream])
    split = _run(options, chunks)
    # Whole against split compares code and in_sync, as before; C against Python all.
    if (split[0], split[2], split[1] and split[1][:2]) != (
            whole[0], whole[2], whole[1] and whole[1][:2]):
        raise AssertionError(f"split by {step} differs: {split!r} != {whole!r}")
    if ACCELERATED:
        for c_result, py_chunks in ((whole, [stream]), (split, chunks)):
            py_result = _run(options, py_chunks, PyDecoder)
            if c_result != py_result:
                raise AssertionError(f"C != Python: {c_result!r} != {py_result!r}")


SEEDS = [
    b"\0" + encode(REQ, PacketType.SUBMIT_JOB, (b"f", b"u", b"data")),
    b"\x08" + encode(RES, PacketType.STATUS_RES_UNIQUE, (b"h", b"1", b"0", b"1", b"2", b"3")),
    b"\x10status\r\nworkers\n" + encode(REQ, PacketType.ECHO_REQ, (b"x\0y",)),
    b"\x01" + b"x" * 20 + b"\n",
    b"\x03\0REQ\0\0\0\x2b\0\0\0\0",
]

if __name__ == "__main__":
    main(test_one_input, SEEDS)
    sys.exit(0)
