"""Protocol conformance: every test runs against our server AND Debian's gearmand 1.1.20.

The ``server`` fixture is parameterised over both, so each assertion here is behaviour that
gearmand really has (docs/protocol.md §1–§4). Where gearmand and our server deliberately
differ (the quirks of docs/protocol.md §6), only the shared part is asserted here; our
choice is asserted in test_quirks.py.
"""

from __future__ import annotations

import os
import re
import struct
import time

import pytest
from wire_helpers import (
    grab,
    items,
    listing,
    number,
    show_jobs,
    status_table,
    submit,
    sync,
    wait_until,
    worker,
)

from gearoffload.protocol import FIELD_COUNTS, REQ, RES, Packet, encode, encode_request
from gearoffload.protocol import PacketType as T

# -- docs/protocol.md §1 transport and framing ----------------------------------------------


def test_partial_packet_is_buffered(server):
    wire = encode_request(T.ECHO_REQ, b"slow\0sender")
    with server.connect() as conn:
        for i in range(len(wire)):
            conn.send_raw(wire[i:i + 1])
            if i in (3, 11):
                time.sleep(0.05)
        assert conn.expect(T.ECHO_RES) == (b"slow\0sender",)


def test_many_packets_in_one_write_are_answered_in_order(server):
    with server.connect() as conn:
        conn.send_raw(encode_request(T.ECHO_REQ, b"one")
                      + encode_request(T.SUBMIT_JOB_BG, b"f", b"", b"x")
                      + encode_request(T.ECHO_REQ, b"two")
                      + encode_request(T.GET_STATUS, b"H:nope:1")
                      + encode_request(T.ECHO_REQ, b""))
        assert conn.expect(T.ECHO_RES) == (b"one",)
        number(conn.expect(T.JOB_CREATED)[0])
        assert conn.expect(T.ECHO_RES) == (b"two",)
        assert conn.expect(T.STATUS_RES) == (b"H:nope:1", b"0", b"0", b"0", b"0")
        assert conn.expect(T.ECHO_RES) == (b"",)


def test_binary_and_text_interleaved_in_one_write(server):
    with server.connect() as conn:
        conn.send_raw(encode_request(T.ECHO_REQ, b"a") + b"version\n"
                      + encode_request(T.ECHO_REQ, b"b") + b"maxqueue\r\n"
                      + encode_request(T.ECHO_REQ, b"c"))
        first, version, second, error, third = items(conn, 5)
        assert first == Packet(RES, T.ECHO_RES, (b"a",))
        assert version.startswith(b"OK ")
        assert second == Packet(RES, T.ECHO_RES, (b"b",))
        assert error == (b"ERR INVALID_ARGUMENTS "
                         b"An+incomplete+set+of+arguments+was+sent+to+this+command+maxqueue")
        assert third == Packet(RES, T.ECHO_RES, (b"c",))


def test_text_line_is_buffered_until_newline(server):
    with server.connect() as conn:
        conn.send_raw(b"vers")
        conn.expect_nothing(0.2)
        assert conn.admin_raw(b"ion\n").startswith(b"OK ")


def test_zero_field_packets_with_stray_payload_stay_in_sync(server):
    with server.connect() as conn:
        # GRAB_JOB with 3 stray bytes: still NO_JOB, and the next packet is read correctly.
        conn.send_raw(struct.pack(">4sII", REQ, T.GRAB_JOB, 3) + b"abc"
                      + struct.pack(">4sII", REQ, T.RESET_ABILITIES, 2) + b"\0\0"
                      + encode_request(T.ECHO_REQ, b"after"))
        conn.expect(T.NO_JOB)
        assert conn.expect(T.ECHO_RES) == (b"after",)


def test_res_magic_is_invalid_magic_and_connection_stays(server):
    with server.connect() as conn:
        conn.send_raw(encode(RES, T.ECHO_REQ, (b"x",)))
        assert conn.expect(T.ERROR) == (b"INVALID_MAGIC", b"Request magic expected")
        conn.send(T.ECHO_REQ, b"still here")
        assert conn.expect(T.ECHO_RES) == (b"still here",)


SERVER_ONLY = (5, 6, 8, 10, 11, 17, 19, 20, 24, 27, 31, 35, 40, 42)


def test_server_only_types_are_invalid_command(server):
    with server.connect() as conn:
        for ptype in SERVER_ONLY:
            fields = [b"x"] * FIELD_COUNTS[ptype]
            conn.send_raw(encode(REQ, ptype, fields))
            assert conn.expect(T.ERROR) == (b"INVALID_COMMAND", b"Command not expected"), ptype
        conn.send(T.ECHO_REQ, b"ok")
        assert conn.expect(T.ECHO_RES) == (b"ok",)


@pytest.mark.parametrize("header", [
    struct.pack(">4sII", b"\0XYZ", T.ECHO_REQ, 0),
    struct.pack(">4sII", REQ, 0, 0),
    struct.pack(">4sII", REQ, 43, 0),
], ids=["bad-magic", "type-0", "type-43"])
def test_unframeable_packet_closes_without_reply(server, header):
    with server.connect() as conn:
        conn.send_raw(header)
        assert conn.is_closed()
        assert not conn.pending


# -- docs/protocol.md §3.1 / §3.3 submission, handles, coalescing -----------------------------


def test_every_submission_type_gets_job_created(server):
    with server.connect() as conn:
        handles = []
        for ptype in (T.SUBMIT_JOB, T.SUBMIT_JOB_HIGH, T.SUBMIT_JOB_LOW, T.SUBMIT_JOB_BG,
                      T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_LOW_BG):
            handles.append(submit(conn, b"f", b"", b"data", ptype))
        conn.send(T.SUBMIT_JOB_EPOCH, b"f", b"", b"%d" % (time.time() + 3600), b"later")
        handles.append(conn.expect(T.JOB_CREATED)[0])
        for ptype in (T.SUBMIT_REDUCE_JOB, T.SUBMIT_REDUCE_JOB_BACKGROUND):
            conn.send(ptype, b"f", b"", b"reducer", b"aggregator", b"data")
            handles.append(conn.expect(T.JOB_CREATED)[0])
        numbers = [number(h) for h in handles]
        assert numbers == list(range(1, 10))  # one counter for the server, starting at 1
        with server.connect() as admin:
            assert status_table(admin)[b"f"] == (9, 0, 0)


def test_coalesced_submission_reuses_handle_and_counter(server):
    with server.connect() as conn:
        first = submit(conn, b"f", b"u1", b"a", T.SUBMIT_JOB_BG)
        assert submit(conn, b"f", b"u1", b"other data", T.SUBMIT_JOB_HIGH_BG) == first
        assert submit(conn, b"f", b"u1", b"x") == first  # foreground joins too
        second = submit(conn, b"f", b"u2", b"a", T.SUBMIT_JOB_BG)
        assert number(second) == number(first) + 1
        with server.connect() as admin:
            assert status_table(admin)[b"f"] == (2, 0, 0)


def test_empty_unique_never_coalesces(server):
    with server.connect() as conn:
        a = submit(conn, b"f", b"", b"same", T.SUBMIT_JOB_BG)
        b = submit(conn, b"f", b"", b"same", T.SUBMIT_JOB_BG)
        assert a != b


def test_same_unique_different_function_is_a_separate_job(server):
    with server.connect() as conn:
        a = submit(conn, b"f", b"u", b"", T.SUBMIT_JOB_BG)
        b = submit(conn, b"g", b"u", b"", T.SUBMIT_JOB_BG)
        assert a != b


def test_foreground_coalescing_attaches_and_keeps_first_data_and_priority(server):
    with server.connect() as c1, server.connect() as c2, server.connect() as c3:
        h = submit(c1, b"f", b"u", b"first", T.SUBMIT_JOB_LOW)
        other = submit(c3, b"f", b"", b"normal")
        assert submit(c2, b"f", b"u", b"second", T.SUBMIT_JOB_HIGH) == h
        with worker(server, b"f") as w:
            # The coalesced HIGH submission did not promote the LOW job.
            assert grab(w) == (other, b"f", b"", b"normal")
            assert grab(w) == (h, b"f", b"u", b"first")
            w.send(T.WORK_COMPLETE, h, b"done")
            assert c1.expect(T.WORK_COMPLETE) == (h, b"done")
            assert c2.expect(T.WORK_COMPLETE) == (h, b"done")
            w.expect_nothing(0.1)


def test_background_then_foreground_attaches_the_foreground_client(server):
    with server.connect() as bg, server.connect() as fg:
        h = submit(bg, b"f", b"u", b"data", T.SUBMIT_JOB_BG)
        assert submit(fg, b"f", b"u", b"ignored") == h
        with worker(server, b"f") as w:
            assert grab(w) == (h, b"f", b"u", b"data")
            w.send(T.WORK_COMPLETE, h, b"result")
            assert fg.expect(T.WORK_COMPLETE) == (h, b"result")
        bg.expect_nothing(0.2)


def test_same_connection_twice_receives_every_packet_twice(server):
    with server.connect() as c:
        h = submit(c, b"f", b"u", b"d")
        assert submit(c, b"f", b"u", b"d") == h
        with worker(server, b"f") as w:
            grab(w)
            w.send(T.WORK_DATA, h, b"chunk")
            w.send(T.WORK_COMPLETE, h, b"end")
            assert [c.recv().type for _ in range(4)] == [
                T.WORK_DATA, T.WORK_DATA, T.WORK_COMPLETE, T.WORK_COMPLETE]
            c.expect_nothing(0.2)


def test_background_coalescing_learns_handle_only(server):
    with server.connect() as fg, server.connect() as bg:
        h = submit(fg, b"f", b"u", b"d")
        assert submit(bg, b"f", b"u", b"d", T.SUBMIT_JOB_BG) == h
        with worker(server, b"f") as w:
            grab(w)
            w.send(T.WORK_COMPLETE, h, b"r")
            assert fg.expect(T.WORK_COMPLETE) == (h, b"r")
        bg.expect_nothing(0.2)


def test_coalescing_window_ends_with_the_job(server):
    with server.connect() as c, worker(server, b"f") as w:
        h = submit(c, b"f", b"u", b"d")
        grab(w)
        assert submit(c, b"f", b"u", b"d", T.SUBMIT_JOB_BG) == h  # running still coalesces
        w.send(T.WORK_COMPLETE, h, b"r")
        c.expect(T.WORK_COMPLETE)
        assert submit(c, b"f", b"u", b"d", T.SUBMIT_JOB_BG) != h


def test_hyphen_unique_coalesces_on_data(server):
    with server.connect() as c:
        a = submit(c, b"f", b"-", b"payload", T.SUBMIT_JOB_BG)
        assert submit(c, b"f", b"-", b"payload", T.SUBMIT_JOB_BG) == a
        assert submit(c, b"f", b"-", b"other", T.SUBMIT_JOB_BG) != a
        assert submit(c, b"g", b"-", b"payload", T.SUBMIT_JOB_BG) != a
        # An explicit unique equal to the data does not match the '-' job.
        assert submit(c, b"f", b"payload", b"payload", T.SUBMIT_JOB_BG) != a
        # Empty data never coalesces.
        e1 = submit(c, b"f", b"-", b"", T.SUBMIT_JOB_BG)
        assert submit(c, b"f", b"-", b"", T.SUBMIT_JOB_BG) != e1
        c.send(T.GET_STATUS_UNIQUE, b"-")
        assert c.expect(T.STATUS_RES_UNIQUE) == (b"-", b"0", b"0", b"0", b"0", b"0")
        with server.connect() as admin:
            assert sorted(listing(admin, "show unique jobs")) == sorted(
                [b"-", b"-", b"-", b"-", b"-", b"payload"])
        with worker(server, b"f") as w:
            assert grab(w) == (a, b"f", b"-", b"payload")


def test_unique_too_long_is_argument_too_large(server):
    with server.connect() as c:
        c.send(T.SUBMIT_JOB_BG, b"f", b"u" * 65, b"d")
        assert c.expect(T.ERROR) == (b"ARGUMENT_TOO_LARGE", b"Unique value too large")
        c.send(T.SUBMIT_REDUCE_JOB, b"f", b"u", b"r" * 65, b"", b"d")
        assert c.expect(T.ERROR) == (b"ARGUMENT_TOO_LARGE", b"Unique value too large")
        number(submit(c, b"f", b"u" * 64, b"d", T.SUBMIT_JOB_BG))  # 64 is accepted


def test_maxqueue_refuses_new_jobs_but_not_coalescing(server):
    with server.connect() as admin, server.connect() as c:
        assert admin.admin("create function f") == b"OK\r\n"
        assert admin.admin("maxqueue f 1") == b"OK\r\n"
        h = submit(c, b"f", b"u", b"", T.SUBMIT_JOB_BG)
        c.send(T.SUBMIT_JOB_HIGH_BG, b"f", b"v", b"")
        assert c.expect(T.ERROR) == (b"QUEUE_ERROR", b"Job queue is full")
        assert submit(c, b"f", b"u", b"", T.SUBMIT_JOB_LOW) == h  # coalescing is never refused
        # A limit on a function that does not exist yet is discarded.
        assert admin.admin("maxqueue g 1") == b"OK\r\n"
        submit(c, b"g", b"", b"", T.SUBMIT_JOB_BG)
        submit(c, b"g", b"", b"", T.SUBMIT_JOB_BG)


def test_maxqueue_forms(server):
    with server.connect() as admin, server.connect() as c:
        admin.admin("create function f")

        def refused(ptype: int) -> bool:
            c.send(ptype, b"f", b"", b"")
            packet = c.recv()
            if packet.type == T.ERROR:
                assert packet.args == (b"QUEUE_ERROR", b"Job queue is full")
                return True
            assert packet.type == T.JOB_CREATED
            return False

        submit(c, b"f", b"", b"", T.SUBMIT_JOB_BG)  # total is now 1
        assert admin.admin("maxqueue f 0 1") == b"OK\r\n"  # high unlimited, normal 1, low unl.
        assert [refused(T.SUBMIT_JOB_HIGH_BG), refused(T.SUBMIT_JOB_BG),
                refused(T.SUBMIT_JOB_LOW_BG)] == [False, True, False]
        assert admin.admin("maxqueue f 9 9 3") == b"OK\r\n"  # total is 3
        assert [refused(T.SUBMIT_JOB_HIGH_BG), refused(T.SUBMIT_JOB_LOW_BG)] == [False, True]
        assert admin.admin("maxqueue f 2") == b"OK\r\n"  # all three priorities
        assert [refused(T.SUBMIT_JOB_HIGH_BG), refused(T.SUBMIT_JOB_BG)] == [True, True]
        assert admin.admin("maxqueue f") == b"OK\r\n"  # limits removed
        assert not refused(T.SUBMIT_JOB_BG)
        assert admin.admin("maxqueue f -5") == b"OK\r\n"  # <= 0 is unlimited
        assert not refused(T.SUBMIT_JOB_LOW_BG)


def test_same_unique_in_two_functions_is_tracked_per_function(server):
    with server.connect() as c:
        hf = submit(c, b"f", b"u", b"", T.SUBMIT_JOB_BG)
        hg = submit(c, b"g", b"u", b"", T.SUBMIT_JOB_BG)
        with worker(server, b"f") as w:
            assert grab(w)[0] == hf
            w.send(T.WORK_COMPLETE, hf, b"")
            sync(w)
        c.send(T.GET_STATUS_UNIQUE, b"u")  # g's job still answers
        assert c.expect(T.STATUS_RES_UNIQUE) == (b"u", b"1", b"0", b"0", b"0", b"0")
        assert submit(c, b"g", b"u", b"", T.SUBMIT_JOB_BG) == hg
        assert submit(c, b"f", b"u", b"", T.SUBMIT_JOB_BG) not in (hf, hg)


def test_pipelined_submissions_answered_in_order_with_errors(server):
    with server.connect() as c:
        c.send_raw(encode_request(T.SUBMIT_JOB_BG, b"f", b"a", b"")
                   + encode_request(T.SUBMIT_JOB_BG, b"f", b"x" * 65, b"")
                   + encode_request(T.SUBMIT_JOB, b"f", b"a", b"")
                   + encode_request(T.SUBMIT_JOB_LOW_BG, b"f", b"b", b""))
        replies = [c.recv() for _ in range(4)]
        assert [p.type for p in replies] == [T.JOB_CREATED, T.ERROR, T.JOB_CREATED,
                                             T.JOB_CREATED]
        assert replies[0].args == replies[2].args
        assert number(replies[3].args[0]) == number(replies[0].args[0]) + 1


def test_large_job_data_and_result(server):
    data = os.urandom(4 << 20)
    with server.connect() as c, worker(server, b"big") as w:
        h = submit(c, b"big", b"", data)
        assert grab(w, T.GRAB_JOB, timeout=20) == (h, b"big", data)
        w.send(T.WORK_COMPLETE, h, data[::-1])
        assert c.expect(T.WORK_COMPLETE, timeout=20) == (h, data[::-1])


def test_functions_are_listed_once_named(server):
    with server.connect() as admin, worker(server, b"viacando") as w:
        submit(admin, b"viasubmit", b"", b"", T.SUBMIT_JOB_BG)
        rows = status_table(admin)
        assert rows[b"viacando"] == (0, 0, 1) and rows[b"viasubmit"] == (1, 0, 0)
        w.send(T.CANT_DO, b"viacando")
        sync(w)
        if server.kind == "gearmand":
            assert status_table(admin)[b"viacando"] == (0, 0, 0)  # still listed
        else:  # no worker, no job, not admin-created: forgotten (issue #17)
            assert b"viacando" not in status_table(admin)


def test_function_names_are_case_sensitive(server):
    with server.connect() as c, worker(server, b"Upper") as w:
        submit(c, b"upper", b"", b"", T.SUBMIT_JOB_BG)
        w.send(T.GRAB_JOB)
        w.expect(T.NO_JOB)


# -- docs/protocol.md §3.4 WORK_* relay -----------------------------------------------------


def test_work_packets_relayed_byte_identical_to_every_attached_client(server):
    with server.connect() as c1, server.connect() as c2, worker(server, b"f") as w:
        h = submit(c1, b"f", b"u", b"in")
        assert submit(c2, b"f", b"u", b"in", T.SUBMIT_JOB_HIGH) == h
        grab(w)
        sent = [
            (T.WORK_DATA, (h, b"da\0ta")),
            (T.WORK_WARNING, (h, b"")),
            (T.WORK_STATUS, (h, b"abc", b"1\0 2")),
            (T.WORK_STATUS, (h, b"1", b"2")),
            (T.WORK_COMPLETE, (h, b"re\0sult\0")),
        ]
        for ptype, args in sent:
            w.send(ptype, *args)
        for client in (c1, c2):
            assert [(p.type, p.args) for p in (client.recv() for _ in sent)] == sent
        w.expect_nothing(0.2)
        c1.send(T.GET_STATUS, h)
        assert c1.expect(T.STATUS_RES) == (h, b"0", b"0", b"0", b"0")


def test_work_fail_relayed_and_ends_job(server):
    with server.connect() as c, worker(server, b"f") as w:
        h = submit(c, b"f", b"", b"in", T.SUBMIT_JOB_LOW)
        grab(w)
        w.send(T.WORK_FAIL, h)
        assert c.expect(T.WORK_FAIL) == (h,)
        w.send(T.WORK_COMPLETE, h, b"late")
        assert w.expect(T.ERROR) == (b"JOB_NOT_FOUND", b"Job given in work result not found")


def test_late_attach_gets_only_later_packets(server):
    with server.connect() as early, server.connect() as late, worker(server, b"f") as w:
        h = submit(early, b"f", b"u", b"in")
        grab(w)
        w.send(T.WORK_DATA, h, b"before")
        assert early.expect(T.WORK_DATA) == (h, b"before")
        assert submit(late, b"f", b"u", b"in") == h
        w.send(T.WORK_DATA, h, b"after")
        w.send(T.WORK_COMPLETE, h, b"end")
        assert late.expect(T.WORK_DATA) == (h, b"after")
        assert late.expect(T.WORK_COMPLETE) == (h, b"end")
        assert early.expect(T.WORK_DATA) == (h, b"after")
        assert early.expect(T.WORK_COMPLETE) == (h, b"end")


def test_work_from_connection_not_holding_the_job_is_job_not_found(server):
    texts = {
        T.WORK_STATUS: b"Job given in work result not found",
        T.WORK_COMPLETE: b"Job given in work result not found",
        T.WORK_FAIL: b"Job given in work result not found",
        T.WORK_DATA: b"Job does not exist on server",
        T.WORK_WARNING: b"Job does not exist on server",
        T.WORK_EXCEPTION: b"An exception was received for a job that does not exist",
    }
    with server.connect() as c, worker(server, b"f") as holder, worker(server, b"f") as other:
        h = submit(c, b"f", b"", b"in")
        grab(holder)
        for handle in (h, b"H:unknown:99"):
            for ptype, text in texts.items():
                fields = {T.WORK_STATUS: (handle, b"1", b"2"), T.WORK_FAIL: (handle,)}.get(
                    ptype, (handle, b"x"))
                other.send(ptype, *fields)
                assert other.expect(T.ERROR) == (b"JOB_NOT_FOUND", text), (handle, ptype)
        c.expect_nothing(0.1)
        holder.send(T.WORK_COMPLETE, h, b"ok")
        assert c.expect(T.WORK_COMPLETE) == (h, b"ok")
        holder.send(T.WORK_COMPLETE, h, b"again")  # a second result
        assert holder.expect(T.ERROR) == (b"JOB_NOT_FOUND", texts[T.WORK_COMPLETE])
        other.send(T.WORK_FAIL, b"H:" + b"x" * 62)  # a handle of 64 bytes
        assert other.expect(T.ERROR) == (
            b"ARGUMENT_TOO_LARGE",
            b"Error occurred due to GEARMAND_JOB_HANDLE_SIZE being too small from snprintf")


def test_running_foreground_job_of_departed_client_accepts_results(server):
    with worker(server, b"f") as w:
        c = server.connect()
        h = submit(c, b"f", b"", b"in")
        grab(w)
        c.close()
        time.sleep(0.1)
        w.send(T.WORK_STATUS, h, b"1", b"2")
        w.send(T.WORK_DATA, h, b"x")
        w.send(T.WORK_COMPLETE, h, b"done")
        w.expect_nothing(0.3)  # the worker never sees an error for it


# -- docs/protocol.md §3.5 priorities -----------------------------------------------------------


def test_priority_order_within_a_function(server):
    with server.connect() as c:
        order = [(T.SUBMIT_JOB_LOW_BG, b"low1"), (T.SUBMIT_JOB_BG, b"norm1"),
                 (T.SUBMIT_JOB_HIGH_BG, b"high1"), (T.SUBMIT_JOB_LOW_BG, b"low2"),
                 (T.SUBMIT_JOB_BG, b"norm2"), (T.SUBMIT_JOB_HIGH_BG, b"high2")]
        for ptype, data in order:
            submit(c, b"f", b"", data, ptype)
        with server.connect() as admin:
            assert listing(admin, "prioritystatus") == [b"f\t2\t2\t2\t0"]
        with worker(server, b"f") as w:
            got = [grab(w, T.GRAB_JOB)[2] for _ in order]
            assert got == [b"high1", b"high2", b"norm1", b"norm2", b"low1", b"low2"]
            w.send(T.GRAB_JOB)
            w.expect(T.NO_JOB)


def test_requeued_job_goes_to_the_tail_of_its_priority(server):
    with server.connect() as c:
        first = submit(c, b"f", b"", b"first", T.SUBMIT_JOB_BG)
        w1 = worker(server, b"f")
        assert grab(w1)[0] == first
        submit(c, b"f", b"", b"second", T.SUBMIT_JOB_BG)
        w1.close()
        with server.connect() as admin:
            wait_until(lambda: show_jobs(admin).get(first, (0,))[0] == 1)
        with worker(server, b"f") as w2:
            assert [grab(w2)[3] for _ in range(2)] == [b"second", b"first"]


# -- docs/protocol.md §3.6 PRE_SLEEP / NOOP -----------------------------------------------------


def test_pre_sleep_with_runnable_job_gets_immediate_noop_every_time(server):
    with server.connect() as c, worker(server, b"f") as w:
        submit(c, b"f", b"", b"", T.SUBMIT_JOB_BG)
        w.send(T.PRE_SLEEP)
        w.expect(T.NOOP)
        w.send(T.PRE_SLEEP)
        w.expect(T.NOOP)  # rule 1 applies to repeated PRE_SLEEPs too
        grab(w)


def test_pre_sleep_without_work_is_silent_then_one_noop(server):
    with server.connect() as c, worker(server, b"f") as sleeper, \
            worker(server, b"g") as other_func, worker(server, b"f") as awake:
        sleeper.send(T.PRE_SLEEP)
        other_func.send(T.PRE_SLEEP)
        sync(sleeper)  # rule 2: no reply (the ECHO_RES comes first)
        sync(other_func)
        submit(c, b"f", b"", b"1", T.SUBMIT_JOB_BG)
        sleeper.expect(T.NOOP)  # rule 3
        submit(c, b"f", b"", b"2", T.SUBMIT_JOB_BG)
        sleeper.expect_nothing(0.2)  # no second NOOP before it grabs
        other_func.expect_nothing(0.05)  # not registered for f
        awake.expect_nothing(0.05)  # never sent PRE_SLEEP
        assert grab(sleeper)[3] == b"1"


def test_noop_is_only_a_hint(server):
    with server.connect() as c, worker(server, b"f") as sleeper, worker(server, b"f") as fast:
        sleeper.send(T.PRE_SLEEP)
        sync(sleeper)
        submit(c, b"f", b"", b"", T.SUBMIT_JOB_BG)
        sleeper.expect(T.NOOP)
        grab(fast)
        sleeper.send(T.GRAB_JOB_UNIQ)
        sleeper.expect(T.NO_JOB)  # rule 6: another worker won


def test_requeue_wakes_sleeping_worker(server):
    with server.connect() as c, worker(server, b"f") as sleeper:
        holder = worker(server, b"f")
        h = submit(c, b"f", b"", b"x", T.SUBMIT_JOB_BG)
        grab(holder)
        sleeper.send(T.PRE_SLEEP)
        sync(sleeper)
        holder.close()
        sleeper.expect(T.NOOP)
        assert grab(sleeper)[0] == h


# -- GRAB variants (docs/protocol.md §2.1, §3.12) ----------------------------------------------


def test_grab_reply_types(server):
    with server.connect() as c, worker(server, b"f") as w:
        h1 = submit(c, b"f", b"", b"", T.SUBMIT_JOB_BG)
        h2 = submit(c, b"f", b"uu", b"d2", T.SUBMIT_JOB_BG)
        h3 = submit(c, b"f", b"", b"d3", T.SUBMIT_JOB_BG)
        c.send(T.SUBMIT_REDUCE_JOB_BACKGROUND, b"f", b"ru", b"red", b"agg", b"d4")
        h4 = c.expect(T.JOB_CREATED)[0]
        c.send(T.SUBMIT_REDUCE_JOB_BACKGROUND, b"f", b"ru2", b"red2", b"agg", b"d5")
        h5 = c.expect(T.JOB_CREATED)[0]
        c.send(T.SUBMIT_REDUCE_JOB_BACKGROUND, b"f", b"ru3", b"red3", b"agg", b"d6")
        h6 = c.expect(T.JOB_CREATED)[0]

        w.send(T.GRAB_JOB)
        packet = w.recv()
        assert packet.type == T.JOB_ASSIGN and packet.args == (h1, b"f", b"")
        w.send(T.GRAB_JOB_UNIQ)
        assert w.expect(T.JOB_ASSIGN_UNIQ) == (h2, b"f", b"uu", b"d2")
        w.send(T.GRAB_JOB_ALL)
        assert w.expect(T.JOB_ASSIGN_UNIQ) == (h3, b"f", b"", b"d3")  # no reducer
        w.send(T.GRAB_JOB_ALL)
        assert w.expect(T.JOB_ASSIGN_ALL) == (h4, b"f", b"ru", b"red", b"d4")
        w.send(T.GRAB_JOB)
        assert w.expect(T.JOB_ASSIGN) == (h5, b"f", b"d5")  # reducer dropped
        w.send(T.GRAB_JOB_UNIQ)
        assert w.expect(T.JOB_ASSIGN_UNIQ) == (h6, b"f", b"ru3", b"d6")
        w.send(T.GRAB_JOB_ALL)
        w.expect(T.NO_JOB)


def test_job_assign_with_empty_data_bytes(server):
    with server.connect() as c, worker(server, b"f") as w:
        h = submit(c, b"f", b"", b"", T.SUBMIT_JOB_BG)
        w.send(T.GRAB_JOB)
        expected = struct.pack(">4sII", RES, T.JOB_ASSIGN, len(h) + 3) + h + b"\0f\0"
        buf = b""
        w.sock.settimeout(5)
        while len(buf) < len(expected):
            buf += w.sock.recv(4096)
        assert buf == expected


# -- GET_STATUS / GET_STATUS_UNIQUE (docs/protocol.md §2.1) --------------------------------------


def test_get_status(server):
    with server.connect() as c, worker(server, b"f") as w:
        c.send(T.GET_STATUS, b"H:x:9")
        assert c.expect(T.STATUS_RES) == (b"H:x:9", b"0", b"0", b"0", b"0")
        h = submit(c, b"f", b"", b"", T.SUBMIT_JOB_BG)
        c.send(T.GET_STATUS, h)
        assert c.expect(T.STATUS_RES) == (h, b"1", b"0", b"0", b"0")
        grab(w)
        c.send(T.GET_STATUS, h)
        assert c.expect(T.STATUS_RES) == (h, b"1", b"1", b"0", b"0")
        for num, den, want in [(b"3", b"10", (b"3", b"10")), (b"abc", b"12xyz", (b"0", b"12")),
                               (b"-1", b"7", (b"4294967295", b"7")),
                               (b"4294967297", b" +5", (b"1", b"5")),
                               # gearmand parses with strtol: saturates at +-2**63
                               (b"9223372036854775813", b"7", (b"4294967295", b"7")),
                               (b"-18446744073709551615", b"7", (b"0", b"7"))]:
            w.send(T.WORK_STATUS, h, num, den)
            w.send(T.ECHO_REQ, b"sync")
            w.expect(T.ECHO_RES)
            c.send(T.GET_STATUS, h)
            assert c.expect(T.STATUS_RES) == (h, b"1", b"1", *want)
        w.send(T.WORK_COMPLETE, h, b"")
        w.send(T.ECHO_REQ, b"sync")
        w.expect(T.ECHO_RES)
        c.send(T.GET_STATUS, h)
        assert c.expect(T.STATUS_RES) == (h, b"0", b"0", b"0", b"0")


def test_get_status_unique(server):
    with server.connect() as c1, server.connect() as c2, worker(server, b"f") as w:
        c1.send(T.GET_STATUS_UNIQUE, b"nope")
        assert c1.expect(T.STATUS_RES_UNIQUE) == (b"nope", b"0", b"0", b"0", b"0", b"0")
        h = submit(c1, b"f", b"uq", b"")
        submit(c2, b"f", b"uq", b"")
        c1.send(T.GET_STATUS_UNIQUE, b"uq")
        assert c1.expect(T.STATUS_RES_UNIQUE) == (b"uq", b"1", b"0", b"0", b"0", b"2")
        submit(c1, b"g", b"bq", b"", T.SUBMIT_JOB_BG)
        c1.send(T.GET_STATUS_UNIQUE, b"bq")
        assert c1.expect(T.STATUS_RES_UNIQUE) == (b"bq", b"1", b"0", b"0", b"0", b"0")
        grab(w)
        w.send(T.WORK_STATUS, h, b"5", b"6")
        c1.expect(T.WORK_STATUS)
        c2.expect(T.WORK_STATUS)
        c2.send(T.GET_STATUS_UNIQUE, b"uq")
        assert c2.expect(T.STATUS_RES_UNIQUE) == (b"uq", b"1", b"1", b"5", b"6", b"2")


# -- ECHO, OPTION_REQ, exceptions (docs/protocol.md §2.1, §3.10) ---------------------------------


def test_echo(server):
    with server.connect() as c:
        for data in (b"", b"\0", b"a\0b\0\0c", os.urandom(70000)):
            c.send(T.ECHO_REQ, data)
            assert c.expect(T.ECHO_RES) == (data,)


def test_option_req(server):
    with server.connect() as c:
        c.send(T.OPTION_REQ, b"exceptions")
        assert c.expect(T.OPTION_RES) == (b"exceptions",)
        c.send(T.OPTION_REQ, b"EXCEPTIONS")
        assert c.expect(T.OPTION_RES) == (b"EXCEPTIONS",)
        c.send(T.OPTION_REQ, b"ExCePtIoNs")
        assert c.expect(T.OPTION_RES) == (b"ExCePtIoNs",)
        for option in (b"nonsense", b"exception", b""):
            c.send(T.OPTION_REQ, option)
            assert c.expect(T.ERROR) == (b"UNKNOWN_OPTION",
                                         b"Server does not recognize given option")


def test_work_exception_with_and_without_the_option(server):
    with server.connect() as opted, server.connect() as plain, worker(server, b"f") as w:
        opted.send(T.OPTION_REQ, b"exceptions")
        opted.expect(T.OPTION_RES)
        h = submit(opted, b"f", b"u", b"")
        submit(plain, b"f", b"u", b"")
        grab(w)
        w.send(T.WORK_EXCEPTION, h, b"boom\0details")
        assert opted.expect(T.WORK_EXCEPTION) == (h, b"boom\0details")
        # gearmand converts to "HANDLE\0" (Q1); ours sends the bare handle.
        assert plain.expect(T.WORK_FAIL)[0] in (h, h + b"\0")
        w.send(T.ECHO_REQ, b"sync")
        w.expect(T.ECHO_RES)
        plain.send(T.GET_STATUS, h)
        assert plain.expect(T.STATUS_RES) == (h, b"0", b"0", b"0", b"0")  # the job ended


# -- docs/protocol.md §3.7 / §3.9 requeue --------------------------------------------------------


def test_worker_disconnect_requeues_job(server):
    with server.connect() as c, server.connect() as admin:
        h = submit(c, b"f", b"", b"data")
        w1 = worker(server, b"f")
        grab(w1)
        w1.send(T.WORK_STATUS, h, b"1", b"2")
        assert c.expect(T.WORK_STATUS) == (h, b"1", b"2")
        assert show_jobs(admin)[h][0] == 0
        w1.close()
        wait_until(lambda: show_jobs(admin).get(h, (0,))[0] == 1)
        c.send(T.GET_STATUS, h)
        assert c.expect(T.STATUS_RES) == (h, b"1", b"0", b"0", b"0")  # numerator reset
        c.expect_nothing(0.05)  # the client is told nothing
        with worker(server, b"f") as w2:
            assert grab(w2) == (h, b"f", b"", b"data")
            w2.send(T.WORK_COMPLETE, h, b"ok")
            assert c.expect(T.WORK_COMPLETE) == (h, b"ok")


def test_worker_holding_several_jobs_loses_all_of_them(server):
    with server.connect() as c, server.connect() as admin:
        handles = {submit(c, b"f", b"", b"%d" % i, T.SUBMIT_JOB_BG) for i in range(3)}
        w = worker(server, b"f")
        assert {grab(w)[0] for _ in range(3)} == handles
        w.close()
        wait_until(lambda: {h: r[0] for h, r in show_jobs(admin).items()}
                   == dict.fromkeys(handles, 1))
        assert status_table(admin)[b"f"] == (3, 0, 0)


def test_cant_do_requeues_and_later_result_is_job_not_found(server):
    with server.connect() as c, worker(server, b"f") as w:
        h = submit(c, b"f", b"", b"d")
        grab(w)
        w.send(T.CANT_DO, b"f")
        w.send(T.WORK_COMPLETE, h, b"late")
        assert w.expect(T.ERROR) == (b"JOB_NOT_FOUND", b"Job given in work result not found")
        with worker(server, b"f") as w2:
            assert grab(w2)[0] == h


def test_reset_abilities_requeues_held_job(server):
    with server.connect() as c, worker(server, b"f", b"g") as w:
        h = submit(c, b"g", b"", b"d")
        grab(w)
        w.send(T.RESET_ABILITIES)
        w.send(T.WORK_DATA, h, b"late")
        assert w.expect(T.ERROR) == (b"JOB_NOT_FOUND", b"Job does not exist on server")
        c.expect_nothing(0.05)
        with worker(server, b"g") as w2:
            assert grab(w2)[0] == h


@pytest.mark.parametrize("ptype", [T.SUBMIT_JOB, T.SUBMIT_JOB_BG], ids=["fg", "bg"])
def test_cancelled_running_job_is_not_run_again_after_worker_loss(server, ptype):
    with server.connect() as c, server.connect() as admin:
        h = submit(c, b"f", b"u", b"d", ptype)
        w = worker(server, b"f")
        grab(w)
        assert admin.admin(f"cancel job {h.decode()}") == b"OK\r\n"
        w.close()
        time.sleep(0.2)
        with worker(server, b"f") as w2:
            w2.send(T.GRAB_JOB_UNIQ)
            w2.expect(T.NO_JOB)
        wait_until(lambda: show_jobs(admin) == {})


def test_can_do_timeout_requeues(server):
    with server.connect() as c, server.connect() as admin:
        h = submit(c, b"f", b"", b"d")
        with server.connect() as slow:
            slow.send(T.CAN_DO_TIMEOUT, b"f", b"1000")
            start = time.monotonic()
            grab(slow)
            if server.kind == "gearoffload":
                # A timeout is a failed attempt (issue #17, as the Perl server): WORK_FAIL.
                assert c.expect(T.WORK_FAIL, timeout=4) == (h,)
                assert time.monotonic() - start >= 0.9
                assert show_jobs(admin) == {}
                return
            wait_until(lambda: show_jobs(admin).get(h, (0,))[0] == 1, timeout=4)
            assert time.monotonic() - start >= 0.9
            assert status_table(admin)[b"f"][:2] == (1, 0)  # queued again, not running
            with worker(server, b"f") as w2:
                assert grab(w2)[0] == h
                slow.send(T.WORK_COMPLETE, h, b"late")
                assert slow.expect(T.ERROR) == (b"JOB_NOT_FOUND",
                                                b"Job given in work result not found")
                c.expect_nothing(0.05)
                w2.send(T.WORK_COMPLETE, h, b"ok")
                assert c.expect(T.WORK_COMPLETE) == (h, b"ok")


# -- docs/protocol.md §3.11 epoch jobs -----------------------------------------------------------


def test_epoch_in_the_past_is_runnable_at_once(server):
    with server.connect() as c, worker(server, b"f") as w:
        for epoch in (b"1", b"0", b"%d" % (time.time() - 5), b"garbage"):
            c.send(T.SUBMIT_JOB_EPOCH, b"f", b"", epoch, b"d" + epoch)
            h = c.expect(T.JOB_CREATED)[0]
            assert grab(w) == (h, b"f", b"", b"d" + epoch)


def test_future_epoch_job_waits_and_is_skipped(server):
    with server.connect() as c, server.connect() as admin, worker(server, b"f") as w:
        c.send(T.SUBMIT_JOB_EPOCH, b"f", b"e", b"%d" % (time.time() + 3600), b"later")
        later = c.expect(T.JOB_CREATED)[0]
        now = submit(c, b"f", b"", b"now", T.SUBMIT_JOB_BG)
        assert status_table(admin)[b"f"] == (2, 0, 1)
        assert listing(admin, "prioritystatus") == [b"f\t0\t2\t0\t1"]
        c.send(T.GET_STATUS, later)
        assert c.expect(T.STATUS_RES) == (later, b"1", b"0", b"0", b"0")
        assert grab(w)[0] == now
        w.send(T.GRAB_JOB_UNIQ)
        w.expect(T.NO_JOB)
        assert submit(c, b"f", b"e", b"again", T.SUBMIT_JOB_BG) == later  # coalesces


# -- docs/protocol.md §4 admin protocol ----------------------------------------------------------


def test_admin_status_and_prioritystatus(server):
    with server.connect() as c, server.connect() as admin:
        w = worker(server, b"f", b"g")
        w.send(T.CAN_DO, b"f")  # duplicate registration (counted once or twice)
        submit(c, b"f", b"", b"", T.SUBMIT_JOB_HIGH_BG)
        submit(c, b"f", b"", b"", T.SUBMIT_JOB_BG)
        submit(c, b"f", b"", b"", T.SUBMIT_JOB_LOW_BG)
        grab(w)
        assert admin.admin("create function empty") == b"OK\r\n"
        rows = status_table(admin)
        assert rows[b"f"][:2] == (3, 1) and rows[b"f"][2] in (1, 2)
        assert rows[b"g"] == (0, 0, 1)
        assert rows[b"empty"] == (0, 0, 0)
        reply = admin.admin("status")
        assert re.fullmatch(rb"(\S+\t\d+\t\d+\t\d+\n)*\.\n", reply)
        prio = {line.split(b"\t")[0]: line for line in listing(admin, "prioritystatus")}
        assert prio[b"f"] in (b"f\t0\t1\t1\t1", b"f\t0\t1\t1\t2")  # running job excluded
        assert prio[b"empty"] == b"empty\t0\t0\t0\t0"
        w.close()
        wait_until(lambda: status_table(admin)[b"f"] == (3, 0, 0))  # function stays listed
        if server.kind == "gearmand":
            assert status_table(admin)[b"g"] == (0, 0, 0)
        else:  # no worker, no job, not admin-created: forgotten (issue #17)
            assert b"g" not in status_table(admin)
        assert status_table(admin)[b"empty"] == (0, 0, 0)  # created by admin: kept


def test_admin_workers(server):
    with server.connect() as admin, worker(server, b"fa", b"fb", client_id=b"w-1") as w, \
            server.connect() as c:
        c.send(T.ECHO_REQ, b"")
        c.expect(T.ECHO_RES)
        w.send(T.ECHO_REQ, b"")
        w.expect(T.ECHO_RES)
        lines = listing(admin, "workers")
        assert len(lines) == 3  # the worker, the client and the admin connection itself
        for line in lines:
            assert re.fullmatch(rb"\d+ 127\.0\.0\.1 \S+ :( \S+)*", line), line
        assert any(re.fullmatch(rb"\d+ 127\.0\.0\.1 w-1 : fb fa", line) for line in lines)
        assert sum(bool(re.fullmatch(rb"\d+ 127\.0\.0\.1 - :", line)) for line in lines) == 2


def test_admin_show_jobs_and_unique_jobs(server):
    with server.connect() as c, server.connect() as admin, worker(server, b"f") as w:
        bg = submit(c, b"f", b"ubg", b"", T.SUBMIT_JOB_BG)
        fg = submit(c, b"f", b"", b"")
        grab(w)
        reply = admin.admin("show jobs")
        assert re.fullmatch(rb"(\S+\t\d+\t\d+\t\d+\n)*\.\n", reply)
        assert show_jobs(admin) == {bg: (0, 0, 1), fg: (0, 0, 0)}
        assert sorted(listing(admin, "show unique jobs")) == [b"", b"ubg"]
        assert listing(admin, "SHOW   JOBS") == listing(admin, "show jobs")


def test_admin_cancel_job(server):
    with server.connect() as c, server.connect() as admin:
        h = submit(c, b"f", b"", b"")
        assert admin.admin(f"cancel job {h.decode()}") == b"OK\r\n"
        assert c.expect(T.WORK_FAIL) == (h,)
        assert admin.admin("cancel job H:nope:77") == b"ERR UNKNOWN_JOB\r\n"


def test_admin_create_and_drop_function(server):
    with server.connect() as admin:
        assert admin.admin("create function Resize") == b"OK\r\n"
        assert status_table(admin)[b"Resize"] == (0, 0, 0)
        assert admin.admin("drop function RESIZE") == b"OK\r\n"  # case-insensitive
        assert b"Resize" not in status_table(admin)
        assert admin.admin("drop function Resize") == b"ERR function not found\r\n"
        with worker(server, b"busy") as w:
            w.send(T.ECHO_REQ, b"")
            w.expect(T.ECHO_RES)
            assert admin.admin("drop function busy") == (
                b"ERR there are still connected workers or executing clients\r\n")


def test_admin_value_replies(server):
    with server.connect() as admin:
        assert admin.admin_raw(b"getpid\n") == b"OK %d\n" % server.proc.pid
        assert re.fullmatch(rb"OK (FATAL|ALERT|CRITICAL|ERROR|WARNING|NOTICE|INFO|DEBUG)\n",
                            admin.admin_raw(b"verbose\n"))
        version = admin.admin_raw(b"version\n")
        assert re.fullmatch(rb"OK \S+\n", version), version


ERROR_TABLE = [
    (b"foo", b"ERR UNKNOWN_COMMAND Unknown+server+commandfoo\r\n"),
    (b"", b"ERR UNKNOWN_COMMAND Unknown+server+command\r\n"),
    (b"   ", b"ERR UNKNOWN_COMMAND Unknown+server+command\r\n"),
    (b" status", b"ERR UNKNOWN_COMMAND Unknown+server+command\r\n"),
    (b"status\tx", b"ERR UNKNOWN_COMMAND Unknown+server+commandstatus\tx\r\n"),
    (b"show", b"ERR UNKNOWN_COMMAND Unknown+server+commandshow\r\n"),
    (b"cancel", b"ERR UNKNOWN_COMMAND Unknown+server+commandcancel\r\n"),
    (b"cancel job", b"ERR UNKNOWN_COMMAND Unknown+server+commandcancel\r\n"),
    (b"show foo", b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n"),
    (b"show jobs x", b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n"),
    (b"show unique", b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n"),
    (b"cancel jobs x", b"ERR UNKNOWN_ERROR\r\n"),
    (b"cancel job H:x:1 extra", b"ERR UNKNOWN_ERROR\r\n"),
    (b"create", b"ERR INVALID_ARGUMENTS "
     b"An+incomplete+set+of+arguments+was+sent+to+this+command+create\r\n"),
    (b"create function", b"ERR INVALID_ARGUMENTS "
     b"An+incomplete+set+of+arguments+was+sent+to+this+command+create\r\n"),
    (b"create fun x", b"ERR INVALID_ARGUMENTS "
     b"An+incomplete+set+of+arguments+was+sent+to+this+command+create\r\n"),
    (b"drop x", b"ERR INVALID_ARGUMENTS "
     b"An+incomplete+set+of+arguments+was+sent+to+this+command+drop\r\n"),
    (b"maxqueue", b"ERR INVALID_ARGUMENTS "
     b"An+incomplete+set+of+arguments+was+sent+to+this+command+maxqueue\r\n"),
    (b"cancel job H:nope:1", b"ERR UNKNOWN_JOB\r\n"),
    (b"shutdown", b"ERR UNKNOWN_COMMAND Unknown+server+commandshutdown\r\n"),
    (b"shutdown graceful", b"ERR UNKNOWN_COMMAND Unknown+server+commandshutdown\r\n"),
]


def test_admin_error_replies_byte_for_byte(server):
    with server.connect() as admin:
        for line, reply in ERROR_TABLE:
            assert admin.admin_raw(line + b"\r\n") == reply, line
            assert admin.admin_raw(line + b"\n") == reply, line
        assert admin.admin_raw(b"version\n").startswith(b"OK ")  # still open


def test_admin_commands_are_case_insensitive_and_ignore_extra_words(server):
    with server.connect() as admin:
        admin.admin("create function f")
        expected = admin.admin("status")
        assert b"f\t0\t0\t0\n" in expected
        for command in ("STATUS", "Status", "status a b c", "status  a  b  c  d"):
            assert admin.admin(command) == expected, command
        assert admin.admin("VERSION x").startswith(b"OK ")
        assert admin.admin("GetPid") == b"OK %d\n" % server.proc.pid
        assert admin.admin("show UNIQUE Jobs") == b".\n"


def test_admin_pipelined_commands(server):
    with server.connect() as admin:
        admin.send_raw(b"create function p\r\nstatus\nbogus\ngetpid\r\nshow jobs\n")
        expected = (b"OK\r\np\t0\t0\t0\n.\n"
                    b"ERR UNKNOWN_COMMAND Unknown+server+commandbogus\r\n"
                    + b"OK %d\n" % server.proc.pid + b".\n")
        buf = b""
        admin.sock.settimeout(5)
        while len(buf) < len(expected):
            chunk = admin.sock.recv(4096)
            assert chunk, buf
            buf += chunk
        assert buf == expected


def test_overlong_admin_line_closes_the_connection(server):
    with server.connect() as conn:
        conn.send_raw(b"status " + b"x" * 9000 + b"\n")
        assert conn.is_closed()


def test_admin_then_binary_on_one_connection(server):
    with server.connect() as conn:
        assert conn.admin("status") == b".\n"
        conn.send(T.ECHO_REQ, b"bin")
        assert conn.expect(T.ECHO_RES) == (b"bin",)


# -- differential: random sessions replayed on both servers ---------------------------------------

_NUMBERED = re.compile(rb"H:[^:\0\t\n]+:(\d+)")
_BACKGROUND = {T.SUBMIT_JOB_BG, T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_LOW_BG, T.SUBMIT_JOB_EPOCH,
               T.SUBMIT_REDUCE_JOB_BACKGROUND}


class _Session:
    """One random but seeded session: three clients, three single-function workers and an
    admin connection. Every step is one request; afterwards each connection is drained
    (the acting one first) and what it received is recorded with handles normalised."""

    def __init__(self, server, seed: int) -> None:
        import random

        self.rnd = random.Random(seed)
        self.server = server
        self.clients = [server.connect() for _ in range(3)]
        self.funcs = [b"f", b"f", b"g"]
        self.workers = [worker(server, func) for func in self.funcs]
        self.admin = server.connect()
        self.held: list[list[bytes]] = [[], [], []]
        self.noop = [False] * 3
        self.handles: list[bytes] = []
        self.log: list[tuple] = []
        #: Whether each job (normalised handle) was created by a background submission,
        #: and the foreground jobs a background submission coalesced onto: we make those
        #: background (issue #17 item 5), gearmand does not, which only ``show jobs``
        #: shows in these sessions (no client disconnects). Their flag is not compared.
        self.background: dict[bytes, bool] = {}
        self.promoted: set[bytes] = set()
        self.clients[0].send(T.OPTION_REQ, b"exceptions")  # the others get WORK_FAIL
        self.clients[0].expect(T.OPTION_RES)

    def close(self) -> None:
        for conn in (*self.clients, *self.workers, self.admin):
            conn.close()

    @staticmethod
    def _norm(data: bytes) -> bytes:
        return _NUMBERED.sub(lambda m: b"H#" + m.group(1), data)

    def _drain(self, conn) -> list[tuple]:
        conn.send(T.ECHO_REQ, b"__drain__")
        got = []
        while True:
            packet = conn.recv()
            if packet.type == T.ECHO_RES and packet.args == (b"__drain__",):
                return got
            args = packet.args
            if packet.type == T.WORK_FAIL:  # Q1: gearmand may append a NUL
                args = (args[0].removesuffix(b"\0"),)
            got.append((packet.type, args))

    def step(self) -> None:
        rnd = self.rnd
        op = rnd.choice(["submit"] * 4 + ["grab"] * 3 + ["work"] * 5
                        + ["status", "unique", "admin", "sleep", "drop", "cant_do"])
        i = rnd.randrange(3)
        actor = 3 + i
        if op == "submit":
            func = rnd.choice([b"f", b"g"])
            unique = rnd.choice([b"", b"-", b"a" if func == b"f" else b"b"])
            ptype = rnd.choice([T.SUBMIT_JOB, T.SUBMIT_JOB_BG, T.SUBMIT_JOB_HIGH,
                                T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_LOW, T.SUBMIT_JOB_LOW_BG,
                                T.SUBMIT_JOB_EPOCH, T.SUBMIT_REDUCE_JOB,
                                T.SUBMIT_REDUCE_JOB_BACKGROUND])
            data = rnd.choice([b"x", b"y", b""])
            if ptype == T.SUBMIT_JOB_EPOCH:
                extra: tuple[bytes, ...] = (b"1",)  # in the past: runnable at once
            elif ptype in (T.SUBMIT_REDUCE_JOB, T.SUBMIT_REDUCE_JOB_BACKGROUND):
                extra = (b"red", b"agg")
            else:
                extra = ()
            self.clients[i].send(ptype, func, unique, *extra, data)
            what, actor = ("submit", i, int(ptype), func, unique, data), i
        elif op == "grab" or (op == "sleep" and self.noop[i]):
            # A worker always grabs after a NOOP (rule 4 differs: see test_quirks).
            self.workers[i].send(rnd.choice([T.GRAB_JOB, T.GRAB_JOB_UNIQ, T.GRAB_JOB_ALL]))
            self.noop[i] = False
            what = ("grab", i)
        elif op == "sleep":
            self.workers[i].send(T.PRE_SLEEP)
            what = ("sleep", i)
        elif op == "work":
            if not self.held[i]:
                return
            handle = rnd.choice(self.held[i])
            kind = rnd.choice(["status", "data", "complete", "fail", "exception"])
            w = self.workers[i]
            if kind == "status":
                w.send(T.WORK_STATUS, handle, b"%d" % rnd.randrange(5), b"5")
            elif kind == "data":
                w.send(T.WORK_DATA, handle, b"d")
            else:
                self.held[i].remove(handle)
                if kind == "complete":
                    w.send(T.WORK_COMPLETE, handle, b"r")
                elif kind == "fail":
                    w.send(T.WORK_FAIL, handle)
                else:
                    w.send(T.WORK_EXCEPTION, handle, b"e")
            what = ("work", i, kind, self._norm(handle))
        elif op in ("drop", "cant_do"):
            # Requeue order of several held jobs is not specified (gearmand: newest first).
            if len(self.held[i]) > 1:
                return
            if op == "drop":
                self.workers[i].close()
                self.workers[i] = worker(self.server, self.funcs[i])
            else:
                self.workers[i].send(T.CANT_DO, self.funcs[i])
                self.workers[i].send(T.CAN_DO, self.funcs[i])
            self.held[i] = []
            self.noop[i] = False
            what = (op, i)
        elif op == "status":
            if not self.handles:
                return
            handle = rnd.choice(self.handles)
            self.admin.send(T.GET_STATUS, handle)
            what, actor = ("status", self._norm(handle)), 6
        elif op == "unique":
            unique = rnd.choice([b"a", b"b"])
            self.admin.send(T.GET_STATUS_UNIQUE, unique)
            what, actor = ("unique", unique), 6
        else:
            command = rnd.choice(["status", "prioritystatus", "show jobs"])
            lines = self._norm(self.admin.admin(command)).split(b"\n")
            if command == "show jobs":
                lines = [line.rpartition(b"\t")[0] + b"\t*"
                         if line.split(b"\t")[0] in self.promoted else line for line in lines]
            self.log.append((command, sorted(lines)))
            return
        conns = [*self.clients, *self.workers, self.admin]
        received: list = [None] * len(conns)
        received[actor] = self._drain(conns[actor])
        for k, conn in enumerate(conns):
            if received[k] is None:
                received[k] = self._drain(conn)
        for k, packets in enumerate(received):
            for ptype, args in packets:
                if ptype == T.JOB_CREATED:
                    self.handles.append(args[0])
                    handle, background = self._norm(args[0]), what[2] in _BACKGROUND
                    if background and self.background.get(handle) is False:
                        self.promoted.add(handle)
                    self.background.setdefault(handle, background)
                elif k >= 3 and ptype == T.NOOP:
                    self.noop[k - 3] = True
                elif ptype in (T.JOB_ASSIGN, T.JOB_ASSIGN_UNIQ, T.JOB_ASSIGN_ALL):
                    self.held[k - 3].append(args[0])
        self.log.append((what, [[(t, tuple(self._norm(a) for a in args)) for t, args in got]
                                for got in received]))


@pytest.mark.parametrize("seed", range(6))
def test_random_sessions_behave_like_gearmand(server_factory, seed):
    """The same seeded session on both servers gives the same packets to every connection
    and the same admin listings (our server with --worker-wakeup 0, gearmand's NOOP rule)."""
    logs = []
    for kind, args in (("gearoffload", ["--worker-wakeup", "0"]), ("gearmand", [])):
        session = _Session(server_factory(kind, *args), seed)
        for _ in range(100):
            session.step()
        session.close()
        logs.append(session.log)
    ours, theirs = logs
    for index, (mine, reference) in enumerate(zip(ours, theirs, strict=False)):
        assert mine == reference, f"step {index} of seed {seed}: {ours[max(0, index - 6):index]}"
    assert len(ours) == len(theirs)
