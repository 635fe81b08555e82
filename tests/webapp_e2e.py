"""The Flask app of the end-to-end web tests (tests/test_web_e2e.py). Served by a gevent
WSGIServer in the test process; its views run in a real ``gearoffload-worker`` pool,
which imports this module as ``webapp_e2e:app``. Runs are counted in files under
``$E2E_STATE_DIR``, since they happen in other processes."""

from __future__ import annotations

import os
import time

from flask import Flask, request, session

from gearoffload import offload
from gearoffload.flask import GearOffload, progress

STATE_DIR = os.environ.get("E2E_STATE_DIR", "/tmp")


def count_run(name: str) -> int:
    """Record one execution of ``name``; return how many there were (across processes)."""
    path = os.path.join(STATE_DIR, f"{name}.runs")
    with open(path, "a") as f:  # O_APPEND: whole short lines, safe across processes
        f.write(f"{os.getpid()}\n")
    with open(path) as f:
        return len(f.readlines())


@offload(name="webapp_e2e.send_mail")
def send_mail(to: str) -> str:
    return f"sent to {to}"


def create_app(servers: str) -> Flask:
    app = Flask(__name__)
    app.config.update(GEAROFFLOAD_SERVERS=servers, GEAROFFLOAD_TIMEOUT=15,
                      # The default (2) where a test asks for it (test_fast_failure_e2e).
                      GEAROFFLOAD_CONNECT_TIMEOUT=float(
                          os.environ.get("E2E_CONNECT_TIMEOUT", "0.5")),
                      SECRET_KEY=os.environ.get("E2E_SECRET_KEY", "e2e-test-key"))
    ext = GearOffload(app)

    @app.get("/stampede")
    @ext.offload(unique=True)
    def stampede():
        runs = count_run("stampede")
        time.sleep(1.5)  # the pool monkey-patched: this sleeps one greenlet
        return {"page": "expensive", "runs": runs, "q": request.args.get("q")}

    @app.post("/report/<int:steps>")
    @ext.offload(background=True)
    def report(steps):
        for i in range(1, steps + 1):
            time.sleep(0.1)
            progress(i, steps)
        return {"steps": steps, "pid": os.getpid()}

    @app.get("/crash")
    @ext.offload
    def crash():
        runs = count_run("crash")
        if runs == 1:
            os._exit(3)  # the worker process dies holding the job
        return f"survived, attempt {runs}"

    @app.get("/trivial")
    @ext.offload
    def trivial():
        return "ok"

    @app.post("/mail")
    def mail():  # an ordinary view that starts an @offload function in the background
        send_mail.background(request.args.get("to", "bob"))
        return "queued", 202

    @app.post("/flaky/<token>")
    @ext.offload(background=True, retries=2, backoff=0.1, jitter=False)
    def flaky(token):
        runs = count_run(f"flaky-{token}")
        if runs < 3:
            raise ConnectionError(f"partner down (run {runs})")
        return {"runs": runs}

    @app.post("/big/<int:size>")
    @ext.offload(background=True)
    def big(size):
        return "x" * size

    @app.post("/unencodable")
    @ext.offload(background=True)
    def unencodable():
        return object()  # not a response Flask can make

    @app.post("/search")
    @ext.offload(unique=True)
    def search():
        count_run("search")
        time.sleep(0.5)  # long enough for concurrent requests to meet
        return f"results for {request.get_data(as_text=True)}"

    @app.get("/login/<user>")
    def login(user):
        session["user"] = user
        return "ok"

    @app.get("/me")
    @ext.offload(unique=True)
    def me():
        count_run("me")
        time.sleep(0.5)
        return f"page of {session.get('user', 'nobody')}"

    if os.environ.get("E2E_WEB_ONLY_VIEW"):  # declared on the web side only: no worker
        @app.get("/unserved")
        @ext.offload(name="webapp_e2e.unserved")
        def unserved():
            return "never"

    @app.after_request
    def served_by(response):
        response.headers["X-Served-By"] = str(os.getpid())
        return response

    return app


app = create_app(os.environ.get("GEAROFFLOAD_SERVERS", "127.0.0.1:4730"))
