"""Web-layer benchmark: what offloading costs a request, and what the middleware sustains.

    .venv/bin/python benchmarks/bench_web.py                  # about 70 s
    .venv/bin/python benchmarks/bench_web.py --quick          # a smoke run, about 25 s
    .venv/bin/python benchmarks/bench_web.py --queue memory   # no durable store

In one run it starts a gearoffload-server, a ``gearoffload-worker --wsgi`` pool and this
file's Flask app on a gevent ``WSGIServer`` (each a separate process on 127.0.0.1), then
measures with ``wrk`` when it is on PATH (``apt-get install wrk``), otherwise with a
keep-alive HTTP/1.1 load loop of its own (gevent sockets); ``--loadgen`` picks one, and
the output says which was used:

1. added latency: the same trivial view run locally (``/local``) and offloaded with
   ``@ext.offload`` (``/offloaded``), sequential requests on one connection (wrk: ``-t1
   -c1 --latency`` for a fixed time): p50/p99 of each and the difference;
2. throughput: requests/s of a trivial WSGI route passing through ``OffloadMiddleware``
   (``/mw/...``, distinct query strings so nothing coalesces) versus the same route served
   locally (``/plain/...``), with C concurrent connections for a fixed time (wrk: ``-t2``,
   a Lua script written to a temp file varies the path per thread and query per request);
   and the same with identical requests (``/mw-same``), which coalesce;
3. time to the 202 of a background view (``@ext.offload(background=True)``, ``POST /bg``:
   the job is acknowledged by the job server, on its default sqlite store unless
   ``--queue`` says otherwise) next to the local view POSTed the same way (``POST
   /local``), sequential requests on one connection (wrk: ``-t1 -c1 --latency`` with a
   small Lua script that makes the request a POST): p50/p99 of each, difference, ratios;
4. status polls per second: C connections GETting the status URL (``/_offload/jobs/<id>``,
   read from the job server's kept results) of one finished job, then of one running job
   (``/bg-slow`` reports progress 1/2 and sleeps), next to the local view (``GET
   /local``) with the same concurrency (wrk: ``-t2``).

Jobs are signed: the script sets ``GEAROFFLOAD_SECRET_KEY`` (a benchmark-only value unless
the environment has one) for the web process and the workers. The server's default store
lives in a private ``$XDG_STATE_HOME``, removed at the end.

Every loop and every wrk run (``-d``) is bounded in count and time; only processes this
script started are stopped, by PID. Figures move with whatever else runs on the machine:
compare ratios, not absolutes.
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()  # entry point (the --serve child too): before anything else

import argparse  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


#: Jobs are signed: the web process, the workers (from the environment) and the middleware
#: need one key. A benchmark-only value unless the environment sets one.
SECRET_KEY = os.environ.setdefault("GEAROFFLOAD_SECRET_KEY", "bench-web-not-a-secret")
#: How long a ``/bg-slow`` job stays running (the worker reads it from the environment).
SLOW_SECONDS = float(os.environ.get("BENCH_WEB_SLOW_SECONDS", "30"))


def make_app(servers: str):
    from flask import Flask

    from gearoffload.flask import GearOffload, progress
    from gearoffload.wsgi import OffloadMiddleware

    app = Flask("bench_web")
    app.config.update(GEAROFFLOAD_SERVERS=servers, GEAROFFLOAD_TIMEOUT=30,
                      SECRET_KEY=SECRET_KEY)
    ext = GearOffload(app)

    @app.route("/local", methods=["GET", "POST"])
    def local():
        return "ok"

    @app.get("/offloaded")
    @ext.offload(name="bench_web.offloaded")
    def offloaded():
        return "ok"

    @app.post("/bg")
    @ext.offload(name="bench_web.bg", background=True)
    def background():
        return "ok"

    @app.post("/bg-slow")
    @ext.offload(name="bench_web.bg_slow", background=True)
    def background_slow():
        import gevent

        progress(1, 2)  # so that its status reads "running 1/2"
        gevent.sleep(SLOW_SECONDS)  # bounded; the pool's --drain-timeout bounds it too
        return "ok"

    def trivial_wsgi(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    flask_wsgi = app.wsgi_app

    def dispatch(environ, start_response):
        if environ["PATH_INFO"].startswith(("/mw", "/plain")):
            return trivial_wsgi(environ, start_response)
        return flask_wsgi(environ, start_response)

    app.wsgi_app = OffloadMiddleware(dispatch, servers=servers, routes=["/mw"],
                                     function="bench_web.wsgi", secret_key=SECRET_KEY)
    return app


app = make_app(os.environ.get("GEAROFFLOAD_SERVERS", "127.0.0.1:4730"))


# -- the load loop ---------------------------------------------------------------------

class Conn:
    """One keep-alive HTTP/1.1 connection (responses must carry Content-Length)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def get(self, path: str) -> int:
        return self.request("GET", path)[0]

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n"
        if body or method == "POST":
            head += f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + body)
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buf) < length:
            self._fill()
        payload, self.buf = self.buf[:length], self.buf[length:]
        return status, payload

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def latencies(port: int, path: str, count: int, budget: float, method: str = "GET",
              expect: int = 200) -> list[float]:
    conn = Conn(port)
    out = []
    deadline = time.monotonic() + budget
    body = b"x" if method == "POST" else b""
    try:
        for _ in range(5):
            conn.request(method, path, body)  # warm-up
        while len(out) < count and time.monotonic() < deadline:
            started = time.perf_counter()
            status = conn.request(method, path, body)[0]
            out.append(time.perf_counter() - started)
            assert status == expect, f"{method} {path}: HTTP {status}"
    finally:
        conn.close()
    return out


def throughput(port: int, path_of, connections: int, seconds: float) -> float:
    import gevent

    done = [0]
    stop_at = time.monotonic() + seconds

    def loop(index: int) -> None:
        conn = Conn(port)
        n = 0
        try:
            while time.monotonic() < stop_at:
                status = conn.get(path_of(index, n))
                assert status == 200, f"HTTP {status}"
                n += 1
                done[0] += 1
        finally:
            conn.close()

    started = time.monotonic()
    greenlets = [gevent.spawn(loop, i) for i in range(connections)]
    gevent.joinall(greenlets, timeout=seconds + 30, raise_error=True)
    return done[0] / (time.monotonic() - started)


# -- wrk -------------------------------------------------------------------------------

# Each wrk thread has its own Lua state: setup() numbers the threads, so
# "<prefix><thread>?n=<count>" is distinct across threads and requests.
WRK_DISTINCT_LUA = """\
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local prefix, n = "/", 0
function init(args)
  prefix = args[1] or "/"
end
function request()
  n = n + 1
  return wrk.format("GET", prefix .. tid .. "?n=" .. n)
end
"""

# A POST with a small body to the URL on the command line (time to the 202 of a background
# view, and the local view measured the same way).
WRK_POST_LUA = """\
wrk.method = "POST"
wrk.body = "x"
wrk.headers["Content-Type"] = "text/plain"
"""

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"wrk: cannot read the duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(port: int, path: str, threads: int, connections: int, seconds: float,
            script: str | None = None, script_args: tuple[str, ...] = ()) -> dict:
    """One bounded wrk run against 127.0.0.1: requests/s, count, mean/p50/p99 (s)."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
           "--latency", "--timeout", "10s"]
    if script:
        cmd += ["-s", script]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    if script_args:
        cmd += ["--", *script_args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    out = done.stdout
    if done.returncode != 0:
        raise SystemExit(f"bench_web: {' '.join(cmd)} exited with {done.returncode}:\n"
                         f"{out}{done.stderr}")
    for bad in ("Non-2xx or 3xx responses", "Socket errors"):
        if bad in out:
            line = next(x for x in out.splitlines() if bad in x)
            raise SystemExit(f"bench_web: wrk {path}: {line.strip()}")
    result = {}
    mean = re.search(r"^\s*Latency\s+(\S+)", out, re.M)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    count = re.search(r"^\s*(\d+) requests in", out, re.M)
    dist = dict(re.findall(r"^\s*(50|75|90|99)%\s+(\S+)", out, re.M))
    if not (mean and rate and count and "50" in dist and "99" in dist):
        raise SystemExit(f"bench_web: cannot parse the wrk output:\n{out}")
    result.update(rate=float(rate.group(1)), count=int(count.group(1)),
                  mean=_seconds(mean.group(1)), p50=_seconds(dist["50"]),
                  p99=_seconds(dist["99"]))
    return result


def write_lua(text: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench_web_",
                                     delete=False) as lua:
        lua.write(text)
    return lua.name


def submit_background(port: int, path: str) -> str:
    """POST to a background view; the status URL of the job it accepted."""
    import json

    conn = Conn(port)
    try:
        status, body = conn.request("POST", path, b"x")
    finally:
        conn.close()
    if status != 202:
        raise SystemExit(f"bench_web: POST {path}: HTTP {status} {body[:200]!r}")
    return json.loads(body)["status_url"]


def wait_state(port: int, url: str, states: tuple[str, ...], timeout: float) -> dict:
    """Poll a status URL (a new connection each time) until the job is in one of
    ``states``; bounded by ``timeout``."""
    import json

    deadline = time.monotonic() + timeout
    while True:
        conn = Conn(port)
        try:
            status, body = conn.request("GET", url)
        finally:
            conn.close()
        answer = json.loads(body) if body.startswith(b"{") else {}
        if status == 200 and answer.get("state") in states:
            return answer
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_web: {url} not {'/'.join(states)} after {timeout:g} s: "
                             f"HTTP {status} {body[:200]!r}")
        time.sleep(0.05)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


# -- processes ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_web: {proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench_web: nothing on port {port} after {timeout}s")


def serve(port: int) -> None:
    from gevent.pywsgi import WSGIServer

    class NoDelayServer(WSGIServer):
        # pywsgi writes headers and body in two sends: without TCP_NODELAY, Nagle and the
        # client's delayed ACK add ~40 ms to every keep-alive response.
        def handle(self, sock, address):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return super().handle(sock, address)

    server = NoDelayServer(("127.0.0.1", port), app, log=None, backlog=1024)
    import gevent
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description="gearoffload web-layer benchmark")
    parser.add_argument("--quick", action="store_true", help="small counts, short runs")
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--queue", default="",
                        help="the job server's --queue (default: its default store, sqlite "
                             "in a private temporary directory; 'memory' for none)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "gevent"), default="auto",
                        help="auto: wrk when it is on PATH, else the built-in gevent loop")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    wrk_path = shutil.which("wrk")
    if args.loadgen == "wrk" and not wrk_path:
        parser.error("--loadgen wrk: wrk is not on PATH (apt-get install wrk)")

    count, seconds = (200, 2.0) if args.quick else (1000, 5.0)
    gear_port, web_port = free_port(), free_port()
    servers = f"127.0.0.1:{gear_port}"
    # A /bg-slow job must outlive the status polls of section 4 (it is stopped with the
    # pool, whose --drain-timeout is 2 s).
    # The server's default store goes to $XDG_STATE_HOME: a private directory, removed at
    # the end, so no queue file is left behind.
    state_dir = tempfile.mkdtemp(prefix="bench-web-state-")
    env = dict(os.environ, GEAROFFLOAD_SERVERS=servers, GEAROFFLOAD_SECRET_KEY=SECRET_KEY,
               BENCH_WEB_SLOW_SECONDS=str(round(3 * seconds + 20)), XDG_STATE_HOME=state_dir,
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH"))
                                          if p))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    children: list[subprocess.Popen] = []
    try:
        server = subprocess.Popen([sys.executable, "-m", "gearoffload_server", "--port",
                                   str(gear_port), "--verbose", "ERROR",
                                   *(["--queue", args.queue] if args.queue else [])],
                                  env=env, cwd=ROOT, **quiet)
        children.append(server)
        wait_for_port(gear_port, server)
        children.append(subprocess.Popen(
            [sys.executable, "-m", "gearoffload.pool", "--wsgi", "bench_web:app",
             "--wsgi-function", "bench_web.wsgi", "--servers", servers, "--processes",
             str(args.processes), "--concurrency", "50", "--log-level", "ERROR",
             "--drain-timeout", "2"],
            env=env, cwd=HERE, **quiet))
        web = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve",
                                str(web_port)], env=env, cwd=ROOT, **quiet)
        children.append(web)
        wait_for_port(web_port, web)
        warm = time.monotonic() + 15
        while True:  # until the pool answers
            try:
                if Conn(web_port).get("/offloaded") == 200:
                    break
            except (OSError, ConnectionError):
                pass
            if time.monotonic() > warm:
                raise SystemExit("bench_web: the worker pool did not answer within 15 s")
            time.sleep(0.2)

        use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and wrk_path)
        loadgen = (f"wrk ({wrk_path})" if use_wrk
                   else "the built-in gevent keep-alive loop" + (
                       "" if args.loadgen == "gevent" else " (wrk not on PATH)"))
        print(f"gearoffload web benchmark ({'quick' if args.quick else 'full'}): server "
              f"(--queue {args.queue or 'default: sqlite'}), {args.processes} worker "
              "processes, 1 web process; all on 127.0.0.1")
        print(f"load generator: {loadgen}")

        # 1. latency: {"count", "p50", "p99", "mean"}, milliseconds
        if use_wrk:
            lat = {}
            for path in ("/local", "/offloaded"):
                r = run_wrk(web_port, path, 1, 1, seconds)
                lat[path] = {"count": r["count"], "p50": r["p50"] * 1000,
                             "p99": r["p99"] * 1000, "mean": r["mean"] * 1000}
            how = (f"wrk -t1 -c1 --latency, {seconds:.0f} s per view "
                   f"({lat['/local']['count']} / {lat['/offloaded']['count']} requests)")
        else:
            lat = {}
            for path in ("/local", "/offloaded"):
                values = latencies(web_port, path, count, 30)
                lat[path] = {"count": len(values), "p50": pct(values, .5),
                             "p99": pct(values, .99),
                             "mean": statistics.mean(values) * 1000}
            how = f"{lat['/local']['count']} sequential requests per view"
        local, remote = lat["/local"], lat["/offloaded"]
        print(f"\n1. latency, {how}, one keep-alive connection")
        print(f"   {'view':<22}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
        for name, v in (("local", local), ("offloaded", remote)):
            print(f"   {name:<22}{v['p50']:9.3f}{v['p99']:9.3f}{v['mean']:9.3f}")
        print(f"   {'added by offloading':<22}{remote['p50'] - local['p50']:9.3f}"
              f"{remote['p99'] - local['p99']:9.3f}{remote['mean'] - local['mean']:9.3f}"
              f"   (ratio p50 {remote['p50'] / local['p50']:.1f}x)")

        c = args.connections
        if use_wrk:
            threads = min(2, c)
            print(f"\n2. throughput, wrk -t{threads} -c{c}, {seconds:.0f} s each")
            with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench_web_",
                                             delete=False) as lua:
                lua.write(WRK_DISTINCT_LUA)
            try:
                plain = run_wrk(web_port, "/", threads, c, seconds, lua.name,
                                ("/plain/",))["rate"]
                distinct = run_wrk(web_port, "/", threads, c, seconds, lua.name,
                                   ("/mw/",))["rate"]
            finally:
                os.unlink(lua.name)
            same = run_wrk(web_port, "/mw-same", threads, c, seconds)["rate"]
        else:
            print(f"\n2. throughput, {c} keep-alive connections, {seconds:.0f} s each")
            plain = throughput(web_port, lambda i, n: f"/plain/{i}?n={n}", c, seconds)
            distinct = throughput(web_port, lambda i, n: f"/mw/{i}?n={n}", c, seconds)
            same = throughput(web_port, lambda i, n: "/mw-same", c, seconds)
        print(f"   {'route':<44}{'req/s':>9}{'ratio':>8}")
        print(f"   {'/plain/... served in the web process':<44}{plain:9.0f}{1:8.2f}")
        print(f"   {'/mw/... via OffloadMiddleware, all distinct':<44}{distinct:9.0f}"
              f"{distinct / plain:8.2f}")
        print(f"   {'/mw-same via OffloadMiddleware, identical':<44}{same:9.0f}"
              f"{same / plain:8.2f}")

        # 3. time to the 202 of a background view, next to the local view, both POSTed
        sub = {}
        if use_wrk:
            lua_name = write_lua(WRK_POST_LUA)
            try:
                for path in ("/local", "/bg"):
                    r = run_wrk(web_port, path, 1, 1, seconds, lua_name)
                    sub[path] = {"count": r["count"], "p50": r["p50"] * 1000,
                                 "p99": r["p99"] * 1000, "mean": r["mean"] * 1000}
            finally:
                os.unlink(lua_name)
            how = (f"wrk -t1 -c1 --latency POST, {seconds:.0f} s per view "
                   f"({sub['/local']['count']} / {sub['/bg']['count']} requests)")
        else:
            for path, expect in (("/local", 200), ("/bg", 202)):
                values = latencies(web_port, path, count, 30, "POST", expect)
                sub[path] = {"count": len(values), "p50": pct(values, .5),
                             "p99": pct(values, .99),
                             "mean": statistics.mean(values) * 1000}
            how = f"{sub['/local']['count']} sequential POSTs per view"
        local, bg = sub["/local"], sub["/bg"]
        print(f"\n3. background submission: time to the 202, {how}, one keep-alive "
              "connection")
        print(f"   {'view':<22}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
        for name, v in (("local (200)", local), ("background (202)", bg)):
            print(f"   {name:<22}{v['p50']:9.3f}{v['p99']:9.3f}{v['mean']:9.3f}")
        print(f"   {'added by submitting':<22}{bg['p50'] - local['p50']:9.3f}"
              f"{bg['p99'] - local['p99']:9.3f}{bg['mean'] - local['mean']:9.3f}"
              f"   (ratio p50 {bg['p50'] / local['p50']:.1f}x, "
              f"p99 {bg['p99'] / local['p99']:.1f}x)")
        # Those submissions are jobs the workers may still be running: let them end
        # (one submitted last ends about last) before the next figures.
        wait_state(web_port, submit_background(web_port, "/bg"), ("done",), 120)

        # 4. status polls: one URL, C connections, next to the local view
        done_url = submit_background(web_port, "/bg")
        wait_state(web_port, done_url, ("done",), 30)
        slow_url = submit_background(web_port, "/bg-slow")
        wait_state(web_port, slow_url, ("running",), 30)
        rows = [("/local (Flask view, GET)", "/local"),
                ("status of a done job", done_url),
                ("status of a running job (1/2)", slow_url)]
        rates = []
        if use_wrk:
            threads = min(2, c)
            print(f"\n4. status polls, wrk -t{threads} -c{c} GET of one URL, "
                  f"{seconds:.0f} s each")
            for _, url in rows:
                rates.append(run_wrk(web_port, url, threads, c, seconds)["rate"])
        else:
            print(f"\n4. status polls, {c} keep-alive connections GET one URL, "
                  f"{seconds:.0f} s each")
            for _, url in rows:
                rates.append(throughput(web_port, lambda i, n, url=url: url, c, seconds))
        # The running job's figure is only that if it was still running at the end.
        wait_state(web_port, slow_url, ("running",), 1)
        print(f"   {'route':<44}{'req/s':>9}{'ratio':>8}")
        for (name, _), rate in zip(rows, rates, strict=True):
            print(f"   {name:<44}{rate:9.0f}{rate / rates[0]:8.2f}")
    finally:
        for proc in reversed(children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
