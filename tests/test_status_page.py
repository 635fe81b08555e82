"""The status page in a real headless Chromium (Debian's ``chromium``, no webdriver).

Chromium loads ``/``, runs the page's script (which fetches ``/status.json``) and dumps
the resulting DOM; the tables are empty in the HTML the server sends, so what is checked
here exists only if the script ran and rendered the server's data. Missing chromium
skips locally and fails under CI=true (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from html.parser import HTMLParser

import pytest
from test_http import HttpServer, Workload

from conftest import need_tool
from gearoffload.protocol import PacketType as T

CHROMIUM_TIMEOUT = 60


class Tables(HTMLParser):
    """The rows of each ``<tbody id=...>``: a list of (tr attributes, cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: dict[str, list[tuple[dict, list[str]]]] = {}
        self.texts: dict[str, str] = {}   # text of elements with an id
        self._body: str | None = None
        self._cell: list[str] | None = None
        self._ids: list[tuple[str, str, list[str]]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "tbody":
            self._body = attrs.get("id")
            self.bodies[self._body] = []
        elif tag == "tr" and self._body:
            self.bodies[self._body].append((attrs, []))
        elif tag == "td" and self._body:
            self._cell = []
        if "id" in attrs and tag != "tbody":
            self._ids.append((tag, attrs["id"], []))

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._body = None
        elif tag == "td" and self._cell is not None:
            self.bodies[self._body][-1][1].append("".join(self._cell).strip())
            self._cell = None
        if self._ids and self._ids[-1][0] == tag:
            _, ident, parts = self._ids.pop()
            self.texts[ident] = "".join(parts).strip()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for _, _, parts in self._ids:
            parts.append(data)

    def rows(self, body: str) -> list[list[str]]:
        return [cells for _, cells in self.bodies[body]]

    def row(self, body: str, key: str, value: str) -> list[str]:
        [cells] = [cells for attrs, cells in self.bodies[body] if attrs.get(key) == value]
        return cells


def dump_dom(url: str) -> tuple[str, Tables]:
    """Load ``url`` in headless Chromium, let its script run, return the DOM."""
    chromium = need_tool("chromium", "chromium")
    profile = tempfile.mkdtemp(prefix="gearoffload-chromium-")
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-extensions",
               f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url]
    # A session of its own: if it hangs, its whole process group (renderer, GPU, zygote
    # processes) is killed, by the PID of the one we started.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT}s")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    dom = out.decode(errors="replace")
    assert proc.returncode == 0 and "<tbody" in dom, err.decode(errors="replace")[-2000:]
    tables = Tables()
    tables.feed(dom)
    return dom, tables


def test_status_page_renders_the_server_state_and_follows_it():
    need_tool("chromium", "chromium")
    server = HttpServer().start()
    work = None
    try:
        work = Workload(server)
        dom, page = dump_dom(server.url + "/")

        assert page.texts["state"].startswith("updated "), page.texts.get("state")
        # It refreshes by itself: in Chromium's 5 s of virtual time it polled again and again.
        polls = re.search(r'<span[^>]*\bdata-polls="(\d+)"', dom)
        assert polls and int(polls.group(1)) >= 3, dom[:500]
        idle = page.row("functions", "data-function", "idle")
        # function, high, normal, low, scheduled, running, workers, completed, failed
        assert idle == ["idle", "1", "3", "2", "0", "0", "0", "0", "0"]
        upper = page.row("functions", "data-function", "upper")
        assert upper[7:] == ["1", "2"] and upper[6] == "1"
        slow = page.row("functions", "data-function", "slow")
        assert slow[5:7] == ["1", "1"]
        running = page.row("running", "data-handle", work.slow_handle.decode())
        assert running[1:3] == ["slow", "report-7"]
        assert "3/10 (30%)" in running[3]
        assert 'max="10"' in dom and 'value="3"' in dom  # the <progress> bar
        failures = page.rows("failures")
        assert [f[4] for f in failures] == ["exception", "fail"]
        assert failures[0][5] == "boom <b>&"       # shown as text ...
        assert "boom &lt;b&gt;&amp;" in dom         # ... escaped in the DOM
        assert page.tags.count("b") == 8            # only the page's own 8 totals
        assert page.texts["t-submitted"] == "10" and page.texts["t-coalesced"] == "1"
        assert page.texts["t-connections"] == "3"

        # Change the server: progress moves on, a queued job runs and fails.
        slow_worker = work.slow_worker
        slow_worker.send(T.WORK_STATUS, work.slow_handle, b"7", b"10")
        with server.connect() as idle_worker:
            idle_worker.send(T.CAN_DO, b"idle")
            idle_worker.send(T.GRAB_JOB)
            (handle, *_) = idle_worker.expect(T.JOB_ASSIGN)
            idle_worker.send(T.WORK_FAIL, handle)
            idle_worker.send(T.ECHO_REQ, b"sync")
            idle_worker.expect(T.ECHO_RES)
            slow_worker.send(T.ECHO_REQ, b"sync")
            slow_worker.expect(T.ECHO_RES)
            dom, page = dump_dom(server.url + "/")

        assert page.row("functions", "data-function", "idle") == [
            "idle", "0", "3", "2", "0", "0", "1", "0", "1"]
        running = page.row("running", "data-handle", work.slow_handle.decode())
        assert "7/10 (70%)" in running[3]
        newest = page.rows("failures")[0]
        assert newest[1:3] == ["idle", handle.decode()] and newest[4] == "fail"

        # The job ends: no job running any more.
        slow_worker.send(T.WORK_COMPLETE, work.slow_handle, b"")
        slow_worker.send(T.ECHO_REQ, b"sync")
        slow_worker.expect(T.ECHO_RES)
        dom, page = dump_dom(server.url + "/")
        assert page.rows("running") == [["no job running"]]
        assert page.row("functions", "data-function", "slow")[5:8] == ["0", "1", "1"]
    finally:
        if work is not None:
            work.close()
        server.stop()
