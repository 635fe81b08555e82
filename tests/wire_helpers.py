"""Raw-wire helpers shared by the conformance, quirk and interop tests (no mocks: they
drive ``conftest.RawConn`` against a real server process)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from gearoffload.protocol import Packet
from gearoffload.protocol import PacketType as T

HANDLE = re.compile(rb"H:[^:]+:(\d+)\Z")


def wait_until(check: Callable[[], object], timeout: float = 5.0, interval: float = 0.02):
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s (last: {result!r})")
        time.sleep(interval)


def submit(conn, func: bytes, unique: bytes = b"", data: bytes = b"",
           ptype: int = T.SUBMIT_JOB) -> bytes:
    conn.send(ptype, func, unique, data)
    return conn.expect(T.JOB_CREATED)[0]


def number(handle: bytes) -> int:
    match = HANDLE.match(handle)
    assert match, f"handle {handle!r} is not H:<host>:<n>"
    return int(match.group(1))


def sync(conn) -> None:
    """Round-trip an ECHO so that everything sent before it has been processed."""
    conn.send(T.ECHO_REQ, b"sync")
    assert conn.expect(T.ECHO_RES) == (b"sync",)


def worker(server, *funcs: bytes, client_id: bytes | None = None):
    conn = server.connect()
    if client_id is not None:
        conn.send(T.SET_CLIENT_ID, client_id)
    for func in funcs:
        conn.send(T.CAN_DO, func)
    sync(conn)  # the registration is in place before other connections act
    return conn


def grab(conn, ptype: int = T.GRAB_JOB_UNIQ, timeout: float = 5.0) -> tuple[bytes, ...]:
    conn.send(ptype)
    reply = {T.GRAB_JOB: T.JOB_ASSIGN, T.GRAB_JOB_UNIQ: T.JOB_ASSIGN_UNIQ}[ptype]
    return conn.expect(reply, timeout)


def items(conn, count: int, timeout: float = 5.0) -> list[Packet | bytes]:
    """The next ``count`` decoded items (packets or text lines) from a raw connection."""
    deadline = time.monotonic() + timeout
    while len(conn.pending) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"got {conn.pending} of {count} items")
        conn._fill(max(0.001, deadline - time.monotonic()))
    got = conn.pending[:count]
    del conn.pending[:count]
    return got


def listing(admin, command: str) -> list[bytes]:
    """A listing reply without its final '.', one entry per line."""
    reply = admin.admin(command)
    assert reply.endswith(b".\n"), reply
    return reply[:-2].split(b"\n")[:-1]


def status_table(admin) -> dict[bytes, tuple[int, ...]]:
    rows = {}
    for line in listing(admin, "status"):
        name, *counts = line.split(b"\t")
        rows[name] = tuple(int(c) for c in counts)
    return rows


def show_jobs(admin) -> dict[bytes, tuple[int, int, int]]:
    rows = {}
    for line in listing(admin, "show jobs"):
        handle, *fields = line.split(b"\t")
        rows[handle] = tuple(int(f) for f in fields)
    return rows
