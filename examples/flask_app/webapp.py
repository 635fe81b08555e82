"""A small Flask app showing each piece of gearoffload's web layer.

- ``/primes/<n>``: a slow CPU-bound view, offloaded (``@ext.offload``).
- ``/expensive``: an expensive page under a stampede (``unique=True``): the stampede page
  fires 100 concurrent requests, and the page shows how many times a worker really ran.
- ``/report``: a background job (``background=True``) with a progress bar polling the
  status URL.
- ``/legacy/...``: a plain WSGI app from before Flask, offloaded by ``OffloadMiddleware``.
- ``/offloaded-function/<n>``: a plain ``@offload`` function called from a normal view.
- ``/flaky``: a background task that fails twice and succeeds on its third run
  (``retries=3``), or always fails and ends as a dead letter (``gearoffload dead``).
- ``/heartbeat``: a periodic task (``@offload(every=timedelta(seconds=30))``), run once
  per slot by the worker pool's scheduler (``gearoffload-worker --schedule``).

Run everything with ``make demo`` (or ``python -m examples.flask_app.demo``). By hand::

    gearoffload-server --port 4730 &
    gearoffload-worker --wsgi examples.flask_app:app --servers 127.0.0.1:4730 --schedule &
    GEAROFFLOAD_SERVERS=127.0.0.1:4730 python -m examples.flask_app.demo --no-children

The worker serves the views, the ``@offload`` functions and (``--wsgi``) the legacy app.
Runs are counted in files under ``$GEAROFFLOAD_DEMO_STATE`` (default: a directory in the
system's temp dir), since they happen in the worker processes.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta

from flask import Flask, render_template_string, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from gearoffload import offload
from gearoffload.flask import GearOffload, progress
from gearoffload.wsgi import OffloadMiddleware, default_wsgi_function

STATE_DIR = os.environ.get("GEAROFFLOAD_DEMO_STATE",
                           os.path.join(tempfile.gettempdir(), "gearoffload-demo"))
SERVERS = os.environ.get("GEAROFFLOAD_SERVERS", "127.0.0.1:4730")



def shared_secret() -> str:
    """The key that signs jobs: ``$GEAROFFLOAD_SECRET_KEY``, else one made once and kept in
    the state directory, so that the web process and the workers on this host share it.
    In production, set the variable from your secret store on every host."""
    key = os.environ.get("GEAROFFLOAD_SECRET_KEY")
    if key:
        return key
    import secrets

    os.makedirs(STATE_DIR, exist_ok=True)
    path = os.path.join(STATE_DIR, "secret.key")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path) as f:
            return f.read().strip()
    with os.fdopen(fd, "w") as f:
        key = secrets.token_hex(32)
        f.write(key)
    return key


app = Flask(__name__)
app.config.update(GEAROFFLOAD_SERVERS=SERVERS, GEAROFFLOAD_TIMEOUT=60,
                  SECRET_KEY=shared_secret())
ext = GearOffload(app)


def count_run(name: str) -> int:
    """Record one run of ``name`` (in any process); return the total so far."""
    os.makedirs(STATE_DIR, exist_ok=True)
    path = os.path.join(STATE_DIR, f"{name}.runs")
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(path) as f:
        return len(f.readlines())


def runs(name: str) -> int:
    try:
        with open(os.path.join(STATE_DIR, f"{name}.runs")) as f:
            return len(f.readlines())
    except FileNotFoundError:
        return 0


PAGE = """<!doctype html><meta charset="utf-8"><title>gearoffload demo</title>
<style>body{font:16px system-ui;max-width:46em;margin:2em auto}code{background:#eee}
progress{width:100%}</style>
<h1><a href="/">gearoffload demo</a></h1>{{ body|safe }}"""


def page(body: str, **context: object) -> str:
    return render_template_string(PAGE, body=render_template_string(body, **context))


@app.get("/")
def index() -> str:
    return page("""
<p>Every link below runs on a Gearman worker process, not in this web process
(pid {{ pid }}).</p>
<ul>
<li><a href="{{ url_for('primes', n=200000) }}">/primes/200000</a>: a slow CPU-bound view,
 offloaded.</li>
<li><a href="{{ url_for('stampede') }}">/stampede</a>: 100 concurrent requests for one
 expensive page; the worker runs it once.</li>
<li><a href="{{ url_for('report_page') }}">/report</a>: a background job with a progress
 bar.</li>
<li><a href="/legacy/hello?name=wsgi">/legacy/hello</a>: a plain WSGI app behind
 <code>OffloadMiddleware</code>.</li>
<li><a href="{{ url_for('function_demo', n=30) }}">/offloaded-function/30</a>: a plain
 <code>@offload</code> function called from a local view.</li>
<li><a href="{{ url_for('heartbeat_page') }}">/heartbeat</a>: a periodic task, run once
every 30 s across the fleet.</li>
<li><a href="{{ url_for('flaky_page') }}">/flaky</a>: a task that fails and is retried
 by the job server; one that always fails becomes a dead letter.</li>
</ul>""", pid=os.getpid())


@app.get("/primes/<int:n>")
@ext.offload(timeout=30)
def primes(n: int) -> str:
    started = time.perf_counter()
    n = min(n, 5_000_000)
    sieve = bytearray([1]) * (n + 1)
    sieve[0:2] = b"\0\0"
    for i in range(2, int(n ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytes(len(range(i * i, n + 1, i)))
    count = sum(sieve)
    return page("<p>{{ count }} primes up to {{ n }}, counted in {{ ms }} ms by worker "
                "process {{ pid }}.</p>", count=count, n=n, pid=os.getpid(),
                ms=round((time.perf_counter() - started) * 1000, 1))


@app.get("/expensive")
@ext.offload(unique=True)
def expensive() -> dict:
    run = count_run("expensive")
    time.sleep(2)  # a slow query, a cache miss...
    return {"rendered_by": os.getpid(), "worker_runs_so_far": run,
            "generation": request.args.get("generation")}


@app.get("/stampede")
def stampede() -> str:
    return page("""
<p>This page fires 100 concurrent requests for <code>/expensive?generation=N</code>, a
2-second page offloaded with <code>unique=True</code>.</p>
<button onclick="go()">Stampede!</button><pre id="out"></pre>
<script>
async function go() {
  const out = document.getElementById("out");
  const gen = Date.now(); out.textContent = "100 requests in flight...";
  const t0 = performance.now();
  const answers = await Promise.all(Array.from({length: 100}, () =>
      fetch("{{ url_for('expensive') }}?generation=" + gen).then(r => r.json())));
  const runs = new Set(answers.map(a => a.worker_runs_so_far));
  out.textContent = `100 responses in ${Math.round(performance.now() - t0)} ms\\n` +
      `distinct responses: ${new Set(answers.map(JSON.stringify)).size}\\n` +
      `worker runs of /expensive so far (all stampedes): ${Math.max(...runs)}`;
}
</script>""")


@app.post("/report/start")
@ext.offload(background=True)
def start_report() -> dict:
    steps = int(request.form.get("steps", 20))
    for i in range(1, steps + 1):
        time.sleep(0.25)  # one chunk of the report
        progress(i, steps)
    return {"rows": steps * 1000, "built_by": os.getpid()}


@app.get("/report")
def report_page() -> str:
    return page("""
<p>Starts a background view (<code>background=True</code>): the POST answers
<code>202 Accepted</code> at once with a status URL, which this page polls.</p>
<button onclick="start()">Build the report</button>
<p><progress id="bar" value="0" max="1"></progress></p><pre id="out"></pre>
<script>
async function start() {
  const out = document.getElementById("out"), bar = document.getElementById("bar");
  const r = await fetch("{{ url_for('start_report') }}", {method: "POST",
      body: new URLSearchParams({steps: "20"})});
  let url = r.headers.get("Location"); out.textContent = `${r.status}, polling ${url}`;
  for (;;) {
    const s = await (await fetch(url)).json();
    bar.max = s.progress.denominator || 1; bar.value = s.progress.numerator;
    out.textContent = JSON.stringify(s, null, 2);
    if (s.state === "done" || s.state === "failed") break;
    await new Promise(ok => setTimeout(ok, 500));
  }
}
</script>""")


@offload(unique=True)
def fibonacci(n: int) -> dict:
    """A plain function run on a worker: ``fibonacci(30)`` from any code."""
    def fib(k: int) -> int:
        return k if k < 2 else fib(k - 1) + fib(k - 2)
    return {"n": n, "fib": fib(min(n, 32)), "computed_by": os.getpid()}


@app.get("/offloaded-function/<int:n>")
def function_demo(n: int) -> str:
    value = fibonacci(n)
    return page("<p>fib({{ v.n }}) = {{ v.fib }}, computed by worker {{ v.computed_by }}; "
                "this view ran in web process {{ pid }}.</p>", v=value, pid=os.getpid())


@offload(retries=3, backoff=1, backoff_max=10)
def flaky_sync(token: str, always_fail: bool = False) -> dict:
    """Syncs with a partner that is down for its first two calls: the job server retries
    it after 1 s, then 2 s (with jitter). With ``always_fail`` it never recovers and,
    after 3 retries, waits in the dead letters (``gearoffload dead``, the status page)."""
    run = count_run(f"flaky-{token}")
    if always_fail or run <= 2:
        raise ConnectionError(f"partner API unavailable (run {run})")
    return {"synced": True, "runs": run, "by": os.getpid()}


@app.post("/flaky/start")
def start_flaky() -> tuple[dict, int]:
    import secrets

    token = secrets.token_hex(8)  # names this submission's run counter
    job = flaky_sync.background(token, always_fail=request.form.get("fail") == "1")
    return {"id": job.id, "token": token}, 202


@app.get("/flaky/<job_id>")
def flaky_status(job_id: str) -> dict:
    outcome = flaky_sync.job(job_id).outcome()
    token = request.args.get("token", "")
    return {"state": outcome.state, "runs": runs(f"flaky-{token}") if token.isalnum() else 0,
            "error": (outcome.data or b"").decode(errors="replace").split("\n")[0]
            if outcome.state in ("failed", "dead") else None}


@app.get("/flaky")
def flaky_page() -> str:
    return page("""
<p>A background <code>@offload(retries=3, backoff=1)</code> function. Its first two runs
raise; the job server runs it again after a back-off, and the third run succeeds. One that
always fails becomes a dead letter after 4 runs: see it with <code>gearoffload dead</code>
or on the job server's status page.</p>
<button onclick="go('0')">Run the flaky task</button>
<button onclick="go('1')">Run one that always fails</button>
<pre id="out"></pre>
<script>
async function go(fail) {
  const out = document.getElementById("out");
  const r = await (await fetch("{{ url_for('start_flaky') }}", {method: "POST",
      body: new URLSearchParams({fail})})).json();
  for (;;) {
    const s = await (await fetch(`/flaky/${r.id}?token=${r.token}`)).json();
    out.textContent = JSON.stringify(s, null, 2);
    if (["done", "failed", "dead"].includes(s.state)) break;
    await new Promise(ok => setTimeout(ok, 500));
  }
}
</script>""")


@offload(every=timedelta(seconds=30))
def heartbeat() -> None:
    """Runs once every 30 s across the fleet, however many schedulers run: appends the
    time and the worker's pid to a file the ``/heartbeat`` page reads."""
    os.makedirs(STATE_DIR, exist_ok=True)
    with open(os.path.join(STATE_DIR, "heartbeat.log"), "a") as f:
        f.write(f"{time.time():.3f} {os.getpid()}\n")


def heartbeats() -> list[tuple[float, int]]:
    try:
        with open(os.path.join(STATE_DIR, "heartbeat.log")) as f:
            return [(float(when), int(pid)) for when, pid in (line.split() for line in f)]
    except FileNotFoundError:
        return []


@app.get("/heartbeat")
def heartbeat_page() -> str:
    beats = heartbeats()[-10:]
    return page("""
<p>A periodic task, <code>@offload(every=timedelta(seconds=30))</code>: the worker pool's
scheduler (<code>gearoffload-worker --schedule</code>) submits each 30-second slot, and it
runs once however many schedulers run. {{ total }} beats so far; the latest:</p>
<ul>{% for when, pid in beats|reverse %}<li>{{ when }} by worker {{ pid }}</li>
{% else %}<li>none yet</li>{% endfor %}</ul>""",
                beats=[(time.strftime("%H:%M:%S", time.localtime(w)), p) for w, p in beats],
                total=len(heartbeats()))


def legacy_app(environ: dict, start_response) -> list[bytes]:
    """A WSGI app from before Flask, mounted at /legacy."""
    from urllib.parse import parse_qs

    name = parse_qs(environ.get("QUERY_STRING", "")).get("name", ["world"])[0]
    where = "a worker" if environ.get("gearoffload.worker") else "the web process"
    body = (f"Hello {name} from the legacy WSGI app, path {environ['SCRIPT_NAME']}"
            f"{environ['PATH_INFO']}, run by {where} (pid {os.getpid()}).\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]


# The legacy app is mounted under /legacy, and requests to it are sent to workers running
# `gearoffload-worker --wsgi examples.flask_app:app` (there the middleware passes through).
app.wsgi_app = OffloadMiddleware(  # type: ignore[method-assign]
    DispatcherMiddleware(app.wsgi_app, {"/legacy": legacy_app}),
    servers=SERVERS, routes=["/legacy/"], secret_key=app.config["SECRET_KEY"],
    function=default_wsgi_function(app))  # the name `--wsgi examples.flask_app:app` serves

