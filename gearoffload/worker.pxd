# Cython declarations for compiling worker.py (pure-Python mode; see client.pxd): its
# classes become C structs and the per-job methods C functions. Every attribute assigned
# in an __init__ must be listed here; cpdef methods may not create closures.
import cython

cdef class _Mailbox:
    cdef public object _items, _waiter
    cpdef put(self, item)
    cpdef get(self)

cdef class _Slots:
    cdef public object free, _waiters
    cpdef take(self)
    cpdef release(self)

cdef class _Runners:
    cdef public object _run, _greenlets, _pending, _idle, _waking, active, _finished
    cpdef _wake(self)

cdef class WorkerJob:
    cdef public object handle, function, unique, data, server, _handle, _conn
    cdef object __weakref__

cdef class Worker:
    cdef public object addresses, tls, client_id, concurrency, registry, connect_timeout
    cdef public object _stop_event, _done, _graceful, _drain_timeout, _working, _slots
    cdef public object _concurrency, _jobs, _conns, _sleeping, _inboxes, jobs_done
    cdef dict __dict__  # other attributes may be set, as on the .py class
    cdef object __weakref__
    @cython.locals(slots=_Slots)
    cpdef _session(self, conn, _Mailbox inbox)
    @cython.locals(job=WorkerJob)
    cpdef _run(self, conn, packet, holds_slot=*)
