#!/usr/bin/env python3
"""Benchmark gearoffload-server against gearmand --threads=1, side by side, in one run.

    .venv/bin/python benchmarks/run.py            # full run, a few minutes
    .venv/bin/python benchmarks/run.py --quick    # smoke run, about a minute

Load comes from the neutral C load generator ``gearload`` in ``<repo>/../shared/bench``
(built into /tmp when missing); without that folder the benchmark says so and exits 0.
Each server runs on a free loopback port; the same scenarios run against both,
interleaved (ours, then gearmand) so that noise from a shared machine hits both alike.
Server CPU per job (``gearload -S PID``) is the stable figure; wall-clock jobs/s and
latencies are noisy on a shared 2-core box.

Only processes this script started are stopped, by PID. Every loop is bounded in count
and in time. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gearoffload.protocol import PacketType, encode_request  # noqa: E402

GEARLOAD = Path("/tmp/gearload")
#: The shared bench folder, looked for beside the repository only.
BENCH_DIRS = (REPO.parent / "shared" / "bench",)
GIB = 1 << 30
HEADER = struct.Struct(">4sII")

# The targets of issue #2.
TARGET_US_PER_JOB = 50.0
TARGET_P99_RATIO = 2.0
TARGET_RSS_BYTES = GIB
TARGET_RSS_JOBS = 1_000_000


# -- processes ---------------------------------------------------------------------------

_started: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop one process this script started, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
    if proc in _started:
        _started.remove(proc)


def stop_all() -> None:
    for proc in list(_started):
        stop(proc)


@dataclass
class Server:
    name: str
    argv: list[str]
    cwd: Path = REPO
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    port: int = 0
    log: Path | None = None

    def start(self) -> None:
        self.port = free_port()
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        fd, path = tempfile.mkstemp(prefix=f"bench-{self.name}-", suffix=".log")
        self.log = Path(path)
        with os.fdopen(fd, "wb") as log:
            env = {**os.environ, **self.env} if self.env else None
            self.proc = subprocess.Popen(argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        _started.append(self.proc)
        wait_listening(self.proc, self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None
        if self.log is not None:
            self.log.unlink(missing_ok=True)
            self.log = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def proc_status(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- gearload ----------------------------------------------------------------------------

def supports_queue_option(tree: Path) -> bool:
    """Whether this version of the server has ``--queue`` (its queue stores)."""
    try:
        res = subprocess.run([sys.executable, "-m", "gearoffload_server", "--help"], cwd=tree,
                             capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return "--queue" in res.stdout


def find_bench_dir() -> Path | None:
    for d in BENCH_DIRS:
        if (d / "gearload" / "gearload.c").is_file():
            return d
    return None


def build_gearload(bench: Path) -> Path:
    src = bench / "gearload" / "gearload.c"
    if GEARLOAD.exists() and GEARLOAD.stat().st_mtime >= src.stat().st_mtime:
        return GEARLOAD
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) to build gearload")
    tmp = GEARLOAD.with_name(f"gearload.{os.getpid()}.tmp")
    print(f"building {GEARLOAD} from {src}", flush=True)
    subprocess.run([cc, "-O2", "-pthread", "-o", str(tmp), str(src)], check=True, timeout=120)
    os.replace(tmp, GEARLOAD)  # atomic: another build running at once cannot leave half a file
    return GEARLOAD


def gearload(args: list[str], server: Server, time_limit: float, verbose: bool) -> dict:
    argv = [str(GEARLOAD), args[0], "-p", str(server.port), "-S", str(server.pid),
            "-t", str(int(time_limit)), *args[1:]]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=time_limit + 60)
    except subprocess.TimeoutExpired:
        return {"status": "killed"}
    line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    if verbose:
        print(f"  [{server.name}] {' '.join(argv[1:])}\n    {line}", flush=True)
    out = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
    if not out:
        out["status"] = f"no output (rc={res.returncode}): {res.stderr.strip()[-200:]}"
    if not server.alive():
        out["status"] = "server died"
    return out


def median_of(runs: list[dict]) -> dict:
    """Per key, the median of the runs' numeric values; status ``ok`` only if all were."""
    merged: dict = {}
    for key in runs[0]:
        values = sorted(x for x in (num(r, key) for r in runs) if x is not None)
        if values:
            merged[key] = values[len(values) // 2] if len(values) % 2 else (
                (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2)
    bad = [r.get("status") for r in runs if r.get("status") != "ok"]
    merged["status"] = bad[0] if bad else "ok"
    return merged


# -- the memory phase: a pipelined raw-socket submitter ----------------------------------

def admin_status(port: int, function: bytes, timeout: float = 10.0) -> int | None:
    """Total jobs of ``function`` per the text admin ``status`` command (None: not listed)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"status\n")
        buf = b""
        while not buf.endswith(b".\n") and time.monotonic() < deadline and len(buf) < 1 << 20:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    for line in buf.splitlines():
        cols = line.split(b"\t")
        if cols[0] == function and len(cols) >= 2:
            return int(cols[1])
    return None


def submit_background(port: int, count: int, payload: int, time_limit: float,
                      function: bytes = b"membench", window: int = 20_000,
                      batch: int = 2_000) -> tuple[int, int, float]:
    """Queue ``count`` SUBMIT_JOB_BG of ``payload`` bytes (distinct data, empty unique) on
    one pipelined connection, at most ``window`` unanswered. No worker ever registers.
    Returns (JOB_CREATED received, ERRORs received, seconds)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    created = errors = sent = 0
    out = memoryview(b"")
    inbuf = bytearray()
    fmt = b"%0" + str(payload).encode() + b"d"
    start = time.monotonic()
    deadline = start + time_limit
    try:
        while created + errors < count and time.monotonic() < deadline:
            if not out and sent < count and sent - created - errors < window:
                n = min(batch, count - sent)
                out = memoryview(b"".join(
                    encode_request(PacketType.SUBMIT_JOB_BG, function, b"", fmt % (sent + i))
                    for i in range(n)))
                sent += n
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0)
            sel.modify(sock, want)
            for _key, events in sel.select(timeout=1.0):
                if events & selectors.EVENT_WRITE and out:
                    try:
                        out = out[sock.send(out):]
                    except BlockingIOError:
                        pass
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(1 << 20)
                    except BlockingIOError:
                        chunk = None
                    if chunk == b"":
                        raise RuntimeError("server closed the submitting connection")
                    if chunk:
                        inbuf += chunk
                        pos, end = 0, len(inbuf)
                        while end - pos >= 12:
                            _, ptype, size = HEADER.unpack_from(inbuf, pos)
                            if end - pos - 12 < size:
                                break
                            if ptype == PacketType.JOB_CREATED:
                                created += 1
                            else:
                                errors += 1
                            pos += 12 + size
                        del inbuf[:pos]
    finally:
        sel.close()
        sock.close()
    return created, errors, time.monotonic() - start


# -- scenarios ---------------------------------------------------------------------------

@dataclass
class Plan:
    small_jobs: int
    large_jobs: int
    serial_small: int
    serial_large: int
    background: int
    coalesce: int
    memory: int
    durable: int
    time_limit: float
    repeat: int


FULL = Plan(small_jobs=100_000, large_jobs=30_000, serial_small=30_000, serial_large=15_000,
            background=100_000, coalesce=1_000, memory=1_000_000, durable=5_000,
            time_limit=45, repeat=3)
QUICK = Plan(small_jobs=20_000, large_jobs=6_000, serial_small=6_000, serial_large=4_000,
             background=20_000, coalesce=1_000, memory=100_000, durable=1_000,
             time_limit=20, repeat=1)


@dataclass
class Row:
    section: str
    metric: str
    higher_is_better: bool
    values: dict[str, float | None] = field(default_factory=dict)
    fmt: str = "{:,.0f}"
    note: str = ""


def num(d: dict, key: str) -> float | None:
    try:
        return float(d[key])
    except (KeyError, ValueError):
        return None


def run(args: argparse.Namespace) -> int:
    bench = find_bench_dir()
    if bench is None:
        print("benchmark skipped: no gearload sources in "
              + " or ".join(str(d) for d in BENCH_DIRS))
        return 0
    build_gearload(bench)
    plan = QUICK if args.quick else FULL
    tl = plan.time_limit
    v = args.verbose
    t0 = time.monotonic()

    # Our server keeps background jobs in a sqlite store by default, under
    # $XDG_STATE_HOME: point that at a private directory, removed at the end. The main
    # scenarios use --queue memory, like gearmand's default in-memory queue; the
    # "durable" scenario compares the default store with gearmand -q libsqlite3.
    state_dir = Path(tempfile.mkdtemp(prefix="bench-state-"))
    ours_argv = [sys.executable, "-m", "gearoffload_server", "--port", "{port}",
                 "--job-handle-prefix", "H:bench"]
    has_queue = supports_queue_option(args.tree)
    env = {"XDG_STATE_HOME": str(state_dir)}
    ours = Server("gearoffload", ours_argv + (["--queue", "memory"] if has_queue else []),
                  cwd=args.tree, env=env)
    servers = [ours]
    durable = [Server("gearoffload", ours_argv, cwd=args.tree, env=env)] if has_queue else []
    gearmand = args.gearmand or shutil.which("gearmand") or (
        "/usr/sbin/gearmand" if os.access("/usr/sbin/gearmand", os.X_OK) else None)
    if gearmand and not args.no_gearmand:
        gm_argv = [gearmand, "--listen=127.0.0.1", "--port={port}", "--threads=1",
                   "--log-file=none"]
        servers.append(Server("gearmand", gm_argv))
        if durable:
            durable.append(Server("gearmand", gm_argv + [
                "-q", "libsqlite3", f"--libsqlite3-db={state_dir / 'gearmand-{port}.db'}"]))
    else:
        print("gearmand not installed (or --no-gearmand): measuring gearoffload alone")
    names = [s.name for s in servers]
    rows: list[Row] = []
    raw: dict[str, dict[str, dict]] = {}

    def add(section: str, metric: str, hib: bool, key: str, results: dict[str, dict],
            fmt: str = "{:,.0f}", scale: float = 1.0) -> None:
        vals = {}
        for n in names:
            x = num(results[n], key)
            vals[n] = None if x is None else x * scale
        note = ",".join(f"{n}:{results[n].get('status')}" for n in names
                        if results[n].get("status") not in ("ok", None))
        rows.append(Row(section, metric, hib, vals, fmt, note))

    def each(label: str, argv: list[str], repeat: int = 1) -> dict[str, dict]:
        """Run gearload against every server, interleaved, ``repeat`` times (fewer once
        the time budget is spent); the median of each figure."""
        print(f"- {label}", flush=True)
        runs: dict[str, list[dict]] = {s.name: [] for s in servers}
        for i in range(repeat):
            if i and time.monotonic() - t0 > args.budget:
                print(f"  time budget of {args.budget:.0f} s spent: {i} repetition(s)")
                break
            for s in servers:
                runs[s.name].append(gearload(argv, s, tl, v))
        raw[label] = runs
        return {name: median_of(rs) for name, rs in runs.items()}

    try:
        for s in servers:
            s.start()
        # Warm up (connections, function registration, allocator) on both, untimed.
        each("warm-up", ["throughput", "-c", "4", "-d", "16", "-w", "4", "-s", "64",
                         "-n", "5000"])
        raw.pop("warm-up")

        cases = [
            ("64 B, 4 clients x 16 in flight, 4 workers", "4", "16", "64", plan.small_jobs),
            ("16 KiB, 4 clients x 16 in flight, 4 workers", "4", "16", "16384", plan.large_jobs),
            ("64 B, 32 clients x 1, 4 workers", "32", "1", "64", plan.serial_small),
            ("16 KiB, 32 clients x 1, 4 workers", "32", "1", "16384", plan.serial_large),
        ]
        for label, c, d, size, n in cases:
            r = each(label, ["throughput", "-c", c, "-d", d, "-w", "4", "-s", size,
                             "-n", str(n)], plan.repeat)
            add(label, "echo jobs/s", True, "jobs_per_s", r)
            add(label, "p50 latency (us)", False, "p50_us", r)
            add(label, "p99 latency (us)", False, "p99_us", r)
            add(label, "server CPU per job (us)", False, "srv_us_per_job", r, "{:,.1f}")
            add(label, "jobs per server CPU-second", True, "srv_jobs_per_cpu_s", r)

        label = f"coalescing: {plan.coalesce:,} identical submissions, 1 worker"
        r = each(label, ["coalesce", "-k", str(plan.coalesce), "-w", "1", "-D", "200",
                         "-s", "64"], plan.repeat)
        add(label, "worker assignments (ideal 1)", False, "assigns", r)
        add(label, "clients answered correctly", True, "completed_ok", r)
        add(label, "elapsed (ms)", False, "elapsed_ms", r, "{:,.1f}")
        add(label, "server CPU per submission (us)", False, "srv_us_per_job", r, "{:,.1f}")

        label = f"background: {plan.background:,} x 64 B, 4 clients x 16, then 4 workers drain"
        r = each(label, ["background", "-n", str(plan.background), "-c", "4", "-d", "16",
                         "-w", "4", "-s", "64"], plan.repeat)
        add(label, "background submissions/s", True, "submit_jobs_per_s", r)
        add(label, "server CPU per submission (us)", False, "submit_srv_us_per_job", r,
            "{:,.1f}")
        add(label, "drain jobs/s", True, "drain_jobs_per_s", r)
        add(label, "server CPU per drained job (us)", False, "drain_srv_us_per_job", r,
            "{:,.1f}")

        # Memory: fresh servers, so that earlier phases do not inflate the figure.
        for s in servers:
            s.stop()
        label = f"memory: {plan.memory:,} queued 64 B background jobs, no workers"
        print(f"- {label}", flush=True)
        mem: dict[str, dict] = {}
        for s in servers:
            s.start()
            base = proc_status(s.pid, "VmRSS")
            cpu0 = proc_cpu(s.pid)
            created, errors, secs = submit_background(s.port, plan.memory, 64, tl * 2)
            cpu = proc_cpu(s.pid) - cpu0
            queued = admin_status(s.port, b"membench") if s.alive() else None
            rss = proc_status(s.pid, "VmRSS") if s.alive() else None
            status = "ok" if created == plan.memory and queued == plan.memory else (
                f"created={created} errors={errors} queued={queued}")
            mem[s.name] = {
                "rss": rss, "base": base, "created": created, "queued": queued,
                "per_job": (rss - base) / created if rss and created else None,
                "srv_us": 1e6 * cpu / created if created else None,
                "status": status,
            }
            if v:
                print(f"  [{s.name}] {mem[s.name]} in {secs:.1f} s", flush=True)
            s.stop()
        raw[label] = mem
        mib = 1 / (1 << 20)
        add(label, "server RSS (MiB)", False, "rss", mem, "{:,.1f}", mib)
        add(label, "RSS growth per queued job (bytes)", False, "per_job", mem, "{:,.0f}")
        add(label, "server CPU per submission (us)", False, "srv_us", mem, "{:,.1f}")

        if durable:
            label = (f"durable background: {plan.durable:,} x 64 B into sqlite "
                     "(ours: default store; gearmand: -q libsqlite3)")
            print(f"- {label}", flush=True)
            res: dict[str, dict] = {}
            for s in durable:
                s.start()
                res[s.name] = gearload(["background", "-n", str(plan.durable), "-c", "4",
                                        "-d", "16", "-w", "4", "-s", "64"], s, tl * 2, v)
                s.stop()
            raw[label] = res
            add(label, "background submissions/s", True, "submit_jobs_per_s", res)
            add(label, "submit p99 latency (us)", False, "submit_p99_us", res)
            add(label, "server CPU per submission (us)", False, "submit_srv_us_per_job", res,
                "{:,.1f}")
    finally:
        stop_all()
        shutil.rmtree(state_dir, ignore_errors=True)

    elapsed = time.monotonic() - t0
    report(rows, names, plan, elapsed, raw, args)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"plan": plan.__dict__, "elapsed_s": elapsed,
             "rows": [r.__dict__ for r in rows], "raw": raw}, indent=1, default=str))
    return 0


def report(rows: list[Row], names: list[str], plan: Plan, elapsed: float,
           raw: dict, args: argparse.Namespace) -> None:
    ours = names[0]
    other = names[1] if len(names) > 1 else None
    width = 36
    print()
    header = f"{'metric':<{width}}" + "".join(f"{n:>14}" for n in names)
    if other:
        header += f"{'ratio':>9}  better"
    print(header)
    section = None
    for r in rows:
        if r.section != section:
            section = r.section
            print(f"\n{section}")
        cells = "".join(
            f"{'-' if r.values[n] is None else r.fmt.format(r.values[n]):>14}" for n in names)
        line = f"  {r.metric:<{width - 2}}{cells}"
        if other:
            a, b = r.values[ours], r.values[other]
            ratio = f"{a / b:.2f}x" if a is not None and b else "-"
            line += f"{ratio:>9}  {'higher' if r.higher_is_better else 'lower'}"
        if r.note:
            line += f"  [{r.note}]"
        print(line)
    print(f"\nfigures: median of up to {plan.repeat} interleaved run(s) per server (memory: 1)")
    if other:
        print(f"ratio = {ours} / {other}")

    def value(section_prefix: str, metric: str, name: str) -> float | None:
        for r in rows:
            if r.section.startswith(section_prefix) and r.metric == metric:
                return r.values.get(name)
        return None

    print("targets (issue #2)")
    us = value("64 B, 4 clients", "server CPU per job (us)", ours)
    check(f"server CPU per job, 64 B 4x16 <= {TARGET_US_PER_JOB:.0f} us",
          us, us is not None and us <= TARGET_US_PER_JOB, "{:.1f} us")
    if other:
        p99 = value("64 B, 4 clients", "p99 latency (us)", ours)
        ref = value("64 B, 4 clients", "p99 latency (us)", other)
        ok = p99 is not None and ref is not None and p99 <= TARGET_P99_RATIO * ref
        check(f"p99, 64 B 4x16 <= {TARGET_P99_RATIO:.0f}x gearmand's",
              p99 / ref if p99 is not None and ref else None, ok, "{:.2f}x")
    assigns = value("coalescing", "worker assignments (ideal 1)", ours)
    check(f"coalescing {plan.coalesce:,} -> 1 assignment", assigns, assigns == 1, "{:.0f}")
    rss = value("memory", "server RSS (MiB)", ours)
    per_job = value("memory", "RSS growth per queued job (bytes)", ours)
    if plan.memory >= TARGET_RSS_JOBS:
        check("1,000,000 queued 64 B jobs < 1 GiB RSS", rss,
              rss is not None and rss * (1 << 20) < TARGET_RSS_BYTES, "{:,.0f} MiB")
    elif rss is not None and per_job is not None:
        est = (rss * (1 << 20) + per_job * (TARGET_RSS_JOBS - plan.memory)) / (1 << 20)
        check(f"1,000,000 queued 64 B jobs < 1 GiB RSS (extrapolated from {plan.memory:,})",
              est, est * (1 << 20) < TARGET_RSS_BYTES, "~{:,.0f} MiB")
    print(f"\ntotal time {elapsed:.0f} s ({'quick' if args.quick else 'full'} run)")


def check(what: str, value: float | None, ok: bool, fmt: str) -> None:
    shown = "-" if value is None else fmt.format(value)
    print(f"  {'PASS' if ok else 'FAIL'}  {what:<62} {shown}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: smaller counts, ~1 minute")
    p.add_argument("--no-gearmand", action="store_true", help="measure gearoffload alone")
    p.add_argument("--gearmand", help="path of gearmand (default: from PATH or /usr/sbin)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which repetitions are skipped (default 300; quick 60)")
    p.add_argument("--tree", type=Path, default=REPO,
                   help="run gearoffload_server from this source tree (e.g. a patched copy) "
                        "instead of the repository's")
    p.add_argument("--json", help="also write every figure and gearload's raw output here")
    p.add_argument("--verbose", "-v", action="store_true", help="print gearload's raw lines")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 60.0 if args.quick else 300.0

    def on_signal(signum, frame):  # stop our servers, then exit
        stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return run(args)
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
