"""Kept results of background jobs and admin ``result``, in the state alone: no sockets, a
manual clock (docs/protocol.md, "Extension: kept results of background jobs"). Also issue
#17 item 5: a background submission coalescing onto a foreground job makes it durable."""

from __future__ import annotations

import base64
import gc
import itertools
import tracemalloc

import pytest
from test_state import Harness
from test_store_state import RowsStore

from conftest import compiled_and_source
from gearoffload.admin import KeptResult
from gearoffload.protocol import PacketType as T
from gearoffload_server.commit import fail_batch
from gearoffload_server.state import ENTRY_OVERHEAD, KeptResults, ManualScheduler
from gearoffload_server.stores import ResultRow

variant = compiled_and_source()  # the compiled state, and state.py


class ResultsStore(RowsStore):
    """RowsStore with kept results too: what a real store would have on disk."""

    def __init__(self, rows=(), results=()):
        super().__init__(rows)
        self.results = {r.id: r for r in results}  # by id, as on disk

    def load_results(self, now):
        rows = sorted(self.results.values())
        self._result_ids = itertools.count(rows[-1].id + 1 if rows else 1)
        return rows

    def write(self, batch):
        super().write(batch)
        for row in batch.result_puts:
            self.results[row[0]] = ResultRow(*row)
        for ident in batch.result_drops:
            del self.results[ident]  # a KeyError would be a drop of a row never kept

    def by_unique(self) -> dict:
        found = {}
        for row in self.results.values():
            assert row.unique not in found, f"two rows for {row.unique!r}"
            found[row.unique] = row
        return found


def result(h: Harness, unique: bytes) -> KeptResult:
    line = h.admin_text(b"result " + unique)
    assert line.endswith(b"\n") and not line.endswith(b"\r\n"), line
    return KeptResult.parse(line[:-1].decode())


def run_one(h: Harness, worker, *packets: tuple) -> bytes:
    """The worker grabs the next job and sends ``packets`` (type, *args after the handle)."""
    h.send(worker, T.GRAB_JOB)
    (ptype, args), = h.received(worker)
    assert ptype == T.JOB_ASSIGN
    handle = args[0]
    for ptype, *rest in packets:
        h.send(worker, ptype, handle, *rest)
    return handle


def test_queued_running_with_progress_done_then_expired():
    h = Harness(result_ttl=60)
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u1", b"x")
    assert result(h, b"u1") == KeptResult("queued", 0, 0, None, None, None)
    handle = run_one(h, worker, (T.WORK_STATUS, b"3", b"10"))
    assert result(h, b"u1") == KeptResult("running", 3, 10, None, None, None)
    h.clock.advance(5)
    h.send(worker, T.WORK_COMPLETE, handle, b"the \x00 result")
    assert h.received(client) == [(T.JOB_CREATED, (handle,))]  # and nothing else
    kept = result(h, b"u1")
    assert (kept.state, kept.numerator, kept.denominator, kept.data) == \
        ("done", 3, 10, b"the \x00 result")
    assert kept.expires_in == 60.0
    h.clock.advance(59.5)
    assert result(h, b"u1").expires_in == 0.5
    h.clock.advance(0.5)
    assert result(h, b"u1") == KeptResult("unknown", 0, 0, None, None, None)
    assert h.state.results.expired == 1 and not h.state.results.entries


def test_reply_line_is_exactly_as_documented():
    h = Harness()
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"report-7", b"x")
    run_one(h, worker, (T.WORK_STATUS, b"10", b"10"), (T.WORK_COMPLETE, b"42"))
    assert h.admin_text(b"result report-7") == \
        b"OK done 10 10 600.000 " + base64.b64encode(b"42") + b"\n"
    assert h.admin_text(b"RESULT never-seen") == b"OK unknown 0 0 - -\n"


def test_failed_by_exception_by_fail_and_after_job_retries():
    h = Harness(job_retries=1)
    client, worker = h.peer(), h.worker(b"f")
    for unique in (b"exc", b"fail", b"lost"):
        h.send(client, T.SUBMIT_JOB_BG, b"f", unique, b"x")
    run_one(h, worker, (T.WORK_EXCEPTION, b"Traceback: ZeroDivisionError"))
    run_one(h, worker, (T.WORK_FAIL,))
    run_one(h, worker)
    h.state.disconnect(worker)  # the worker dies holding "lost": --job-retries 1 fails it
    assert result(h, b"exc").data == b"Traceback: ZeroDivisionError"
    assert result(h, b"exc").state == "failed"
    assert h.admin_text(b"result fail") == b"OK failed 0 0 600.000 !empty\n"
    assert result(h, b"fail").data == b""
    assert (result(h, b"lost").state, result(h, b"lost").data) == ("failed", b"")
    assert not h.state.jobs


def test_dead_letter_after_retries_is_dead_with_the_last_text_and_queued_meanwhile():
    h = Harness(retry_failed=1, retry_backoff=10)
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    run_one(h, worker, (T.WORK_STATUS, b"1", b"2"), (T.WORK_EXCEPTION, b"first"))
    assert result(h, b"u").state == "queued"  # waiting for its retry
    h.clock.advance(10)
    run_one(h, worker, (T.WORK_STATUS, b"2", b"2"), (T.WORK_EXCEPTION, b"second"))
    kept = result(h, b"u")
    assert (kept.state, kept.numerator, kept.denominator, kept.data) == \
        ("dead", 2, 2, b"second")
    assert len(h.state.dead) == 1
    # Requeued from the dead letters, it is live again: the live state wins.
    handle = next(iter(h.state.dead))
    assert h.admin_text(b"requeue dead job " + handle) == b"OK\r\n"
    assert result(h, b"u").state == "queued"
    run_one(h, worker, (T.WORK_COMPLETE, b"at last"))
    assert (result(h, b"u").state, result(h, b"u").data) == ("done", b"at last")


def test_a_dead_letter_stays_readable_after_its_kept_result_expired():
    """A dead letter waits for a person longer than --result-ttl: ``result`` still says
    ``dead`` (with its error) while it exists, and ``unknown`` once it is deleted."""
    h = Harness(retry_failed=1, retry_backoff=0, result_ttl=60)
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    run_one(h, worker, (T.WORK_EXCEPTION, b"first"))
    h.clock.advance(0.01)
    run_one(h, worker, (T.WORK_EXCEPTION, b"second"))
    h.clock.advance(3600)  # the kept result is long gone
    h.state.results.get(b"u")  # (a read sweeps what expired)
    assert h.state.results.get(b"u") is None
    kept = result(h, b"u")
    assert (kept.state, kept.data) == ("dead", b"second")
    assert 59 <= kept.expires_in <= 60
    assert result(h, b"other").state == "unknown"
    handle = next(iter(h.state.dead))
    assert h.admin_text(b"delete dead job " + handle) == b"OK\r\n"
    assert result(h, b"u").state == "unknown"


def test_not_kept_foreground_no_unique_hyphen_or_cancelled():
    h = Harness()
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB, b"f", b"fg", b"x")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"", b"x")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"-", b"x")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"cancelled", b"x")
    for _ in range(3):
        run_one(h, worker, (T.WORK_COMPLETE, b"r"))
    handle = run_one(h, worker)
    assert h.admin_text(b"cancel job " + handle) == b"OK\r\n"
    h.send(worker, T.WORK_COMPLETE, handle, b"r")
    assert not h.state.results.entries and h.state.results.kept == 0
    for unique in (b"fg", b"-", b"cancelled"):
        assert result(h, unique).state == "unknown"


def test_newest_outcome_of_a_unique_wins_and_live_job_comes_first():
    h = Harness()
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u", b"1")
    run_one(h, worker, (T.WORK_COMPLETE, b"one"))
    h.clock.advance(30)
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u", b"2")
    assert result(h, b"u").state == "queued"
    run_one(h, worker, (T.WORK_COMPLETE, b"two"))
    kept = result(h, b"u")
    assert (kept.data, kept.expires_in) == (b"two", 600.0)
    assert len(h.state.results.entries) == 1


def test_too_large_result_is_kept_as_a_size_marker():
    h = Harness(result_max_size=10)
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"big", b"x")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"fits", b"x")
    run_one(h, worker, (T.WORK_COMPLETE, b"y" * 11))
    run_one(h, worker, (T.WORK_COMPLETE, b"y" * 10))
    assert h.admin_text(b"result big") == b"OK done 0 0 600.000 !toolarge:11\n"
    big = result(h, b"big")
    assert (big.state, big.data, big.too_large) == ("done", None, 11)
    assert result(h, b"fits").data == b"y" * 10
    assert h.state.results.oversized == 1


def test_memory_bound_evicts_the_oldest_first():
    data = b"d" * 1000
    per_result = ENTRY_OVERHEAD + len(b"u00") + len(data)
    h = Harness(result_memory=per_result * 5, result_max_size=1000)
    client, worker = h.peer(), h.worker(b"f")
    for i in range(8):
        h.send(client, T.SUBMIT_JOB_BG, b"f", b"u%02d" % i, b"x")
        run_one(h, worker, (T.WORK_COMPLETE, data))
        h.clock.advance(1)
    results = h.state.results
    assert list(results.entries) == [b"u%02d" % i for i in range(3, 8)]
    assert results.used == per_result * 5 and results.evicted == 3
    assert result(h, b"u00").state == "unknown"
    assert result(h, b"u07").data == data


def test_expired_results_are_swept_without_reads():
    h = Harness(result_ttl=10)
    client, worker = h.peer(), h.worker(b"f")
    for i in range(100):
        h.send(client, T.SUBMIT_JOB_BG, b"f", b"old%d" % i, b"x")
        run_one(h, worker, (T.WORK_COMPLETE, b"r"))
    h.clock.advance(11)
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"new", b"x")
    run_one(h, worker, (T.WORK_COMPLETE, b"r"))  # a keep sweeps the expired front
    assert list(h.state.results.entries) == [b"new"]
    assert h.state.results.expired == 100 and h.state.results.used == \
        ENTRY_OVERHEAD + 3 + 1


def test_results_off_with_ttl_zero_says_so():
    h = Harness(result_ttl=0)
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    run_one(h, worker, (T.WORK_COMPLETE, b"r"))
    assert h.state.results is None
    assert h.admin_text(b"result u") == (b"ERR RESULTS_DISABLED This+server+keeps+no+results+"
                                         b"of+background+jobs+(--result-ttl+0)\r\n")


@pytest.mark.parametrize("line", [
    b"result", b"result ", b"result a b", b"result " + b"x" * 65, b"result a\tb",
    b"result a\x00b", b"result \x7f", b"result a\rb",
])
def test_bad_arguments_get_an_err_line(line):
    h = Harness()
    reply = h.admin_text(line)
    assert reply.startswith(b"ERR INVALID_ARGUMENTS ") and reply.endswith(b"\r\n"), reply
    assert h.admin_text(b"result " + b"x" * 64) == b"OK unknown 0 0 - -\n"  # 64 is fine


def test_kept_result_goes_into_the_batch_that_deletes_the_row_and_comes_back():
    store = ResultsStore()
    h = Harness()
    h.state.store = store
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    store.commit()
    run_one(h, worker, (T.WORK_STATUS, b"1", b"1"), (T.WORK_COMPLETE, b"r"))
    batch = store.take_batch()
    assert batch.deletes and [row[1] for row in batch.result_puts] == [b"u"]  # one transaction
    store.write(batch)
    assert not store.rows and store.by_unique()[b"u"].data == b"r"
    # A restart: the result is back, with its expiry; an expired one is skipped.
    stale = ResultRow(0, b"stale", b"done", 0, 0, h.clock.now() + 5, b"s", 0)
    store.results[0] = stale
    h.clock.advance(10)
    again = Harness()
    again.clock.time = h.clock.now()
    again.state.store = store
    assert again.state.restore_results(store.load_results(again.clock.now())) == 1
    kept = result(again, b"u")
    assert (kept.state, kept.numerator, kept.data, kept.expires_in) == ("done", 1, b"r", 590)
    assert result(again, b"stale").state == "unknown"
    assert store.batch.result_drops == [0]  # deleted with the first batch
    store.commit()
    assert list(store.by_unique()) == [b"u"]
    # Kept again after the restart: a new id, and the old row goes.
    client, worker = again.peer(), again.worker(b"f")
    again.send(client, T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    run_one(again, worker, (T.WORK_COMPLETE, b"again"))
    store.commit()
    assert [(r.id, r.data) for r in store.results.values()] == [(2, b"again")]


def test_dropped_results_are_deleted_from_the_store_with_a_later_batch():
    store = ResultsStore()
    h = Harness(result_ttl=10)
    h.state.store = store
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"a", b"x")
    run_one(h, worker, (T.WORK_COMPLETE, b"r"))
    store.commit()
    h.clock.advance(11)
    assert result(h, b"a").state == "unknown"
    assert store.batch.result_drops == [1]
    store.commit()
    assert not store.results


def test_restore_caps_expiry_at_the_current_ttl_and_respects_the_memory_bound():
    clock = ManualScheduler()
    kept = KeptResults(100, 1 << 20, (ENTRY_OVERHEAD + 2 + 1) * 2, clock.now)
    rows = [ResultRow(i + 1, b"r%d" % i, b"done", 0, 0, clock.now() + 1000 + i, b"x", 0)
            for i in range(3)]
    assert kept.restore(rows) == 3
    assert list(kept.entries) == [b"r1", b"r2"] and kept.evicted == 1
    assert kept.get(b"r2").expires == clock.now() + 100


def test_entry_overhead_matches_what_a_kept_result_really_costs():
    """The figure --result-memory counts per result is close to tracemalloc's (not under
    it by more than a little, nor far over it)."""
    clock = ManualScheduler()
    kept = KeptResults(600, 1 << 20, 1 << 30, clock.now)
    uniques = [b"job-%08d" % i for i in range(20000)]
    data = [b"%064d" % i for i in range(20000)]  # made before: a worker's packet owns it
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for unique, value in zip(uniques, data, strict=True):
        kept.keep(unique, b"done", 0, 0, value)
    measured = (tracemalloc.get_traced_memory()[0] - before) / len(uniques)
    tracemalloc.stop()
    # Unique and data already existed here; in the server they are the job's and the
    # packet's, freed with them unless kept: count them as the estimate does.
    real = measured + (33 + 12) + (33 + 64)
    estimate = ENTRY_OVERHEAD + 12 + 64
    print(f"kept result: {measured:.0f} B of bookkeeping, {real:.0f} B with its unique "
          f"and 64 B of data; estimate {estimate} B")
    assert real * 0.8 <= estimate <= real * 1.5


# -- issue #17 item 5: a background submission onto a foreground job ------------------------


def test_background_onto_foreground_job_is_saved_held_and_survives_the_client():
    store = ResultsStore()
    h = Harness()
    h.state.store = store
    fg, bg, worker = h.peer(), h.peer(), h.worker(b"f")
    h.send(fg, T.SUBMIT_JOB, b"f", b"u", b"x")
    assert h.received(fg) == [(T.JOB_CREATED, (b"H:t:1",))]
    assert not store.batch.pending  # a foreground job is not stored
    h.send(bg, T.SUBMIT_JOB_BG, b"f", b"u", b"ignored")  # coalesces onto H:t:1
    job = h.state.jobs[b"H:t:1"]
    assert job.background and job.stored
    assert store.held[bg] is store.batch  # its JOB_CREATED is held until the save is durable
    batch = store.commit()
    assert [row[2] for row in batch.saves] == [b"u"] and batch.acks[0][0] is bg
    assert h.received(bg) == [(T.JOB_CREATED, (b"H:t:1",))]
    h.state.disconnect(fg)  # the foreground client goes away: the job stays
    assert b"H:t:1" in h.state.jobs
    run_one(h, worker, (T.WORK_COMPLETE, b"done"))
    store.commit()
    assert not store.rows and store.by_unique()[b"u"].data == b"done"
    assert result(h, b"u").state == "done"


def test_promoted_running_job_survives_its_clients_and_its_worker():
    h = Harness()
    fg, bg, worker = h.peer(), h.peer(), h.worker(b"f")
    h.send(fg, T.SUBMIT_JOB, b"f", b"u", b"x")
    run_one(h, worker)
    h.send(bg, T.SUBMIT_JOB_BG, b"f", b"u", b"x")  # onto the running job (no store)
    h.state.disconnect(fg)
    h.state.disconnect(worker)  # requeued, not dropped: someone still wants it
    assert result(h, b"u").state == "queued"
    other = h.worker(b"f")
    run_one(h, other, (T.WORK_COMPLETE, b"r"))
    assert result(h, b"u").data == b"r"


def test_failed_save_of_a_promoted_job_refuses_the_background_submission_only():
    store = ResultsStore()
    h = Harness()
    h.state.store = store
    fg, bg, late = h.peer(), h.peer(), h.peer()
    h.send(fg, T.SUBMIT_JOB, b"f", b"u", b"x")
    h.received(fg)
    h.send(bg, T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    h.send(late, T.SUBMIT_JOB, b"f", b"u", b"x")  # foreground, onto the unsaved job
    batch = store.take_batch()
    assert fail_batch(h.state, batch, b"disk full") == 0  # the job stays, for fg
    assert h.received(bg) == [(T.ERROR, (b"QUEUE_ERROR", b"disk full"))]
    assert h.received(late) == [(T.ERROR, (b"QUEUE_ERROR", b"disk full"))]
    job = h.state.jobs[b"H:t:1"]
    assert not job.background and not job.stored and job.clients == [fg]
    assert not late.attached and late.waiting == 0
    worker = h.worker(b"f")
    run_one(h, worker, (T.WORK_COMPLETE, b"r"))
    assert h.received(fg) == [(T.WORK_COMPLETE, (b"H:t:1", b"r"))]
    assert not h.state.jobs
