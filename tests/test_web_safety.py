"""Coalescing that never crosses requests, stale work that never runs, mistakes that fail at
start-up, and eager mode (issue #15), with a real job server process and a Worker serving
the app in a greenlet of this process."""

from __future__ import annotations

import time
from collections.abc import Iterator

import gevent
import pytest
from flask import Flask, g, request, session
from gevent.event import Event

from conftest import ServerProcess, free_port, gevent_time_limit, start_worker
from gearoffload import Worker
from gearoffload.flask import GearOffload
from gearoffload.loading import registry_for
from gearoffload.offloading import configure_reset

RUNS: list[str] = []
BUSY = Event()

time_limit = gevent_time_limit(30)


def make_app(servers: str, **config) -> Flask:
    app = Flask(__name__)
    app.secret_key = "test"
    app.config.update(GEAROFFLOAD_SERVERS=servers, GEAROFFLOAD_CONNECT_TIMEOUT=0.5,
                      **config)
    ext = GearOffload(app)

    @app.before_request
    def tenant():
        g.tenant = request.headers.get("X-Tenant", "none")

    @app.post("/search")
    @ext.offload(unique=True)
    def search():
        RUNS.append(request.get_data(as_text=True))
        gevent.sleep(0.3)
        return f"results for {request.get_data(as_text=True)}"

    @app.get("/me")
    @ext.offload(unique=True)
    def me():
        RUNS.append("me")
        gevent.sleep(0.3)
        return f"page of {session.get('user', 'nobody')}"

    @app.get("/news")
    @ext.offload(unique=True, public=True, ignore_query=["utm_*"])
    def news():
        RUNS.append("news")
        gevent.sleep(0.3)
        return "the same news for everyone"

    @app.get("/login/<user>")
    def login(user):
        session["user"] = user
        return "ok"

    @app.get("/slow")
    @ext.offload(timeout=0.5)
    def slow():
        RUNS.append("slow")
        return "late"

    @app.get("/busy")
    @ext.offload
    def busy():
        BUSY.wait(5)
        return "busy done"

    @app.get("/tenant")
    @ext.offload(carry_g=["tenant"])
    def tenant_view():
        return f"tenant {g.tenant}"

    @app.get("/forgot")
    @ext.offload
    def forgot():
        return f"tenant {g.tenant}"

    return app


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Flask, str]]:
    server = ServerProcess("gearoffload").start()
    app = make_app(server.address)
    worker = Worker(server.address, concurrency=20, registry=registry_for(app))
    greenlet = start_worker(worker)
    yield app, server.address
    worker.stop(graceful=False)
    greenlet.join(5)
    server.stop()
    configure_reset()


@pytest.fixture(autouse=True)
def reset() -> None:
    RUNS.clear()
    BUSY.set()


def concurrently(*calls):
    greenlets = [gevent.spawn(call) for call in calls]
    gevent.joinall(greenlets, raise_error=True)
    return [gl.value for gl in greenlets]


def test_two_bodies_never_share_an_answer(served):
    client = served[0].test_client()
    apples, pears, apples2 = concurrently(
        lambda: client.post("/search", data="apples").text,
        lambda: client.post("/search", data="pears").text,
        lambda: client.post("/search", data="apples").text)
    assert (apples, pears, apples2) == ("results for apples", "results for pears",
                                        "results for apples")
    assert sorted(RUNS) == ["apples", "pears"]  # identical bodies still coalesce


def test_two_users_at_the_same_moment_each_see_their_own_page(served):
    app = served[0]
    alice, bob, alice2 = app.test_client(), app.test_client(), app.test_client()
    alice.get("/login/alice")
    bob.get("/login/bob")
    alice2.get("/login/alice")
    pages = concurrently(lambda: alice.get("/me").text, lambda: bob.get("/me").text)
    assert pages == ["page of alice", "page of bob"]
    assert RUNS == ["me", "me"]
    RUNS.clear()
    # A public view is shared across users, and utm_* parameters do not split it.
    pages = concurrently(lambda: alice.get("/news?utm_source=a").text,
                         lambda: bob.get("/news?utm_source=b").text)
    assert pages == ["the same news for everyone"] * 2 and RUNS == ["news"]


def test_a_stale_job_never_runs_after_its_caller_gave_up():
    server = ServerProcess("gearoffload").start()
    app = make_app(server.address)
    solo = Worker(server.address, concurrency=1, registry=registry_for(app))
    working = start_worker(solo)
    try:
        BUSY.clear()
        client = app.test_client()
        busy = gevent.spawn(lambda: client.get("/busy"))
        gevent.sleep(0.3)  # the only slot is taken
        assert client.get("/slow").status_code == 504
        gevent.sleep(0.3)  # past the deadline and the clock-skew allowance
        BUSY.set()
        assert busy.get(timeout=5).text == "busy done"
        gevent.sleep(1.0)  # the queued /slow job reaches the worker after its deadline
        assert "slow" not in RUNS
        assert client.get("/slow").text == "late" and RUNS == ["slow"]
    finally:
        BUSY.set()
        solo.stop(graceful=False)
        working.join(5)
        server.stop()


def test_g_values_travel_when_declared_and_the_error_says_why_otherwise(served):
    client = served[0].test_client()
    assert client.get("/tenant", headers={"X-Tenant": "acme"}).text == "tenant acme"
    with pytest.raises(Exception, match=r"g.tenant is not set on the worker.*carry_g"):
        served[0].config["PROPAGATE_EXCEPTIONS"] = True  # through the test client
        try:
            client.get("/forgot")
        finally:
            served[0].config["PROPAGATE_EXCEPTIONS"] = None


def test_offload_above_route_fails_at_start_up():
    app = Flask(__name__)
    app.secret_key = "k"
    ext = GearOffload(app)
    with pytest.raises(TypeError, match="below @app.route"):
        @ext.offload
        @app.get("/wrong")
        def wrong():
            return "runs here"


def test_local_fallback_runs_a_stampede_once():
    app = make_app(f"127.0.0.1:{free_port()}", GEAROFFLOAD_FALLBACK="local")
    client = app.test_client()
    pages = concurrently(*[lambda: client.post("/search", data="x").text] * 20)
    assert pages == ["results for x"] * 20 and RUNS == ["x"]


def test_eager_mode_runs_views_and_background_jobs_here_without_a_server():
    app = make_app(f"127.0.0.1:{free_port()}", TESTING=True)
    ext = app.extensions["gearoffload"].ext

    @app.post("/report")
    @ext.offload(background=True)
    def report():
        return {"rows": 3}

    client = app.test_client()
    assert client.post("/search", data="pears").text == "results for pears"
    accepted = client.post("/report")
    assert accepted.status_code == 202
    status = client.get(accepted.headers["Location"]).get_json()
    assert status["state"] == "done" and status["result"] == {"rows": 3}
    assert client.get(status["result_url"]).get_json() == {"rows": 3}
    assert client.get("/_offload/jobs/garbage").status_code == 404


def test_only_the_owner_reads_a_background_job(served):
    app, servers = served
    owned = Flask("owned")
    owned.secret_key = "test"
    owned.config.update(GEAROFFLOAD_SERVERS=servers)
    ext = GearOffload(owned, job_owner=lambda req: session.get("user"))

    @owned.get("/login/<user>")
    def login(user):
        session["user"] = user
        return "ok"

    @owned.post("/mine")
    @ext.offload(background=True)
    def mine():
        return {"owner": session.get("user")}

    worker = Worker(servers, registry=registry_for(owned))
    working = start_worker(worker)
    try:
        alice, bob = owned.test_client(), owned.test_client()
        alice.get("/login/alice")
        bob.get("/login/bob")
        location = alice.post("/mine").headers["Location"]
        for _ in range(100):
            status = alice.get(location).get_json()
            if status["state"] == "done":
                break
            gevent.sleep(0.05)
        assert status["result"] == {"owner": "alice"}
        # The id is signed, not encrypted: it carries a digest of the owner, not "alice".
        import base64
        payload = location.rsplit("/", 1)[1].split(".")[0]
        assert b"alice" not in base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        assert bob.get(location).status_code == 404  # not admitted to exist
        assert bob.get(location + "/result").status_code == 404
        assert owned.test_client().get(location).status_code == 404  # anonymous
    finally:
        worker.stop(graceful=False)
        working.join(5)


def test_a_forged_or_replayed_job_is_refused_and_never_runs(served):
    from gearoffload.core import OffloadConfig, Offloader
    from gearoffload.errors import JobFailed

    app, servers = served
    name = "test_web_safety.make_app.<locals>.search"
    offloader = app.extensions["gearoffload"].offloader
    client = offloader.client
    payload = b'j{"environ":{"REQUEST_METHOD":"POST","PATH_INFO":"/search"},"body":"forged"}'
    forger = Offloader(OffloadConfig(servers=servers, secret_key="not-the-key"))
    for data in (payload, forger.seal.close(payload)):
        with pytest.raises(JobFailed):
            client.submit(name, data).result(5)
    # A job signed with the right key, captured, and replayed after its signature expired.
    short = Offloader(OffloadConfig(servers=servers, secret_key="test",
                                    signature_max_age=1))
    captured = offloader.seal.close(payload)
    gevent.sleep(2.1)  # itsdangerous timestamps have a resolution of one second
    with pytest.raises(Exception, match="expired"):
        short.seal.open(captured)
    app.extensions["gearoffload"].offloader.seal.max_age = 1
    try:
        with pytest.raises(JobFailed):
            client.submit(name, captured).result(5)
    finally:
        app.extensions["gearoffload"].offloader.seal.max_age = 86400.0
    assert RUNS == []


def test_two_wsgi_apps_on_one_job_server_never_answer_for_each_other(served):
    from werkzeug.test import Client as WsgiClient

    from gearoffload.wsgi import OffloadMiddleware

    _, servers = served

    def first(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"first app"]

    def second(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"second app"]

    wrapped = [OffloadMiddleware(app, servers=servers, secret_key="k") for app in
               (first, second)]
    assert wrapped[0].function != wrapped[1].function
    from gearoffload.wsgi import default_wsgi_function, wsgi_runner

    workers = []
    for app, middleware in zip((first, second), wrapped, strict=True):
        worker = Worker(servers)  # as `gearoffload-worker --wsgi` registers each app
        worker.register(default_wsgi_function(app), wsgi_runner(app, middleware.offloader))
        workers.append(worker)
    working = [start_worker(w) for w in workers]
    try:
        answers = concurrently(*[
            (lambda m=m: WsgiClient(m).get("/x").text) for m in wrapped * 10])
        assert answers == ["first app", "second app"] * 10
    finally:
        for worker in workers:
            worker.stop(graceful=False)
        gevent.joinall(working, timeout=5)
        configure_reset()


def test_eager_mode_follows_testing_set_after_init_app():
    app = make_app(f"127.0.0.1:{free_port()}")  # GearOffload(app) ran without TESTING
    app.config["TESTING"] = True                # as the usual pytest fixture does
    started = time.monotonic()
    assert app.test_client().post("/search", data="late").text == "results for late"
    assert time.monotonic() - started < 1 and RUNS == ["late"]


def test_refusals_and_lost_jobs_answer_honestly():
    from gearoffload.core import Seal, http_error
    from gearoffload.errors import JobLost

    # A job delayed past the signature's max age is not refused as old when it falls due.
    seal = Seal("k", max_age=2)
    delayed = seal.close(b"later", not_before=time.time() + 60)
    assert seal.open(delayed) == b"later"
    with pytest.raises(Exception, match="unsigned"):
        Seal("k").open(Seal(None, allow_unsigned=True).close(b"x"))
    with pytest.raises(ValueError, match="GEAROFFLOAD_SECRET_KEY"):
        Seal(None).close(b"x")  # no key, unsigned not allowed: nothing is sent
    # A job lost with its server (a drain, a crash) is a 503 to retry, not "worker failed".
    answer = http_error(JobLost("job lost with its server"))
    assert answer.status == 503 and answer.retry_after


def test_the_middleware_reads_its_key_from_the_environment(monkeypatch):
    from gearoffload.wsgi import OffloadMiddleware

    monkeypatch.setenv("GEAROFFLOAD_SECRET_KEY", "from-env")
    assert OffloadMiddleware(lambda e, s: [], servers="127.0.0.1:1").config.secret_key == \
        "from-env"
