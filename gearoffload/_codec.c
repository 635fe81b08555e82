/* Optional C accelerator of gearoffload.protocol: Decoder, encode and Router.
 *
 * The pure-Python code in protocol.py (PyDecoder, py_encode) is the reference: this file
 * must give the same items, the same ProtocolError (message, code, in_sync) and leave the
 * same tail buffered, for any input. The Python objects it hands out (Packet, the
 * exception class, the type names) come from protocol.py through bind(), so the two
 * cannot drift apart on tables.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>

#define HEADER_SIZE 12
#define MAX_TYPE 42
#define MAX_U32 0xFFFFFFFFULL
/* Line limits are clamped to this so that pos + limit + 2 never overflows; no buffer
 * gets anywhere near it, so the clamp never changes a result. */
#define LINE_CLAMP (PY_SSIZE_T_MAX / 4)

/* Objects and tables from protocol.py (see bind()). One interpreter, set once. */
static struct {
    int bound;
    PyObject *packet_type;      /* the Packet NamedTuple class */
    PyObject *protocol_error;   /* gearoffload.errors.ProtocolError */
    PyObject *names;            /* tuple: names[t] = PacketType(t).name */
    PyObject *items_then_raise; /* protocol._items_then_raise, for feed() */
    PyObject *struct_error;     /* struct.error, what py_encode raises on range errors */
    PyObject *req, *res;        /* b"\0REQ", b"\0RES" */
    PyObject *default_max_packet_size, *default_max_line_size;
    PyObject *str_code, *str_in_sync, *str_invalid_packet, *str_argument_too_large,
        *str_line_too_long;
    unsigned char counts[MAX_TYPE + 1];
} S;

static const char MAGIC_REQ[4] = {0, 'R', 'E', 'Q'};
static const char MAGIC_RES[4] = {0, 'R', 'E', 'S'};

/* ------------------------------------------------------------------------------------ */

/* Raise ProtocolError(message, code=code, in_sync=in_sync); steals `message`. */
static void
raise_protocol_error(PyObject *message, PyObject *code, int in_sync)
{
    PyObject *args, *kwargs = NULL, *exc = NULL;
    if (message == NULL)
        return;
    args = PyTuple_Pack(1, message);
    Py_DECREF(message);
    if (args == NULL)
        return;
    kwargs = Py_BuildValue("{OOOO}", S.str_code, code ? code : Py_None, S.str_in_sync,
                           in_sync ? Py_True : Py_False);
    if (kwargs != NULL)
        exc = PyObject_Call(S.protocol_error, args, kwargs);
    Py_DECREF(args);
    Py_XDECREF(kwargs);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
}

static void
raise_protocol_error_str(const char *message, PyObject *code, int in_sync)
{
    raise_protocol_error(PyUnicode_FromString(message), code, in_sync);
}

/* ProtocolError(f"bad magic {magic!r}") for the 4 bytes at h. */
static void
raise_bad_magic(const unsigned char *h)
{
    PyObject *magic = PyBytes_FromStringAndSize((const char *)h, 4);
    if (magic == NULL)
        return;
    raise_protocol_error(PyUnicode_FromFormat("bad magic %R", magic), NULL, 0);
    Py_DECREF(magic);
}

/* f"{obj}", as the Python messages format the limits. */
static PyObject *
fmt(PyObject *obj)
{
    return PyObject_Format(obj, NULL);
}

/* `value` clamped into [lo, hi]; -1 with an exception if it is not an int. */
static int
clamp_int(PyObject *value, long long lo, long long hi, long long *out, const char *what)
{
    int overflow = 0;
    long long v;
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what,
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow > 0 || v > hi)
        v = hi;
    else if (overflow < 0 || v < lo)
        v = lo;
    *out = v;
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* Decoder */

typedef struct {
    PyObject_HEAD
    char *buf;          /* pending bytes of an incomplete packet or line: buf[0:len] */
    Py_ssize_t len, cap;
    PyObject *max_packet_size, *max_line_size, *text, *magic; /* as set, for reading */
    long long max_size_c;   /* max_packet_size clamped to [-1, 2**32] */
    Py_ssize_t max_line_c;  /* max_line_size clamped to +-LINE_CLAMP */
    int text_c;
    int busy;               /* inside dispatch()/feed(): callbacks may not re-enter */
} DecoderObject;

static int
set_max_packet_size(DecoderObject *self, PyObject *value, void *closure)
{
    long long v;
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "cannot delete max_packet_size");
        return -1;
    }
    if (clamp_int(value, -1, (long long)MAX_U32 + 1, &v, "max_packet_size") < 0)
        return -1;
    Py_INCREF(value);
    Py_XSETREF(self->max_packet_size, value);
    self->max_size_c = v;
    return 0;
}

static int
set_max_line_size(DecoderObject *self, PyObject *value, void *closure)
{
    long long v;
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "cannot delete max_line_size");
        return -1;
    }
    if (clamp_int(value, -(long long)LINE_CLAMP, LINE_CLAMP, &v, "max_line_size") < 0)
        return -1;
    Py_INCREF(value);
    Py_XSETREF(self->max_line_size, value);
    self->max_line_c = (Py_ssize_t)v;
    return 0;
}

static int
set_text(DecoderObject *self, PyObject *value, void *closure)
{
    int t;
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "cannot delete text");
        return -1;
    }
    t = PyObject_IsTrue(value);
    if (t < 0)
        return -1;
    Py_INCREF(value);
    Py_XSETREF(self->text, value);
    self->text_c = t;
    return 0;
}

static int
set_magic(DecoderObject *self, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "cannot delete magic");
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(self->magic, value);
    return 0;
}

static PyObject *
get_max_packet_size(DecoderObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->max_packet_size);
}

static PyObject *
get_max_line_size(DecoderObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->max_line_size);
}

static PyObject *
get_text(DecoderObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->text);
}

static PyObject *
get_magic(DecoderObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->magic);
}

static PyObject *
get_buffered(DecoderObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->len);
}

static PyObject *
Decoder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    DecoderObject *self;
    (void)args;
    (void)kwargs;
    if (!S.bound) {
        PyErr_SetString(PyExc_RuntimeError, "gearoffload._codec.bind() was not called");
        return NULL;
    }
    self = (DecoderObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    /* Valid defaults even if __init__ is skipped (e.g. a subclass forgetting super()). */
    if (set_max_packet_size(self, S.default_max_packet_size, NULL) < 0
        || set_max_line_size(self, S.default_max_line_size, NULL) < 0
        || set_text(self, Py_True, NULL) < 0 || set_magic(self, Py_None, NULL) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
Decoder_init(DecoderObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"max_packet_size", "text", "magic", "max_line_size", NULL};
    PyObject *max_packet_size = S.default_max_packet_size, *text = Py_True,
             *magic = Py_None, *max_line_size = S.default_max_line_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O$OOO:Decoder", kwlist,
                                     &max_packet_size, &text, &magic, &max_line_size))
        return -1;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Decoder re-initialised during dispatch()");
        return -1;
    }
    if (set_max_packet_size(self, max_packet_size, NULL) < 0
        || set_max_line_size(self, max_line_size, NULL) < 0 || set_text(self, text, NULL) < 0
        || set_magic(self, magic, NULL) < 0)
        return -1;
    self->len = 0;
    return 0;
}

static int
Decoder_traverse(DecoderObject *self, visitproc visit, void *arg)
{
    /* No Py_VISIT(Py_TYPE(self)): the type is static, and subtype_traverse visits a heap
     * subclass itself (visiting it here too would undercount its references). */
    Py_VISIT(self->max_packet_size);
    Py_VISIT(self->max_line_size);
    Py_VISIT(self->text);
    Py_VISIT(self->magic);
    return 0;
}

static int
Decoder_clear(DecoderObject *self)
{
    /* None rather than NULL: a finalizer of the same cycle may still read them. */
    Py_XSETREF(self->max_packet_size, Py_NewRef(Py_None));
    Py_XSETREF(self->max_line_size, Py_NewRef(Py_None));
    Py_XSETREF(self->text, Py_NewRef(Py_None));
    Py_XSETREF(self->magic, Py_NewRef(Py_None));
    return 0;
}

static void
Decoder_dealloc(DecoderObject *self)
{
    /* A heap subclass's type reference is dropped by subtype_dealloc, not here. */
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->max_packet_size);
    Py_CLEAR(self->max_line_size);
    Py_CLEAR(self->text);
    Py_CLEAR(self->magic);
    PyMem_Free(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Room for `extra` more pending bytes. */
static int
reserve(DecoderObject *self, Py_ssize_t extra)
{
    Py_ssize_t need, cap;
    char *buf;
    if (extra > PY_SSIZE_T_MAX / 2 - self->len) {
        PyErr_NoMemory();
        return -1;
    }
    need = self->len + extra;
    if (need <= self->cap)
        return 0;
    cap = self->cap < 256 ? 256 : self->cap;
    while (cap < need)
        cap *= 2;
    buf = PyMem_Realloc(self->buf, (size_t)cap);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->buf = buf;
    self->cap = cap;
    return 0;
}

static inline uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Hand one item over: to `list` (feed) or to `callback` (dispatch). Steals `item`. */
static inline int
deliver(PyObject *item, PyObject *callback, PyObject *list)
{
    PyObject *result;
    int rc;
    if (item == NULL)
        return -1;
    if (list != NULL) {
        rc = PyList_Append(list, item);
        Py_DECREF(item);
        return rc;
    }
    result = PyObject_CallOneArg(callback, item);
    Py_DECREF(item);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* The decoding loop over p[0:end]. Returns the position decoding stopped at (everything
 * before it has been handed over); sets *failed with an exception set on error. */
static Py_ssize_t
decode(DecoderObject *self, const unsigned char *p, Py_ssize_t end, PyObject *on_packet,
       PyObject *on_line, PyObject *list, int want_req, int want_res,
       PyObject *max_size_obj, long long max_size, int *failed)
{
    Py_ssize_t pos = 0;
    char msg[128];
    *failed = 1;
    while (pos < end) {
        if (p[pos] != 0) {
            Py_ssize_t ml, nl, line_end;
            long long wend;
            const unsigned char *found = NULL;
            if (!self->text_c) {
                PyOS_snprintf(msg, sizeof msg, "expected a binary packet, got byte 0x%02x",
                              (unsigned)p[pos]);
                raise_protocol_error_str(msg, NULL, 0);
                return pos;
            }
            /* buf.find(b"\n", pos, pos + max_line_size + 2), negative end included. */
            ml = self->max_line_c;
            wend = (long long)pos + ml + 2;
            if (wend < 0) {
                wend += end;
                if (wend < 0)
                    wend = 0;
            }
            if (wend > end)
                wend = end;
            if (wend > pos)
                found = memchr(p + pos, '\n', (size_t)(wend - pos));
            if (found == NULL) {
                if (end - pos > ml + 1) {
                    PyObject *limit = fmt(self->max_line_size);
                    if (limit != NULL)
                        raise_protocol_error(
                            PyUnicode_FromFormat("text line longer than %U bytes", limit),
                            S.str_line_too_long, 1);
                    Py_XDECREF(limit);
                    return pos;
                }
                break;
            }
            nl = found - p;
            line_end = (nl > pos && p[nl - 1] == '\r') ? nl - 1 : nl;
            if (line_end - pos > ml) {
                /* The window above lets one byte more through when there is no CR:
                   8192 bytes and a LF must not pass as a line (issue #17). */
                PyObject *limit = fmt(self->max_line_size);
                if (limit != NULL)
                    raise_protocol_error(
                        PyUnicode_FromFormat("text line longer than %U bytes", limit),
                        S.str_line_too_long, 1);
                Py_XDECREF(limit);
                return pos;
            }
            {
                PyObject *line =
                    PyBytes_FromStringAndSize((const char *)p + pos, line_end - pos);
                pos = nl + 1;
                if (deliver(line, on_line, list) < 0)
                    return pos;
            }
            continue;
        }
        {
            const unsigned char *h = p + pos;
            Py_ssize_t avail = end - pos, start;
            uint32_t ptype, size;
            int is_req, is_res, count;
            PyObject *magic, *args, *packet;
            if (avail < HEADER_SIZE) {
                if (avail >= 4 && memcmp(h, MAGIC_REQ, 4) != 0 && memcmp(h, MAGIC_RES, 4) != 0) {
                    raise_bad_magic(h);
                    return pos;
                }
                break;
            }
            is_req = memcmp(h, MAGIC_REQ, 4) == 0;
            is_res = !is_req && memcmp(h, MAGIC_RES, 4) == 0;
            if (!is_req && !is_res) {
                raise_bad_magic(h);
                return pos;
            }
            ptype = be32(h + 4);
            size = be32(h + 8);
            if (ptype == 0 || ptype > MAX_TYPE) {
                PyOS_snprintf(msg, sizeof msg, "unknown packet type %lu", (unsigned long)ptype);
                raise_protocol_error_str(msg, NULL, 0);
                return pos;
            }
            magic = is_req ? S.req : S.res;
            if (is_req ? !want_req : !want_res) {
                raise_protocol_error(PyUnicode_FromFormat("unexpected magic %R on %U", magic,
                                                          PyTuple_GET_ITEM(S.names, ptype)),
                                     NULL, 0);
                return pos;
            }
            if ((long long)size > max_size) {
                PyObject *limit = fmt(max_size_obj);
                if (limit != NULL)
                    raise_protocol_error(
                        PyUnicode_FromFormat("packet of %lu bytes exceeds the limit of %U",
                                             (unsigned long)size, limit),
                        S.str_argument_too_large, 1);
                Py_XDECREF(limit);
                return pos;
            }
            start = pos + HEADER_SIZE;
            /* Unsigned: with a 32-bit Py_ssize_t, (Py_ssize_t)size is negative from 2**31
             * on and would pass this check and move pos backwards (end - start >= 0). */
            if ((unsigned long long)size > (unsigned long long)(end - start))
                break;
            pos = start + (Py_ssize_t)size;
            count = S.counts[ptype];
            if (count == 0) {
                args = PyTuple_New(0);
            }
            else if (count == 1) {
                PyObject *field = PyBytes_FromStringAndSize((const char *)p + start, size);
                if (field == NULL)
                    return pos;
                args = PyTuple_New(1);
                if (args == NULL) {
                    Py_DECREF(field);
                    return pos;
                }
                PyTuple_SET_ITEM(args, 0, field);
            }
            else {
                /* payload.split(b"\0", count - 1): count fields or an error. */
                const unsigned char *q = p + start, *stop = p + pos, *nul;
                int i;
                args = PyTuple_New(count);
                if (args == NULL)
                    return pos;
                for (i = 0; i < count; i++) {
                    PyObject *field;
                    if (i == count - 1) {
                        nul = stop;
                    }
                    else {
                        nul = memchr(q, 0, (size_t)(stop - q));
                        if (nul == NULL) {
                            Py_DECREF(args);
                            raise_protocol_error(
                                PyUnicode_FromFormat("%U needs %d fields, got %d",
                                                     PyTuple_GET_ITEM(S.names, ptype), count,
                                                     i + 1),
                                S.str_invalid_packet, 1);
                            return pos;
                        }
                    }
                    field = PyBytes_FromStringAndSize((const char *)q, nul - q);
                    if (field == NULL) {
                        Py_DECREF(args);
                        return pos;
                    }
                    PyTuple_SET_ITEM(args, i, field);
                    q = nul + 1;
                }
            }
            if (args == NULL)
                return pos;
            /* tuple.__new__(Packet, ...) without the intermediate tuple. */
            packet = ((PyTypeObject *)S.packet_type)->tp_alloc((PyTypeObject *)S.packet_type, 3);
            if (packet == NULL) {
                Py_DECREF(args);
                return pos;
            }
            PyTuple_SET_ITEM(packet, 0, Py_NewRef(magic));
            PyTuple_SET_ITEM(packet, 1, PyLong_FromUnsignedLong(ptype));
            PyTuple_SET_ITEM(packet, 2, args);
            if (deliver(packet, on_packet, list) < 0)
                return pos;
            continue;
        }
    }
    *failed = 0;
    return pos;
}

/* The whole of dispatch(): 0, or -1 with an exception set. Exactly the unconsumed tail
 * stays buffered however it ended (all consumed, a malformed item, a callback raising). */
static int
dispatch_impl(DecoderObject *self, PyObject *data, PyObject *on_packet, PyObject *on_line,
              PyObject *list)
{
    Py_buffer view;
    const unsigned char *p;
    Py_ssize_t n, pos;
    int have_view = 0, failed = 0, want_req = 1, want_res = 1;
    PyObject *max_size_obj;
    long long max_size;

    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "Decoder.dispatch()/feed() called from one of its own callbacks");
        return -1;
    }
    if (PyBytes_CheckExact(data)) {
        p = (const unsigned char *)PyBytes_AS_STRING(data);
        n = PyBytes_GET_SIZE(data);
    }
    else {
        /* The export also stops a bytearray from being resized under us by a callback. */
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
            return -1;
        have_view = 1;
        p = view.buf;
        n = view.len;
    }
    /* Like the Python code, magic and max_packet_size are read once per call. */
    if (self->magic != Py_None) {
        if (self->magic != S.req) {
            int ne = PyObject_RichCompareBool(S.req, self->magic, Py_NE);
            if (ne < 0)
                goto fail_early;
            want_req = !ne;
        }
        if (self->magic != S.res) {
            int ne = PyObject_RichCompareBool(S.res, self->magic, Py_NE);
            if (ne < 0)
                goto fail_early;
            want_res = !ne;
        }
    }
    max_size_obj = Py_NewRef(self->max_packet_size);
    max_size = self->max_size_c;

    self->busy = 1;
    Py_INCREF(self);
    if (self->len > 0) {
        if (reserve(self, n) < 0) {
            failed = 1;
        }
        else {
            memcpy(self->buf + self->len, p, (size_t)n);
            self->len += n;
            if (have_view) {
                PyBuffer_Release(&view);
                have_view = 0;
            }
            pos = decode(self, (const unsigned char *)self->buf, self->len, on_packet, on_line,
                         list, want_req, want_res, max_size_obj, max_size, &failed);
            self->len -= pos;
            if (pos > 0 && self->len > 0)
                memmove(self->buf, self->buf + pos, (size_t)self->len);
        }
    }
    else {
        pos = decode(self, p, n, on_packet, on_line, list, want_req, want_res, max_size_obj,
                     max_size, &failed);
        if (pos < n) {
            if (reserve(self, n - pos) < 0) {
                /* Losing the tail silently would desynchronise the stream: say so. */
                if (failed)
                    PyErr_Clear();
                PyErr_NoMemory();
                failed = 1;
            }
            else {
                memcpy(self->buf, p + pos, (size_t)(n - pos));
                self->len = n - pos;
            }
        }
    }
    /* A large packet's buffer is not kept for the connection's lifetime. */
    if (self->len == 0 && self->cap > 65536) {
        PyMem_Free(self->buf);
        self->buf = NULL;
        self->cap = 0;
    }
    self->busy = 0;
    Py_DECREF(max_size_obj);
    if (have_view)
        PyBuffer_Release(&view);
    Py_DECREF(self);
    return failed ? -1 : 0;

fail_early:
    if (have_view)
        PyBuffer_Release(&view);
    return -1;
}

/* Minimal keyword support for the METH_FASTCALL methods: fills out[0:n]. */
static int
fast_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
          const char *const *names, int n, int required, PyObject **out)
{
    Py_ssize_t i, nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    int j;
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fname, n,
                     nargs);
        return -1;
    }
    for (j = 0; j < n; j++)
        out[j] = j < nargs ? args[j] : NULL;
    for (i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        for (j = 0; j < n; j++)
            if (PyUnicode_CompareWithASCIIString(key, names[j]) == 0)
                break;
        if (j == n) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                         fname, key);
            return -1;
        }
        if (out[j] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                         names[j]);
            return -1;
        }
        out[j] = args[nargs + i];
    }
    for (j = 0; j < required; j++)
        if (out[j] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                         names[j]);
            return -1;
        }
    return 0;
}

static PyObject *
Decoder_dispatch(DecoderObject *self, PyObject *const *args, Py_ssize_t nargs,
                 PyObject *kwnames)
{
    static const char *const names[] = {"data", "on_packet", "on_line"};
    PyObject *a[3];
    if (kwnames == NULL && nargs == 3) {
        a[0] = args[0], a[1] = args[1], a[2] = args[2];
    }
    else if (fast_args("dispatch", args, nargs, kwnames, names, 3, 3, a) < 0) {
        return NULL;
    }
    if (dispatch_impl(self, a[0], a[1], a[2], NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Decoder_feed(DecoderObject *self, PyObject *data)
{
    PyObject *items = PyList_New(0), *result;
    if (items == NULL)
        return NULL;
    if (dispatch_impl(self, data, NULL, NULL, items) < 0) {
        PyObject *type, *value, *tb;
        if (!PyErr_ExceptionMatches(S.protocol_error)) {
            Py_DECREF(items);
            return NULL;
        }
        /* The items before the error, then the error: like _items_then_raise(). */
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb != NULL)
            PyException_SetTraceback(value, tb);
        result = PyObject_CallFunctionObjArgs(S.items_then_raise, items, value, NULL);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        Py_DECREF(items);
        return result;
    }
    result = PyObject_GetIter(items);
    Py_DECREF(items);
    return result;
}

static PyMethodDef Decoder_methods[] = {
    {"dispatch", (PyCFunction)(void (*)(void))Decoder_dispatch, METH_FASTCALL | METH_KEYWORDS,
     PyDoc_STR("dispatch($self, data, on_packet, on_line, /)\n--\n\n"
               "Add ``data`` and call ``on_packet(packet)`` or ``on_line(line)`` for every\n"
               "complete item, in stream order. A malformed item raises ``ProtocolError``\n"
               "once the items before it have been handed over.")},
    {"feed", (PyCFunction)Decoder_feed, METH_O,
     PyDoc_STR("feed($self, data, /)\n--\n\n"
               "Add ``data``; return an iterator over every complete packet or line now\n"
               "available (it raises ``ProtocolError`` after the items before an error).")},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Decoder_getset[] = {
    {"max_packet_size", (getter)get_max_packet_size, (setter)set_max_packet_size,
     PyDoc_STR("Largest payload accepted (ARGUMENT_TOO_LARGE above it)."), NULL},
    {"max_line_size", (getter)get_max_line_size, (setter)set_max_line_size,
     PyDoc_STR("Longest text line accepted (LINE_TOO_LONG above it)."), NULL},
    {"text", (getter)get_text, (setter)set_text,
     PyDoc_STR("Whether text admin lines are accepted."), NULL},
    {"magic", (getter)get_magic, (setter)set_magic,
     PyDoc_STR("The only accepted magic, or None for both."), NULL},
    {"buffered", (getter)get_buffered, NULL,
     PyDoc_STR("How many bytes are waiting for the rest of a packet or line."), NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gearoffload._codec.Decoder",
    .tp_basicsize = sizeof(DecoderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = PyDoc_STR(
        "Decoder(max_packet_size=67108864, *, text=True, magic=None, max_line_size=8191)\n"
        "--\n\n"
        "Incremental Gearman decoder (C accelerator of gearoffload.protocol.PyDecoder)."),
    .tp_new = Decoder_new,
    .tp_init = (initproc)Decoder_init,
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_traverse = (traverseproc)Decoder_traverse,
    .tp_clear = (inquiry)Decoder_clear,
    .tp_methods = Decoder_methods,
    .tp_getset = Decoder_getset,
};

/* ------------------------------------------------------------------------------------ */
/* encode */

#define STACK_FIELDS 16

static PyObject *
codec_encode(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"magic", "ptype", "args"};
    PyObject *a[3], *seq = NULL, *result = NULL, **items;
    Py_buffer stack_views[STACK_FIELDS], *views = stack_views;
    char magic[4];
    Py_ssize_t nfields, i, acquired = 0;
    unsigned long long total = 0;
    long long ptype;
    int overflow = 0;
    unsigned char *out;
    (void)module;

    if (fast_args("encode", args, nargs, kwnames, names, 3, 2, a) < 0)
        return NULL;
    /* Copied at once: taking a field's buffer below may run code that resizes a
     * bytearray magic. struct's "4s": shorter magic is NUL-padded, longer is cut. */
    if (PyBytes_Check(a[0]) || PyByteArray_Check(a[0])) {
        const char *src = PyBytes_Check(a[0]) ? PyBytes_AS_STRING(a[0])
                                              : PyByteArray_AS_STRING(a[0]);
        Py_ssize_t len = PyBytes_Check(a[0]) ? PyBytes_GET_SIZE(a[0])
                                             : PyByteArray_GET_SIZE(a[0]);
        memset(magic, 0, sizeof magic);
        memcpy(magic, src, (size_t)(len < 4 ? len : 4));
    }
    else {
        PyErr_Format(PyExc_TypeError, "magic must be bytes, not %.100s",
                     Py_TYPE(a[0])->tp_name);
        return NULL;
    }
    if (!PyIndex_Check(a[1])) {
        PyErr_Format(PyExc_TypeError, "ptype must be an int, not %.100s",
                     Py_TYPE(a[1])->tp_name);
        return NULL;
    }
    {
        PyObject *index = PyNumber_Index(a[1]);
        if (index == NULL)
            return NULL;
        ptype = PyLong_AsLongLongAndOverflow(index, &overflow);
        Py_DECREF(index);
        if (ptype == -1 && PyErr_Occurred())
            return NULL;
    }
    if (overflow || ptype < 0 || (unsigned long long)ptype > MAX_U32) {
        PyErr_SetString(S.struct_error, "'I' format requires 0 <= number <= 4294967295");
        return NULL;
    }
    if (a[2] == NULL) {
        nfields = 0;
        items = NULL;
    }
    else {
        /* A tuple, so that nothing run while taking a field's buffer can resize the
         * sequence under `items` (a list is copied; the common case is a tuple). */
        if (PyTuple_CheckExact(a[2])) {
            seq = Py_NewRef(a[2]);
        }
        else if (PyList_Check(a[2]) || PyTuple_Check(a[2]) || PySequence_Check(a[2])) {
            seq = PySequence_Tuple(a[2]);
            if (seq == NULL)
                return NULL;
        }
        else {
            PyErr_Format(PyExc_TypeError, "args must be a tuple or list of bytes, not %.100s",
                         Py_TYPE(a[2])->tp_name);
            return NULL;
        }
        nfields = PyTuple_GET_SIZE(seq);
        items = &PyTuple_GET_ITEM(seq, 0);
    }
    if (nfields > STACK_FIELDS) {
        views = PyMem_New(Py_buffer, nfields);
        if (views == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    for (i = 0; i < nfields; i++) {
        PyObject *field = items[i];
        if (PyBytes_CheckExact(field)) {
            views[i].obj = NULL; /* no export to release */
            views[i].buf = PyBytes_AS_STRING(field);
            views[i].len = PyBytes_GET_SIZE(field);
        }
        else if (PyObject_GetBuffer(field, &views[i], PyBUF_SIMPLE) < 0) {
            PyErr_Format(PyExc_TypeError, "packet fields must be bytes-like, not %.100s",
                         Py_TYPE(field)->tp_name);
            goto done;
        }
        acquired = i + 1;
        total += (unsigned long long)views[i].len;
    }
    if (nfields > 1)
        total += (unsigned long long)(nfields - 1);
    if (total > MAX_U32) {
        PyErr_SetString(S.struct_error, "'I' format requires 0 <= number <= 4294967295");
        goto done;
    }
    /* With a 32-bit Py_ssize_t a total just under 2**32 would wrap HEADER_SIZE + total to
     * a small size and the copies below would overflow the result (bytes.join raises). */
    if (total > (unsigned long long)(PY_SSIZE_T_MAX - HEADER_SIZE)) {
        PyErr_SetString(PyExc_OverflowError, "join() result is too long for a Python string");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + (Py_ssize_t)total);
    if (result == NULL)
        goto done;
    out = (unsigned char *)PyBytes_AS_STRING(result);
    memcpy(out, magic, 4);
    out[4] = (unsigned char)(ptype >> 24);
    out[5] = (unsigned char)(ptype >> 16);
    out[6] = (unsigned char)(ptype >> 8);
    out[7] = (unsigned char)ptype;
    out[8] = (unsigned char)(total >> 24);
    out[9] = (unsigned char)(total >> 16);
    out[10] = (unsigned char)(total >> 8);
    out[11] = (unsigned char)total;
    out += HEADER_SIZE;
    for (i = 0; i < nfields; i++) {
        if (i > 0)
            *out++ = 0;
        if (views[i].len > 0)
            memcpy(out, views[i].buf, (size_t)views[i].len);
        out += views[i].len;
    }

done:
    for (i = 0; i < acquired; i++)
        if (views[i].obj != NULL)
            PyBuffer_Release(&views[i]);
    if (views != stack_views)
        PyMem_Free(views);
    Py_XDECREF(seq);
    return result;
}

/* ------------------------------------------------------------------------------------ */
/* Router: what a decoder hands packets to, without a Python frame in between */

typedef struct {
    PyObject_HEAD
    PyObject *handlers;  /* indexed by packet type */
    PyObject *context;   /* first argument of every handler */
    PyObject *magic;     /* packets with this magic go to handlers[type] */
    PyObject *otherwise; /* the others go to otherwise(context, packet) */
    vectorcallfunc vectorcall;
} RouterObject;

/* packet[i] as PyRouter's `packet[i]` gets it: straight from a tuple (Packet is one) whose
 * subscript is tuple's, else through the packet's own __getitem__. New reference. */
static PyObject *
router_item(PyObject *packet, Py_ssize_t i)
{
    PyObject *index, *item;
    if (PyTuple_Check(packet) && i < PyTuple_GET_SIZE(packet)
        && Py_TYPE(packet)->tp_as_mapping != NULL
        && Py_TYPE(packet)->tp_as_mapping->mp_subscript
               == PyTuple_Type.tp_as_mapping->mp_subscript)
        return Py_NewRef(PyTuple_GET_ITEM(packet, i));
    if ((index = PyLong_FromSsize_t(i)) == NULL)
        return NULL;
    item = PyObject_GetItem(packet, index);  /* its IndexError, TypeError, ... */
    Py_DECREF(index);
    return item;
}

static PyObject *
Router_vectorcall(RouterObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *packet, *magic, *handler, *result, *call[3];
    int same;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    /* PyRouter.__call__(self, packet): one packet, by position or as packet=. */
    if (nargs + nkw != 1
        || (nkw == 1
            && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "packet") != 0)) {
        PyErr_SetString(PyExc_TypeError, "Router takes exactly one argument (a packet)");
        return NULL;
    }
    packet = args[0];
    if ((magic = router_item(packet, 0)) == NULL)
        return NULL;
    /* `packet[0] == self.magic` as Python does it: no identity shortcut (a NaN, an __eq__
     * that raises or says False), except for exact bytes, where it cannot differ. */
    if (PyBytes_CheckExact(magic) && PyBytes_CheckExact(self->magic))
        same = magic == self->magic
               || (PyBytes_GET_SIZE(magic) == PyBytes_GET_SIZE(self->magic)
                   && memcmp(PyBytes_AS_STRING(magic), PyBytes_AS_STRING(self->magic),
                             (size_t)PyBytes_GET_SIZE(magic)) == 0);
    else {
        PyObject *eq = PyObject_RichCompare(magic, self->magic, Py_EQ);
        if (eq == NULL) {
            Py_DECREF(magic);
            return NULL;
        }
        same = PyObject_IsTrue(eq);
        Py_DECREF(eq);
        if (same < 0) {
            Py_DECREF(magic);
            return NULL;
        }
    }
    Py_DECREF(magic);
    if (same) {
        PyObject *ptype = router_item(packet, 1);
        if (ptype == NULL)
            return NULL;
        if (PyList_CheckExact(self->handlers) && PyLong_CheckExact(ptype)) {
            Py_ssize_t index = PyLong_AsSsize_t(ptype);
            if (index >= 0 && index < PyList_GET_SIZE(self->handlers))
                handler = Py_NewRef(PyList_GET_ITEM(self->handlers, index));
            else {
                if (index == -1 && PyErr_Occurred())
                    PyErr_Clear();
                handler = PyObject_GetItem(self->handlers, ptype);  /* the same IndexError */
            }
        }
        else
            handler = PyObject_GetItem(self->handlers, ptype);
        Py_DECREF(ptype);
        if (handler == NULL)
            return NULL;
    }
    else
        handler = Py_NewRef(self->otherwise);
    /* Held while it runs: the handler may change the table or the router. */
    call[0] = NULL;
    call[1] = Py_NewRef(self->context);
    call[2] = packet;
    result = PyObject_Vectorcall(handler, call + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(call[1]);
    Py_DECREF(handler);
    return result;
}

static PyObject *
Router_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"handlers", "context", "magic", "otherwise", NULL};
    PyObject *handlers, *context, *magic, *otherwise;
    RouterObject *self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO:Router", kwlist, &handlers,
                                     &context, &magic, &otherwise))
        return NULL;
    self = (RouterObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->handlers = Py_NewRef(handlers);
    self->context = Py_NewRef(context);
    self->magic = Py_NewRef(magic);
    self->otherwise = Py_NewRef(otherwise);
    self->vectorcall = (vectorcallfunc)Router_vectorcall;
    return (PyObject *)self;
}

static int
Router_traverse(RouterObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->handlers);
    Py_VISIT(self->context);
    Py_VISIT(self->magic);
    Py_VISIT(self->otherwise);
    return 0;
}

static int
Router_clear(RouterObject *self)
{
    Py_CLEAR(self->handlers);
    Py_CLEAR(self->context);
    Py_CLEAR(self->magic);
    Py_CLEAR(self->otherwise);
    return 0;
}

static void
Router_dealloc(RouterObject *self)
{
    PyObject_GC_UnTrack(self);
    /* A chain of routers (one the context of the next) freed at once: not one C frame each. */
    Py_TRASHCAN_BEGIN(self, Router_dealloc)
    Router_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
    Py_TRASHCAN_END
}

/* Cleared only by the garbage collector: a getter must not hand out NULL. */
static PyObject *
router_field(PyObject *field)
{
    if (field == NULL) {
        PyErr_SetString(PyExc_AttributeError, "Router was cleared");
        return NULL;
    }
    return Py_NewRef(field);
}

static PyObject *get_handlers(RouterObject *self, void *c) { (void)c; return router_field(self->handlers); }
static PyObject *get_context(RouterObject *self, void *c) { (void)c; return router_field(self->context); }
static PyObject *get_router_magic(RouterObject *self, void *c) { (void)c; return router_field(self->magic); }
static PyObject *get_otherwise(RouterObject *self, void *c) { (void)c; return router_field(self->otherwise); }

static PyGetSetDef Router_getset[] = {
    {"handlers", (getter)get_handlers, NULL, NULL, NULL},
    {"context", (getter)get_context, NULL, NULL, NULL},
    {"magic", (getter)get_router_magic, NULL, NULL, NULL},
    {"otherwise", (getter)get_otherwise, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RouterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gearoffload._codec.Router",
    .tp_basicsize = sizeof(RouterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = PyDoc_STR(
        "Router(handlers, context, magic, otherwise)\n"
        "--\n\n"
        "C accelerator of gearoffload.protocol.PyRouter."),
    .tp_vectorcall_offset = offsetof(RouterObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = Router_new,
    .tp_dealloc = (destructor)Router_dealloc,
    .tp_traverse = (traverseproc)Router_traverse,
    .tp_clear = (inquiry)Router_clear,
    .tp_getset = Router_getset,
};

/* ------------------------------------------------------------------------------------ */
/* bind */

static PyObject *
codec_bind(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"packet", "protocol_error", "field_counts", "names",
                             "items_then_raise", "struct_error", "req", "res",
                             "max_packet_size", "max_line_size", NULL};
    PyObject *packet, *protocol_error, *field_counts, *names, *items_then_raise,
        *struct_error, *req, *res, *max_packet_size, *max_line_size;
    Py_ssize_t i;
    unsigned char counts[MAX_TYPE + 1] = {0};
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOSSOO:bind", kwlist, &packet,
                                     &protocol_error, &field_counts, &names,
                                     &items_then_raise, &struct_error, &req, &res,
                                     &max_packet_size, &max_line_size))
        return NULL;
    /* tp_alloc + PyTuple_SET_ITEM in decode() needs a plain tuple layout. */
    if (!PyType_Check(packet) || !PyType_IsSubtype((PyTypeObject *)packet, &PyTuple_Type)
        || ((PyTypeObject *)packet)->tp_basicsize != PyTuple_Type.tp_basicsize
        || ((PyTypeObject *)packet)->tp_itemsize != PyTuple_Type.tp_itemsize) {
        PyErr_SetString(PyExc_TypeError, "packet must be a tuple subclass without slots");
        return NULL;
    }
    if (!PyType_Check(protocol_error)
        || !PyType_IsSubtype((PyTypeObject *)protocol_error, (PyTypeObject *)PyExc_Exception)
        || !PyType_Check(struct_error)
        || !PyType_IsSubtype((PyTypeObject *)struct_error, (PyTypeObject *)PyExc_Exception)) {
        PyErr_SetString(PyExc_TypeError, "protocol_error and struct_error must be exceptions");
        return NULL;
    }
    if (!PyTuple_Check(field_counts) || PyTuple_GET_SIZE(field_counts) != MAX_TYPE + 1
        || !PyTuple_Check(names) || PyTuple_GET_SIZE(names) != MAX_TYPE + 1) {
        PyErr_SetString(PyExc_ValueError, "field_counts and names must be 43-tuples");
        return NULL;
    }
    if (PyBytes_GET_SIZE(req) != 4 || memcmp(PyBytes_AS_STRING(req), MAGIC_REQ, 4) != 0
        || PyBytes_GET_SIZE(res) != 4 || memcmp(PyBytes_AS_STRING(res), MAGIC_RES, 4) != 0) {
        PyErr_SetString(PyExc_ValueError, "req and res must be b'\\0REQ' and b'\\0RES'");
        return NULL;
    }
    if (!PyLong_Check(max_packet_size) || !PyLong_Check(max_line_size)) {
        PyErr_SetString(PyExc_TypeError, "the default limits must be ints");
        return NULL;
    }
    for (i = 1; i <= MAX_TYPE; i++) {
        long c = PyLong_AsLong(PyTuple_GET_ITEM(field_counts, i));
        if (c == -1 && PyErr_Occurred())
            return NULL;
        if (c < 0 || c > 16 || !PyUnicode_Check(PyTuple_GET_ITEM(names, i))) {
            PyErr_SetString(PyExc_ValueError, "bad field count or name");
            return NULL;
        }
        counts[i] = (unsigned char)c;
    }
    /* Only now, when nothing can fail: a rejected bind() leaves the tables as they were. */
    memcpy(S.counts, counts, sizeof counts);
    Py_XSETREF(S.packet_type, Py_NewRef(packet));
    Py_XSETREF(S.protocol_error, Py_NewRef(protocol_error));
    Py_XSETREF(S.names, Py_NewRef(names));
    Py_XSETREF(S.items_then_raise, Py_NewRef(items_then_raise));
    Py_XSETREF(S.struct_error, Py_NewRef(struct_error));
    Py_XSETREF(S.req, Py_NewRef(req));
    Py_XSETREF(S.res, Py_NewRef(res));
    Py_XSETREF(S.default_max_packet_size, Py_NewRef(max_packet_size));
    Py_XSETREF(S.default_max_line_size, Py_NewRef(max_line_size));
    S.bound = 1;
    Py_RETURN_NONE;
}

static PyMethodDef codec_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))codec_encode, METH_FASTCALL | METH_KEYWORDS,
     PyDoc_STR("encode(magic, ptype, args=())\n--\n\n"
               "Encode one packet. Fields are joined by NUL; only the last one may contain "
               "NULs.")},
    {"bind", (PyCFunction)(void (*)(void))codec_bind, METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("Hand over protocol.py's objects and tables; called once by protocol.py.")},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef codec_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gearoffload._codec",
    .m_doc = PyDoc_STR("C accelerator of gearoffload.protocol's Decoder, encode and Router."),
    .m_size = -1,
    .m_methods = codec_methods,
};

PyMODINIT_FUNC
PyInit__codec(void)
{
    PyObject *m;
    if (PyType_Ready(&DecoderType) < 0 || PyType_Ready(&RouterType) < 0)
        return NULL;
    if ((S.str_code = PyUnicode_InternFromString("code")) == NULL
        || (S.str_in_sync = PyUnicode_InternFromString("in_sync")) == NULL
        || (S.str_invalid_packet = PyUnicode_InternFromString("INVALID_PACKET")) == NULL
        || (S.str_argument_too_large = PyUnicode_InternFromString("ARGUMENT_TOO_LARGE"))
               == NULL
        || (S.str_line_too_long = PyUnicode_InternFromString("LINE_TOO_LONG")) == NULL)
        return NULL;
    m = PyModule_Create(&codec_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&DecoderType);
    if (PyModule_AddObject(m, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(&DecoderType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RouterType);
    if (PyModule_AddObject(m, "Router", (PyObject *)&RouterType) < 0) {
        Py_DECREF(&RouterType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
