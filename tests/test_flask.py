"""gearoffload.flask with Flask's test client: a real job server process, and a Worker
serving the app's offloaded views in a greenlet of this process (the test client waits
cooperatively, so the worker runs while a request waits for it)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import gevent
import pytest
from flask import Flask, abort, jsonify, make_response, redirect, request, session
from gevent.event import Event

import gearoffload.errors
import gearoffload.offloading
from conftest import ServerProcess, free_port, gevent_time_limit, start_worker
from gearoffload import Worker
from gearoffload.errors import JobFailed
from gearoffload.flask import GearOffload, offload, progress
from gearoffload.loading import registry_for
from gearoffload.offloading import current_job

TEST_TIME_LIMIT = 30
RUNS: dict[str, int] = {}
RELEASE = Event()


time_limit = gevent_time_limit(TEST_TIME_LIMIT)


def make_app(servers: str, **config) -> Flask:
    app = Flask(__name__)
    app.secret_key = "test"
    app.config.update(GEAROFFLOAD_SERVERS=servers, GEAROFFLOAD_CONNECT_TIMEOUT=0.5,
                      GEAROFFLOAD_MAX_BODY=64 * 1024, **config)
    ext = GearOffload(app)

    @app.errorhandler(404)
    def not_found(exc):
        return f"custom 404: {exc.description}", 404

    @app.errorhandler(500)
    def server_error(exc):
        original = getattr(exc, "original_exception", None)
        return f"custom 500: {type(original).__name__}: {original}", 500

    @app.before_request
    def maybe_parse_form():
        if request.args.get("parse_first"):
            request.form  # noqa: B018 - spends the stream on the web side

    @app.route("/text")
    @ext.offload
    def text():
        return f"hello from {'a worker' if current_job() is not None else 'here'}"

    @app.route("/bytes")
    @ext.offload
    def raw_bytes():
        return b"\x00\xff\x80"

    @app.route("/dict")
    @ext.offload
    def a_dict():
        return {"a": 1, "b": [True, None]}

    @app.route("/list")
    @ext.offload
    def a_list():
        return [1, "two"]

    @app.route("/tuple")
    @ext.offload
    def a_tuple():
        return "made", 201, {"X-Thing": "yes"}

    @app.route("/response")
    @ext.offload
    def a_response():
        response = make_response("a,b\n1,2\n")
        response.mimetype = "text/csv"
        response.set_cookie("flavour", "oat")
        return response

    @app.route("/redirect")
    @ext.offload
    def a_redirect():
        return redirect("/text", code=302)

    @app.route("/missing/<int:n>")
    @ext.offload
    def missing(n):
        abort(404, description=f"no item {n}")

    @app.route("/teapot")
    @ext.offload
    def teapot():
        abort(418)

    @app.route("/raises")
    @ext.offload
    def raises():
        raise ValueError("bad value on the worker")

    @app.route("/echo/<path:rest>", methods=["GET", "POST", "PUT"])
    @ext.offload
    def echo(rest):
        return jsonify(
            method=request.method, rest=rest, path=request.path, args=request.args.to_dict(),
            header=request.headers.get("X-Test"), cookie=request.cookies.get("c"),
            form=request.form.to_dict(), json=request.get_json(silent=True),
            files={k: [f.filename, f.read().decode()] for k, f in request.files.items()},
            remote=request.remote_addr, on_worker=current_job() is not None)

    @app.route("/session/set/<value>")
    @ext.offload
    def session_set(value):
        session["value"] = value
        return "set"

    @app.route("/session/get")
    @ext.offload
    def session_get():
        return session.get("value", "none")

    @app.route("/stampede/<key>")
    @ext.offload(unique=True)
    def stampede(key):
        run = f"{key}?{request.args.get('q')}"
        RUNS[run] = RUNS.get(run, 0) + 1
        RELEASE.wait(5)
        return {"key": key, "q": request.args.get("q"), "runs": RUNS[run]}

    @app.route("/fails")
    @ext.offload
    def fails():
        raise JobFailed("the task gave up")  # WORK_FAIL

    @app.route("/slow")
    @ext.offload(timeout=0.5)
    def slow():
        gevent.sleep(3)
        return "too late"

    @app.route("/job/<int:steps>", methods=["POST"])
    @offload(background=True)  # the module-level decorator, bound to the serving app
    def job(steps):
        for i in range(1, steps + 1):
            RELEASE.wait(5)
            progress(i, steps)
        return {"steps": steps, "who": request.get_json()["who"]}

    @app.route("/job-fails", methods=["POST"])
    @ext.offload(background=True)
    def job_fails():
        raise RuntimeError("background boom")

    @app.route("/local")
    @ext.offload(fallback="local")
    def local():
        return "ran " + ("on a worker" if current_job() is not None else "here")

    return app


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Flask, Worker]]:
    server = ServerProcess("gearoffload").start()
    app = make_app(server.address)
    worker = Worker(server.address, concurrency=50, registry=registry_for(app))
    greenlet = start_worker(worker)
    yield app, worker
    worker.stop(graceful=False)
    greenlet.join(5)
    server.stop()
    gearoffload.offloading.configure_reset()


@pytest.fixture
def client(served):
    RUNS.clear()
    RELEASE.set()
    return served[0].test_client()


def test_str_runs_on_the_worker(client):
    response = client.get("/text")
    assert response.status_code == 200
    assert response.text == "hello from a worker"
    assert response.mimetype == "text/html"


@pytest.mark.parametrize("path,status,mimetype,body", [
    ("/bytes", 200, "text/html", b"\x00\xff\x80"),
    ("/dict", 200, "application/json", b'{"a":1,"b":[true,null]}\n'),
    ("/list", 200, "application/json", b'[1,"two"]\n'),
    ("/tuple", 201, "text/html", b"made"),
    ("/response", 200, "text/csv", b"a,b\n1,2\n"),
])
def test_every_return_type_comes_back_as_the_same_response(client, path, status, mimetype,
                                                           body):
    response = client.get(path)
    assert (response.status_code, response.mimetype, response.data) == (status, mimetype, body)
    assert response.headers["Content-Length"] == str(len(body))
    if path == "/tuple":
        assert response.headers["X-Thing"] == "yes"
    if path == "/response":
        assert "flavour=oat" in response.headers["Set-Cookie"]


def test_redirect_and_aborts_use_the_apps_handlers(client):
    response = client.get("/redirect")
    assert response.status_code == 302 and response.headers["Location"] == "/text"
    response = client.get("/missing/7")
    assert response.status_code == 404 and response.text == "custom 404: no item 7"
    assert client.get("/teapot").status_code == 418


def test_worker_exception_is_a_500_through_the_apps_error_handling(client, caplog):
    response = client.get("/raises")
    assert response.status_code == 500
    assert response.text.startswith(
        "custom 500: JobException: ValueError: bad value on the worker")
    # The worker's traceback is chained to the exception (for error trackers) and logged.
    assert any("job H:test:" in r.getMessage() and "raised on the worker" in r.getMessage()
               and "Traceback (most recent call last)" in r.getMessage()
               for r in caplog.records)


def test_request_is_rebuilt_on_the_worker(client):
    client.set_cookie("c", "cookie-value")
    response = client.get("/echo/a/b?x=1&y=%C3%A9", headers={"X-Test": "header"})
    assert response.json == {
        "method": "GET", "rest": "a/b", "path": "/echo/a/b", "args": {"x": "1", "y": "é"},
        "header": "header", "cookie": "cookie-value", "form": {}, "json": None, "files": {},
        "remote": "127.0.0.1", "on_worker": True}
    response = client.put("/echo/j", json={"k": [1, 2]})
    assert response.json["method"] == "PUT" and response.json["json"] == {"k": [1, 2]}


@pytest.mark.parametrize("parse_first", ["", "1"])
def test_form_and_uploads_travel_even_if_the_web_side_parsed_them(client, parse_first):
    data = {"name": "ada", "upload": (io.BytesIO(b"file body"), "notes.txt")}
    response = client.post(f"/echo/f?parse_first={parse_first}", data=data,
                           content_type="multipart/form-data")
    assert response.json["form"] == {"name": "ada"}
    assert response.json["files"] == {"upload": ["notes.txt", "file body"]}
    response = client.post(f"/echo/u?parse_first={parse_first}", data={"a": "1", "b": "é"})
    assert response.json["form"] == {"a": "1", "b": "é"}


def test_a_body_over_the_limit_is_413(client):
    response = client.post("/echo/big", data=b"x" * (64 * 1024 + 1),
                           content_type="application/octet-stream")
    assert response.status_code == 413


def test_session_changes_on_the_worker_come_back(client):
    assert client.get("/session/set/kept").text == "set"
    assert client.get("/session/get").text == "kept"


def test_unique_view_runs_once_for_a_stampede(client, served):
    RELEASE.clear()
    requests = [gevent.spawn(client.get, "/stampede/k1?q=1") for _ in range(30)]
    others = [gevent.spawn(client.get, "/stampede/k1?q=2") for _ in range(5)]
    gevent.sleep(0.3)
    RELEASE.set()
    gevent.joinall(requests + others, raise_error=True)
    assert {r.value.status_code for r in requests + others} == {200}
    assert {r.value.data for r in requests} == {b'{"key":"k1","q":"1","runs":1}\n'}
    assert {r.value.json["q"] for r in others} == {"2"}
    assert RUNS == {"k1?1": 1, "k1?2": 1}  # one run per distinct query string


def test_failed_job_is_502(client):
    assert client.get("/fails").status_code == 502


def test_with_a_secret_key_workers_run_only_signed_requests(our_server):
    servers = our_server.address
    app = make_app(servers, GEAROFFLOAD_SECRET_KEY="k" * 32)
    worker = Worker(servers, registry=registry_for(app))
    greenlet = start_worker(worker)
    try:
        assert app.test_client().get("/text").text == "hello from a worker"
        client = app.extensions["gearoffload"].offloader.client
        name = "test_flask.make_app.<locals>.text"
        forged = b'j{"environ":{"PATH_INFO":"/text"},"body":{"\\u0000":["b",""]}}'
        for data in (forged, b"GO0.0:" + forged, b"GO1." + forged + b".AAAA.BBBB"):
            with pytest.raises(JobFailed):  # refused: never run
                client.submit(name, data).result(5)
    finally:
        worker.stop(graceful=False)
        greenlet.join(5)


def test_timeout_is_504(client):
    response = client.get("/slow")
    assert response.status_code == 504


def test_background_view_202_then_progress_then_result(client):
    RELEASE.clear()
    response = client.post("/job/3", json={"who": "me"})
    assert response.status_code == 202
    location = response.headers["Location"]
    assert location.startswith("/_offload/jobs/") and response.headers["Retry-After"] == "1"
    token = location.rsplit("/", 1)[1]
    assert len(token) >= 20 and "H:" not in token  # unguessable, not the Gearman handle
    seen = set()
    for _ in range(100):
        status = client.get(location).json
        seen.add(status["state"])
        if status["state"] == "running":
            RELEASE.set()
        if status["state"] == "done":
            break
        gevent.sleep(0.05)
    assert status["state"] == "done" and "running" in seen
    assert status["progress"] == {"numerator": 3, "denominator": 3}
    assert status["status_code"] == 200 and status["result"] == {"steps": 3, "who": "me"}
    result = client.get(status["result_url"])
    assert result.status_code == 200 and result.json == {"steps": 3, "who": "me"}
    assert client.get("/_offload/jobs/not-a-token").status_code == 404


def test_background_failure_is_reported(client):
    location = client.post("/job-fails").headers["Location"]
    for _ in range(100):
        status = client.get(location).json
        if status["state"] != "queued":
            break
        gevent.sleep(0.05)
    # The exception's type for everyone; its message and traceback only in debug mode.
    assert status["state"] == "failed" and status["error"] == "the job failed (RuntimeError)"
    assert "traceback" not in status and "boom" not in json.dumps(status)
    assert client.get(location + "/result").status_code == 500
    client.application.debug = True
    try:
        status = client.get(location).json
    finally:
        client.application.debug = False
    assert status["error"] == "RuntimeError: background boom"
    assert "Traceback (most recent call last)" in status["traceback"]


def test_background_results_expire_after_the_ttl():
    server = ServerProcess("gearoffload", ["--result-ttl", "1"]).start()
    short = make_app(server.address, GEAROFFLOAD_RESULT_TTL=1)
    worker = Worker(server.address, registry=registry_for(short))
    RELEASE.set()
    greenlet = start_worker(worker)
    try:
        client = short.test_client()
        location = client.post("/job/1", json={"who": "x"}).headers["Location"]
        for _ in range(100):
            if client.get(location).json["state"] == "done":
                break
            gevent.sleep(0.05)
        gevent.sleep(1.5)
        expired = client.get(location)
        assert expired.status_code == 410 and "expired" in expired.json["error"]
        assert client.get(location + "/result").status_code == 410
    finally:
        worker.stop(graceful=False)
        greenlet.join(5)
        server.stop()


def test_no_server_is_503_or_local_fallback():
    app = make_app(f"127.0.0.1:{free_port()}")
    client = app.test_client()
    response = client.get("/text")
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert client.get("/local").text == "ran here"
    app = make_app(f"127.0.0.1:{free_port()}", GEAROFFLOAD_FALLBACK="local")
    assert app.test_client().get("/text").text == "hello from here"


def test_an_offload_call_in_a_plain_view_with_no_server_is_503_not_500():
    """``.background()`` called from an ordinary view, every job server down: the app
    answers as an offloaded view does (503, Retry-After), unless it handles it itself."""
    for own_handler in (False, True):
        app = Flask(__name__)
        app.secret_key = "test"
        app.config.update(GEAROFFLOAD_SERVERS=f"127.0.0.1:{free_port()}",
                          GEAROFFLOAD_CONNECT_TIMEOUT=0.5)
        if own_handler:
            @app.errorhandler(gearoffload.errors.NoServersAvailable)
            def queue_later(exc):
                return "saved for later", 202
        GearOffload(app)

        @gearoffload.offloading.offload(name="test_flask.send_mail")
        def send_mail(to: str) -> str:
            return to

        @app.post("/mail")
        def mail():
            send_mail.background("bob")
            return "sent", 200

        response = app.test_client().post("/mail")
        if own_handler:
            assert (response.status_code, response.text) == (202, "saved for later")
        else:
            assert response.status_code == 503 and response.headers["Retry-After"] == "5"
            assert "No job server is reachable" in response.text


@pytest.mark.parametrize("key,value,message", [
    ("GEAROFFLOAD_TIMEOUT", "soon", "GEAROFFLOAD_TIMEOUT must be a number"),
    ("GEAROFFLOAD_FALLBACK", "maybe", "'raise'.*or 'local'"),
    ("GEAROFFLOAD_SERVERS", "host:port", "expected host:port"),
    ("GEAROFFLOAD_SERVERS", "127.0.0.1:99999", "a port from 1 to 65535"),
    ("GEAROFFLOAD_SERVERS", "http://127.0.0.1:47401", "drop the http://: a Gearman server is "
                                                      "HOST:PORT"),
    ("GEAROFFLOAD_SERVERS", "127.0.0.1:47401;127.0.0.1:47402", "separate servers with commas"),
    ("GEAROFFLOAD_SERVERS", ["127.0.0.1:1", "127.0.0.1:1"], "listed twice"),
    ("GEAROFFLOAD_FORMAT", "pickle", "needs a secret key"),
    ("GEAROFFLOAD_MAX_BODY", "lots", "GEAROFFLOAD_MAX_BODY must be a number"),
    ("GEAROFFLOAD_URL_PREFIX", "jobs", "must start with '/'"),
])
def test_bad_config_fails_at_start_up_with_advice(key, value, message):
    app = Flask(__name__)
    if key != "GEAROFFLOAD_FORMAT":  # pickle is refused only without any key
        app.config["SECRET_KEY"] = "k"
    app.config[key] = value
    with pytest.raises(ValueError, match=message):
        GearOffload(app)


def test_views_need_a_key_to_sign_jobs_unless_told_otherwise():
    with pytest.raises(ValueError, match="GEAROFFLOAD_SECRET_KEY"):
        GearOffload(Flask(__name__))
    app = Flask(__name__)
    app.config["GEAROFFLOAD_ALLOW_UNSIGNED"] = True
    GearOffload(app)


def test_worker_registry_lists_every_offloaded_view(served):
    names = registry_for(served[0]).names()
    assert "test_flask.make_app.<locals>.text" in names
    assert "test_flask.make_app.<locals>.job" in names  # the module-level decorator's view


def test_memory_results_are_bounded_and_expire():
    from gearoffload.results import MemoryResults, Outcome

    results = MemoryResults(ttl=60, max_entries=3)
    for i in range(5):
        results.write(f"t{i}", Outcome("done", data=b"%d" % i))
    assert [results.read(f"t{i}").state for i in range(5)] == \
        ["unknown", "unknown", "done", "done", "done"]  # the oldest went first
    results.ttl = -1
    results.write("t3", Outcome("failed"))  # an update of an existing one, expired
    assert results.read("t3").state == "unknown" and results.read("t4").data == b"4"


def test_a_server_that_never_accepts_the_job_is_503_or_local_fallback(dropping_server):
    response = make_app(dropping_server).test_client().get("/text")
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    app = make_app(dropping_server, GEAROFFLOAD_FALLBACK="local")
    assert app.test_client().get("/text").text == "hello from here"


def test_a_background_job_id_leads_to_the_servers_history(client):
    """An operator with a job id (from a 202 answer or a status URL) gets its unique key
    (``ext.job_unique``, or ``flask gearoffload job ID``) and finds the job in the job
    server's history with ``find job``."""
    from gearoffload.admin import AdminClient
    from gearoffload.core import JobNotFound

    app = client.application
    ext = app.extensions["gearoffload"].ext
    job_id = client.post("/job/1", json={"who": "ops"}).json["id"]
    for _ in range(100):
        if client.get(f"/_offload/jobs/{job_id}").json["state"] == "done":
            break
        gevent.sleep(0.05)
    unique = ext.job_unique(job_id)  # outside a request: the app init_app saw
    assert unique.startswith("bg-") and unique not in job_id
    with AdminClient(app.config["GEAROFFLOAD_SERVERS"]) as admin:
        history = admin.find_job(unique)
    assert history and history[-1].unique == unique and history[-1].outcome == "done"
    assert history[-1].function.endswith(".job")
    shown = app.test_cli_runner().invoke(args=["gearoffload", "job", job_id])
    assert shown.exit_code == 0 and f"unique     {unique}" in shown.output
    refused = app.test_cli_runner().invoke(args=["gearoffload", "job", job_id[:-3] + "xyz"])
    assert refused.exit_code == 1 and "unknown job id" in refused.output
    with pytest.raises(JobNotFound):
        ext.job_unique("not-an-id")


@pytest.mark.parametrize(("options", "error", "text"), [
    ({"priority": "urgent"}, ValueError, "priority= must be 'normal', 'high' or 'low'"),
    ({"background": "yes"}, TypeError, "background= must be True or False"),
    ({"public": 1}, TypeError, "public= must be True or False"),
    ({"vary": "Accept-Language"}, TypeError, r"vary= takes a list of names, not the string"),
    ({"carry_g": "tenant"}, TypeError, r"write \['tenant'\]"),
    ({"ignore_query": [1]}, TypeError, "ignore_query= takes names"),
    ({"unique": 3}, TypeError, "unique= must be True, False, a key"),
    ({"timeout": "10"}, TypeError, "timeout= must be a number of seconds"),
    ({"background": True, "retries": 2, "jitter": "off"}, TypeError, "jitter="),
    ({"background": True, "backoff": 5}, ValueError, "backoff= apply to retries"),
])
def test_view_settings_are_checked_when_the_decorator_runs(options, error, text):
    ext = GearOffload()
    with pytest.raises(error, match=text):
        ext.offload(lambda: "x", **options)
    with pytest.raises(error, match=text):  # the module-level decorator: the same checks
        offload(lambda: "x", **options)
