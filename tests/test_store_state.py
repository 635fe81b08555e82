"""Queue stores seen from the state: saves, deletes, replay, a failed write (no I/O)."""

from __future__ import annotations

from test_state import Harness

from conftest import compiled_and_source
from gearoffload.protocol import PacketType as T
from gearoffload_server.commit import fail_batch
from gearoffload_server.stores import (
    QueueStore,
    StoredJob,
    open_store,
    parse_queue_url,
    with_default_prefix,
)
from gearoffload_server.stores.sqlite import SqliteStore

variant = compiled_and_source()  # the compiled state, and state.py


class RowsStore(QueueStore):
    """A store that keeps rows in a dict: what a real one would have on disk."""

    def __init__(self, rows=()):
        super().__init__()
        self.rows = {r.id: r for r in rows}

    def load(self):
        return sorted(self.rows.values())

    def write(self, batch):
        for row in batch.saves:
            self.rows[row[0]] = StoredJob(*row)
        for dead, died, attempts, failures, error, ident in batch.marks:
            self.rows[ident] = self.rows[ident]._replace(
                dead=dead, died=died, attempts=attempts, failures=failures, error=error)
        if batch.last_handle:
            self.last_handle = batch.last_handle
        for ident in batch.deletes:
            self.rows.pop(ident, None)

    def commit(self, state=None):
        """What the committer does (``commit.GroupCommit``), at once."""
        batch = self.take_batch()
        if state is not None:
            batch.last_handle = state.last_handle()
        self.write(batch)
        batch.done = True
        return batch


def harness(store, **config):
    h = Harness(**config)
    h.state.store = store
    return h


def test_background_jobs_are_saved_per_job_and_deleted_when_they_end():
    store = RowsStore()
    h = harness(store)
    client, worker = h.peer(), h.worker(b"f")
    for _ in range(2):  # two empty uniques: two rows, never one (Q11)
        h.send(client, T.SUBMIT_JOB_BG, b"f", b"", b"x")
    h.send(client, T.SUBMIT_JOB, b"f", b"", b"foreground")  # not stored
    assert store.held[client] is store.batch
    batch = store.commit()
    assert len(store.rows) == 2 and batch.done
    h.send(worker, T.GRAB_JOB)
    handle = h.received(worker)[0][1][0]
    h.send(worker, T.WORK_COMPLETE, handle, b"")
    store.commit()
    assert len(store.rows) == 1


def test_coalesced_submission_waits_for_the_batch_of_the_job():
    store = RowsStore()
    h = harness(store)
    a, b = h.peer(), h.peer()
    h.send(a, T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    batch = store.take_batch()  # being written
    h.send(b, T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    assert store.held[b] is batch and len(batch.acks) == 2
    assert not store.batch.pending


def test_failed_write_turns_job_created_into_queue_error_and_drops_the_jobs():
    store = RowsStore()
    h = harness(store)
    client, other = h.peer(), h.peer()
    h.send(client, T.ECHO_REQ, b"before")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u1", b"x")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"", b"y")
    h.send(other, T.SUBMIT_JOB, b"f", b"u1", b"x")  # foreground onto the unsaved job
    h.send(client, T.ECHO_REQ, b"after")
    batch = store.take_batch()
    assert fail_batch(h.state, batch, b"Job could not be saved: disk full") == 2
    got = h.received(client)
    assert [t for t, _ in got] == [T.ECHO_RES, T.ERROR, T.ERROR, T.ECHO_RES]
    assert got[1][1] == (b"QUEUE_ERROR", b"Job could not be saved: disk full")
    assert h.received(other) == [(T.ERROR, (b"QUEUE_ERROR", b"Job could not be saved: disk full"))]
    assert not h.state.jobs and not other.attached
    assert not store.batch.deletes  # nothing was stored, nothing to delete
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u1", b"x")  # the unique is free again
    assert h.received(client)[0][0] == T.JOB_CREATED


def test_restore_keeps_priority_fifo_uniques_and_epoch_times():
    now = 1_000_000
    rows = [
        StoredJob(1, b"f", b"", 2, b"low1", 0, None),
        StoredJob(2, b"f", b"n1", 1, b"normal1", 0, None),
        StoredJob(3, b"f", b"", 0, b"high1", 0, None),
        StoredJob(4, b"f", b"later", 1, b"epoch", now + 60, None),
        StoredJob(5, b"f", b"", 1, b"normal2", 0, None),
        StoredJob(6, b"f", b"", 0, b"high2", 0, None),
        StoredJob(7, b"f", b"r", 1, b"reduce", 0, b"red"),
    ]
    store = RowsStore(rows)
    h = harness(store)
    assert h.state.restore(store.load()) == 7
    client = h.peer()
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"n1", b"again")  # coalesces onto row 2
    assert h.received(client)[0][1][0] == b"H:t:2"
    assert not store.batch.pending
    worker = h.worker(b"f")
    order = []
    for _ in range(6):
        h.send(worker, T.GRAB_JOB_ALL)
        (ptype, args), = h.received(worker)
        order.append(args[-1])
        h.send(worker, T.WORK_COMPLETE, args[0], b"")
    assert order == [b"high1", b"high2", b"normal1", b"normal2", b"reduce", b"low1"]
    h.send(worker, T.GRAB_JOB)
    assert h.received(worker)[0][0] == T.NO_JOB  # the epoch job is not due yet
    h.clock.advance(61)
    h.send(worker, T.GRAB_JOB)
    assert h.received(worker)[0][1][2] == b"epoch"
    assert sorted(store.batch.deletes) == [1, 2, 3, 5, 6, 7]


def test_sqlite_store_round_trip_and_ids_continue(tmp_path):
    path = str(tmp_path / "q.db")
    store = open_store("sqlite://" + path)
    assert isinstance(store, SqliteStore) and store.load() == []
    h = harness(store)
    client = h.peer()
    h.send(client, T.SUBMIT_JOB_EPOCH, b"f", b"e", b"2000000", b"d1")
    h.send(client, T.SUBMIT_REDUCE_JOB_BACKGROUND, b"f", b"", b"red", b"agg", b"d2")
    store.write(store.take_batch())
    store.close()
    store = open_store("sqlite://" + path + "?synchronous=normal")
    rows = store.load()
    assert rows == [StoredJob(1, b"f", b"e", 1, b"d1", 2000000, None, b"H:t:1"),
                    StoredJob(2, b"f", b"", 1, b"d2", 0, b"red", b"H:t:2")]
    h = harness(store)
    h.send(h.peer(), T.SUBMIT_JOB_BG, b"f", b"", b"d3")
    assert store.batch.saves[0][0] == 3
    store.close()


def test_queue_urls():
    assert parse_queue_url("memory") == ("memory", "", {})
    assert parse_queue_url("sqlite:///var/q.db?max_size=1M") == (
        "sqlite", "/var/q.db", {"max_size": "1m"})
    assert parse_queue_url("sqlite://rel.db") == ("sqlite", "rel.db", {})
    assert parse_queue_url("redis://h:6380/2?prefix=eu1") == (
        "redis", "redis://h:6380/2", {"prefix": "eu1"})
    assert parse_queue_url("redis://h") == ("redis", "redis://h", {})
    assert with_default_prefix("redis://h:6379/0", 4730) == \
        "redis://h:6379/0?prefix=gearoffload:4730"
    assert with_default_prefix("redis://h/0?prefix=x", 4730) == "redis://h/0?prefix=x"
    assert with_default_prefix("sqlite://q.db", 4730) == "sqlite://q.db"
    for bad in ("postgres://x", "sqlite://", "sqlite:///q.db?synchronous=off",
                "sqlite:///q.db?foo=1", "redis://h:0/0", "redis://h:99999/0",
                "redis://h:6379/db", "redis://h/0?prefix=", "redis://h/0?db=1"):
        try:
            parse_queue_url(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_failed_background_job_retries_with_backoff_then_becomes_a_dead_letter():
    store = RowsStore()
    h = harness(store, retry_failed=2, retry_backoff=1.0)
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    h.send(client, T.SUBMIT_JOB, b"f", b"", b"foreground")
    store.commit()
    h.received(client)

    def run(answer):
        h.send(worker, T.GRAB_JOB_UNIQ)
        (ptype, args), = h.received(worker)
        assert ptype == T.JOB_ASSIGN_UNIQ, ptype
        h.send(worker, answer, args[0], *((b"boom",) if answer == T.WORK_EXCEPTION else ()))
        return args

    handle = run(T.WORK_FAIL)[0]  # background: retried, not dropped
    assert run(T.WORK_FAIL)[3] == b"foreground"  # foreground: failed for its client
    assert h.received(client) == [(T.WORK_FAIL, (b"H:t:2",))]
    h.send(worker, T.GRAB_JOB)
    assert h.received(worker)[0][0] == T.NO_JOB  # back-off: 1 s
    h.clock.advance(1)
    assert run(T.WORK_EXCEPTION)[0] == handle
    h.clock.advance(1.5)
    h.send(worker, T.GRAB_JOB)
    assert h.received(worker)[0][0] == T.NO_JOB  # doubled: 2 s
    h.clock.advance(0.5)
    run(T.WORK_FAIL)  # third failure: retries used up
    assert h.admin_text(b"status") == b"f\t0\t0\t1\n.\n"
    assert h.admin_text(b"show dead jobs") == b"H:t:1\tf\tu\t3\n.\n"
    store.commit(h.state)
    assert [r.dead for r in store.rows.values()] == [1]

    # After a restart the dead letter is still one, not a queued job.
    # Its handle, failures, death time and error stay too (a restart used to lose them).
    died = h.state.dead_info[b"H:t:1"].died
    h2 = harness(RowsStore(store.load()), retry_failed=2)
    assert h2.state.restore(h2.state.store.load(), store.last_handle) == 1
    assert h2.admin_text(b"status") == b"f\t0\t0\t0\n.\n"
    assert h2.admin_text(b"show dead jobs") == b"H:t:1\tf\tu\t3\n.\n"
    assert h2.state.dead_info[b"H:t:1"] == (died, 3, "")
    # New handles continue past every handle issued before the restart (H:t:2 was a
    # foreground job, never stored): none names two jobs.
    h2.send(client2 := h2.peer(), T.SUBMIT_JOB, b"f", b"", b"x")
    assert h2.received(client2) == [(T.JOB_CREATED, (b"H:t:3",))]

    assert h.admin_text(b"requeue dead job H:t:9") == b"ERR UNKNOWN_JOB\r\n"
    assert h.admin_text(b"requeue dead job H:t:1") == b"OK\r\n"
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u", b"x")  # coalesces onto it again
    assert h.received(client) == [(T.JOB_CREATED, (b"H:t:1",))]
    h.send(worker, T.GRAB_JOB)
    (ptype, args), = h.received(worker)
    h.send(worker, T.WORK_COMPLETE, args[0], b"")
    store.commit()
    assert not store.rows and h.admin_text(b"show dead jobs") == b".\n"


def test_redis_rows_round_trip():
    from gearoffload_server.stores.redis import _pack, _unpack

    for row in [(7, b"f", b"", 1, b"data", 0, None),
                (8, b"fn:x", b"u\x00nique", 0, b"", 1893456000, b"reduce"),
                (9, b"f", b"u", 2, bytes(range(256)) * 3, 0, b"")]:
        assert _unpack(row[0], _pack(row), 1) == StoredJob(*row, dead=1)


def test_sqlite_file_of_an_older_version_gains_the_new_columns(tmp_path):
    """A queue file written before handles and dead-letter data were stored opens, its
    rows load (fresh handles for them), and new rows keep their handles."""
    import sqlite3

    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE gearoffload_jobs (id INTEGER PRIMARY KEY, function BLOB NOT "
               "NULL, unique_key BLOB NOT NULL, priority INTEGER NOT NULL, data BLOB NOT "
               "NULL, due INTEGER NOT NULL, reducer BLOB, dead INTEGER NOT NULL DEFAULT 0)")
    db.execute("INSERT INTO gearoffload_jobs VALUES (4, x'66', x'75', 1, x'64', 0, NULL, 1)")
    db.commit()
    db.close()
    store = open_store("sqlite://" + path)
    assert store.load() == [StoredJob(4, b"f", b"u", 1, b"d", 0, None, dead=1)]
    assert store.last_handle == 0
    h = harness(store)
    assert h.state.restore(store.load(), store.last_handle) == 1
    assert h.admin_text(b"show dead jobs") == b"H:t:1\tf\tu\t0\n.\n"
    h.send(client := h.peer(), T.SUBMIT_JOB_BG, b"f", b"", b"new")
    assert h.received(client) == [(T.JOB_CREATED, (b"H:t:2",))]
    batch = store.take_batch()
    batch.last_handle = h.state.last_handle()
    store.write(batch)
    store.close()
    store = open_store("sqlite://" + path)
    assert [row.handle for row in store.load()] == [b"", b"H:t:2"]
    assert store.last_handle == 2
    store.close()
