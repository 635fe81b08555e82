"""Healthy clients beside hostile ones (issue #17): latency and memory must hold.

Starts ``python -m gearoffload_server`` on free loopback ports (``--queue memory``,
``--http-port``, ``--idle-timeout 5``, ``--max-output-buffer 8M``) and, for
``--seconds`` (default 60), runs in this process a healthy load: ``--clients`` threads
each submitting one foreground job at a time to a worker thread that answers at once,
every round trip timed. Beside it, a child process runs one thread per attack of issue
#17, each bounded in rate and in connections, reconnecting when the server drops it:

- ``slow-reader``: asks 192 KiB of echoes per 64 KiB it reads every 10 ms (item 2);
- ``one-byte``: keeps 200 connections that sent one byte of a packet (item 6);
- ``scraper``: scrapes /metrics and /status.json back to back (item 1);
- ``registrar``: connects, registers 1,000 new function names, closes; again (item 3);
- ``http-idle``: keeps 300 silent connections on the HTTP port (item 4);
- ``forger``: registers names with tabs and newlines; ``long-lines``: 8,192-byte admin
  lines (items 7, 8);
- ``sleeper``: a worker with ``CAN_DO_TIMEOUT`` that grabs and never answers, fed
  background jobs (item 10).

Every second it samples the server's VmRSS. At the end it prints the healthy p50/p99/max,
jobs done, the RSS peak, what each attacker achieved, and checks that /healthz answers.
Exit 1 if the healthy p99 is over ``--max-p99-ms`` (50), the RSS peak over
``--max-rss-mib`` (128), a healthy job failed, or the server died.

    .venv/bin/python benchmarks/soak_hostile.py --seconds 60     # make soak

Only processes this script started are stopped, by PID.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gearoffload.errors import ProtocolError  # noqa: E402
from gearoffload.protocol import REQ, RES, Decoder, encode_request  # noqa: E402
from gearoffload.protocol import PacketType as T  # noqa: E402

TIMEOUT = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Peer:
    """A blocking raw Gearman peer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = Decoder(magic=RES, text=False)
        self.pending: list = []

    def send(self, ptype: int, *args: bytes) -> None:
        self.sock.sendall(encode_request(ptype, *args))

    def recv(self):
        while not self.pending:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("closed by the server")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def close(self) -> None:
        self.sock.close()


# -- the healthy side ---------------------------------------------------------------------


def healthy_worker(port: int, stop: threading.Event, stats: Counter) -> None:
    w = Peer(port)
    w.send(T.SET_CLIENT_ID, b"healthy-worker")
    w.send(T.CAN_DO, b"healthy")
    try:
        while not stop.is_set():
            w.send(T.GRAB_JOB)
            packet = w.recv()
            while packet.type == T.NOOP:  # a late wake-up from an earlier sleep
                packet = w.recv()
            if packet.type == T.NO_JOB:
                w.send(T.PRE_SLEEP)
                w.sock.settimeout(0.5)
                try:
                    w.recv()  # NOOP: work came
                except TimeoutError:
                    pass
                w.sock.settimeout(TIMEOUT)
                continue
            handle, _, data = packet.args
            w.send(T.WORK_COMPLETE, handle, data)
    except Exception as exc:
        stats[f"worker error: {exc!r}"] += 1
    finally:
        w.close()


def healthy_client(port: int, stop: threading.Event, latencies: list[float],
                   stats: Counter) -> None:
    c = Peer(port)
    c.send(T.SET_CLIENT_ID, b"healthy-client")
    stage = "nothing"
    try:
        n = 0
        while not stop.is_set():
            n += 1
            started = time.perf_counter()
            c.send(T.SUBMIT_JOB, b"healthy", b"", b"job %d" % n)
            stage = "JOB_CREATED"
            handle = c.recv().args[0]
            stage = "the result"
            packet = c.recv()
            latencies.append(time.perf_counter() - started)
            if packet.type != T.WORK_COMPLETE or packet.args[0] != handle:
                stats["healthy job failed"] += 1
            time.sleep(0.002)  # a steady load, not a saturating one
    except OSError as exc:
        stats[f"client error: {exc} waiting for {stage}"] += 1
        if os.environ.get("SOAK_VERBOSE"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as a:
                a.sendall(b"status\nworkers\nshow jobs\n")
                time.sleep(0.5)
                text = a.recv(1 << 20).decode(errors="replace")
                print("\n".join(line for line in text.splitlines()
                                if "junk" not in line))
    finally:
        c.close()


# -- the hostile side (a child process) ---------------------------------------------------


def _loop(name: str, body, stop: threading.Event, stats) -> None:
    while not stop.is_set():
        try:
            body(stop, stats)
        except (OSError, ProtocolError):
            stats[name + " dropped"] += 1
            time.sleep(0.05)


def slow_reader(port: int):
    payload = b"e" * 65536
    burst = (REQ + struct.pack(">II", T.ECHO_REQ, len(payload)) + payload) * 3

    def body(stop, stats):
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        try:
            while not stop.is_set():
                s.sendall(burst)
                time.sleep(0.01)
                if not s.recv(65536):
                    raise ConnectionError
        finally:
            s.close()
    return body


def one_byte(port: int):
    def body(stop, stats):
        held = []
        try:
            while not stop.is_set():
                held = [s for s in held if s.fileno() >= 0]
                while len(held) < 200:
                    s = socket.create_connection(("127.0.0.1", port), timeout=2)
                    s.sendall(b"\0")
                    s.setblocking(False)
                    held.append(s)
                time.sleep(0.5)
                for s in list(held):
                    try:
                        if s.recv(1) == b"":
                            stats["one-byte closed by server"] += 1
                            s.close()
                            held.remove(s)
                    except BlockingIOError:
                        pass
        finally:
            for s in held:
                s.close()
    return body


def scraper(http_port: int):
    def body(stop, stats):
        while not stop.is_set():
            for path in ("/metrics", "/status.json"):
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}",
                                            timeout=10) as r:
                    r.read()
                stats["scrapes"] += 1
    return body


def registrar(port: int):
    def body(stop, stats):
        n = stats["registrations"]
        p = Peer(port)
        try:
            p.sock.sendall(b"".join(encode_request(T.CAN_DO, b"junk-%d-%d" % (n, i))
                                    for i in range(1000)))
            p.send(T.ECHO_REQ, b"x")
            while p.recv().type != T.ECHO_RES:
                pass
            stats["registrations"] += 1000
        finally:
            p.close()
        time.sleep(0.2)
    return body


def http_idle(http_port: int):
    def body(stop, stats):
        held = []
        try:
            while not stop.is_set():
                while len(held) < 300:
                    held.append(socket.create_connection(("127.0.0.1", http_port), timeout=2))
                time.sleep(1.0)
                for s in list(held):
                    s.setblocking(False)
                    try:
                        if s.recv(1) == b"":
                            stats["http-idle evicted"] += 1
                            s.close()
                            held.remove(s)
                    except BlockingIOError:
                        pass
        finally:
            for s in held:
                s.close()
    return body


def forger(port: int):
    def body(stop, stats):
        p = Peer(port)
        try:
            while not stop.is_set():
                p.send(T.CAN_DO, b"aaa\t7\t7\t7\n.\n")
                if p.recv().type == T.ERROR:
                    stats["forged names refused"] += 1
                p.sock.sendall(b"x" * 8192 + b"\n")
                reply = p.sock.recv(1024)
                if reply.startswith(b"ERR LINE_TOO_LONG"):
                    stats["8,192-byte lines refused"] += 1
                break  # the server closes this connection now
        finally:
            p.close()
        time.sleep(0.1)
    return body


def sleeper(port: int):
    def body(stop, stats):
        w, c = Peer(port), Peer(port)
        try:
            w.send(T.CAN_DO_TIMEOUT, b"slow", b"1000")
            while not stop.is_set():
                c.send(T.SUBMIT_JOB_BG, b"slow", b"", b"x")
                c.recv()
                w.send(T.GRAB_JOB)
                if w.recv().type == T.JOB_ASSIGN:
                    stats["jobs held past their timeout"] += 1
                time.sleep(1.5)
        finally:
            w.close()
            c.close()
    return body


def hostile_main(port: int, http_port: int, seconds: float, queue) -> None:
    stop = threading.Event()
    stats: Counter = Counter()
    attacks = {"slow-reader": slow_reader(port), "one-byte": one_byte(port),
               "scraper": scraper(http_port), "registrar": registrar(port),
               "http-idle": http_idle(http_port), "forger": forger(port),
               "sleeper": sleeper(port)}
    threads = [threading.Thread(target=_loop, args=(name, body, stop, stats), daemon=True)
               for name, body in attacks.items()]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(10)
    queue.put(dict(stats))


# -- the run ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-p99-ms", type=float, default=50.0)
    p.add_argument("--max-rss-mib", type=float, default=128.0)
    p.add_argument("--tree", type=Path, default=ROOT,
                   help="run gearoffload_server from this source tree (e.g. an older one)")
    p.add_argument("--no-hostile", action="store_true", help="the healthy load alone")
    args = p.parse_args(argv)
    port, http_port = free_port(), free_port()
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(
        [sys.executable, "-m", "gearoffload_server", "--port", str(port), "--queue", "memory",
         "--http-port", str(http_port), "--idle-timeout", "5", "--max-output-buffer", "8M",
         "--verbose", "WARNING"], cwd=args.tree, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    print("the server did not start")
                    return 1
                time.sleep(0.05)
        start_rss = rss_mib(server.pid)
        stop, stop_worker = threading.Event(), threading.Event()
        stats: Counter = Counter()
        latencies: list[float] = []
        worker = threading.Thread(target=healthy_worker, args=(port, stop_worker, stats))
        threads = [threading.Thread(target=healthy_client, args=(port, stop, latencies, stats))
                   for _ in range(args.clients)]
        for t in (worker, *threads):
            t.start()
        queue = multiprocessing.get_context("spawn").Queue()
        child = None
        if not args.no_hostile:
            child = multiprocessing.get_context("spawn").Process(
                target=hostile_main, args=(port, http_port, args.seconds, queue), daemon=True)
            child.start()
        peak = start_rss
        ends = time.monotonic() + args.seconds
        while time.monotonic() < ends and server.poll() is None:
            time.sleep(1.0)
            peak = max(peak, rss_mib(server.pid))
        stop.set()  # the clients first: the worker answers their last jobs
        for t in threads:
            t.join(10)
        stop_worker.set()
        worker.join(10)
        hostile = {}
        if child is not None:
            hostile = queue.get(timeout=30)
            child.join(10)
        alive = server.poll() is None
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5) as r:
            healthz = r.status
        latencies.sort()
        count = len(latencies)
        p50 = latencies[count // 2] * 1000 if count else float("nan")
        p99 = latencies[min(count - 1, int(count * 0.99))] * 1000 if count else float("nan")
        worst = latencies[-1] * 1000 if count else float("nan")
        print(f"healthy: {count} jobs in {args.seconds:g}s, p50 {p50:.2f} ms, "
              f"p99 {p99:.2f} ms, max {worst:.1f} ms")
        print(f"server RSS: {start_rss:.0f} MiB at start, peak {peak:.0f} MiB")
        for key, value in sorted({**stats, **hostile}.items()):
            print(f"  {key}: {value}")
        failed = []
        if not alive:
            failed.append("the server died")
        if healthz != 200:
            failed.append(f"/healthz answered {healthz}")
        if not count or p99 > args.max_p99_ms:
            failed.append(f"healthy p99 {p99:.1f} ms > {args.max_p99_ms:g} ms")
        if peak > args.max_rss_mib:
            failed.append(f"RSS peak {peak:.0f} MiB > {args.max_rss_mib:g} MiB")
        if stats["healthy job failed"] or any(k.startswith(("client error", "worker error"))
                                              for k in stats):
            failed.append("a healthy job or connection failed")
        print("FAIL: " + "; ".join(failed) if failed else "PASS")
        return 1 if failed else 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
        log.seek(0)
        tail = log.read().decode(errors="replace").splitlines()[-5:]
        if os.environ.get("SOAK_VERBOSE"):
            print("\n".join(tail))


if __name__ == "__main__":
    sys.exit(main())
