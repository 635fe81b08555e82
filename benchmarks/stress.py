"""Stress our job server with clients and workers that misbehave at random, then audit it.

Starts ``python -m gearoffload_server --port FREE --queue memory`` on loopback and runs,
for ``--seconds`` (default 30), ``--actors`` threads with raw sockets (the shared codec)
that connect, submit (foreground/background, with and without a unique), grab, send
data, complete or fail, and disconnect at random: between packets, mid-job and
mid-packet. Afterwards a final worker drains every function, and the admin protocol must
show a consistent server: every function has total 0 and running 0, and ``workers``
lists only the admin connection. VmRSS of the server is printed at start and end; the
run fails if it grew by more than ``--max-growth-mib`` (50). Exit code 0 means all good.

    .venv/bin/python benchmarks/stress.py --seconds 30
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from gearoffload.protocol import RES, Decoder, Packet, encode_request
from gearoffload.protocol import PacketType as T

ROOT = Path(__file__).resolve().parent.parent

FUNCTIONS = [b"s0", b"s1", b"s2", b"s3"]
UNIQUES = [b"u%d" % n for n in range(8)]
SOCKET_TIMEOUT = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Conn:
    """A blocking raw peer; every read has a timeout."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
        self.decoder = Decoder(magic=RES, text=False)
        self.pending: list[Packet] = []

    def send(self, ptype: int, *args: bytes) -> None:
        self.sock.sendall(encode_request(ptype, *args))

    def recv(self, timeout: float = SOCKET_TIMEOUT) -> Packet | None:
        """The next packet, or None on timeout or close."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                return None
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def close(self) -> None:
        self.sock.close()


class Admin:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def listing(self, command: bytes) -> list[bytes]:
        self.sock.sendall(command + b"\n")
        while True:
            if self.buf.startswith(b".\n"):
                text, self.buf = b"", self.buf[2:]
                break
            end = self.buf.find(b"\n.\n")
            if end >= 0:
                text, self.buf = self.buf[:end], self.buf[end + 3:]
                break
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("admin connection closed")
            self.buf += data
        return [line for line in text.split(b"\n") if line]


class Actor(threading.Thread):
    """One thread doing random client/worker/garbage sessions until the deadline."""

    def __init__(self, port: int, seed: int, deadline: float, stats: Counter) -> None:
        super().__init__(daemon=True)
        self.port, self.rng, self.deadline, self.stats = port, random.Random(seed), deadline, stats
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for _ in range(1_000_000):  # bounded; the deadline ends it much sooner
                if time.monotonic() >= self.deadline:
                    break
                session = self.rng.choice([self.client, self.client, self.worker,
                                           self.worker, self.garbage])
                try:
                    session()
                except OSError:
                    self.stats["oserror"] += 1  # a reset from our own abrupt closes
        except BaseException as exc:  # reported by main()
            self.error = exc

    def client(self) -> None:
        rng = self.rng
        c = Conn(self.port)
        try:
            for _ in range(rng.randint(1, 5)):
                func = rng.choice(FUNCTIONS)
                unique = rng.choice(UNIQUES) if rng.random() < 0.5 else b""
                background = rng.random() < 0.4
                ptype = rng.choice([T.SUBMIT_JOB_BG, T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_LOW_BG]
                                   if background else
                                   [T.SUBMIT_JOB, T.SUBMIT_JOB_HIGH, T.SUBMIT_JOB_LOW])
                wire = encode_request(ptype, func, unique, rng.randbytes(rng.randint(0, 64)))
                if rng.random() < 0.05:  # disconnect mid-packet
                    c.sock.sendall(wire[:rng.randint(1, len(wire) - 1)])
                    self.stats["client_cut_mid_packet"] += 1
                    return
                c.sock.sendall(wire)
                self.stats["submit_bg" if background else "submit_fg"] += 1
                created = c.recv()
                if created is None or created.type != T.JOB_CREATED:
                    return
                if background:
                    continue
                if rng.random() < 0.3:  # walk away before the result
                    self.stats["client_left_fg"] += 1
                    return
                for _ in range(20):  # wait a little for the result
                    p = c.recv(timeout=0.5)
                    if p is None or p.type in (T.WORK_COMPLETE, T.WORK_FAIL, T.WORK_EXCEPTION):
                        self.stats["fg_done" if p is not None else "fg_timeout"] += 1
                        break
        finally:
            c.close()

    def worker(self) -> None:
        rng = self.rng
        w = Conn(self.port)
        try:
            for func in rng.sample(FUNCTIONS, rng.randint(1, len(FUNCTIONS))):
                w.send(T.CAN_DO, func)
            for _ in range(rng.randint(1, 10)):
                w.send(rng.choice([T.GRAB_JOB, T.GRAB_JOB_UNIQ, T.GRAB_JOB_ALL]))
                p = w.recv()
                if p is None:
                    return
                if p.type == T.NO_JOB:
                    w.send(T.PRE_SLEEP)
                    if w.recv(timeout=0.2) is None and rng.random() < 0.5:
                        return
                    continue
                if p.type not in (T.JOB_ASSIGN, T.JOB_ASSIGN_UNIQ, T.JOB_ASSIGN_ALL):
                    continue
                handle = p.args[0]
                self.stats["grabbed"] += 1
                roll = rng.random()
                if roll < 0.1:  # vanish mid-job
                    self.stats["worker_left_mid_job"] += 1
                    return
                if roll < 0.15:  # vanish mid-packet
                    wire = encode_request(T.WORK_COMPLETE, handle, b"partial result")
                    w.sock.sendall(wire[:rng.randint(1, len(wire) - 1)])
                    self.stats["worker_cut_mid_packet"] += 1
                    return
                if rng.random() < 0.3:
                    w.send(T.WORK_DATA, handle, b"chunk")
                    w.send(T.WORK_STATUS, handle, b"1", b"2")
                if roll < 0.25:
                    w.send(T.WORK_FAIL, handle)
                    self.stats["failed"] += 1
                else:
                    w.send(T.WORK_COMPLETE, handle, b"done")
                    self.stats["completed"] += 1
        finally:
            w.close()

    def garbage(self) -> None:
        rng = self.rng
        g = Conn(self.port)
        try:
            choice = rng.randrange(3)
            if choice == 0:
                g.sock.sendall(rng.randbytes(rng.randint(1, 100)))
            elif choice == 1:  # a header announcing more than is ever sent
                g.sock.sendall(encode_request(T.SUBMIT_JOB, b"s0", b"", b"x" * 50)[:30])
            else:
                g.sock.sendall(b"status\nworkers\nshow jobs\n")
                g.sock.settimeout(0.2)
                try:
                    g.sock.recv(65536)
                except OSError:
                    pass
            self.stats["garbage"] += 1
        finally:
            g.close()


def drain(port: int, seconds: float) -> int:
    """A worker for every function completes jobs until the queue stays empty."""
    w = Conn(port)
    done = 0
    try:
        for func in FUNCTIONS:
            w.send(T.CAN_DO, func)
        deadline = time.monotonic() + seconds
        empty_rounds = 0
        while time.monotonic() < deadline and empty_rounds < 3:
            w.send(T.GRAB_JOB)
            p = w.recv(timeout=5)
            if p is None:
                raise RuntimeError("drain worker: no answer to GRAB_JOB")
            if p.type == T.JOB_ASSIGN:
                w.send(T.WORK_COMPLETE, p.args[0], b"drained")
                done += 1
                empty_rounds = 0
            elif p.type == T.NO_JOB:
                empty_rounds += 1
                time.sleep(0.2)
    finally:
        w.close()
    return done


def audit(port: int, admin: Admin, seconds: float = 10) -> list[str]:
    """Problems left in the server (empty when consistent); retried while sockets close."""
    deadline = time.monotonic() + seconds
    while True:
        problems = []
        for line in admin.listing(b"status"):
            name, total, running, _workers = line.split(b"\t")
            if int(total) or int(running):
                problems.append(f"function {name.decode()}: total {total.decode()} "
                                f"running {running.decode()}")
        workers = admin.listing(b"workers")
        if len(workers) != 1:
            problems.append(f"{len(workers)} connections listed, expected only the admin one: "
                            + repr(workers[:10]))
        jobs = admin.listing(b"show jobs")
        if jobs:
            problems.append(f"{len(jobs)} jobs left: {jobs[:5]!r}")
        if not problems or time.monotonic() >= deadline:
            return problems
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--actors", type=int, default=24)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--max-growth-mib", type=float, default=50)
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2 ** 32)

    port = free_port()
    log = tempfile.TemporaryFile()
    state_home = tempfile.TemporaryDirectory(prefix="gearoffload-stress-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gearoffload_server", "--port", str(port), "--queue", "memory"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
        env={**os.environ, "XDG_STATE_HOME": state_home.name})
    try:
        for _ in range(200):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        admin = Admin(port)
        rss_before = rss_kib(proc.pid)
        print(f"server pid {proc.pid} port {port}; seed {seed}; VmRSS before {rss_before} KiB")

        stats: Counter = Counter()
        deadline = time.monotonic() + args.seconds
        actors = [Actor(port, seed + n, deadline, stats) for n in range(args.actors)]
        started = time.monotonic()
        for a in actors:
            a.start()
        for a in actors:
            a.join(timeout=args.seconds + 30)
        stuck = [a for a in actors if a.is_alive()]
        errors = [a.error for a in actors if a.error is not None]
        rss_peak = rss_kib(proc.pid)
        print(f"load for {time.monotonic() - started:.1f}s: {dict(sorted(stats.items()))}")
        print(f"VmRSS after load {rss_peak} KiB")

        drained = drain(port, 60)
        print(f"final drain completed {drained} jobs")
        problems = audit(port, admin)
        if proc.poll() is not None:
            problems.append(f"server died with exit code {proc.returncode}")
        rss_after = rss_kib(proc.pid) if proc.poll() is None else 0
        growth = (rss_after - rss_before) / 1024
        print(f"VmRSS after drain {rss_after} KiB (growth {growth:+.1f} MiB)")
        if growth > args.max_growth_mib:
            problems.append(f"VmRSS grew by {growth:.1f} MiB > {args.max_growth_mib}")
        if stuck:
            problems.append(f"{len(stuck)} actor threads did not finish")
        problems += [f"actor error: {e!r}" for e in errors]
        if stats["submit_fg"] + stats["submit_bg"] == 0 or stats["grabbed"] == 0:
            problems.append("no jobs flowed: the load did not exercise the server")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.seek(0)
        tracebacks = log.read().decode(errors="replace")
        state_home.cleanup()
    if "Traceback" in tracebacks:
        problems.append("server logged a traceback:\n" + tracebacks[-3000:])
    for p in problems:
        print("FAIL:", p)
    print("OK: server consistent" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
