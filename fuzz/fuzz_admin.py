"""Fuzz the text admin protocol: every line gets exactly one reply, never an exception.

The input is split on newlines; each line goes to ``AdminProtocol.handle`` over a state
with a worker, queued and running jobs, and shutdown enabled (recorded, not performed).
A reply must start with ``OK`` or ``ERR`` or be a listing ending in ``.\\n``.

    .venv/bin/python fuzz/fuzz_admin.py -max_total_time=60
"""

from __future__ import annotations

import sys

from _common import instrumented, main

with instrumented():
    from gearoffload.protocol import REQ, Packet, PacketType
    from gearoffload_server.admin import AdminProtocol
    from gearoffload_server.config import ServerConfig
    from gearoffload_server.state import JobServerState, ManualScheduler, Peer


def _state():
    state = JobServerState(ServerConfig(handle_prefix="H:f", enable_shutdown=True),
                           ManualScheduler())
    state.on_shutdown = lambda graceful: None
    worker = state.connect(Peer(fd=10, address="127.0.0.1"))
    client = state.connect(Peer(fd=11, address="192.0.2.1", loopback=False))
    state.handle(worker, Packet(REQ, PacketType.CAN_DO, (b"f1",)))
    for n in range(3):
        state.handle(client, Packet(REQ, PacketType.SUBMIT_JOB_BG, (b"f1", b"u%d" % n, b"x")))
    state.handle(client, Packet(REQ, PacketType.SUBMIT_JOB, (b"f2", b"", b"y")))
    state.handle(worker, Packet(REQ, PacketType.GRAB_JOB, ()))
    return state, [state.connect(Peer(fd=12, address="127.0.0.1")), client]


def test_one_input(data: bytes) -> None:
    state, peers = _state()
    admin = AdminProtocol(state)
    for n, line in enumerate(data.split(b"\n")[:64]):
        peer = peers[n % 2]
        before = len(peer.out)
        admin.handle(peer, line.rstrip(b"\r"))
        if len(peer.out) != before + 1:
            raise AssertionError(f"{line!r}: {len(peer.out) - before} replies")
        reply = peer.out[-1]
        if not (reply.startswith((b"OK", b"ERR")) or reply.endswith(b".\n")):
            raise AssertionError(f"{line!r}: bad reply {reply!r}")


SEEDS = [
    b"status\nprioritystatus\nworkers\nshow jobs\nshow unique jobs\nshow dead jobs",
    b"cancel job H:f:1\ncreate function g\ndrop function g\ndrop function f1",
    b"maxqueue f1 1 2 3\nmaxqueue f1 -5\nmaxqueue\ngetpid\nverbose\nversion",
    b"shutdown\nshutdown graceful\nshutdown now\nrequeue dead job H:f:1\nx  y  z a b c d",
    b" status\nSTATUS\t\n\0\n\r\n",
]

if __name__ == "__main__":
    main(test_one_input, SEEDS)
    sys.exit(0)
