# Cython declarations for compiling client.py (pure-Python mode; setup.py builds it when
# Cython is there). client.py stays the source and runs as it is without them: this file
# makes its classes C structs (attribute access without a dictionary lookup) and the
# methods every job goes through C functions with typed locals. Every attribute
# assigned in an __init__ must be listed here, or the compiled class refuses it; cpdef
# methods may not create closures (no generator expressions or inner functions).
import cython

cdef class Job
cdef class Client

cdef class _Deadline:
    cdef public object greenlet, done

cdef class _Deadlines:
    cdef public object _buckets, _ticker
    @cython.locals(entry=_Deadline)
    cpdef run(self, timeout, wait)

cdef class _Reply:
    cdef public object expect, result

cdef class _Attachment:
    cdef public object subs, copies, skip

cdef class _Submission:
    cdef public object client, function, unique, data, ptype, epoch, background, key, link
    cdef public object handle, replied, _created, finished, value, error, _waiters, jobs
    cdef public object losses, drops
    cpdef packet(self)
    cpdef on_reply(self, link, packet)
    cpdef _replied(self)
    cpdef wait_finished(self)
    cpdef deliver(self, ptype, args)
    @cython.locals(job=Job, client=Client)
    cpdef finish(self, value=*, exc=*)

cdef class _Link:
    cdef public object client, address, name, conn, pending, jobs, retry_at, backoff
    cdef public object _connecting, connected_at, down_since, attempts, _background
    cdef public object last_error
    @cython.locals(attachment=_Attachment, sub=_Submission)
    cpdef _on_packet(self, packet)
    @cython.locals(attachment=_Attachment)
    cpdef attach(self, handle, sub)

cdef class Job:
    cdef public object _client, _sub, _updates, _ended
    cdef object __weakref__
    cpdef _push(self, item)
    @cython.locals(sub=_Submission, client=Client)
    cpdef result(self, timeout=*)

cdef class Client:
    cdef public object tls, timeout, connect_timeout, exceptions, client_id, _links
    cdef public object _extra_links, _ring_points, _ring_links, _round_robin, _inflight
    cdef public object _deadlines, _closed
    cdef dict __dict__  # other attributes may be set, as on the .py class
    cdef object __weakref__
    @cython.locals(sub=_Submission, job=Job)
    cpdef submit(self, function, data=*, unique=*, priority=*, background=*, run_at=*,
                 wait=*, require_worker=*)
    cpdef call(self, function, data=*, unique=*, priority=*, timeout=*, require_worker=*)
    @cython.locals(existing=_Submission)
    cpdef _join_inflight(self, _Submission sub)
    cpdef _prepare(self, function, data, unique=*, priority=*, background=*, run_at=*)
    @cython.locals(link=_Link)
    cpdef _route(self, _Submission sub, deadline, patient=*)
