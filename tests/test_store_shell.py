"""The I/O shell's group commit, in-process with a store whose writes the test releases.

Proves the core promise directly: no JOB_CREATED for a background job leaves before its
batch is written, other peers are not held meanwhile, a pipelining client's replies come
out batch by batch and in order, and a failed write becomes ERROR QUEUE_ERROR.
"""

from __future__ import annotations

import gevent
import gevent.socket
import pytest
from gevent import monkey

from gearoffload.protocol import RES, Decoder, encode_request
from gearoffload.protocol import PacketType as T
from gearoffload_server import commit as commit_module
from gearoffload_server import server as server_module
from gearoffload_server.config import ServerConfig
from gearoffload_server.server import GearmanServer
from gearoffload_server.stores import QueueStore, StoreError

RealEvent = monkey.get_original("threading", "Event")
RealLock = monkey.get_original("threading", "Lock")


class GatedStore(QueueStore):
    """Each ``write`` (in the shell's thread) waits until the test opens a gate for it."""

    def __init__(self):
        super().__init__()
        self.gates: list = []
        self.written: list = []
        self.fail_next = False
        self._lock = RealLock()

    def load(self):
        return []

    def gate(self, index: int):
        with self._lock:
            while len(self.gates) <= index:
                self.gates.append(RealEvent())
            return self.gates[index]

    def write(self, batch):
        index = len(self.written)
        self.written.append(batch)
        if not self.gate(index).wait(10):
            raise StoreError("gate never opened")
        if self.fail_next:
            self.fail_next = False
            raise StoreError("queue database x: database or disk is full")


class Conn:
    def __init__(self, port: int):
        self.sock = gevent.socket.create_connection(("127.0.0.1", port))
        self.decoder = Decoder(magic=RES, text=False)
        self.pending: list = []

    def send(self, ptype: int, *args: bytes) -> None:
        self.sock.sendall(encode_request(ptype, *args))

    def packets(self, count: int, timeout: float = 3.0) -> list:
        with gevent.Timeout(timeout):
            while len(self.pending) < count:
                data = self.sock.recv(65536)
                assert data
                self.pending.extend(self.decoder.feed(data))
        got, self.pending = self.pending[:count], self.pending[count:]
        return [(p.type, p.args) for p in got]

    def nothing(self, wait: float = 0.2) -> None:
        with gevent.Timeout(wait, False):
            data = self.sock.recv(65536)
            self.pending.extend(self.decoder.feed(data))
        assert not self.pending, self.pending


@pytest.fixture
def gated(monkeypatch):
    store = GatedStore()
    monkeypatch.setattr(server_module, "open_store", lambda url: store)
    srv = GearmanServer(ServerConfig(port=0, handle_prefix="H:g", queue="memory"),
                        ("127.0.0.1", 0))
    srv.start()
    yield srv, store
    for gate in store.gates:
        gate.set()
    srv.stop()


def wait_for(predicate, timeout: float = 3.0) -> None:
    with gevent.Timeout(timeout):
        while not predicate():
            gevent.sleep(0.005)


def test_job_created_waits_for_the_commit_others_do_not(gated):
    srv, store = gated
    port = srv.server_port
    client, other, worker = Conn(port), Conn(port), Conn(port)
    client.send(T.SUBMIT_JOB_BG, b"f", b"", b"one")
    wait_for(lambda: store.written)  # batch 0 is being written
    client.nothing()
    other.send(T.ECHO_REQ, b"hi")
    assert other.packets(1) == [(T.ECHO_RES, (b"hi",))]  # not held
    other.send(T.SUBMIT_JOB, b"g", b"", b"fg")  # foreground jobs are not stored
    assert other.packets(1)[0][0] == T.JOB_CREATED
    worker.send(T.CAN_DO, b"f")
    worker.send(T.GRAB_JOB)
    assert worker.packets(1)[0][0] == T.JOB_ASSIGN

    # The client pipelines on: its replies stay behind the first batch, in order.
    client.send(T.SUBMIT_JOB_BG, b"f", b"", b"two")
    client.send(T.ECHO_REQ, b"after-two")
    client.nothing()
    store.gate(0).set()
    assert client.packets(1) == [(T.JOB_CREATED, (b"H:g:1",))]
    wait_for(lambda: len(store.written) == 2)  # batch 1: job two
    client.nothing()
    store.gate(1).set()
    assert client.packets(2) == [(T.JOB_CREATED, (b"H:g:3",)), (T.ECHO_RES, (b"after-two",))]


def test_failed_write_answers_queue_error_and_keeps_serving(gated):
    srv, store = gated
    port = srv.server_port
    client, coalescer = Conn(port), Conn(port)
    store.fail_next = True
    client.send(T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    wait_for(lambda: store.written)
    coalescer.send(T.SUBMIT_JOB, b"f", b"u", b"x")  # attaches to the unsaved job
    coalescer.nothing()
    store.gate(0).set()
    error = (T.ERROR, (b"QUEUE_ERROR",
                       b"Job could not be saved: queue database x: database or disk is full"))
    assert client.packets(1) == [error]
    assert coalescer.packets(1) == [error]
    assert not srv.state.jobs
    store.gate(1).set()
    client.send(T.SUBMIT_JOB_BG, b"f", b"u", b"x")  # the next batch is fine again
    assert client.packets(1)[0][0] == T.JOB_CREATED


def _complete_one_job(srv, store, client, worker) -> None:
    """Submit a background job, let its save through, run it: its delete is now pending."""
    client.send(T.SUBMIT_JOB_BG, b"f", b"", b"one")
    wait_for(lambda: store.written)
    store.gate(0).set()
    handle = client.packets(1)[0][1][0]
    worker.send(T.CAN_DO, b"f")
    worker.send(T.GRAB_JOB)
    assert worker.packets(1)[0] == (T.JOB_ASSIGN, (handle, b"f", b"one"))
    worker.send(T.WORK_COMPLETE, handle, b"done")
    wait_for(lambda: store.batch.deletes)


def test_deletes_linger_until_a_submission_needs_a_commit(gated, monkeypatch):
    """A batch of deletes alone waits (DELETE_LINGER) so that a drain commits many at
    once; a submission that arrives meanwhile is written at once, with those deletes."""
    monkeypatch.setattr(commit_module, "DELETE_LINGER", 30.0)
    srv, store = gated
    client, worker = Conn(srv.server_port), Conn(srv.server_port)
    _complete_one_job(srv, store, client, worker)
    gevent.sleep(0.3)
    assert len(store.written) == 1  # the delete lingers
    client.send(T.SUBMIT_JOB_BG, b"f", b"", b"two")
    wait_for(lambda: len(store.written) == 2)  # well before the 30 s linger
    batch = store.written[1]
    assert len(batch.saves) == 1 and len(batch.deletes) == 1
    store.gate(1).set()
    assert client.packets(1)[0][0] == T.JOB_CREATED


def test_lingering_deletes_are_written_after_the_linger(gated, monkeypatch):
    monkeypatch.setattr(commit_module, "DELETE_LINGER", 0.2)
    srv, store = gated
    client, worker = Conn(srv.server_port), Conn(srv.server_port)
    _complete_one_job(srv, store, client, worker)
    wait_for(lambda: len(store.written) == 2)
    batch = store.written[1]
    assert not batch.saves and len(batch.deletes) == 1


def test_lingering_ends_once_delete_batch_rows_are_waiting(gated, monkeypatch):
    monkeypatch.setattr(commit_module, "DELETE_LINGER", 30.0)
    monkeypatch.setattr(commit_module, "DELETE_BATCH", 2)
    srv, store = gated
    client, worker = Conn(srv.server_port), Conn(srv.server_port)
    client.sock.sendall(encode_request(T.SUBMIT_JOB_BG, b"f", b"", b"one") +
                        encode_request(T.SUBMIT_JOB_BG, b"f", b"", b"two"))  # one batch
    wait_for(lambda: store.written)
    store.gate(0).set()
    handles = [p[1][0] for p in client.packets(2)]
    worker.send(T.CAN_DO, b"f")
    for handle in handles:
        worker.send(T.GRAB_JOB)
        assert worker.packets(1)[0][1][0] == handle
        if handle == handles[0]:
            worker.send(T.WORK_COMPLETE, handle, b"")
            gevent.sleep(0.3)
            assert len(store.written) == 1  # one delete: it lingers
    worker.send(T.WORK_COMPLETE, handles[1], b"")
    wait_for(lambda: len(store.written) == 2)  # two: DELETE_BATCH, written long before 30 s
    assert len(store.written[1].deletes) == 2
