/* ResponseFramer in C: fleet.wsgi._response.ResponseFramer.
 *
 * The twin of fleet.wsgi.response.ResponseFramer (the reference; read its
 * docstrings): the same head bytes, body framing, keep-alive decision and
 * errors. The rules stay in one place: the common response (a cached status,
 * a list or tuple of (str, str) headers with cached names and ASCII values,
 * no hop-by-hop header) is checked here, and anything else goes to the
 * reference's checks (_check_status, _check_headers, _check_length,
 * _version_semantics, _tokens, http_date), which also raise the errors.
 * One difference, on input serve() never gives: body_length must be None or
 * an int. tests/unit/test_http_response.py runs every case against both.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *ResponseError;
static PyObject *check_status, *check_headers, *check_length, *version_semantics, *tokens_of, *http_date;
static PyObject *statuses, *header_names, *hop_by_hop;
static PyObject *s_HEAD, *s_HTTP_11, *s_HTTP_10, *s_close, *s_keep_alive, *s_content_length, *s_date;

enum { IDLE, SENDING, DONE };
static const char *const STATE_NAMES[] = {"IDLE", "SENDING", "DONE"};

typedef struct {
    PyObject_HEAD
    char head, http11, http10, keep_alive, state, no_body, chunked;
    char has_length, huge_length; /* a Content-Length beyond long long: never reached */
    long long length, sent;
    PyObject *length_obj; /* the Content-Length as the head says it */
    PyObject *now;
    PyObject *status_code;
} Framer;

/* -- a growable byte buffer for the head ------------------------------------ */

typedef struct {
    char *p;
    Py_ssize_t len, cap;
    char small[512];
} Head;

static int head_put(Head *h, const char *data, Py_ssize_t n) {
    if (h->len + n > h->cap) {
        Py_ssize_t cap = h->cap * 2 > h->len + n ? h->cap * 2 : h->len + n;
        char *p = h->p == h->small ? PyMem_Malloc(cap) : PyMem_Realloc(h->p, cap);
        if (!p) { PyErr_NoMemory(); return -1; }
        if (h->p == h->small) memcpy(p, h->small, h->len);
        h->p = p;
        h->cap = cap;
    }
    memcpy(h->p + h->len, data, n);
    h->len += n;
    return 0;
}

static int head_text(Head *h, PyObject *text) { /* str, latin-1 (validated by the checks) */
    if (PyUnicode_IS_COMPACT_ASCII(text)) return head_put(h, PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text));
    PyObject *bytes = PyUnicode_AsLatin1String(text);
    if (!bytes) return -1;
    int r = head_put(h, PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes));
    Py_DECREF(bytes);
    return r;
}

static int head_str(Head *h, PyObject *value) { /* str(value) */
    PyObject *text = PyObject_Str(value);
    if (!text) return -1;
    int r = head_text(h, text);
    Py_DECREF(text);
    return r;
}

#define PUT(h, literal) head_put(h, literal, sizeof(literal) - 1)

/* -- __init__ ---------------------------------------------------------------- */

static int contains(PyObject *set, PyObject *key) { return PySequence_Contains(set, key); }

static int framer_init(Framer *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"method", "version", "connection", "now", NULL};
    PyObject *method = NULL, *version = NULL, *connection = NULL, *now = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOOO:ResponseFramer", names, &method, &version, &connection,
                                     &now))
        return -1;
    if (!method || !version || !connection) {
        PyErr_SetString(PyExc_TypeError, "ResponseFramer() takes keyword arguments method, version, connection");
        return -1;
    }
    int head = PyObject_RichCompareBool(method, s_HEAD, Py_EQ);
    if (head < 0) return -1;
    self->head = (char)head;
    if (PyUnicode_CheckExact(version) && PyUnicode_Compare(version, s_HTTP_11) == 0) {
        self->http11 = 1, self->http10 = 0;
    } else if (PyUnicode_CheckExact(version) && PyUnicode_Compare(version, s_HTTP_10) == 0) {
        self->http11 = 0, self->http10 = 1;
    } else {
        PyObject *known = PyObject_CallOneArg(version_semantics, version);
        if (!known) return -1;
        int a = PyObject_IsTrue(PyTuple_GET_ITEM(known, 0)), b = PyObject_IsTrue(PyTuple_GET_ITEM(known, 1));
        Py_DECREF(known);
        if (a < 0 || b < 0) return -1;
        self->http11 = (char)a, self->http10 = (char)b;
    }
    if (connection == Py_None) {
        self->keep_alive = self->http11;
    } else {
        PyObject *tokens = PyObject_CallOneArg(tokens_of, connection);
        if (!tokens) return -1;
        int close = contains(tokens, s_close), keep = contains(tokens, s_keep_alive);
        Py_DECREF(tokens);
        if (close < 0 || keep < 0) return -1;
        self->keep_alive = self->http11 ? !close : (self->http10 && keep && !close);
    }
    Py_XSETREF(self->now, Py_NewRef(now));
    Py_XSETREF(self->status_code, Py_NewRef(Py_None));
    Py_CLEAR(self->length_obj);
    self->state = IDLE;
    self->no_body = self->head;
    self->chunked = self->has_length = self->huge_length = 0;
    self->length = self->sent = 0;
    return 0;
}

/* -- start ------------------------------------------------------------------- */

/* The common headers into `h`; 1 done, 0 not the common kind (nothing kept), -1 error. */
static int common_headers(PyObject *headers, Head *h, PyObject *lengths, int *has_date) {
    PyObject *seq = PySequence_Fast(headers, "");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int result = 1;
    for (Py_ssize_t i = 0; i < n && result == 1; i++) {
        PyObject *item = items[i];
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2) { result = 0; break; }
        PyObject *name = PyTuple_GET_ITEM(item, 0), *value = PyTuple_GET_ITEM(item, 1);
        if (!PyUnicode_CheckExact(name) || !PyUnicode_CheckExact(value) || !PyUnicode_IS_COMPACT_ASCII(value)) {
            result = 0;
            break;
        }
        PyObject *lower = PyDict_GetItemWithError(header_names, name);
        if (!lower) { result = PyErr_Occurred() ? -1 : 0; break; }
        const char *text = PyUnicode_DATA(value);
        Py_ssize_t size = PyUnicode_GET_LENGTH(value);
        if (memchr(text, '\r', size) || memchr(text, '\n', size) || memchr(text, '\0', size)) { result = 0; break; }
        int hop = PySet_Contains(hop_by_hop, lower);
        if (hop) { result = hop < 0 ? -1 : 0; break; }
        if (PyUnicode_Compare(lower, s_content_length) == 0) {
            if (PyList_Append(lengths, value) < 0) result = -1;
            continue;
        }
        if (PyUnicode_Compare(lower, s_date) == 0) *has_date = 1;
        if (head_text(h, name) < 0 || PUT(h, ": ") < 0 || head_put(h, text, size) < 0 || PUT(h, "\r\n") < 0)
            result = -1;
    }
    Py_DECREF(seq);
    return result;
}

/* The reference's _check_headers, into `h`: the exact errors for what common_headers does not take. */
static int reference_headers(PyObject *code, PyObject *headers, Head *h, PyObject **lengths, int *has_date) {
    PyObject *checked = PyObject_CallFunctionObjArgs(check_headers, code, headers, NULL);
    if (!checked) return -1;
    PyObject *lines = PyTuple_GET_ITEM(checked, 0);
    int failed = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lines) && !failed; i++)
        failed = head_text(h, PyList_GET_ITEM(lines, i)) < 0;
    Py_SETREF(*lengths, Py_NewRef(PyTuple_GET_ITEM(checked, 1)));
    *has_date = PyObject_IsTrue(PyTuple_GET_ITEM(checked, 2));
    Py_DECREF(checked);
    return failed || *has_date < 0 ? -1 : 0;
}

/* _check_length(values) as a Python int. */
static PyObject *app_length(PyObject *values) {
    if (PyList_GET_SIZE(values) == 1) {
        PyObject *value = PyList_GET_ITEM(values, 0);
        Py_ssize_t n = PyUnicode_GET_LENGTH(value);
        const char *p = PyUnicode_DATA(value);
        int digits = PyUnicode_IS_COMPACT_ASCII(value) && n > 0 && n <= 18;
        for (Py_ssize_t i = 0; digits && i < n; i++) digits = p[i] >= '0' && p[i] <= '9';
        if (digits) return PyLong_FromString(p, NULL, 10);
    }
    return PyObject_CallOneArg(check_length, values);
}

static int set_length(Framer *self, PyObject *length) {
    if (!PyLong_Check(length)) {
        PyErr_SetString(PyExc_TypeError, "body_length must be None or an int");
        return -1;
    }
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(length, &overflow);
    if (value == -1 && PyErr_Occurred()) return -1;
    self->has_length = 1;
    self->huge_length = overflow > 0;
    self->length = value;
    Py_XSETREF(self->length_obj, Py_NewRef(length));
    return 0;
}

static PyObject *framer_start(Framer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    static const char *const names[] = {"status", "headers", "body_length"};
    PyObject *values[3] = {NULL, NULL, Py_None};
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > 3) return PyErr_Format(PyExc_TypeError, "start() takes at most 3 arguments (%zd given)", nargs);
    for (Py_ssize_t i = 0; i < nargs; i++) values[i] = args[i];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *kw = PyTuple_GET_ITEM(kwnames, i);
        int j = 0;
        while (j < 3 && PyUnicode_CompareWithASCIIString(kw, names[j]) != 0) j++;
        if (j == 3 || (j < nargs)) return PyErr_Format(PyExc_TypeError, "start() got an unexpected argument %R", kw);
        values[j] = args[nargs + i];
    }
    if (!values[0] || !values[1]) return PyErr_Format(PyExc_TypeError, "start() needs status and headers");
    PyObject *status = values[0], *headers = values[1], *body_length = values[2];
    if (self->state != IDLE) {
        PyErr_SetString(PyExc_RuntimeError, "start() called twice");
        return NULL;
    }
    PyObject *parsed = PyUnicode_CheckExact(status) ? PyDict_GetItemWithError(statuses, status) : NULL;
    if (parsed) {
        Py_INCREF(parsed);
    } else if (PyErr_Occurred() || !(parsed = PyObject_CallOneArg(check_status, status))) {
        return NULL;
    }
    PyObject *code_obj = PyTuple_GET_ITEM(parsed, 0), *reason = PyTuple_GET_ITEM(parsed, 1);
    long code = PyLong_AsLong(code_obj);
    Head h = {.p = h.small, .len = 0, .cap = sizeof(h.small)};
    PyObject *lengths = PyList_New(0), *length = NULL, *result = NULL;
    int has_date = 0;
    if (!lengths) goto done;
    /* The status line first; the lines after it. */
    if (head_text(&h, self->http10 ? s_HTTP_10 : s_HTTP_11) < 0 || PUT(&h, " ") < 0 || head_str(&h, code_obj) < 0 ||
        PUT(&h, " ") < 0 || head_text(&h, reason) < 0 || PUT(&h, "\r\n") < 0)
        goto done;
    Py_ssize_t lines_start = h.len;
    int common = (PyList_CheckExact(headers) || PyTuple_CheckExact(headers))
                     ? common_headers(headers, &h, lengths, &has_date) : 0;
    if (common < 0) goto done;
    if (common == 0) {
        h.len = lines_start;
        has_date = 0;
        if (reference_headers(code_obj, headers, &h, &lengths, &has_date) < 0) goto done; /* its lengths */
    }
    int no_body = self->head || code < 200 || code == 204 || code == 304;
    int truthy = body_length == Py_None ? 0 : PyObject_IsTrue(body_length);
    if (truthy < 0) goto done;
    if (PyList_GET_SIZE(lengths) && code != 204 && code >= 200) {
        if (!(length = app_length(lengths))) goto done;
    } else if (body_length != Py_None && !no_body) {
        length = Py_NewRef(body_length);
    } else if (truthy && self->head && code != 204 && code != 304) {
        length = Py_NewRef(body_length);
    }
    if (length && set_length(self, length) < 0) goto done;
    /* Everything is valid: commit. */
    self->state = SENDING;
    Py_XSETREF(self->status_code, Py_NewRef(code_obj));
    self->no_body = (char)no_body;
    if (length && (PUT(&h, "Content-Length: ") < 0 || head_str(&h, length) < 0 || PUT(&h, "\r\n") < 0)) goto done;
    if (code == 101) {
        self->keep_alive = 1; /* the connection now speaks the new protocol */
    } else {
        if (!self->no_body && !length) {
            if (self->http11) {
                self->chunked = 1;
                if (PUT(&h, "Transfer-Encoding: chunked\r\n") < 0) goto done;
            } else {
                self->keep_alive = 0; /* the body ends when the connection does */
            }
        }
        if (!self->keep_alive) {
            if (PUT(&h, "Connection: close\r\n") < 0) goto done;
        } else if (self->http10 && PUT(&h, "Connection: keep-alive\r\n") < 0) {
            goto done;
        }
    }
    if (self->now != Py_None && code >= 200 && !has_date) {
        PyObject *date = PyObject_CallOneArg(http_date, self->now);
        if (!date || PUT(&h, "Date: ") < 0 || head_text(&h, date) < 0 || PUT(&h, "\r\n") < 0) {
            Py_XDECREF(date);
            goto done;
        }
        Py_DECREF(date);
    }
    if (PUT(&h, "\r\n") < 0) goto done;
    result = PyBytes_FromStringAndSize(h.p, h.len);
done:
    if (h.p != h.small) PyMem_Free(h.p);
    Py_XDECREF(parsed);
    Py_XDECREF(lengths);
    Py_XDECREF(length);
    return result;
}

/* -- body and end -------------------------------------------------------------- */

static PyObject *framer_body(Framer *self, PyObject *data) {
    if (self->state != SENDING)
        return PyErr_Format(PyExc_RuntimeError, "body() called in state %s", STATE_NAMES[(int)self->state]);
    PyObject *owned = NULL;
    if (!PyBytes_CheckExact(data)) {
        if (!PyBytes_Check(data) && !PyByteArray_Check(data) && !PyMemoryView_Check(data)) {
            self->keep_alive = 0;
            PyObject *name = PyType_GetName(Py_TYPE(data));
            if (name) {
                PyErr_Format(ResponseError, "app yielded %U, not bytes", name);
                Py_DECREF(name);
            }
            return NULL;
        }
        if (!(owned = data = PyBytes_FromObject(data))) return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    PyObject *result = NULL;
    if (self->no_body || size == 0) {
        result = PyBytes_FromStringAndSize(NULL, 0);
    } else if (self->has_length && !self->huge_length && self->sent + size > self->length) {
        self->keep_alive = 0;
        PyErr_Format(ResponseError, "app sent more than its Content-Length of %S", self->length_obj);
    } else {
        self->sent += size;
        if (!self->chunked) {
            result = Py_NewRef(data);
        } else {
            char prefix[24];
            int n = snprintf(prefix, sizeof(prefix), "%zx\r\n", size);
            if ((result = PyBytes_FromStringAndSize(NULL, n + size + 2))) {
                char *out = PyBytes_AS_STRING(result);
                memcpy(out, prefix, n);
                memcpy(out + n, PyBytes_AS_STRING(data), size);
                memcpy(out + n + size, "\r\n", 2);
            }
        }
    }
    Py_XDECREF(owned);
    return result;
}

static PyObject *framer_end(Framer *self, PyObject *unused) {
    if (self->state != SENDING)
        return PyErr_Format(PyExc_RuntimeError, "end() called in state %s", STATE_NAMES[(int)self->state]);
    self->state = DONE;
    if (self->chunked) return PyBytes_FromStringAndSize("0\r\n\r\n", 5);
    if (!self->no_body && self->has_length && (self->huge_length || self->sent < self->length))
        self->keep_alive = 0; /* the client still waits for the missing bytes */
    return PyBytes_FromStringAndSize(NULL, 0);
}

static PyObject *framer_keep_alive(Framer *self, void *closure) { return PyBool_FromLong(self->keep_alive); }

static PyObject *framer_status_code(Framer *self, void *closure) {
    return Py_NewRef(self->status_code ? self->status_code : Py_None);
}

static void framer_dealloc(Framer *self) {
    Py_XDECREF(self->length_obj);
    Py_XDECREF(self->now);
    Py_XDECREF(self->status_code);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef framer_methods[] = {
    {"start", (PyCFunction)(void (*)(void))framer_start, METH_FASTCALL | METH_KEYWORDS,
     "start(status, headers, body_length=None) -> bytes: the status line and headers."},
    {"body", (PyCFunction)framer_body, METH_O, "body(data) -> bytes: data framed for the wire."},
    {"end", (PyCFunction)framer_end, METH_NOARGS, "end() -> bytes: the end of the body framing."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef framer_getset[] = {
    {"keep_alive", (getter)framer_keep_alive, NULL, "Must the connection stay open after this response?", NULL},
    {"status_code", (getter)framer_status_code, NULL, "The status code, once start() succeeded.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FramerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fleet.wsgi._response.ResponseFramer",
    .tp_basicsize = sizeof(Framer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "fleet.wsgi.response.ResponseFramer, in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)framer_init,
    .tp_dealloc = (destructor)framer_dealloc,
    .tp_methods = framer_methods,
    .tp_getset = framer_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fleet.wsgi._response",
                                    "ResponseFramer in C (fleet.wsgi.response is the reference).", -1, NULL};

static int take(PyObject *from, const char *name, PyObject **into) {
    *into = PyObject_GetAttrString(from, name);
    return *into ? 0 : -1;
}

PyMODINIT_FUNC PyInit__response(void) {
    PyObject *reference = PyImport_ImportModule("fleet.wsgi.response");
    if (!reference) return NULL;
    int failed = take(reference, "ResponseError", &ResponseError) < 0 ||
                 take(reference, "_check_status", &check_status) < 0 ||
                 take(reference, "_check_headers", &check_headers) < 0 ||
                 take(reference, "_check_length", &check_length) < 0 ||
                 take(reference, "_version_semantics", &version_semantics) < 0 ||
                 take(reference, "_tokens", &tokens_of) < 0 || take(reference, "http_date", &http_date) < 0 ||
                 take(reference, "_STATUSES", &statuses) < 0 || take(reference, "_HEADER_NAMES", &header_names) < 0 ||
                 take(reference, "HOP_BY_HOP", &hop_by_hop) < 0 || take(reference, "HTTP_11", &s_HTTP_11) < 0 ||
                 take(reference, "HTTP_10", &s_HTTP_10) < 0;
    Py_DECREF(reference);
    if (failed) return NULL;
    if (!PyDict_CheckExact(statuses) || !PyDict_CheckExact(header_names) || !PyFrozenSet_Check(hop_by_hop)) {
        PyErr_SetString(PyExc_ImportError, "fleet.wsgi.response changed: its caches are not what _response.c reads");
        return NULL;
    }
#define INTERN(var, text) if (!(var = PyUnicode_InternFromString(text))) return NULL
    INTERN(s_HEAD, "HEAD");
    INTERN(s_close, "close");
    INTERN(s_keep_alive, "keep-alive");
    INTERN(s_content_length, "content-length");
    INTERN(s_date, "date");
#undef INTERN
    if (PyType_Ready(&FramerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "ResponseFramer", (PyObject *)&FramerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
