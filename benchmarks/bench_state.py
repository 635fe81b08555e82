"""The state's own cost per job, without sockets: submit, grab, complete through
``JobServerState.handle`` on a manual clock (no I/O, no gevent).

    .venv/bin/python benchmarks/bench_state.py            # 200,000 jobs, best of 5
    .venv/bin/python benchmarks/bench_state.py --background --result-ttl 600   # kept results
    GEAROFFLOAD_PURE_PYTHON=1 .venv/bin/python benchmarks/bench_state.py   # pure Python
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_state.py   # compare

Used to price bookkeeping added to the hot path (e.g. the metrics counters of issue #6):
run it on two checkouts and compare the µs per job. Packets are built once, so what is
measured is the state's work alone.
"""

from __future__ import annotations

import argparse
import time

from gearoffload.protocol import REQ, Packet
from gearoffload.protocol import PacketType as T
from gearoffload_server.config import ServerConfig
from gearoffload_server.state import JobServerState, ManualScheduler, Peer


def run(jobs: int, background: bool = False, result_ttl: float = 600.0) -> float:
    """Seconds of CPU for ``jobs`` foreground jobs: submit, grab, complete. With
    ``background``: background jobs, each with a unique of its own, whose outcomes are
    kept for ``result_ttl`` seconds (``KeptResults``; 0 = none)."""
    state = JobServerState(ServerConfig(handle_prefix="H:b", queue="memory",
                                        result_ttl=result_ttl), ManualScheduler())
    client = state.connect(Peer(fd=1))
    worker = state.connect(Peer(fd=2))
    handle = state.handle
    handle(worker, Packet(REQ, T.CAN_DO, (b"echo",)))
    if background:  # built before the clock starts, as a decoder would have built them
        submits = [Packet(REQ, T.SUBMIT_JOB_BG, (b"echo", b"job-%d" % n, b"x" * 64))
                   for n in range(jobs)]
    else:
        submits = [Packet(REQ, T.SUBMIT_JOB, (b"echo", b"", b"x" * 64))] * jobs
    grab = Packet(REQ, T.GRAB_JOB_UNIQ, ())
    prefix = b"H:b:"
    started = time.process_time()
    for n in range(1, jobs + 1):
        handle(client, submits[n - 1])
        handle(worker, grab)
        handle(worker, Packet(REQ, T.WORK_COMPLETE, (prefix + b"%d" % n, b"x")))
        if not n & 1023:
            client.out.clear()
            worker.out.clear()
            state.take_dirty()
    elapsed = time.process_time() - started
    assert not state.jobs, "jobs left over: the loop did not complete them"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--background", action="store_true",
                        help="background jobs with distinct uniques (kept results)")
    parser.add_argument("--result-ttl", type=float, default=600.0,
                        help="with --background: seconds outcomes are kept (0 = none)")
    args = parser.parse_args()
    best = min(run(args.jobs, args.background, args.result_ttl) for _ in range(args.repeat))
    kind = f"background, --result-ttl {args.result_ttl:g}" if args.background else "foreground"
    print(f"{best / args.jobs * 1e6:.3f} µs of state CPU per job "
          f"(submit + grab + complete, {kind}, best of {args.repeat} × {args.jobs:,})")


if __name__ == "__main__":
    main()
