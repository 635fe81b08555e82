"""The job state on its own: no sockets, a manual clock."""

from __future__ import annotations

import pytest

from conftest import compiled_and_source
from gearoffload.protocol import REQ, RES, Decoder, Packet
from gearoffload.protocol import PacketType as T
from gearoffload_server.admin import AdminProtocol
from gearoffload_server.config import ServerConfig
from gearoffload_server.state import JobServerState, ManualScheduler, Peer

variant = compiled_and_source()  # the compiled state, and state.py


class Harness:
    def __init__(self, **config):
        config.setdefault("handle_prefix", "H:t")
        self.clock = ManualScheduler()
        self.state = JobServerState(ServerConfig(**config), self.clock)
        self.admin = AdminProtocol(self.state)
        self._fd = 10

    def peer(self) -> Peer:
        self._fd += 1
        return self.state.connect(Peer(fd=self._fd, address="127.0.0.1"))

    def send(self, peer: Peer, ptype: int, *args: bytes) -> None:
        self.state.handle(peer, Packet(REQ, ptype, args))

    @staticmethod
    def received(peer: Peer) -> list[tuple[int, tuple[bytes, ...]]]:
        """Everything queued for ``peer`` since the last call, decoded."""
        data = peer.take_output() if peer.out else b""
        packets = list(Decoder(magic=RES, text=False).feed(data))
        return [(p.type, p.args) for p in packets]

    def worker(self, *functions: bytes) -> Peer:
        w = self.peer()
        for f in functions:
            self.send(w, T.CAN_DO, f)
        return w

    def sleep(self, worker: Peer) -> None:
        self.send(worker, T.PRE_SLEEP)

    def admin_text(self, line: bytes) -> bytes:
        p = self.peer()
        self.admin.handle(p, line)
        out = p.take_output()
        self.state.disconnect(p)
        return out


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_coalescing_thousand_submissions_one_assignment(h):
    worker = h.worker(b"slow")
    clients = [h.peer() for _ in range(1000)]
    for c in clients:
        h.send(c, T.SUBMIT_JOB, b"slow", b"key", b"data")
    handles = {h.received(c)[0] for c in clients}
    assert handles == {(T.JOB_CREATED, (b"H:t:1",))}
    h.send(worker, T.GRAB_JOB_UNIQ)
    assert h.received(worker) == [(T.JOB_ASSIGN_UNIQ, (b"H:t:1", b"slow", b"key", b"data"))]
    h.send(worker, T.GRAB_JOB_UNIQ)
    assert h.received(worker) == [(T.NO_JOB, ())]
    h.send(worker, T.WORK_COMPLETE, b"H:t:1", b"result")
    assert all(h.received(c) == [(T.WORK_COMPLETE, (b"H:t:1", b"result"))] for c in clients)
    assert not h.state.jobs
    # The window has closed: the same unique makes a new job.
    h.send(clients[0], T.SUBMIT_JOB, b"slow", b"key", b"data")
    assert h.received(clients[0]) == [(T.JOB_CREATED, (b"H:t:2",))]


def test_hyphen_unique_coalesces_on_data_only(h):
    c = h.peer()
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"-", b"same")
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"-", b"same")
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"-", b"other")
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"same", b"same")
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"-", b"")
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"-", b"")
    assert [args[0] for _, args in h.received(c)] == [
        b"H:t:1", b"H:t:1", b"H:t:2", b"H:t:3", b"H:t:4", b"H:t:5"]
    assert h.admin_text(b"show unique jobs") == b"-\n-\nsame\n-\n-\n.\n"


def test_same_connection_attached_twice_gets_results_twice(h):
    c, w = h.peer(), h.worker(b"f")
    h.send(c, T.SUBMIT_JOB, b"f", b"u", b"x")
    h.send(c, T.SUBMIT_JOB_HIGH, b"f", b"u", b"y")
    h.received(c)
    h.send(w, T.GRAB_JOB)
    assert h.received(w) == [(T.JOB_ASSIGN, (b"H:t:1", b"f", b"x"))]  # first data wins
    h.send(w, T.WORK_DATA, b"H:t:1", b"d")
    h.send(w, T.WORK_COMPLETE, b"H:t:1", b"r")
    assert h.received(c) == [(T.WORK_DATA, (b"H:t:1", b"d"))] * 2 + [
        (T.WORK_COMPLETE, (b"H:t:1", b"r"))] * 2


def test_one_noop_per_runnable_job_no_thundering_herd(h):
    workers = [h.worker(b"f") for _ in range(5)]
    for w in workers:
        h.sleep(w)
    c = h.peer()
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"", b"1")
    woken = [w for w in workers if h.received(w) == [(T.NOOP, ())]]
    assert len(woken) == 1
    # A second job before the first worker grabs wakes a second sleeper, not the first again.
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"", b"2")
    woken2 = [w for w in workers if h.received(w) == [(T.NOOP, ())]]
    assert len(woken2) == 1 and woken2 != woken


def test_worker_wakeup_zero_wakes_all(h):
    h = Harness(worker_wakeup=0)
    workers = [h.worker(b"f") for _ in range(4)]
    for w in workers:
        h.sleep(w)
    h.send(h.peer(), T.SUBMIT_JOB_BG, b"f", b"", b"1")
    assert all(h.received(w) == [(T.NOOP, ())] for w in workers)


def test_woken_worker_taking_other_work_wakes_another_sleeper(h):
    both, only_f = h.worker(b"g", b"f"), h.worker(b"f")
    c = h.peer()
    h.sleep(both)
    h.send(c, T.SUBMIT_JOB_BG, b"g", b"", b"for g")
    assert h.received(both) == [(T.NOOP, ())]
    h.sleep(only_f)
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"", b"for f")
    # `both` is already woken and can do f: one woken worker per runnable job is enough...
    assert h.received(only_f) == []
    h.send(both, T.GRAB_JOB)
    assert h.received(both)[0][1][2] == b"for g"
    # ...but it took g's job, so f's job now needs the other sleeper.
    assert h.received(only_f) == [(T.NOOP, ())]


def test_job_not_stranded_by_a_woken_worker_that_never_grabs(h):
    lazy, other = h.worker(b"f"), h.worker(b"f")
    h.sleep(lazy)
    h.sleep(other)
    h.send(h.peer(), T.SUBMIT_JOB_BG, b"f", b"", b"x")
    assert h.received(lazy) == [(T.NOOP, ())] and h.received(other) == []
    h.clock.advance(0.9)
    assert h.received(other) == []
    h.clock.advance(0.2)  # `lazy` did not grab within WAKE_GRACE
    assert h.received(other) == [(T.NOOP, ())]
    h.send(other, T.GRAB_JOB)
    assert h.received(other)[0][0] == T.JOB_ASSIGN
    h.clock.advance(5)
    assert h.received(lazy) == []  # nothing left to wake anyone for


def test_pre_sleep_with_work_queued_gets_immediate_noop_every_time(h):
    c, w = h.peer(), h.worker(b"f")
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"", b"x")
    h.sleep(w)
    h.sleep(w)
    assert h.received(w) == [(T.NOOP, ()), (T.NOOP, ())]


def test_priority_order_within_a_function(h):
    c, w = h.peer(), h.worker(b"f")
    for ptype, data in [(T.SUBMIT_JOB_LOW_BG, b"low1"), (T.SUBMIT_JOB_BG, b"norm1"),
                        (T.SUBMIT_JOB_HIGH_BG, b"high1"), (T.SUBMIT_JOB_LOW_BG, b"low2"),
                        (T.SUBMIT_JOB_BG, b"norm2"), (T.SUBMIT_JOB_HIGH_BG, b"high2")]:
        h.send(c, ptype, b"f", b"", data)
    order = []
    for _ in range(6):
        h.send(w, T.GRAB_JOB)
        (ptype, args), = h.received(w)
        order.append(args[2])
        h.send(w, T.WORK_COMPLETE, args[0], b"")
    assert order == [b"high1", b"high2", b"norm1", b"norm2", b"low1", b"low2"]


def test_global_priority_then_round_robin_across_functions(h):
    c, w = h.peer(), h.worker(b"fa", b"fb", b"fc")
    for f in (b"fa", b"fb", b"fc"):
        h.send(c, T.SUBMIT_JOB_BG, f, b"", f + b"-n1")
        h.send(c, T.SUBMIT_JOB_BG, f, b"", f + b"-n2")
    h.send(c, T.SUBMIT_JOB_HIGH_BG, b"fb", b"", b"fb-high")
    order = []
    for _ in range(7):
        h.send(w, T.GRAB_JOB)
        (_, args), = h.received(w)
        order.append(args[2])
    assert order[0] == b"fb-high"
    assert [o[:2] for o in order[1:4]] in ([b"fa", b"fb", b"fc"], [b"fb", b"fc", b"fa"],
                                           [b"fc", b"fa", b"fb"])


def test_lost_worker_requeues_to_tail_and_job_retries_fail(h):
    h = Harness(job_retries=2)
    c = h.peer()
    h.send(c, T.SUBMIT_JOB, b"f", b"", b"first")
    h.send(c, T.SUBMIT_JOB, b"f", b"", b"second")
    h.received(c)
    w1 = h.worker(b"f")
    h.send(w1, T.GRAB_JOB)
    h.send(w1, T.WORK_STATUS, b"H:t:1", b"1", b"2")
    h.state.disconnect(w1)
    assert h.admin_text(b"show jobs") == b"H:t:1\t1\t0\t0\nH:t:2\t0\t0\t0\n.\n"
    w2 = h.worker(b"f")
    h.send(w2, T.GRAB_JOB)
    assert h.received(w2)[0][1][2] == b"second"  # requeued at the tail
    h.send(w2, T.GRAB_JOB)
    assert h.received(w2)[0][1][2] == b"first"
    h.state.disconnect(w2)  # second loss of "first": retries exhausted
    received = h.received(c)
    assert (T.WORK_STATUS, (b"H:t:1", b"1", b"2")) in received
    assert (T.WORK_FAIL, (b"H:t:1",)) in received
    assert list(h.state.jobs) == [b"H:t:2"]
    assert h.state.functions[b"f"].total == 1


def test_can_do_timeout_one_timer_per_job(h):
    c, w = h.peer(), h.peer()
    h.send(w, T.CAN_DO_TIMEOUT, b"f", b"1500")
    h.send(c, T.SUBMIT_JOB, b"f", b"", b"a")
    h.send(c, T.SUBMIT_JOB, b"f", b"", b"b")
    h.send(w, T.GRAB_JOB)
    h.clock.advance(1.0)
    h.send(w, T.WORK_COMPLETE, b"H:t:1", b"done")  # finished in time: its timer goes
    h.send(w, T.GRAB_JOB)
    h.received(w)
    h.clock.advance(1.0)  # 2.0 s after the first grab, 1.0 s after the second
    assert h.state.jobs[b"H:t:2"].worker is w
    h.clock.advance(0.6)
    # A timeout is a failed attempt (issue #17): the caller is told, the job is gone.
    assert b"H:t:2" not in h.state.jobs
    assert (T.WORK_FAIL, (b"H:t:2",)) in h.received(c)
    h.send(w, T.WORK_COMPLETE, b"H:t:2", b"late")
    assert h.received(w) == [(T.ERROR, (b"JOB_NOT_FOUND", b"Job given in work result not found"))]


def test_epoch_job_wakes_sleeper_when_due(h):
    c, w = h.peer(), h.worker(b"f")
    h.sleep(w)
    due = int(h.clock.now()) + 10
    h.send(c, T.SUBMIT_JOB_EPOCH, b"f", b"", b"%d" % due, b"later")
    h.send(c, T.SUBMIT_JOB_BG, b"g", b"", b"unrelated")
    assert h.received(w) == []
    assert h.admin_text(b"prioritystatus").startswith(b"f\t0\t1\t0\t1\n")
    h.clock.advance(9)
    assert h.received(w) == []
    h.clock.advance(2)
    assert h.received(w) == [(T.NOOP, ())]
    h.send(w, T.GRAB_JOB)
    assert h.received(w)[0][1][2] == b"later"


def test_abandoned_queued_foreground_job_is_removed_at_once(h):
    c = h.peer()
    h.send(c, T.SUBMIT_JOB, b"f", b"u", b"x")
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"bg", b"y")
    h.state.disconnect(c)
    assert list(h.state.jobs) == [b"H:t:2"]  # the background job stays (Q3)
    assert h.admin_text(b"status") == b"f\t1\t0\t0\n.\n"


def test_foreground_client_leaving_a_background_job_keeps_it(h):
    c1, c2 = h.peer(), h.peer()
    h.send(c1, T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    h.send(c2, T.SUBMIT_JOB, b"f", b"u", b"x")
    h.state.disconnect(c2)
    assert b"H:t:1" in h.state.jobs


def test_resubmission_into_running_abandoned_job_is_answered(h):
    c1, w = h.peer(), h.worker(b"f")
    h.send(c1, T.SUBMIT_JOB, b"f", b"u", b"x")
    h.send(w, T.GRAB_JOB)
    h.state.disconnect(c1)
    assert h.state.jobs[b"H:t:1"].abandoned
    c2 = h.peer()
    h.send(c2, T.SUBMIT_JOB, b"f", b"u", b"x")
    assert h.received(c2) == [(T.JOB_CREATED, (b"H:t:1",))]
    h.send(w, T.WORK_COMPLETE, b"H:t:1", b"ok")
    assert h.received(c2) == [(T.WORK_COMPLETE, (b"H:t:1", b"ok"))]


def test_abandoned_queue_entries_are_compacted(h):
    h.state.function(b"f").pinned = True  # else it goes with its last job (_reclaim)
    for _ in range(3000):
        c = h.peer()
        h.send(c, T.SUBMIT_JOB, b"f", b"", b"x")
        h.state.disconnect(c)
    func = h.state.functions[b"f"]
    assert func.total == 0 and len(func.queues[1]) <= 1100


def test_cancel_detaches_clients(h):
    c, w = h.peer(), h.worker(b"f")
    h.send(c, T.SUBMIT_JOB, b"f", b"u", b"x")
    h.send(w, T.GRAB_JOB)
    h.received(c), h.received(w)
    assert h.admin_text(b"cancel job H:t:1") == b"OK\r\n"
    assert h.received(c) == [(T.WORK_FAIL, (b"H:t:1",))]
    h.send(w, T.WORK_COMPLETE, b"H:t:1", b"late")
    assert h.received(c) == [] and h.received(w) == []
    assert not h.state.jobs


def test_exception_goes_to_opted_in_clients_and_fail_to_others(h):
    plain, opted, w = h.peer(), h.peer(), h.worker(b"f")
    h.send(opted, T.OPTION_REQ, b"Exceptions")
    assert h.received(opted) == [(T.OPTION_RES, (b"Exceptions",))]
    h.send(plain, T.SUBMIT_JOB, b"f", b"u", b"x")
    h.send(opted, T.SUBMIT_JOB, b"f", b"u", b"x")
    h.received(plain), h.received(opted)
    h.send(w, T.GRAB_JOB)
    h.send(w, T.WORK_EXCEPTION, b"H:t:1", b"boom")
    h.send(w, T.WORK_FAIL, b"H:t:1")  # python-gearman's follow-up: accepted quietly
    assert h.received(plain) == [(T.WORK_FAIL, (b"H:t:1",))]
    assert h.received(opted) == [(T.WORK_EXCEPTION, (b"H:t:1", b"boom"))]
    assert h.received(w)[1:] == []


def test_status_numbers_parse_like_strtoul(h):
    c, w = h.peer(), h.worker(b"f")
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"", b"x")
    h.send(w, T.GRAB_JOB)
    for num, den, expected in [(b"abc", b"12xyz", (b"0", b"12")),
                               (b"-1", b"7", (b"4294967295", b"7"))]:
        h.send(w, T.WORK_STATUS, b"H:t:1", num, den)
        h.send(c, T.GET_STATUS, b"H:t:1")
        assert h.received(c)[-1] == (T.STATUS_RES, (b"H:t:1", b"1", b"1") + expected)


def test_maxqueue_refuses_new_jobs_but_never_coalescing_ones(h):
    c = h.peer()
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    assert h.admin_text(b"maxqueue f 1") == b"OK\r\n"
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    h.send(c, T.SUBMIT_JOB_BG, b"f", b"v", b"x")
    assert h.received(c)[1:] == [(T.JOB_CREATED, (b"H:t:1",)),
                                 (T.ERROR, (b"QUEUE_ERROR", b"Job queue is full"))]


def test_admin_workers_and_status_from_state(h):
    w = h.worker(b"fa", b"fb")
    h.send(w, T.SET_CLIENT_ID, b" my worker\t1 ")
    text = h.admin_text(b"workers")
    assert b"%d 127.0.0.1 myworker1 : fb fa\n" % w.fd in text
    assert text.endswith(b" : \n.\n") is False and text.endswith(b":\n.\n")
    assert sorted(h.admin_text(b"status").splitlines()) == [b".", b"fa\t0\t0\t1", b"fb\t0\t0\t1"]


# -- the job history (gearoffload_server.history) --------------------------------------

def _run_once(h: Harness, worker: Peer, handle: bytes) -> None:
    h.send(worker, T.GRAB_JOB_UNIQ)
    [(ptype, args)] = h.received(worker)
    assert ptype == T.JOB_ASSIGN_UNIQ and args[0] == handle


def test_history_shows_the_attempts_of_a_job_lost_once_failed_twice_then_done():
    h = Harness(retry_failed=2, retry_backoff=0.1)
    client = h.peer()
    h.send(client, T.SUBMIT_JOB_BG, b"flaky", b"order-7", b"data")
    [(_, (handle,))] = h.received(client)
    submitted = h.clock.now()
    lost = h.worker(b"flaky")
    _run_once(h, lost, handle)
    h.state.disconnect(lost)            # the worker dies mid-job: requeued
    worker = h.worker(b"flaky")
    for attempt in (2, 3):
        _run_once(h, worker, handle)
        h.send(worker, T.WORK_EXCEPTION, handle, b"Traceback...\nValueError: boom %d" % attempt)
        h.send(worker, T.WORK_FAIL, handle)
        h.clock.advance(1.0)             # the retry falls due
    _run_once(h, worker, handle)
    h.clock.advance(0.5)
    h.send(worker, T.WORK_COMPLETE, handle, b"ok")
    entries = h.state.history.find(b"order-7")
    assert [(e.outcome, e.attempts) for e in entries] == [
        ("requeued", 1), ("retrying", 2), ("retrying", 3), ("done", 4)]
    assert entries[1].error.endswith("ValueError: boom 2")
    assert entries[-1].submitted == submitted and entries[-1].duration == pytest.approx(2.5)
    assert h.state.history.find(handle) == entries
    # The same through the admin text protocol: HANDLE FUNCTION UNIQUE OUTCOME ...
    lines = h.admin_text(b"find job order-7").decode().splitlines()
    assert lines[-1] == "."
    assert [line.split("\t")[3] for line in lines[:-1]] == [
        "requeued", "retrying", "retrying", "done"]
    shown = h.admin_text(b"show history flaky").decode().splitlines()
    assert shown[0].split("\t")[3:4] == ["done"] and len(shown) == 5
    assert h.admin_text(b"show retries") == b"flaky\t0\t2\t0\n.\n"


def test_history_records_dead_letters_failures_and_cancels():
    h = Harness(retry_failed=1, retry_backoff=0.1)
    client = h.peer()
    worker = h.worker(b"bad")
    h.send(client, T.SUBMIT_JOB_BG, b"bad", b"doomed", b"x")
    [(_, (dead,))] = h.received(client)
    for _ in range(2):
        _run_once(h, worker, dead)
        h.send(worker, T.WORK_FAIL, dead)
        h.clock.advance(1.0)
    assert dead in h.state.dead
    assert [(e.outcome, e.attempts) for e in h.state.history.find(dead)] == [
        ("retrying", 1), ("dead", 2)]
    assert h.admin_text(b"show retries") == b"bad\t0\t1\t1\n.\n"
    # A foreground job that fails is not retried: "failed".
    h.send(client, T.SUBMIT_JOB, b"bad", b"fg", b"x")
    [(_, (fg,))] = h.received(client)
    _run_once(h, worker, fg)
    h.send(worker, T.WORK_FAIL, fg)
    assert h.received(client) == [(T.WORK_FAIL, (fg,))]
    assert [e.outcome for e in h.state.history.find(b"fg")] == ["failed"]
    # A queued job cancelled by the admin: "cancelled".
    h.send(client, T.SUBMIT_JOB_BG, b"bad", b"later", b"x")
    [(_, (later,))] = h.received(client)
    assert h.state.cancel(later)
    assert [e.outcome for e in h.state.history.find(b"later")] == ["cancelled"]
    # A dead letter still shows where it is now.
    found = h.admin_text(b"find job doomed").decode().splitlines()
    assert found[-2].split("\t")[3] == "dead"


def test_history_is_off_with_history_max_0():
    h = Harness(history_max=0)
    client = h.peer()
    worker = h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u", b"x")
    [(_, (handle,))] = h.received(client)
    _run_once(h, worker, handle)
    h.send(worker, T.WORK_COMPLETE, handle, b"")
    assert h.state.history is None
    # Said, not shown as an empty history (which reads as "nothing ended yet").
    assert h.admin_text(b"show history").startswith(b"ERR HISTORY_DISABLED ")
    assert h.admin_text(b"find job u").startswith(b"ERR HISTORY_DISABLED ")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"live", b"x")
    found = h.admin_text(b"find job live").decode().splitlines()
    assert [line.split("\t")[3] for line in found[:-1]] == ["queued"] and found[-1] == "."


def test_history_says_cancelled_when_every_client_of_a_queued_job_left():
    h = Harness()
    client = h.peer()
    h.send(client, T.SUBMIT_JOB, b"nobody", b"gone", b"x")
    h.state.disconnect(client)
    [entry] = h.state.history.find(b"gone")
    assert (entry.outcome, entry.attempts, entry.error) == (
        "cancelled", 1, "every client waiting on it left")
