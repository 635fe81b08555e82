"""The live status page served at ``/``: one self-contained HTML document.

No external asset (the machines it runs on may have no internet): the CSS and the script
are inline, and the script polls ``/status.json`` and ``/history.json`` every second
and rebuilds the tables
with ``textContent`` only, so a function name or an exception text can never become
markup. ``CONTENT_SECURITY_POLICY`` allows exactly this script and style (by hash) and
requests to the same origin, nothing else.

Example::

    >>> PAGE.startswith(b"<!doctype html>")
    True
    >>> "script-src 'sha256-" in CONTENT_SECURITY_POLICY
    True
"""

from __future__ import annotations

import base64
import hashlib

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .2em; }
h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
#state { color: #666; }
#state.stale, .failed, .draining { color: #b00020; }
table { border-collapse: collapse; background: #fff; min-width: 40em; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .7em; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.empty { color: #888; font-style: italic; }
.totals span { display: inline-block; margin-right: 1.5em; }
.totals b { font-size: 1.2em; }
progress { width: 9em; vertical-align: middle; }
code { font-size: .95em; }
td.detail { max-width: 40em; overflow-wrap: anywhere; }
pre.trace { max-width: 60em; max-height: 30em; overflow: auto; white-space: pre-wrap;
  font-size: .9em; background: #f4f4f4; padding: .4em; }
.outcome-done { color: #1b5e20; }
.outcome-failed, .outcome-dead, .outcome-lost, .outcome-timeout { color: #b00020; }
.outcome-retrying, .outcome-requeued { color: #a65e00; }
#action-state.refused { color: #b00020; }
button { margin-right: .4em; }
"""

_SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function cell(content, cls) {
  const td = el("td", undefined, cls);
  if (content instanceof Node) td.appendChild(content); else td.textContent = String(content);
  return td;
}
function fill(id, rows, empty) {
  const body = $(id);
  if (!rows.length) {
    const tr = el("tr");
    const td = cell(empty, "empty");
    td.colSpan = 9;
    tr.appendChild(td);
    rows = [tr];
  }
  body.replaceChildren(...rows);
}
function progress(n, d) {
  const span = el("span");
  if (d > 0) {
    const bar = el("progress");
    bar.max = d;
    bar.value = Math.min(n, d);
    span.appendChild(bar);
    span.appendChild(document.createTextNode(
      " " + n + "/" + d + " (" + Math.round(100 * Math.min(n, d) / d) + "%)"));
  } else {
    span.textContent = "no status yet";
  }
  return span;
}
const clock = (t) => new Date(t * 1000).toISOString().slice(11, 19) + " UTC";
function render(s) {
  $("version").textContent = s.version;
  for (const [k, v] of Object.entries(s.totals)) $("t-" + k).textContent = v;
  for (const k of ["connections", "workers", "jobs", "dead_letters"]) {
    $("t-" + k).textContent = s[k];
  }
  $("draining").textContent = s.draining ? "draining: shutting down" : "";
  fill("functions", s.functions.map((f) => {
    const tr = el("tr");
    tr.dataset.function = f.name;
    tr.append(cell(f.name), cell(f.queued.high, "n high"), cell(f.queued.normal, "n normal"),
      cell(f.queued.low, "n low"), cell(f.scheduled, "n scheduled"),
      cell(f.running, "n running"), cell(f.workers, "n workers"),
      cell(f.completed, "n completed"), cell(f.failed, f.failed ? "n failed" : "n"));
    return tr;
  }), "no function yet");
  $("running-total").textContent = s.running_total > s.running.length ?
    "(" + s.running.length + " of " + s.running_total + " shown)" : "";
  fill("running", s.running.map((j) => {
    const tr = el("tr");
    tr.dataset.handle = j.handle;
    tr.append(cell(el("code", j.handle)), cell(j.function), cell(j.unique),
      cell(progress(j.numerator, j.denominator), "progress"),
      cell(j.age.toFixed(1) + " s", "n"), cell(j.worker));
    return tr;
  }), "no job running");
  fill("failures", s.failures.map((f) => {
    const tr = el("tr");
    tr.dataset.handle = f.handle;
    tr.append(cell(clock(f.time)), cell(f.function), cell(el("code", f.handle)),
      cell(f.unique), cell(f.what, "what failed"), cell(f.detail, "detail"));
    return tr;
  }), "no failure recorded");
}
const opened = new Set();  // dead letters whose error is expanded: kept across refreshes
const seconds = (t) => t < 10 ? t.toFixed(3) + " s" : t.toFixed(1) + " s";
function errorCell(text, key) {
  if (!text) return cell("");
  const details = el("details");
  const lines = text.split("\\n").filter((l) => l.trim());
  // The summary of a folded error is its exception: the first line of a short error (the
  // history's: exception, then frame) or of a gearoffload worker's traceback text, the
  // last line of a bare traceback.
  const bare = !lines.length || /^(\\s|Traceback\\b)/.test(lines[0]);
  details.appendChild(el("summary", (bare ? lines[lines.length - 1] : lines[0]) || text));
  details.appendChild(el("pre", text, "trace"));
  if (key) {
    details.open = opened.has(key);
    details.addEventListener("toggle", () => {
      if (details.open) opened.add(key); else opened.delete(key);
    });
  }
  return cell(details, "detail");
}
function dataCell(d) {
  // null: the viewer is not one the admin port admits, and a job's arguments may be
  // personal (the server sends no data then).
  if (d.data === null) return cell(d.size + " B (hidden)", "data");
  const details = el("details");
  details.appendChild(el("summary", d.size + " B"));
  details.appendChild(el("pre", d.data, "trace"));
  const key = "data " + d.handle;
  details.open = opened.has(key);
  details.addEventListener("toggle", () => {
    if (details.open) opened.add(key); else opened.delete(key);
  });
  return cell(details, "data");
}
function historyRow(e) {
  const tr = el("tr");
  tr.dataset.handle = e.handle;
  tr.dataset.outcome = e.outcome;
  tr.append(cell(e.ended ? clock(e.ended) : "-"), cell(e.function), cell(el("code", e.handle)),
    cell(e.unique), cell(e.outcome, "outcome outcome-" + e.outcome),
    cell(e.ended ? seconds(e.duration) : "-", "n"), cell(e.attempts, "n attempts"),
    errorCell(e.error));
  return tr;
}
async function act(what, handle) {
  const state = $("action-state");
  try {
    const response = await fetch("dead/" + what, {method: "POST", cache: "no-store",
      headers: {"Content-Type": "application/json", "X-Gearoffload-Action": "1"},
      body: JSON.stringify({handle: handle})});
    const text = (await response.text()).trim();
    state.textContent = response.ok ? what + " " + handle + ": done" : text;
    state.className = response.ok ? "" : "refused";
  } catch (err) {
    state.textContent = what + " " + handle + ": " + err.message;
    state.className = "refused";
  }
  pollHistory();
}
function button(text, what, handle) {
  const b = el("button", text, what);
  b.type = "button";
  b.addEventListener("click", () => act(what, handle));
  return b;
}
let query = "";
function renderHistory(h) {
  $("history-off").textContent = h.enabled ? "" : "(off: --history-max 0)";
  const rows = [];
  for (const entries of Object.values(h.functions)) rows.push(...entries);
  rows.sort((a, b) => b.ended - a.ended);
  fill("history", rows.map(historyRow), "no job ended yet");
  $("dead-total").textContent = h.dead_total > h.dead.length ?
    "(" + h.dead.length + " of " + h.dead_total + " shown)" : "";
  fill("dead", h.dead.map((d) => {
    const tr = el("tr");
    tr.dataset.handle = d.handle;
    const actions = el("span");
    actions.append(button("Retry", "retry", d.handle), button("Delete", "delete", d.handle));
    tr.append(cell(d.function), cell(el("code", d.handle)), cell(d.unique),
      cell(d.attempts, "n"), cell(d.died ? clock(d.died) : "-"),
      errorCell(d.error, d.handle), dataCell(d), cell(actions));
    return tr;
  }), "no dead letter");
  if (h.found === null) {
    $("found-section").hidden = true;
  } else {
    $("found-section").hidden = false;
    fill("found", h.found.map(historyRow), "nothing known of " + h.query);
  }
}
async function pollHistory() {
  const response = await fetch("history.json?q=" + encodeURIComponent(query),
    {cache: "no-store"});
  if (!response.ok) throw new Error("HTTP " + response.status);
  renderHistory(await response.json());
}
$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  query = $("q").value.trim();
  pollHistory();
});
async function poll() {
  try {
    const response = await fetch("status.json", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    await pollHistory();
    $("state").textContent = "updated " + clock(Date.now() / 1000);
    $("state").className = "";
    $("state").dataset.polls = (+$("state").dataset.polls || 0) + 1;  // seen by tests
  } catch (err) {
    $("state").textContent = "cannot reach the server (" + err.message + "); retrying";
    $("state").className = "stale";
  }
  setTimeout(poll, 1000);
}
poll();
"""

_BODY = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gearoffload status</title>
<style>{style}</style>
</head>
<body>
<h1>gearoffload <span id="version"></span></h1>
<p><span id="state">loading&hellip;</span> <span id="draining" class="draining"></span></p>
<noscript><p>This page needs JavaScript; the same data is at
<a href="status.json">status.json</a> and <a href="metrics">metrics</a>.</p></noscript>
<p class="totals">
<span>submitted <b id="t-submitted">-</b></span>
<span>coalesced <b id="t-coalesced">-</b></span>
<span>completed <b id="t-completed">-</b></span>
<span>failed <b id="t-failed">-</b></span>
<span>live jobs <b id="t-jobs">-</b></span>
<span>dead letters <b id="t-dead_letters">-</b></span>
<span>connections <b id="t-connections">-</b></span>
<span>workers <b id="t-workers">-</b></span>
</p>
<h2>Functions</h2>
<table>
<thead><tr><th>function</th><th class="n">high</th><th class="n">normal</th><th class="n">low</th>
<th class="n">scheduled</th><th class="n">running</th><th class="n">workers</th>
<th class="n">completed</th><th class="n">failed</th></tr></thead>
<tbody id="functions"></tbody>
</table>
<h2>Running jobs <span id="running-total"></span></h2>
<table>
<thead><tr><th>handle</th><th>function</th><th>unique</th><th>progress</th>
<th class="n">age</th><th>worker</th></tr></thead>
<tbody id="running"></tbody>
</table>
<h2>Recent failures</h2>
<table>
<thead><tr><th>time</th><th>function</th><th>handle</th><th>unique</th><th>what</th>
<th>detail</th></tr></thead>
<tbody id="failures"></tbody>
</table>
<h2>Dead letters <span id="dead-total"></span></h2>
<p id="action-state"></p>
<table>
<thead><tr><th>function</th><th>handle</th><th>unique</th><th class="n">attempts</th>
<th>died</th><th>error</th><th>data</th><th></th></tr></thead>
<tbody id="dead"></tbody>
</table>
<h2>Job history <span id="history-off"></span></h2>
<form id="search"><label>find a job by handle or unique key
<input id="q" name="q" size="40"></label> <button type="submit">Find</button></form>
<div id="found-section" hidden>
<h2>Found</h2>
<table>
<thead><tr><th>ended</th><th>function</th><th>handle</th><th>unique</th><th>outcome</th>
<th class="n">duration</th><th class="n">attempts</th><th>error</th></tr></thead>
<tbody id="found"></tbody>
</table>
</div>
<h2>Recent jobs</h2>
<table>
<thead><tr><th>ended</th><th>function</th><th>handle</th><th>unique</th><th>outcome</th>
<th class="n">duration</th><th class="n">attempts</th><th>error</th></tr></thead>
<tbody id="history"></tbody>
</table>
<script>{script}</script>
</body>
</html>
"""


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


#: The page: static; all data arrives through ``/status.json``.
PAGE: bytes = _BODY.format(style=_STYLE, script=_SCRIPT).encode()
#: Only this page's own script and style run; it may only fetch from its own origin.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_hash(_SCRIPT)}; style-src {_hash(_STYLE)}; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'")
