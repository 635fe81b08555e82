"""OffloadMiddleware with werkzeug's test client: a real job server process, and a Worker
running ``wsgi_runner(app)`` in a greenlet of this process."""

from __future__ import annotations

import re
from collections.abc import Iterator

import gevent
import pytest
from gevent.event import Event
from werkzeug.test import Client as WsgiClient

from conftest import ServerProcess, free_port, gevent_time_limit, start_worker
from gearoffload import Worker
from gearoffload.loading import load_registry
from gearoffload.wsgi import OffloadMiddleware, wsgi_runner

TEST_TIME_LIMIT = 30
RUNS: list[str] = []
RELEASE = Event()


time_limit = gevent_time_limit(TEST_TIME_LIMIT)


def legacy_app(environ, start_response):
    """A plain WSGI app, as old as they come."""
    path = environ["PATH_INFO"]
    where = "worker" if environ.get("gearoffload.worker") else "web"
    if path == "/boom":
        raise RuntimeError("legacy code exploded")
    if path == "/slow":
        gevent.sleep(3)
    if path.startswith("/reports/"):
        RUNS.append(f"{environ['REQUEST_METHOD']} {path}?{environ['QUERY_STRING']} "
                    f"{environ.get('HTTP_ACCEPT_LANGUAGE', '')}")
        RELEASE.wait(5)
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    text = (f"{where} {environ['REQUEST_METHOD']} {environ['SCRIPT_NAME']}{path} "
            f"q={environ['QUERY_STRING']} body={body.decode()} "
            f"type={environ.get('CONTENT_TYPE', '')} x={environ.get('HTTP_X_TEST', '')}")
    start_response("203 Non-Authoritative Information",
                   [("Content-Type", "text/plain"), ("Set-Cookie", "a=1"),
                    ("Set-Cookie", "b=2"), ("Connection", "close")])
    return [text.encode(), b" (done)"]


def wrap(servers: str, **options) -> OffloadMiddleware:
    options.setdefault("routes", ["/reports/", "/boom", "/slow", re.compile(r"^/item/\d+$")])
    options.setdefault("secret_key", "test-key")
    options.setdefault("function", "gearoffload.wsgi")
    return OffloadMiddleware(legacy_app, servers=servers, connect_timeout=0.5, **options)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    server = ServerProcess("gearoffload").start()
    # The worker runs the wrapped app: the middleware must pass requests through there.
    worker = Worker(server.address, concurrency=50)
    wrapped = wrap(server.address)
    worker.register("gearoffload.wsgi", wsgi_runner(wrapped, wrapped.offloader))
    greenlet = start_worker(worker)
    yield server
    worker.stop(graceful=False)
    greenlet.join(5)
    server.stop()


@pytest.fixture(autouse=True)
def reset() -> None:
    RUNS.clear()
    RELEASE.set()


def test_matching_requests_run_on_the_worker_others_here(server):
    client = WsgiClient(wrap(server.address))
    response = client.post("/reports/7?x=1", data=b"payload", headers={"X-Test": "t"},
                           content_type="text/plain")
    assert response.status_code == 203
    assert response.text == ("worker POST /reports/7 q=x=1 body=payload type=text/plain "
                             "x=t (done)")
    assert response.headers.getlist("Set-Cookie") == ["a=1", "b=2"]
    assert "Connection" not in response.headers  # hop-by-hop headers stay behind
    assert client.get("/item/12").text.startswith("worker GET /item/12")
    assert client.get("/item/x").text.startswith("web GET /item/x")
    assert client.get("/other").text.startswith("web GET /other")
    assert client.delete("/reports/7").text.startswith("web DELETE")  # not in methods


def test_identical_safe_requests_coalesce_unsafe_ones_never(server):
    client = WsgiClient(wrap(server.address, vary=("Host", "Accept-Language")))
    RELEASE.clear()
    gets = [gevent.spawn(client.get, "/reports/x?m=11") for _ in range(40)]
    french = [gevent.spawn(client.get, "/reports/x?m=11", headers={"Accept-Language": "fr"})
              for _ in range(5)]
    posts = [gevent.spawn(client.post, "/reports/x?m=11") for _ in range(3)]
    gevent.sleep(0.3)
    RELEASE.set()
    gevent.joinall(gets + french + posts, raise_error=True)
    assert {g.value.text for g in gets} == {"worker GET /reports/x q=m=11 body= type= x= (done)"}
    assert sorted(RUNS) == sorted(["GET /reports/x?m=11 ", "GET /reports/x?m=11 fr"] +
                                  ["POST /reports/x?m=11 "] * 3)


def test_errors_map_to_status_codes(server):
    client = WsgiClient(wrap(server.address, timeout=0.5, max_body=10))
    assert client.get("/boom").status_code == 500
    assert client.get("/slow").status_code == 504
    assert client.post("/reports/1", data=b"x" * 11).status_code == 413
    dead = WsgiClient(wrap(f"127.0.0.1:{free_port()}"))
    response = dead.get("/reports/1")
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    local = WsgiClient(wrap(f"127.0.0.1:{free_port()}", fallback="local"))
    assert local.post("/reports/2", data=b"kept").text.startswith(
        "web POST /reports/2 q= body=kept")


def test_options_are_validated():
    with pytest.raises(TypeError, match="re.compile"):
        OffloadMiddleware(legacy_app, routes=[42], secret_key="k")
    with pytest.raises(ValueError, match="'local'"):
        OffloadMiddleware(legacy_app, fallback="yes", secret_key="k")
    # Unsigned jobs are an explicit choice: without a key the middleware refuses to start.
    with pytest.raises(ValueError, match="needs secret_key"):
        OffloadMiddleware(legacy_app)
    assert OffloadMiddleware(legacy_app, allow_unsigned=True).function == \
        "gearoffload.wsgi:test_wsgi.legacy_app"


def test_worker_pool_loads_a_wsgi_app_with_the_wsgi_flag():
    registry = load_registry("test_wsgi:legacy_app", "gearoffload.wsgi")
    assert "gearoffload.wsgi" in registry.names()
    with pytest.raises(TypeError, match="--wsgi"):
        load_registry("test_wsgi:legacy_app")


def test_signed_middleware_requests(server):
    worker = Worker(server.address)
    good = wrap(server.address, function="signed.wsgi", secret_key="s3cret")
    worker.register("signed.wsgi", wsgi_runner(legacy_app, good.offloader))
    greenlet = start_worker(worker)
    try:
        assert WsgiClient(good).get("/item/1").text.startswith("worker GET /item/1")
        # Refused by the worker (WORK_FAIL, 502), never run: unsigned, or another key.
        unsigned = WsgiClient(wrap(server.address, function="signed.wsgi",
                                   secret_key=None, allow_unsigned=True))
        assert unsigned.get("/item/1").status_code == 502
        wrong = WsgiClient(wrap(server.address, function="signed.wsgi", secret_key="nope"))
        assert wrong.get("/item/1").status_code == 502
        # An old key still works while it is listed (rotation).
        from gearoffload.core import OffloadConfig, Offloader
        rotated = Offloader(OffloadConfig(servers=server.address, secret_key="new",
                                          old_secret_keys=("s3cret",)))
        assert rotated.seal.open(good.offloader.seal.close(b"x")) == b"x"
    finally:
        worker.stop(graceful=False)
        greenlet.join(5)


def test_a_server_that_never_accepts_the_job_is_503_or_local_fallback(dropping_server):
    response = WsgiClient(wrap(dropping_server, timeout=5)).get("/reports/1")
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    local = WsgiClient(wrap(dropping_server, fallback="local", timeout=5))
    assert local.post("/reports/3", data=b"kept").text.startswith(
        "web POST /reports/3 q= body=kept")
