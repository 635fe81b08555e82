# Cython declarations for compiling connection.py (pure-Python mode; see client.pxd):
# Connection becomes a C struct, and the methods every packet goes through C functions.
# Every attribute assigned in __init__ must be listed here; cpdef methods may not create
# closures.

cdef class Connection:
    cdef public object address, tls, max_packet_size, name, _on_packet, _on_close, _sock
    cdef public object _fd, _watchers, _out, _kicked, _wakeup, _kick, _reader, _writer
    cdef public object closed, close_reason, _close_after_flush, reached
    cdef dict __dict__  # other attributes may be set, as on the .py class
    cdef object __weakref__
    cpdef send_raw(self, data)
    cpdef _flush(self)
