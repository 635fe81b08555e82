"""The Gearman wire codec: packet types, ``encode`` and an incremental ``Decoder``.

Pure: bytes in, packets (and text admin lines) out. No sockets, no gevent, no logging,
so the server, the client and the worker all share it, and it can be tested and fuzzed
on its own. See ``docs/protocol.md`` §1–§2.

``Decoder``, ``encode`` and ``Router`` are the C accelerator ``gearoffload._codec`` when it
is built (``ACCELERATED``), else the pure-Python ``PyDecoder``, ``py_encode`` and
``PyRouter``, which stay the reference it must match exactly. ``GEAROFFLOAD_PURE_PYTHON=1``
forces the pure ones.

Example::

    >>> from gearoffload.protocol import Decoder, PacketType, encode_request
    >>> wire = encode_request(PacketType.SUBMIT_JOB, b"upper", b"", b"abc") + b"status\\n"
    >>> list(Decoder().feed(wire))  # doctest: +NORMALIZE_WHITESPACE
    [Packet(magic=b'\\x00REQ', type=7, args=(b'upper', b'', b'abc')), b'status']
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from enum import IntEnum
from typing import NamedTuple

from .errors import ProtocolError

__all__ = [
    "REQ",
    "RES",
    "HEADER_SIZE",
    "DEFAULT_MAX_PACKET_SIZE",
    "MAX_LINE_SIZE",
    "PacketType",
    "PT",
    "FIELD_COUNTS",
    "Packet",
    "Decoder",
    "PyDecoder",
    "Router",
    "PyRouter",
    "encode",
    "py_encode",
    "ACCELERATED",
    "encode_request",
    "encode_response",
    "to_bytes",
    "ProtocolError",
]

REQ = b"\0REQ"
RES = b"\0RES"
HEADER = struct.Struct(">4sII")
HEADER_SIZE = HEADER.size
#: Larger than anything real clients send (gearmand was seen taking 8 MiB jobs), small
#: enough that one peer announcing 4 GiB cannot make us buffer it.
DEFAULT_MAX_PACKET_SIZE = 64 * 1024 * 1024
#: gearmand closes on a text line longer than 8191 bytes before the newline (docs/protocol.md §1.5).
MAX_LINE_SIZE = 8191


class PacketType(IntEnum):
    """Every wire packet type, 1–42 (``docs/protocol.md`` §2)."""

    CAN_DO = 1
    CANT_DO = 2
    RESET_ABILITIES = 3
    PRE_SLEEP = 4
    UNUSED = 5
    NOOP = 6
    SUBMIT_JOB = 7
    JOB_CREATED = 8
    GRAB_JOB = 9
    NO_JOB = 10
    JOB_ASSIGN = 11
    WORK_STATUS = 12
    WORK_COMPLETE = 13
    WORK_FAIL = 14
    GET_STATUS = 15
    ECHO_REQ = 16
    ECHO_RES = 17
    SUBMIT_JOB_BG = 18
    ERROR = 19
    STATUS_RES = 20
    SUBMIT_JOB_HIGH = 21
    SET_CLIENT_ID = 22
    CAN_DO_TIMEOUT = 23
    ALL_YOURS = 24
    WORK_EXCEPTION = 25
    OPTION_REQ = 26
    OPTION_RES = 27
    WORK_DATA = 28
    WORK_WARNING = 29
    GRAB_JOB_UNIQ = 30
    JOB_ASSIGN_UNIQ = 31
    SUBMIT_JOB_HIGH_BG = 32
    SUBMIT_JOB_LOW = 33
    SUBMIT_JOB_LOW_BG = 34
    SUBMIT_JOB_SCHED = 35
    SUBMIT_JOB_EPOCH = 36
    SUBMIT_REDUCE_JOB = 37
    SUBMIT_REDUCE_JOB_BACKGROUND = 38
    GRAB_JOB_ALL = 39
    JOB_ASSIGN_ALL = 40
    GET_STATUS_UNIQUE = 41
    STATUS_RES_UNIQUE = 42


_FIELDS_BY_COUNT = {
    0: (3, 4, 5, 6, 9, 10, 24, 30, 39),
    1: (1, 2, 8, 14, 15, 16, 17, 22, 26, 27, 41),
    2: (13, 19, 23, 25, 28, 29),
    3: (7, 11, 12, 18, 21, 32, 33, 34),
    4: (31, 36),
    5: (20, 37, 38, 40),
    6: (42,),
    8: (35,),
}
#: ``FIELD_COUNTS[t]`` is the number of payload fields of packet type ``t`` (index 0 unused).
FIELD_COUNTS: tuple[int, ...] = tuple(
    next((n for n, types in _FIELDS_BY_COUNT.items() if t in types), 0) for t in range(43)
)
MAX_TYPE = 42

#: ``PacketType``'s members as plain ints (``PT.SUBMIT_JOB == 7``), for code that runs per
#: packet: on Python 3.11 reading an ``IntEnum`` member costs about 0.19 µs, a plain class
#: attribute about 0.035 µs, and the server, the client and the worker read several per job.
PT = type("PT", (), {member.name: int(member) for member in PacketType})


class Packet(NamedTuple):
    """One decoded binary packet. ``args`` holds exactly ``FIELD_COUNTS[type]`` fields."""

    magic: bytes
    type: int
    args: tuple[bytes, ...]

    @property
    def name(self) -> str:
        return PacketType(self.type).name


def to_bytes(value: bytes | str | bytearray | memoryview, what: str) -> bytes:
    """``value`` as a packet field: bytes as they are, ``str`` as UTF-8.

    >>> to_bytes("grüß", "data")
    b'gr\\xc3\\xbc\\xc3\\x9f'
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes or str, not {type(value).__name__}")


def py_encode(magic: bytes, ptype: int, args: tuple[bytes, ...] | list[bytes] = ()) -> bytes:
    """Encode one packet. Fields are joined by NUL; only the last one may contain NULs.

    The pure-Python reference of ``encode`` (which is the C one when it is built).
    """
    payload = b"\0".join(args) if len(args) != 1 else args[0]
    return HEADER.pack(magic, ptype, len(payload)) + payload


def split_payload(ptype: int, payload: bytes) -> tuple[bytes, ...]:
    """Split ``payload`` into the fields of ``ptype``: at most n-1 splits, never more
    (docs/protocol.md §1.3).

    Raises ``ProtocolError`` (code ``INVALID_PACKET``, stream still in sync) when the
    payload has fewer NULs than the type needs.
    """
    count = FIELD_COUNTS[ptype]
    if count == 1:
        return (payload,)
    if count == 0:
        return ()  # gearmand consumes and ignores a stray payload on zero-field packets
    args = payload.split(b"\0", count - 1)
    if len(args) != count:
        raise ProtocolError(
            f"{PacketType(ptype).name} needs {count} fields, got {len(args)}",
            code="INVALID_PACKET",
            in_sync=True,
        )
    return tuple(args)


class PyRouter:
    """A packet callback that sends each packet to the handler for its type:
    ``handlers[packet.type](context, packet)`` when ``packet.magic`` is ``magic``, else
    ``otherwise(context, packet)``. Handed to ``Decoder.dispatch()`` as ``on_packet``.

    The pure-Python reference of ``Router``. The C one calls the handler straight from
    the decoder, without a Python frame in between (the server's path, once per packet).

    Example::

        >>> seen = []
        >>> handlers = [None] * (MAX_TYPE + 1)
        >>> handlers[PacketType.ECHO_REQ] = lambda peer, p: seen.append((peer, p.args))
        >>> route = Router(handlers, "peer-1", REQ, lambda peer, p: seen.append("magic"))
        >>> Decoder().dispatch(encode_request(PacketType.ECHO_REQ, b"hi"), route, print)
        >>> seen
        [('peer-1', (b'hi',))]
    """

    __slots__ = ("handlers", "context", "magic", "otherwise")

    def __init__(self, handlers: Sequence[Callable[[object, Packet], object]], context: object,
                 magic: bytes, otherwise: Callable[[object, Packet], object]) -> None:
        self.handlers = handlers
        self.context = context
        self.magic = magic
        self.otherwise = otherwise

    def __call__(self, packet: Packet) -> object:
        if packet[0] == self.magic:
            return self.handlers[packet[1]](self.context, packet)
        return self.otherwise(self.context, packet)


class PyDecoder:
    """Incremental decoder: feed it arbitrary chunks, iterate what is complete.

    The pure-Python reference of ``Decoder`` (which is the C one when it is built): the
    C decoder must behave exactly like this one, item for item and error for error.

    Yields ``Packet`` for binary packets and ``bytes`` (the line without ``\\r\\n``) for
    text admin lines when ``text`` is true. Partial packets and lines are kept until the
    rest arrives. A malformed packet raises ``ProtocolError`` at its position in the
    stream; the packets before it have been yielded already.

    ``magic`` restricts the accepted magic (``REQ`` for a server, ``RES`` for a client);
    with ``None`` both are accepted and the packet carries the one it had, so that a
    server can answer a ``\\0RES`` request with ``ERROR INVALID_MAGIC`` (docs/protocol.md §1.5).

    Example::

        >>> d = PyDecoder()
        >>> wire = encode_request(PacketType.ECHO_REQ, b"hi")
        >>> list(d.feed(wire[:5])), list(d.feed(wire[5:]))
        ([], [Packet(magic=b'\\x00REQ', type=16, args=(b'hi',))])
    """

    __slots__ = ("_buf", "max_packet_size", "max_line_size", "text", "magic")

    def __init__(
        self,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        *,
        text: bool = True,
        magic: bytes | None = None,
        max_line_size: int = MAX_LINE_SIZE,
    ) -> None:
        self._buf = bytearray()
        self.max_packet_size = max_packet_size
        self.max_line_size = max_line_size
        self.text = text
        self.magic = magic

    @property
    def buffered(self) -> int:
        """How many bytes are waiting for the rest of a packet or line."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Packet | bytes]:
        """Add ``data``; return an iterator over every complete packet or line now available.

        The data is decoded at once; a malformed item makes the iterator raise
        ``ProtocolError`` after the items before it.
        """
        items: list[Packet | bytes] = []
        append = items.append
        try:
            self.dispatch(data, append, append)
        except ProtocolError as exc:
            return _items_then_raise(items, exc)
        return iter(items)

    def dispatch(self, data: bytes | bytearray | memoryview, on_packet: Callable[[Packet], object],
                 on_line: Callable[[bytes], object]) -> None:
        """Add ``data`` and call ``on_packet(packet)`` or ``on_line(line)`` for every
        complete item, in stream order. A malformed item raises ``ProtocolError`` once the
        items before it have been handed over. The server's path: no iterator per chunk.
        """
        if self._buf:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            # Common case: nothing pending, so slice the caller's bytes directly (one copy
            # per payload instead of two) and keep only an incomplete tail. Other buffers
            # (memoryview has no find()) are copied once.
            buf = data if type(data) is bytes or type(data) is bytearray else bytes(data)
        pos = 0
        end = len(buf)
        is_bytes = type(buf) is bytes
        unpack = HEADER.unpack_from
        counts = FIELD_COUNTS
        new_tuple = tuple.__new__
        want_magic = self.magic
        max_size = self.max_packet_size
        try:
            while pos < end:
                if buf[pos] != 0:
                    if not self.text:
                        raise ProtocolError(
                            f"expected a binary packet, got byte 0x{buf[pos]:02x}"
                        )
                    nl = buf.find(b"\n", pos, pos + self.max_line_size + 2)
                    if nl < 0:
                        if end - pos > self.max_line_size + 1:
                            raise ProtocolError(
                                f"text line longer than {self.max_line_size} bytes",
                                code="LINE_TOO_LONG",
                                in_sync=True,
                            )
                        break
                    line_end = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl
                    if line_end - pos > self.max_line_size:
                        # The window above lets one byte more through when there is no
                        # CR: 8192 bytes and a LF must not pass as a line (issue #17).
                        raise ProtocolError(
                            f"text line longer than {self.max_line_size} bytes",
                            code="LINE_TOO_LONG",
                            in_sync=True,
                        )
                    line = bytes(buf[pos:line_end])
                    pos = nl + 1
                    on_line(line)
                    continue
                if end - pos < 12:
                    if end - pos >= 4 and buf[pos : pos + 4] not in (REQ, RES):
                        raise ProtocolError(f"bad magic {bytes(buf[pos:pos + 4])!r}")
                    break
                magic, ptype, size = unpack(buf, pos)
                if magic != REQ and magic != RES:
                    raise ProtocolError(f"bad magic {magic!r}")
                if ptype == 0 or ptype > MAX_TYPE:
                    raise ProtocolError(f"unknown packet type {ptype}")
                if want_magic is not None and magic != want_magic:
                    raise ProtocolError(f"unexpected magic {magic!r} on {PacketType(ptype).name}")
                if size > max_size:
                    raise ProtocolError(
                        f"packet of {size} bytes exceeds the limit of {max_size}",
                        code="ARGUMENT_TOO_LARGE",
                        in_sync=True,
                    )
                start = pos + 12
                if start + size > end:
                    break
                pos = start + size
                # Inlined split_payload() and tuple.__new__ instead of Packet(...): this
                # loop runs for every packet the server receives.
                payload = buf[start:pos] if is_bytes else bytes(buf[start:pos])
                count = counts[ptype]
                if count == 1:
                    args = (payload,)
                elif count == 0:
                    args = ()
                else:
                    args = tuple(payload.split(b"\0", count - 1))
                    if len(args) != count:
                        raise ProtocolError(
                            f"{PacketType(ptype).name} needs {count} fields, got {len(args)}",
                            code="INVALID_PACKET",
                            in_sync=True,
                        )
                on_packet(new_tuple(Packet, (magic, ptype, args)))
        finally:
            # However it ended (all consumed, a malformed item, a callback raising), keep
            # exactly the unconsumed tail so that the next call resumes at the right byte.
            if buf is self._buf:
                del buf[:pos]
            elif pos < end:
                self._buf += buf[pos:]


def _items_then_raise(items: list[Packet | bytes], exc: ProtocolError) -> Iterator[Packet | bytes]:
    yield from items
    raise exc


def encode_request(ptype: int, *args: bytes) -> bytes:
    """Encode a packet sent to a server (``\\0REQ``)."""
    return encode(REQ, ptype, args)


def encode_response(ptype: int, *args: bytes) -> bytes:
    """Encode a packet sent by a server (``\\0RES``)."""
    return encode(RES, ptype, args)


def _load_accelerator() -> tuple[type, Callable[..., bytes], type] | None:
    """The C ``Decoder``, ``encode`` and ``Router`` bound to this module's objects, or
    None when the extension is not built or ``GEAROFFLOAD_PURE_PYTHON=1`` asks for the
    reference."""
    if os.environ.get("GEAROFFLOAD_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from . import _codec
    except ImportError:
        return None
    try:
        _codec.bind(
            packet=Packet,
            protocol_error=ProtocolError,
            field_counts=FIELD_COUNTS,
            names=(None, *(PacketType(t).name for t in range(1, MAX_TYPE + 1))),
            items_then_raise=_items_then_raise,
            struct_error=struct.error,
            req=REQ,
            res=RES,
            max_packet_size=DEFAULT_MAX_PACKET_SIZE,
            max_line_size=MAX_LINE_SIZE,
        )
        router = _codec.Router  # not in a build from before Router
    except (TypeError, ValueError, AttributeError) as exc:
        # A stale build from another version of this module: run, but say why it is slow.
        warnings.warn(f"gearoffload._codec not used: {exc}", RuntimeWarning, stacklevel=2)
        return None
    return _codec.Decoder, _codec.encode, router


_accelerator = _load_accelerator()
#: Whether ``Decoder``, ``encode`` and ``Router`` are the C accelerator (``gearoffload._codec``).
ACCELERATED: bool = _accelerator is not None
Decoder: type[PyDecoder]
encode: Callable[..., bytes]
Router: type[PyRouter]
if _accelerator is not None:
    Decoder, encode, Router = _accelerator  # type: ignore[assignment]
else:
    Decoder, encode, Router = PyDecoder, py_encode, PyRouter
