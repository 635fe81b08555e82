"""The job history and the dead letters outside the state: the admin commands over a real
server, the status page's Retry/Delete POSTs (refused unless admitted and same-origin),
and, in a real headless Chromium, the history listing a failed job and the dead letter's
Retry button running it again."""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_http import HttpServer

from conftest import ServerProcess, need_tool, poll_until, tasks_on_a_pool
from gearoffload.admin import AdminClient, HistoryDisabled
from gearoffload.protocol import PacketType as T
from gearoffload_server.config import ServerConfig, _network
from gearoffload_server.http import ObservabilityApp
from gearoffload_server.state import JobServerState, ManualScheduler

SECRET = "history-test-key"
CHROMIUM_TIMEOUT = 90


# -- the admin commands over a real server ---------------------------------------------

def test_admin_history_find_job_and_retries_over_a_real_server():
    server = ServerProcess("gearoffload", ["--retry-failed", "1", "--retry-backoff",
                                           "0.05"]).start()
    try:
        client, worker = server.connect(), server.connect()
        client.send(T.SUBMIT_JOB_BG, b"hist.fn", b"key\tA", b"x")
        [handle] = client.expect(T.JOB_CREATED)
        worker.send(T.CAN_DO, b"hist.fn")
        for attempt in (1, 2):
            worker.send(T.GRAB_JOB)
            deadline = time.monotonic() + 5
            while True:  # the retry is due after its back-off: grab until it is
                packet = worker.recv()
                if packet.type == T.JOB_ASSIGN:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.02)
                worker.send(T.GRAB_JOB)
            worker.send(T.WORK_EXCEPTION, handle, b"Traceback\nKeyError: %d" % attempt)
            worker.send(T.WORK_FAIL, handle)
        with AdminClient(server.address) as admin:
            assert poll_until(lambda: admin.dead_jobs(), 5)
            entries = admin.find_job(handle.decode())
            assert [(e.outcome, e.attempts) for e in entries] == [
                ("retrying", 1), ("dead", 2), ("dead", 2)]  # the last: where it is now
            assert entries[1].error == "Traceback\nKeyError: 2" and entries[1].unique == "key\\tA"
            assert entries[1].ended >= entries[1].submitted > 0
            assert [e.outcome for e in admin.history("hist.fn")] == ["dead", "retrying"]
            assert [e.outcome for e in admin.history()] == ["dead", "retrying"]
            assert admin.history("nothing") == []
            assert admin.retries() == {"hist.fn": (0, 1, 1)}
            admin.requeue_dead(handle.decode())
            worker.send(T.GRAB_JOB)
            assert worker.expect(T.JOB_ASSIGN)[0] == handle
            worker.send(T.WORK_COMPLETE, handle, b"fine")
            assert poll_until(lambda: admin.history("hist.fn")[0].outcome == "done", 5)
            done = admin.history("hist.fn")[0]
            assert done.attempts == 1 and done.duration >= 0
            with pytest.raises(ValueError):
                admin.find_job("two words")
        client.close()
        worker.close()
    finally:
        server.stop()


def test_history_off_is_said_not_shown_as_an_empty_history():
    """``--history-max 0``: ``show history`` and a ``find job`` that finds nothing answer
    ERR HISTORY_DISABLED (not ``.``, which reads as "nothing ended"); ``find job`` still
    tells where a live job is; AdminClient raises HistoryDisabled with a clear text."""
    server = ServerProcess("gearoffload", ["--history-max", "0"]).start()
    try:
        with server.connect() as conn:
            assert conn.admin("show history") == (
                b"ERR HISTORY_DISABLED This+server+keeps+no+job+history+(--history-max+0)"
                b"\r\n")
            assert conn.admin("find job nothing").startswith(b"ERR HISTORY_DISABLED ")
            conn.send(T.SUBMIT_JOB_BG, b"off.fn", b"live", b"x")
            [handle] = conn.expect(T.JOB_CREATED)
        with AdminClient(server.address) as admin:
            with pytest.raises(HistoryDisabled, match="keeps no job history: it runs with "
                               "--history-max 0"):
                admin.history()
            with pytest.raises(HistoryDisabled):
                admin.history("off.fn")
            with pytest.raises(HistoryDisabled):
                admin.find_job("nothing")
            [entry] = admin.find_job("live")
            assert (entry.handle, entry.outcome) == (handle.decode(), "queued")
            assert admin.status()  # the connection is still in step
    finally:
        server.stop()


# -- the status page's buttons: WSGI, no socket --------------------------------------------

def _app(*allow: str) -> tuple[ObservabilityApp, JobServerState, bytes]:
    state = JobServerState(ServerConfig(admin_allow=tuple(_network(a) for a in allow)),
                           ManualScheduler())
    from gearoffload_server.state import Job
    func = state.function(b"f")
    job = Job(b"H:x:1", func, b"u<script>", b"data", 1, True, None, 0)
    job.state = 4  # DEAD
    state.dead[job.handle] = job
    return ObservabilityApp(state), state, job.handle


def _post(app: ObservabilityApp, path: str, body: dict | None = None,
          **environ: str) -> tuple[str, bytes]:
    data = json.dumps(body if body is not None else {"handle": "H:x:1"}).encode()
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "REMOTE_ADDR": "127.0.0.1",
           "HTTP_HOST": "127.0.0.1:9120", "HTTP_ORIGIN": "http://127.0.0.1:9120",
           "HTTP_X_GEAROFFLOAD_ACTION": "1", "CONTENT_LENGTH": str(len(data)),
           "wsgi.input": io.BytesIO(data)}
    env.update(environ)
    env = {k: v for k, v in env.items() if v is not None}
    status = []
    body_out = b"".join(app(env, lambda s, h: status.append(s)))
    return status[0], body_out


def test_a_button_from_an_address_not_admitted_is_refused_with_403():
    app, state, handle = _app()
    status, body = _post(app, "/dead/retry", REMOTE_ADDR="10.1.2.3")
    assert status.startswith("403") and b"--admin-allow" in body
    assert handle in state.dead
    # --admin-allow admits it (the admin port's rule, ``admin.admitted``).
    app, state, handle = _app("10.0.0.0/8")
    status, _ = _post(app, "/dead/delete", REMOTE_ADDR="10.1.2.3")
    assert status.startswith("200") and not state.dead


@pytest.mark.parametrize("environ", [
    {"HTTP_ORIGIN": "http://evil.example"},                    # another site's form/script
    {"HTTP_ORIGIN": "http://127.0.0.1:9999"},                  # another port: another origin
    {"HTTP_ORIGIN": None, "HTTP_REFERER": "http://evil.example/page"},
    {"HTTP_ORIGIN": None},                                     # neither Origin nor Referer
    {"HTTP_X_GEAROFFLOAD_ACTION": None},                       # a plain cross-site form
])
def test_a_cross_origin_button_post_is_refused_with_403(environ):
    app, state, handle = _app()
    status, body = _post(app, "/dead/retry", **environ)
    assert status.startswith("403") and body.startswith(b"refused")
    assert handle in state.dead


def test_a_same_origin_button_runs_the_dead_letter_again():
    app, state, handle = _app()
    status, _ = _post(app, "/dead/retry", HTTP_ORIGIN=None,
                      HTTP_REFERER="http://127.0.0.1:9120/")
    assert status.startswith("200") and handle in state.jobs and not state.dead
    assert _post(app, "/dead/retry")[0].startswith("404")           # not dead any more
    assert _post(app, "/dead/retry", {"nope": 1})[0].startswith("400")
    assert _post(app, "/status.json")[0].startswith("405")           # the rest stays read-only


def test_history_json_lists_dead_letters_and_searches():
    app, state, handle = _app()
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/history.json", "QUERY_STRING": "q=u%3Cscript%3E"}
    data = json.loads(b"".join(app(env, lambda s, h: None)))
    assert data["dead"][0]["unique"] == "u<script>" and data["dead_total"] == 1
    assert [f["outcome"] for f in data["found"]] == ["dead"]


def test_a_dead_letters_data_is_shown_only_to_admitted_viewers():
    """A job's arguments may be personal: /history.json gives a dead letter's data to the
    viewers the admin port would let change the server, and its size to the others."""
    app, state, handle = _app("10.0.0.0/8")
    state.dead[handle].data = b"GOR1 2 1 300 1\nGOU1123.0:0:[[\"alice@example.com\"],{}]"

    def dead(remote: str) -> dict:
        env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/history.json", "REMOTE_ADDR": remote}
        return json.loads(b"".join(app(env, lambda s, h: None)))["dead"][0]

    for admitted_viewer in ("127.0.0.1", "10.1.2.3"):
        shown = dead(admitted_viewer)
        assert shown["data"] == 'GOU1123.0:0:[["alice@example.com"],{}]'  # no retry line
        assert shown["size"] == len(state.dead[handle].data)
    hidden = dead("192.0.2.7")
    assert hidden["data"] is None and hidden["size"] == shown["size"]


def test_a_cross_origin_post_over_http_is_refused():
    server = HttpServer().start()
    try:
        import urllib.request
        request = urllib.request.Request(
            server.url + "/dead/retry", data=b'{"handle": "H:1"}', method="POST",
            headers={"Origin": "http://evil.example", "X-Gearoffload-Action": "1",
                     "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 403
        assert b"cross-origin" in refused.value.read()
    finally:
        server.stop()


def test_a_button_is_post_only_and_a_refusal_is_logged_in_one_phrase():
    """GET /dead/retry is 405 with Allow: POST (was 404 "not found"); a POST without
    Origin or Referer is refused, and the server's log line says "refused" once."""
    server = HttpServer().start()
    try:
        import urllib.request
        for path in ("/dead/retry", "/dead/delete"):
            status, headers, body = server.get(path)
            assert (status, headers["Allow"]) == (405, "POST"), (path, body)
            assert server.get(path, "HEAD")[0] == 405
        status, headers, _ = server.get("/history.json", "DELETE")
        assert (status, headers["Allow"]) == (405, "GET, HEAD")
        assert server.get("/nothing")[0] == 404
        request = urllib.request.Request(
            server.url + "/dead/retry", data=b'{"handle": "H:1"}', method="POST",
            headers={"X-Gearoffload-Action": "1", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 403
        assert refused.value.read() == (b"refused: no Origin or Referer (a request from the "
                                        b"status page has one)\n")
    finally:
        server.stop()
    log = server.stderr_text()
    assert "/dead/retry from 127.0.0.1 refused: no Origin or Referer" in log, log
    assert "refused: refused" not in log


# -- in a real browser ------------------------------------------------------------------------

TASKS = '''
import os
from pathlib import Path

from gearoffload import offload

RUNS = Path(os.environ["HISTORY_TEST_DIR"])


@offload(name="histtasks.charge", retries=1, backoff=0.1, jitter=False)
def charge(order):
    with open(RUNS / "runs", "a") as f:
        f.write("run\\n")
    if not (RUNS / "fixed").exists():
        raise ValueError(f"cannot charge order {order} <b>bold</b>")
    return "charged"
'''


class DevToolsError(Exception):
    pass


class DevTools:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (the DevTools protocol
    on fds 3 and 4, NUL-terminated JSON): no webdriver, no websocket library."""

    def __init__(self) -> None:
        chromium = need_tool("chromium", "chromium")
        self.profile = tempfile.mkdtemp(prefix="gearoffload-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Above 2 and away from 3 and 4, so that the child's dup2 cannot clobber them.
        child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 100)
        child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 100)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def fds() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--disable-extensions",
                   f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=fds,
                                     pass_fds=(3, 4), start_new_session=True)
        os.close(child_in)
        os.close(child_out)
        self._buffer = b""
        self._id = 0
        self.deadline = time.monotonic() + CHROMIUM_TIMEOUT
        self.session = ""

    def call(self, method: str, **params: object) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                remaining = self.deadline - time.monotonic()
                assert remaining > 0, f"chromium did not answer {method} in time"
                import select
                ready, _, _ = select.select([self._from_browser], [], [], remaining)
                if ready:
                    chunk = os.read(self._from_browser, 1 << 20)
                    assert chunk, "chromium closed its DevTools pipe"
                    self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise DevToolsError(reply["error"].get("message", str(reply["error"])))
                return reply["result"]

    def open(self, url: str) -> None:
        """Attach to the first page and load ``url`` in it."""
        self.attach()
        self.call("Page.navigate", url=url)

    def attach(self) -> None:
        for _ in range(100):
            pages = [t for t in self.call("Target.getTargets")["targetInfos"]
                     if t["type"] == "page"]
            if pages:
                break
            time.sleep(0.1)
        self.session = self.call("Target.attachToTarget", targetId=pages[0]["targetId"],
                                 flatten=True)["sessionId"]

    def evaluate(self, expression: str) -> object:
        for _ in range(50):
            try:
                result = self.call("Runtime.evaluate", expression=expression,
                                   awaitPromise=True, returnByValue=True)
                break
            except DevToolsError as exc:  # the navigation replaced the document
                if "context" not in str(exc):
                    raise
                time.sleep(0.1)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed, released) in the middle of the element."""
        x, y = self.evaluate(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            e.scrollIntoView();
            const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                      clickCount=1)

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group of the one we started
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)


WAIT_JS = """
var wait = async (f, what) => {
  const end = Date.now() + 20000;
  while (Date.now() < end) {
    const v = f();
    if (v) return v;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error("timed out waiting for " + what);
};
var rows = (body, handle) => [...document.querySelectorAll("#" + body + " tr")]
  .filter((tr) => tr.dataset.handle === handle)
  .map((tr) => ({outcome: tr.dataset.outcome || "",
                 cells: [...tr.children].map((td) => td.textContent)}));
"""


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    """Our server with its HTTP port, a one-process worker pool on the tasks module."""
    need_tool("chromium", "chromium")
    runs = tmp_path / "runs"
    runs.mkdir()
    server = HttpServer().start()
    with tasks_on_a_pool(tmp_path, monkeypatch, "histtasks", textwrap.dedent(TASKS), server,
                         SECRET, {"HISTORY_TEST_DIR": str(runs)}) as (histtasks, _):
        yield server, histtasks, runs


def test_browser_history_lists_the_failed_job_and_retry_runs_the_dead_letter(stack):
    server, tasks, runs = stack
    job = tasks.charge.background(7)
    with AdminClient(server.address) as admin:
        assert poll_until(lambda: admin.dead_jobs(), 15), "no dead letter"
        [dead] = admin.dead_jobs()
    (runs / "fixed").touch()  # from now on the task succeeds
    browser = DevTools()
    try:
        browser.open(server.url + "/")
        handle = json.dumps(dead.handle)
        seen = browser.evaluate(WAIT_JS + f"""(async () => {{
            await wait(() => rows("dead", {handle}).length, "the dead letter");
            await wait(() => rows("history", {handle}).length >= 2, "the history");
            const trace = document.querySelector(
                "#dead tr[data-handle='" + {handle} + "'] pre.trace").textContent;
            const summary = [...document.querySelectorAll("#history tr")].find(
                (tr) => tr.dataset.handle === {handle}).querySelector("summary").textContent;
            return {{dead: rows("dead", {handle}), history: rows("history", {handle}),
                     trace: trace, bold: document.querySelectorAll("#dead b").length,
                     summary: summary}};
        }})()""")
        # The history lists the failed attempts: retried once, then dead, with the error.
        assert [r["outcome"] for r in seen["history"]] == ["dead", "retrying"]
        assert "ValueError: cannot charge order 7 <b>bold</b>" in seen["history"][0]["cells"][7]
        # Folded, the short error shows its exception line (not the frame's source line).
        assert seen["summary"] == "ValueError: cannot charge order 7 <b>bold</b>"
        assert seen["history"][0]["cells"][6] == "2"  # attempts
        [row] = seen["dead"]
        assert row["cells"][0] == "histtasks.charge" and row["cells"][3] == "2"
        # Its data (the arguments, JSON inside the seal): shown, as the viewer is loopback.
        assert "[[7],{}]" in row["cells"][6]
        assert "Traceback" in seen["trace"] and "histtasks.py" in seen["trace"]
        assert seen["bold"] == 0  # the error's markup is text, not markup

        browser.click(f"#dead tr[data-handle='{dead.handle}'] button.retry")
        after = browser.evaluate(WAIT_JS + f"""(async () => {{
            await wait(() => rows("history", {handle}).some((r) => r.outcome === "done"),
                       "the retried job to complete");
            await wait(() => !rows("dead", {handle}).length, "the dead letter to go");
            return {{history: rows("history", {handle}),
                     state: document.getElementById("action-state").textContent}};
        }})()""")
        assert [r["outcome"] for r in after["history"]] == ["done", "dead", "retrying"]
        assert after["state"] == f"retry {dead.handle}: done"
    finally:
        browser.close()
    assert job.result(timeout=15) == "charged"
    assert (runs / "runs").read_text().count("run") == 3
