"""The two codec implementations, for tests parametrised over both.

``IMPLS`` holds the pure-Python reference (``PyDecoder``/``py_encode``) and the C
accelerator (``gearoffload._codec``) when it is active; without it (not built, or
``GEAROFFLOAD_PURE_PYTHON=1``) the C parameter skips, and ``test_codec_accel`` fails
under CI=true so that CI never runs without it unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest

from gearoffload import protocol
from gearoffload.protocol import REQ, RES


class Impl(NamedTuple):
    """One codec: its ``Decoder`` class and its ``encode`` function."""

    name: str
    Decoder: type
    encode: Callable[..., bytes]

    def request(self, ptype: int, *args: bytes) -> bytes:
        """``encode_request`` with this implementation's ``encode``."""
        return self.encode(REQ, ptype, args)

    def response(self, ptype: int, *args: bytes) -> bytes:
        """``encode_response`` with this implementation's ``encode``."""
        return self.encode(RES, ptype, args)


PY = Impl("py", protocol.PyDecoder, protocol.py_encode)
C: Impl | None = Impl("c", protocol.Decoder, protocol.encode) if protocol.ACCELERATED else None
_NO_C = "C codec not active (not built, or GEAROFFLOAD_PURE_PYTHON=1)"

IMPLS = [
    pytest.param(PY, id="py"),
    pytest.param(C, id="c", marks=pytest.mark.skipif(C is None, reason=_NO_C)),
]
