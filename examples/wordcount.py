"""Map/reduce word count over files with gearoffload.

The reducer task ``wordcount`` receives a JSON list of file paths, submits one
``count_words`` sub-job per file (the map step) through a ``Client``, and merges the
partial counts. The two tasks are served by **two separate Workers**, each with its own
concurrency: however many ``wordcount`` jobs are waiting for their sub-jobs, the
``count_words`` worker always has free slots, so the reducers cannot starve the mappers
of workers (the classic deadlock when every worker waits on sub-jobs).

Run it (starts a private gearoffload server when ``--servers`` is not given)::

    python examples/wordcount.py README.md docs/*.md
    python examples/wordcount.py --servers 127.0.0.1:4730 *.txt

Or serve the two halves with the process pool, in separate pools::

    gearoffload-worker examples.wordcount:mappers --processes 4      # CPU-bound: processes
    gearoffload-worker examples.wordcount:reducers --processes 1 --concurrency 50
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time

import gevent

from gearoffload import Client, TaskRegistry, Worker
from gearoffload.worker import WorkerJob

WORD = re.compile(r"[a-z0-9']+")

#: Where the reducer submits its sub-jobs; set by ``main()`` or by the environment.
SERVERS = os.environ.get("GEAROFFLOAD_SERVERS", "127.0.0.1:4730")

mappers = TaskRegistry()
reducers = TaskRegistry()
_client: Client | None = None


def client() -> Client:
    """One Client per process, shared by every reducer greenlet (it multiplexes)."""
    global _client
    if _client is None:
        _client = Client(SERVERS, timeout=60)
    return _client


@mappers.task("count_words")
def count_words(job: WorkerJob) -> str:
    """Map: the data is a text; the result is a JSON object word -> count."""
    counts = collections.Counter(WORD.findall(job.data.decode("utf-8", "replace").lower()))
    return json.dumps(counts)


@reducers.task("wordcount")
def wordcount(job: WorkerJob) -> str:
    """Reduce: the data is a JSON list of paths; the result is a JSON object word -> count."""
    paths = json.loads(job.data)
    texts = []
    for path in paths:
        with open(path, "rb") as f:
            texts.append(f.read())
    # One pipelined batch of sub-jobs. The unique is the content's hash: two identical
    # files (or two reducers counting the same file at once) share one execution.
    subjobs = client().submit_many([
        ("count_words", text, {"unique": hashlib.sha1(text).hexdigest()}) for text in texts
    ])
    total: collections.Counter = collections.Counter()
    for done, subjob in enumerate(subjobs, 1):
        # Always bound the wait: a lost sub-job must not hold this slot forever.
        total.update(json.loads(subjob.result(timeout=60)))
        job.send_status(done, len(subjobs))
    return json.dumps(total)


def run_workers(servers: str, map_concurrency: int = 8, reduce_concurrency: int = 2
                ) -> tuple[Worker, Worker]:
    """Start a mapper Worker and a reducer Worker in greenlets of this process."""
    global SERVERS
    SERVERS = servers
    map_worker = Worker(servers, concurrency=map_concurrency, registry=mappers)
    reduce_worker = Worker(servers, concurrency=reduce_concurrency, registry=reducers)
    gevent.spawn(map_worker.work)
    gevent.spawn(reduce_worker.work)
    return map_worker, reduce_worker


def _start_private_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gearoffload_server", "--port", str(port)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--servers", help="host:port,...; default: start a private server")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    server = None
    servers = args.servers
    if not servers:
        server, servers = _start_private_server()
    try:
        map_worker, reduce_worker = run_workers(servers)
        with Client(servers, timeout=120) as submitter:
            paths = [os.path.abspath(p) for p in args.files]
            counts = json.loads(submitter.submit("wordcount", json.dumps(paths)).result())
        for word, count in collections.Counter(counts).most_common(args.top):
            print(f"{count:8d} {word}")
        map_worker.stop()
        reduce_worker.stop()
    finally:
        if _client is not None:
            _client.close()
        if server is not None:
            server.terminate()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
