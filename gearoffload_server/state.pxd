# Cython declarations for compiling state.py (pure-Python mode; setup.py builds it when
# Cython is there). state.py stays the source and runs as it is without them: this file
# only makes its classes C structs (attribute access without a dictionary lookup)
# and the per-job methods C functions with typed locals. Every attribute assigned in
# an __init__ must be listed here, or the compiled class refuses it.
import cython

cdef class Peer:
    cdef public object fd, address, loopback, client_id, out, out_bytes
    cdef public object exceptions, functions, timeouts, jobs, attached, sleep, rr
    cdef public object last_exception, _dirty, _flagged, waiting
    cdef object __weakref__

cdef class Function:
    cdef public object name, queues, queued, ready, scheduled, running, total, dead
    cdef public object workers, sleepers, woken, limits, wake_timer, submitted, coalesced
    cdef public object completed, failed, exceptions, latency, pinned, retried
    cdef object __weakref__

cdef class Job:
    cdef public object handle, function, unique, data, priority, background, reducer, when
    cdef public object clients, worker, numerator, denominator, retries, abandoned, timer
    cdef public object state, coalesce, stored, batch, failures, since, submitted
    cdef object __weakref__

cdef class Kept:
    cdef public object state, numerator, denominator, expires, data, too_large, size, row

cdef class KeptResults:
    cdef public object ttl, max_size, memory, entries, used, kept, expired, evicted
    cdef public object oversized, _holder, _now, _sweep_at

    # keep() runs once per ended background job with a unique (JobServerState._keep).
    @cython.locals(entry=Kept)
    cpdef keep(self, unique, state, numerator, denominator, data)
    @cython.locals(old=Kept, entry=Kept)
    cpdef _put(self, unique, state, numerator, denominator, expires, data, too_large=*)
    @cython.locals(entry=Kept)
    cpdef _trim(self, now)
    cpdef _drop(self, unique, Kept entry)

cdef class JobServerState:
    cdef public object config, scheduler, store, functions, jobs, peers, _uniques, _hyphen
    cdef public object _epochs, _epoch_timer, _epoch_timer_due, _prefix, _max_client_jobs
    cdef public object _counter, _dirty, draining, failures, on_shutdown, _handlers, _now
    cdef public object dead, dead_info, results, _stale, history
    cdef object __weakref__

    # The methods every job goes through (submit, grab, complete).
    @cython.locals(func=Function, job=Job)
    cpdef _submit(self, Peer peer, packet, reducer=*, when=*)
    cpdef _attach(self, Job job, Peer peer)
    @cython.locals(func=Function)
    cpdef _enqueue(self, Job job)
    @cython.locals(func=Function, client=Peer)
    cpdef _remove(self, Job job)
    @cython.locals(worker=Peer, func=Function)
    cpdef _unassign(self, Job job)
    @cython.locals(job=Job)
    cpdef _pop_runnable(self, Function func, priority)
    cpdef _grab(self, Peer peer, packet)
    @cython.locals(func=Function)
    cpdef _next_job(self, Peer peer)
    @cython.locals(func=Function)
    cpdef _assign(self, Peer peer, Job job, grab_type)
    @cython.locals(job=Job, func=Function, client=Peer)
    cpdef _work(self, Peer peer, packet)
    @cython.locals(results=KeptResults)
    cpdef _keep(self, Job job, state, data)
    cpdef _index(self, Job job)
    cpdef _unindex(self, Job job)
    @cython.locals(peer=Peer)
    cpdef take_dirty(self)
