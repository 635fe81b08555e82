"""Fuzz the incremental ``Decoder``: any input gives packets/lines or ``ProtocolError``.

The first byte picks the decoder options and split points; the rest is the stream. The
stream is decoded whole and in pieces, and both must give the same items, the same
error (code, in_sync) and stop at the same position. Any other exception is a bug.

    .venv/bin/python fuzz/fuzz_decoder.py -max_total_time=60       # atheris if installed
    .venv/bin/python fuzz/fuzz_decoder.py --plain -max_total_time=60
"""

from __future__ import annotations

import sys

from _common import atheris, main

if atheris is not None:
    with atheris.instrument_imports():
        from gearoffload.protocol import REQ, RES, Decoder, PacketType, ProtocolError, encode
else:
    from gearoffload.protocol import REQ, RES, Decoder, PacketType, ProtocolError, encode

OPTIONS = [
    {},
    {"max_packet_size": 32, "max_line_size": 16},
    {"text": False},
    {"magic": REQ, "max_line_size": 8},
    {"magic": RES, "text": False, "max_packet_size": 0},
]


def _run(options: dict, chunks: list[bytes]):
    decoder = Decoder(**options)
    out, fed = [], 0
    for chunk in chunks:
        fed += len(chunk)
        try:
            out.extend(decoder.feed(chunk))
        except ProtocolError as exc:
            return out, (exc.code, exc.in_sync), fed - decoder.buffered
    return out, None, fed - decoder.buffered


def test_one_input(data: bytes) -> None:
    if not data:
        return
    control, stream = data[0], data[1:]
    options = OPTIONS[control % len(OPTIONS)]
    step = (control >> 3) + 1  # 1..32
    whole = _run(options, [stream])
    split = _run(options, [stream[i:i + step] for i in range(0, len(stream), step)])
    if split != whole:
        raise AssertionError(f"split by {step} differs: {split!r} != {whole!r}")


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
