"""Issue #15 over real HTTP: gunicorn -w 4 (gthread) in front of ``webapp_e2e:app``, a real
``gearoffload-server`` and a real ``gearoffload-worker`` pool. Two bodies and two users
at the same moment never share an answer; a view no worker serves is a 503 within a
second; a restarted job server is found again within about a second."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import gevent
import pytest
from gevent import socket
from test_background_e2e import Web

from conftest import gevent_time_limit

time_limit = gevent_time_limit(60)


def request(port: int, method: str, path: str, body: bytes = b"",
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.0 request with extra headers; (status, headers, body)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with gevent.Timeout(20), socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{extra}"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        fields[name.lower()] = value if name.lower() != "set-cookie" else value.split(";")[0]
    return int(lines[0].split()[1]), fields, payload


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> Iterator[Web]:
    stack = Web(tmp_path_factory.mktemp("safety"), "gunicorn-gthread",
                web_env={"E2E_WEB_ONLY_VIEW": "1"})
    yield stack
    stack.stop()


def runs(web: Web, name: str) -> int:
    path = web.tmp / f"{name}.runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_two_bodies_at_the_same_moment_get_their_own_answers(web):
    before = runs(web, "search")
    answers = [gevent.spawn(request, web.port, "POST", "/search", body)
               for body in (b"apples", b"pears", b"apples")]
    gevent.joinall(answers, raise_error=True)  # (it returns them in the order they end)
    assert [g.value[2] for g in answers] == [b"results for apples", b"results for pears",
                                            b"results for apples"]
    assert runs(web, "search") - before == 2  # the two identical bodies coalesced


def test_two_users_at_the_same_moment_each_see_their_own_page(web):
    cookies = {}
    for user in ("alice", "bob"):
        _, headers, _ = request(web.port, "GET", f"/login/{user}")
        cookies[user] = headers["set-cookie"]
    pages = [gevent.spawn(request, web.port, "GET", "/me", b"", {"Cookie": cookies[user]})
             for user in ("alice", "bob", "alice")]
    gevent.joinall(pages, raise_error=True)
    assert [g.value[2] for g in pages] == [b"page of alice", b"page of bob",
                                          b"page of alice"]


def test_a_view_no_worker_serves_is_a_503_within_a_second(web):
    started = time.monotonic()
    status, headers, body = request(web.port, "GET", "/unserved")
    elapsed = time.monotonic() - started
    assert status == 503 and b"No worker serves" in body and b"webapp_e2e.unserved" in body
    assert b"127.0.0.1" not in body  # the page names the function, not the servers
    assert elapsed < 1.0 and headers.get("retry-after")


def test_a_restarted_job_server_is_found_again_within_about_a_second(web):
    assert request(web.port, "GET", "/trivial")[2] == b"ok"
    web.restart_server(signal.SIGKILL)
    restarted = time.monotonic()
    while True:
        status, _, body = request(web.port, "GET", "/trivial")
        if status == 200:
            break
        assert status == 503, (status, body)
        assert time.monotonic() - restarted < 5, "the web side did not find the server"
        gevent.sleep(0.05)
    assert time.monotonic() - restarted < 1.5
