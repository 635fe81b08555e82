"""Periodic jobs (``gearoffload.schedule``): slots and missed-slot policies, validation,
the job server's run-once rule (in the state and over the wire), three scheduler
processes and a job-server restart on a compressed clock, ``gearoffload-worker
--schedule``; and delayed jobs (``.background(delay=/at=)``) with a real worker, across a
server restart."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import gevent
import pytest
from test_state import Harness

import gearoffload
from conftest import (
    ROOT,
    ServerProcess,
    gevent_time_limit,
    need_module,
    poll_until,
    stop_process,
)
from gearoffload import offload
from gearoffload.codec import stable_hash
from gearoffload.core import OffloadConfig
from gearoffload.errors import NoServersAvailable
from gearoffload.offloading import configure_reset
from gearoffload.periodic import MAX_CATCH_UP, Schedule, slot_unique
from gearoffload.protocol import PacketType as T
from gearoffload.registry import TaskRegistry
from gearoffload.schedule import Scheduler

time_limit = gevent_time_limit(40)

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SECRET = "periodic-test-key"


# -- slots and missed-slot policies --------------------------------------------------------

def test_every_slots_are_aligned_on_the_epoch_and_bounded():
    s = Schedule(every=60)
    assert s.slots(0, 180) == [60.0, 120.0, 180.0]
    assert s.slots(59.9, 120) == [60.0, 120.0]
    assert s.slots(60, 119.9) == []
    assert s.slots(0, 10_000, limit=2) == [9900.0, 9960.0]  # the latest ones
    assert s.count(100, 700) == 10


def test_cron_slots_follow_the_timezone():
    need_module("croniter")
    paris = Schedule(cron="0 3 * * *", tz="Europe/Paris")
    day = datetime(2026, 1, 10, tzinfo=timezone.utc).timestamp()
    # 03:00 in Paris in January is 02:00 UTC; in July (summer time) 01:00 UTC.
    assert paris.slots(day, day + 86400) == [day + 2 * 3600]
    july = datetime(2026, 7, 10, tzinfo=timezone.utc).timestamp()
    assert paris.slots(july, july + 86400) == [july + 3600]
    every5 = Schedule(cron="*/5 * * * *")  # UTC
    assert every5.slots(day, day + 600) == [day + 300, day + 600]  # the end is included
    assert every5.grace(day + 600) == 60 and Schedule(cron="* * * * *").grace(day) == 30


def test_missed_policies():
    now = 1_000_035.0
    last = 1_000_000.0
    assert Schedule(every=10, missed="all").due(last, now, 600) == \
        ([1_000_010.0, 1_000_020.0, 1_000_030.0], 0)
    assert Schedule(every=10, missed="last").due(last, now, 600) == ([1_000_030.0], 0)
    # none: only a slot within half a period (at most 60 s) of now
    assert Schedule(every=10, missed="none").due(last, now, 600) == ([1_000_030.0], 0)
    assert Schedule(every=10, missed="none").due(last, now + 1, 600) == ([], 0)
    assert Schedule(every=300, missed="none").due(None, 1_000_261.0, 600) == ([], 0)
    assert Schedule(every=300, missed="none").due(None, 1_000_259.0, 600) == \
        ([1_000_200.0], 0)
    # nothing new since the last slot
    assert Schedule(every=10).due(1_000_030.0, now, 600) == ([], 0)


def test_slots_older_than_the_lookback_are_never_submitted():
    schedule = Schedule(every=10, missed="all")
    slots, dropped = schedule.due(1000.0, 2000.0, 600)
    assert slots[0] > 2000 - 600 and slots[-1] == 2000.0 and len(slots) == 60
    assert dropped == 40  # (1000, 1400]: logged, not run
    # a first pass (no last slot) looks back over the window only, at most MAX_CATCH_UP
    slots, dropped = Schedule(every=1, missed="all").due(None, 5000.0, 600)
    assert len(slots) == MAX_CATCH_UP and slots[-1] == 5000.0 and dropped == 0


# -- validation at decoration time ---------------------------------------------------------

def declare(fn=lambda: None, **options):
    return offload(registry=TaskRegistry(), **options)(fn)


@pytest.mark.parametrize(("options", "error", "text"), [
    ({"every": timedelta(0)}, ValueError, "at least 1 second"),
    ({"every": -5}, ValueError, "at least 1 second"),
    ({"every": 0.001}, ValueError, r"every= must be at least 1 second \(the schedulers "
                                   r"pass about once a second\), not 0.001"),
    ({"every": timedelta(milliseconds=500)}, ValueError, "at least 1 second"),
    ({"every": float("nan")}, ValueError, "finite"),
    ({"every": "5m"}, TypeError, "a number of seconds or a timedelta"),
    ({"every": "10"}, TypeError, "a number of seconds or a timedelta, not str '10'"),
    ({"every": True}, TypeError, "not bool True"),
    ({"cron": "0 0 * * * *"}, ValueError, r"five fields .* not 6 .* seconds \(Quartz "
                                          r"style\) and years are not supported"),
    ({"cron": "0 0 3 * * *"}, ValueError, "five fields"),
    ({"cron": "0 0 3 * * * 2030"}, ValueError, "not 7"),
    ({"cron": "0 3 * *"}, ValueError, "not 4"),
    ({"cron": "R * * * *"}, ValueError, r"random \(R\) and hashed \(H\)"),
    ({"cron": "H 3 * * *"}, ValueError, "random"),
    ({"cron": "@reboot"}, ValueError, "alias '@reboot' is not one of"),
    ({"cron": 5}, TypeError, "cron= must be a cron expression"),
    ({"cron": "* * * * *", "tz": 1}, TypeError, "tz= must be an IANA timezone name"),
    ({"every": 60, "missed": None}, TypeError, "missed= must be"),
    ({"every": 60, "cron": "* * * * *"}, TypeError, "not both"),
    ({"every": 60, "missed": "first"}, ValueError, "'last', 'all' or 'none'"),
    ({"every": 60, "tz": "Europe/Paris"}, TypeError, "tz= goes with cron="),
    ({"missed": "all"}, TypeError, "add every= or cron="),
    ({"every": 60, "unique": True}, TypeError, "unique="),
    ({"cron": "61 * * * *"}, ValueError, "not a valid cron expression"),
    ({"cron": "* * * * *", "tz": "Mars/Olympus"}, ValueError, "not a known timezone"),
])
def test_bad_periodic_declarations_are_refused(options, error, text):
    if "cron" in options:
        need_module("croniter")
    with pytest.raises(error, match=text):
        declare(**options)


def test_five_fields_aliases_and_one_second_are_accepted():
    need_module("croniter")
    for cron in ("0 3 * * *", " */5  * * * mon-fri ", "0 0 L * *", "@daily", "@Hourly"):
        assert declare(cron=cron).schedule.cron == cron
    day = 86400.0
    # @daily is 0 0 * * *: one slot a day, at midnight in the timezone
    assert Schedule(cron="@daily", tz="UTC").slots(0, 3 * day) == [day, 2 * day, 3 * day]
    assert declare(every=1).schedule.every == 1.0
    assert Schedule(every=timedelta(seconds=1.5)).slots(0, 3) == [1.5, 3.0]


def test_periodic_task_takes_no_arguments():
    def report(month, page=1):
        pass

    with pytest.raises(TypeError, match="no arguments, but it needs month"):
        declare(report, cron="0 * * * *")
    with pytest.raises(TypeError, match="needs month"):
        declare(report, every=60)
    assert declare(lambda verbose=False: None, every=60).schedule.every == 60


def test_cron_without_croniter_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "croniter", None)  # import croniter -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'gearoffload\[schedule\]'"):
        declare(cron="*/5 * * * *")


# -- the Scheduler, with a fake offloader ----------------------------------------------------

class FakeOffloader:
    """Records ``start()`` calls; ``down`` makes them fail as with no server reachable."""

    def __init__(self):
        self.config = OffloadConfig(result_ttl=600)
        self.started: list[str] = []
        self.down = False

    def start(self, function, payload, *, unique, once, priority, retry):
        assert once and function.endswith("beat")
        if self.down:
            raise NoServersAvailable("no job server reachable: 127.0.0.1:1")
        self.started.append("once:" + stable_hash(unique))


def test_scheduler_submits_each_slot_and_retries_after_a_failure(caplog):
    clock = [1_000_001.0]

    def beat():
        pass

    task = declare(beat, every=10, missed="all")
    offloader = FakeOffloader()
    seen = []
    scheduler = Scheduler([task], offloader, clock=lambda: clock[0],
                          on_submit=lambda t, slot: seen.append(slot))
    assert scheduler.tick() == 60  # first pass: the look-back window (600 s)
    expected = [slot_unique(task.name, s) for s in seen]
    assert offloader.started == expected  # the same keys the job server sees
    assert scheduler.tick() == 0
    offloader.down = True
    clock[0] += 25
    assert scheduler.tick() == 0  # logged, not raised
    assert "not submitted" in caplog.text
    offloader.down = False
    clock[0] += 10
    assert scheduler.tick() == 3  # the slots missed while down (missed="all")
    assert seen[-3:] == [1_000_010.0, 1_000_020.0, 1_000_030.0]
    # A second scheduler computes the same uniques: the job server merges them.
    other = FakeOffloader()
    Scheduler([task], other, clock=lambda: clock[0]).tick()
    assert other.started == offloader.started[-60:]


def test_scheduler_with_missed_last_skips_to_the_latest_slot():
    clock = [1_000_001.0]
    task = declare(lambda: None, name="x.beat", every=10)
    offloader = FakeOffloader()
    scheduler = Scheduler([task], offloader, clock=lambda: clock[0])
    assert scheduler.tick() == 1
    clock[0] += 100
    assert scheduler.tick() == 1
    assert scheduler.last["x.beat"] == 1_000_100.0
    assert len(offloader.started) == 2


def test_scheduler_needs_periodic_tasks():
    with pytest.raises(ValueError, match="no periodic tasks"):
        Scheduler([])


# -- the run-once rule of the job server ------------------------------------------------------

def run_one(h: Harness, worker, unique: bytes) -> None:
    h.send(worker, T.GRAB_JOB_UNIQ)
    (ptype, args), = h.received(worker)
    assert ptype == T.JOB_ASSIGN_UNIQ and args[2] == unique
    h.send(worker, T.WORK_COMPLETE, args[0], b"ok")


def test_state_acknowledges_a_finished_once_slot_without_running_it():
    h = Harness()
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"once:slot-1", b"x")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"once:slot-1", b"x")  # queued: coalesced
    run_one(h, worker, b"once:slot-1")
    h.received(client)
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"once:slot-1", b"x")  # a late scheduler
    (ptype, (handle,)), = h.received(client)
    assert ptype == T.JOB_CREATED and handle not in h.state.jobs
    h.send(worker, T.GRAB_JOB_UNIQ)
    assert h.received(worker) == [(T.NO_JOB, ())]
    assert h.state.functions[b"f"].coalesced == 2
    # Other uniques run again as before; so do foreground jobs (the rule is for
    # background submissions only).
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"bg-slot-1", b"x")
    run_one(h, worker, b"bg-slot-1")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"bg-slot-1", b"x")
    run_one(h, worker, b"bg-slot-1")
    h.send(client, T.SUBMIT_JOB, b"f", b"once:slot-1", b"x")
    run_one(h, worker, b"once:slot-1")


def test_state_runs_a_once_slot_again_after_its_result_expired():
    h = Harness(result_ttl=60)
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"once:slot-2", b"x")
    run_one(h, worker, b"once:slot-2")
    h.clock.advance(61)
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"once:slot-2", b"x")
    run_one(h, worker, b"once:slot-2")


def test_run_once_rule_over_the_wire(our_server):
    with our_server.connect() as client, our_server.connect() as worker:
        worker.send(T.CAN_DO, b"f")
        for _ in range(2):
            client.send(T.SUBMIT_JOB_BG, b"f", b"once:wire", b"x")
            client.expect(T.JOB_CREATED)
        worker.send(T.GRAB_JOB_UNIQ)
        handle, _, unique, _ = worker.expect(T.JOB_ASSIGN_UNIQ)
        assert unique == b"once:wire"
        worker.send(T.WORK_COMPLETE, handle, b"done")
        assert poll_until(lambda: b"OK done" in client.admin("result once:wire"))
        client.send(T.SUBMIT_JOB_BG, b"f", b"once:wire", b"x")
        client.expect(T.JOB_CREATED)
        worker.send(T.GRAB_JOB_UNIQ)
        worker.expect(T.NO_JOB)


# -- real processes ---------------------------------------------------------------------------

class Fleet:
    """A job server on sqlite, a worker pool and scheduler processes, stopped by PID."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.log = tmp_path / "runs.log"
        self.log.touch()
        self.db = tmp_path / "queue.db"
        self.server = ServerProcess("gearoffload", ["--queue", f"sqlite://{self.db}"]).start()
        self.env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}",
                        GEAROFFLOAD_SERVERS=self.server.address,
                        GEAROFFLOAD_SECRET_KEY=SECRET, PERIODIC_LOG=str(self.log))
        self.procs: list[subprocess.Popen] = []

    def spawn(self, *command: str, env: dict | None = None) -> subprocess.Popen:
        out = open(self.tmp / f"proc{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(command, cwd=TESTS, stdout=out, stderr=out,
                                env={**self.env, **(env or {})})
        out.close()
        self.procs.append(proc)
        return proc

    def worker(self, *args: str) -> subprocess.Popen:
        proc = self.spawn(str(BIN / "gearoffload-worker"), "periodic_tasks", "--processes",
                          "1", "--concurrency", "4", *args)
        assert poll_until(self.served, 15), self.logs()
        return proc

    def served(self) -> bool:
        """Whether a worker serves periodic_tasks.tick (admin status: its worker count)."""
        try:
            with self.server.connect() as conn:
                return any(line.startswith(b"periodic_tasks.tick\t")
                           and not line.endswith(b"\t0")
                           for line in conn.admin("status").splitlines())
        except OSError:
            return False

    def lines(self) -> list[str]:
        return self.log.read_text().split()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:]
                         for p in sorted(self.tmp.glob("proc*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, timeout=5)
        self.server.stop()


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.stop()


def test_three_schedulers_and_a_server_restart_run_every_slot_once(fleet):
    """A 2-minute window of 5-second slots on a clock running 20 times faster (6 s):
    two schedulers from the start, a third one late (it submits the whole look-back
    window again), and the job server killed mid-window and restarted on its store."""
    speed, period, window = 20.0, 5.0, 120.0
    fleet.worker()
    t0 = time.time()

    def real(compressed: float) -> float:  # the real time at which the clock says this
        return t0 + (compressed - t0) / speed

    def scheduler():
        # a 60 s look-back (3 real seconds): the late one resubmits 12 finished slots
        return fleet.spawn(sys.executable, "run_scheduler.py", str(t0), str(speed),
                           "periodic_tasks", "--tick", "0.02", "--log-level", "DEBUG",
                           env={"GEAROFFLOAD_RESULT_TTL": "60"})

    scheduler(), scheduler()
    gevent.sleep(max(0.0, real(t0 + 40) - time.time()))
    late = scheduler()
    # Kill the server midway between two slots (a run ends within milliseconds of its
    # slot: killing at one could catch a run before its end is written, and run it
    # again: the at-least-once window of a crash, docs/offload.md).
    kill_at = (math.floor((t0 + 60) / period) + 0.5) * period
    gevent.sleep(max(0.0, real(kill_at) - time.time()))
    fleet.server.stop(signal.SIGKILL)
    gevent.sleep(0.4)  # two slots fall due while it is down
    fleet.server.start()
    slots = [k * period for k in range(math.floor(t0 / period) + 1,
                                       math.floor((t0 + window) / period) + 1)]
    expected = {slot_unique("periodic_tasks.tick", s): s for s in slots}
    assert poll_until(lambda: set(expected) <= set(fleet.lines()),
                      real(t0 + window) - time.time() + 10), \
        (sorted(expected[u] for u in set(expected) - set(fleet.lines())), fleet.logs())
    gevent.sleep(0.5)  # a duplicate would have come by now
    runs = Counter(fleet.lines())
    assert all(runs[u] == 1 for u in expected), \
        [(expected[u], runs[u]) for u in expected if runs[u] != 1]
    assert max(runs.values()) == 1  # before the window too
    assert len(slots) == 24
    # The late scheduler did submit the slots that had run already: the server
    # acknowledged them without running them again.
    late_log = (fleet.tmp / f"proc{fleet.procs.index(late)}.log").read_text()
    # It starts at +40 s of the clock and looks 60 s back, so it submits the 12 slots
    # before it (which ran), then the rest; a loaded machine delays its start by several
    # virtual seconds (22 of 24 once, with other test runs on the 2 cores), hence "half".
    assert late_log.count("submitted") >= len(slots) // 2


def test_worker_pool_with_schedule_runs_the_periodic_tasks(fleet, tmp_path):
    (tmp_path / "every_second.py").write_text(
        "import os\nfrom gearoffload import offload\n"
        "from gearoffload.offloading import current_job\n\n"
        "@offload(every=1, missed='none')\ndef beat():\n"
        "    with open(os.environ['PERIODIC_LOG'], 'a') as f:\n"
        "        f.write(current_job().unique + '\\n')\n")
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    fleet.spawn(str(BIN / "gearoffload-worker"), "every_second", "--processes", "1",
                "--schedule", env=env)
    fleet.spawn(str(BIN / "gearoffload-worker"), "every_second", "--processes", "1",
                "--schedule", env=env)
    assert poll_until(lambda: len(fleet.lines()) >= 4, 15), fleet.logs()
    lines = fleet.lines()
    assert all(u.startswith("once:") for u in lines) and len(set(lines)) == len(lines)
    # Tasks, but none periodic: --schedule has nothing to do, and says so.
    (tmp_path / "no_periodic.py").write_text(
        "from gearoffload import offload\n\n@offload\ndef plain():\n    return 1\n")
    out = subprocess.run([str(BIN / "gearoffload-worker"), "no_periodic", "--schedule"],
                         cwd=tmp_path, env={**fleet.env, **env}, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "has no periodic tasks" in out.stderr, out.stderr


@pytest.mark.parametrize(("env", "text"), [
    ({"GEAROFFLOAD_RESULT_TTL": "abc"}, "GEAROFFLOAD_RESULT_TTL must be a number, not 'abc'"),
    ({"GEAROFFLOAD_SERVERS": "nonsense:port"},
     "GEAROFFLOAD_SERVERS: bad port in server address 'nonsense:port'"),
    # Accepted before (then every submission failed, retried for ever).
    ({"GEAROFFLOAD_SERVERS": "127.0.0.1:99999"}, "a port from 1 to 65535"),
    ({"GEAROFFLOAD_SERVERS": "http://127.0.0.1:47401"}, "drop the http://"),
    ({"GEAROFFLOAD_SERVERS": "127.0.0.1:47401;127.0.0.1:47402"},
     "separate servers with commas"),
    ({"GEAROFFLOAD_FALLBACK": "maybe"}, "GEAROFFLOAD_FALLBACK must be 'raise'"),
])
@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "gearoffload.schedule", "periodic_tasks"],
    [str(BIN / "gearoffload-worker"), "periodic_tasks", "--schedule", "--processes", "1"],
], ids=["schedule", "worker"])
def test_commands_refuse_bad_settings_at_start_in_one_line(command, env, text):
    """A bad GEAROFFLOAD_* variable: one line and exit 2 at start, as a bad option, not a
    scheduler logging tracebacks at every pass nor a worker's raw traceback."""
    import gevent.subprocess

    out = gevent.subprocess.run(command, cwd=TESTS, capture_output=True, text=True,
                                timeout=30, env={
                                    **os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}",
                                    "GEAROFFLOAD_SECRET_KEY": SECRET, **env})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and text in lines[0], out.stderr
    assert lines[0].startswith(("gearoffload.schedule: ", "gearoffload-worker: "))


# -- delayed jobs --------------------------------------------------------------------------

@pytest.fixture
def configured(fleet):
    gearoffload.configure(servers=fleet.server.address, secret_key=SECRET)
    yield fleet
    configure_reset()


def ran_at(fleet: Fleet, tag: str) -> float | None:
    for line in fleet.log.read_text().splitlines():
        name, _, when = line.partition(" ")
        if name == tag:
            return float(when)
    return None


def test_delayed_jobs_run_on_time_and_survive_a_server_restart(configured):
    import periodic_tasks

    fleet = configured
    fleet.worker()
    due = {}
    start = time.time()
    periodic_tasks.stamp.background("soon", delay=1.0)
    due["soon"] = start + 1.0
    periodic_tasks.stamp.background("at", at=datetime.fromtimestamp(start + 1.5, timezone.utc))
    due["at"] = start + 1.5
    periodic_tasks.stamp.background("restart", delay=timedelta(seconds=3))
    due["restart"] = start + 3.0
    assert poll_until(lambda: ran_at(fleet, "at") is not None, 5), fleet.logs()
    fleet.server.stop(signal.SIGKILL)  # "restart" is acknowledged, so it is on disk
    fleet.server.start()
    assert poll_until(lambda: ran_at(fleet, "restart") is not None, 8), fleet.logs()
    for tag, when in due.items():
        late = ran_at(fleet, tag) - when
        # Gearman's epoch is whole seconds, rounded up: up to a second late, plus the
        # wake-up of a worker (and 50 ms either side for two processes' clock reads).
        assert -0.05 <= late <= 1.15, (tag, late)
    with pytest.raises(ValueError, match="aware datetime"):
        periodic_tasks.stamp.background("naive", at=datetime.now())


@pytest.mark.parametrize("call, error, message", [
    (lambda c: c.submit("f", b"x", run_at="soon"), TypeError, "run_at must be a Unix time"),
    (lambda c: c.submit("f", b"x", run_at=True), TypeError, "run_at must be a Unix time"),
    (lambda c: c.submit("f", b"x", run_at=float("nan")), ValueError, "finite Unix time"),
])
def test_a_bad_run_at_is_refused_before_anything_is_sent(call, error, message):
    from gearoffload import Client

    with Client("127.0.0.1:1", connect_timeout=0.5) as client:  # nothing listens there
        with pytest.raises(error, match=message):
            call(client)
        assert client._links[0].attempts == 0


def test_once_needs_a_unique_and_a_scheduler_a_positive_tick():
    from gearoffload.core import OffloadConfig, Offloader

    offloader = Offloader(OffloadConfig(servers=["127.0.0.1:1"], secret_key="k"))
    with pytest.raises(ValueError, match="once=True needs a unique key"):
        offloader.start("f", b"x", once=True)
    with pytest.raises(ValueError, match="tick must be a positive number"):
        Scheduler([object()], tick=0)  # type: ignore[list-item]
