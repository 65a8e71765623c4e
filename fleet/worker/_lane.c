/* The worker's fast lane: one Mongrel2 request, from its bytes to its reply, in C.
 *
 * fleet.worker._lane.serve is what Worker.handle, Worker._serve and
 * fleet.wsgi.serve.serve do for the request nearly every request is (read
 * them first; they are the reference): a plain HTTP request (no upload, no
 * flow control) whose app returns a list or tuple of bytes. It uses the
 * compiled codec, environ and framer, calls the app once, and returns the one
 * Mongrel2 message (and the close when the connection must end) framed for
 * the wire, with (conn_id, closed, status line): the worker's outbox sends it
 * (fleet.worker.outbox), so the lane itself never writes to a socket.
 *
 * Everything else stays in Python, so the rules live in one place:
 *  - a message that is not a plain request: serve() returns None before any
 *    work, and the worker takes its usual path;
 *  - once the app was called (it is called once), whatever is not the common
 *    case (an iterator, an error, a response already begun with write(), a
 *    status or header the framer refuses) is handed to
 *    fleet.wsgi.serve.respond with the live Response, which is this file's
 *    twin of serve._Response (it makes the thread's Reply on first use).
 * tests/unit/test_worker_lane.py serves a table of apps both ways and
 * compares every message sent.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *parse_message, *ProtocolError, *RequestType, *Framer, *build_environ, *BytesIO, *ReplyType;
static PyObject *s_headers, *s_sender, *s_conn_id, *s_body, *s_METHOD, *s_VERSION, *s_connection, *s_DOWNLOAD_CREDITS,
    *s_upload_start, *s_upload_done, *s_GET, *s_HTTP_11, *s_joiner, *s_start, *s_end, *s_keep_alive, *s_send,
    *s_write, *s_start_response, *s_with_traceback;
static PyObject *framer_kwnames, *environ_kwnames, *reply_kwnames;

/* -- Response: serve._Response's twin ------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *framer, *reply, *responder, *poll_control, *sender, *conn_id;
    PyObject *status, *headers;
    char head_sent;
} Response;

static PyTypeObject ResponseType;

static PyObject *response_reply(Response *self, void *closure) {
    if (!self->reply) {
        /* Reply(responder, sender, conn_id, poll_control=poll_control), as Worker.handle makes it */
        PyObject *args[4] = {self->responder, self->sender, self->conn_id, self->poll_control};
        self->reply = PyObject_Vectorcall(ReplyType, args, 3, reply_kwnames);
        if (!self->reply) return NULL;
    }
    return Py_NewRef(self->reply);
}

static PyObject *response_send_impl(Response *self, PyObject *data, PyObject *body_length) {
    if (self->status == Py_None) {
        PyErr_SetString(PyExc_AssertionError, "the application sent body data before calling start_response");
        return NULL;
    }
    PyObject *framed = NULL, *reply = NULL, *sent = NULL;
    if (!self->head_sent) {
        PyObject *args[4] = {self->framer, self->status, self->headers, body_length};
        PyObject *head = PyObject_VectorcallMethod(s_start, args, 4, NULL);
        if (!head) return NULL;
        self->head_sent = 1;
        PyObject *body = PyObject_CallMethodOneArg(self->framer, s_body, data);
        if (body) framed = PyNumber_Add(head, body);
        Py_DECREF(head);
        Py_XDECREF(body);
    } else {
        int truthy = PyObject_IsTrue(data);
        if (truthy <= 0) return truthy < 0 ? NULL : Py_NewRef(Py_None);
        framed = PyObject_CallMethodOneArg(self->framer, s_body, data);
    }
    if (framed && (reply = response_reply(self, NULL))) sent = PyObject_CallMethodOneArg(reply, s_send, framed);
    Py_XDECREF(framed);
    Py_XDECREF(reply);
    if (!sent) return NULL;
    Py_DECREF(sent);
    Py_RETURN_NONE;
}

static PyObject *response_send(Response *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    /* send(data, body_length=None) */
    PyObject *values[2] = {NULL, Py_None};
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > 2) return PyErr_Format(PyExc_TypeError, "send() takes at most 2 arguments (%zd given)", nargs);
    for (Py_ssize_t i = 0; i < nargs; i++) values[i] = args[i];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        int j = PyUnicode_CompareWithASCIIString(name, "data") == 0 ? 0
                : PyUnicode_CompareWithASCIIString(name, "body_length") == 0 ? 1 : -1;
        if (j < nargs) return PyErr_Format(PyExc_TypeError, "send() got an unexpected argument %R", name);
        values[j] = args[nargs + i];
    }
    if (!values[0]) return PyErr_Format(PyExc_TypeError, "send() missing its data");
    return response_send_impl(self, values[0], values[1]);
}

static PyObject *response_write(Response *self, PyObject *data) { return response_send_impl(self, data, Py_None); }

static PyObject *response_start_response(Response *self, PyObject *const *args, Py_ssize_t nargs,
                                         PyObject *kwnames) {
    static const char *const names[] = {"status", "headers", "exc_info", NULL};
    PyObject *values[3] = {NULL, NULL, Py_None};
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > 3) return PyErr_Format(PyExc_TypeError, "start_response() takes at most 3 arguments");
    for (Py_ssize_t i = 0; i < nargs; i++) values[i] = args[i];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        int j = 0;
        while (names[j] && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, i), names[j]) != 0) j++;
        if (!names[j] || j < nargs)
            return PyErr_Format(PyExc_TypeError, "start_response() got an unexpected keyword argument");
        values[j] = args[nargs + i];
    }
    if (!values[0] || !values[1]) return PyErr_Format(PyExc_TypeError, "start_response(status, headers, exc_info=None)");
    PyObject *exc_info = values[2];
    if (exc_info != Py_None) {
        if (self->head_sent) { /* raise exc_info[1].with_traceback(exc_info[2]) */
            PyObject *value = PySequence_GetItem(exc_info, 1), *tb = value ? PySequence_GetItem(exc_info, 2) : NULL;
            PyObject *error = tb ? PyObject_CallMethodOneArg(value, s_with_traceback, tb) : NULL;
            Py_XDECREF(value);
            Py_XDECREF(tb);
            if (!error) return NULL;
            PyErr_SetObject((PyObject *)Py_TYPE(error), error);
            Py_DECREF(error);
            return NULL;
        }
    } else if (self->status != Py_None) {
        PyErr_SetString(PyExc_AssertionError, "start_response called a second time without exc_info");
        return NULL;
    }
    PyObject *headers = PySequence_List(values[1]);
    if (!headers) return NULL;
    Py_SETREF(self->status, Py_NewRef(values[0]));
    Py_SETREF(self->headers, headers);
    return PyObject_GetAttr((PyObject *)self, s_write);
}

static PyObject *response_head_sent(Response *self, void *closure) { return PyBool_FromLong(self->head_sent); }
static PyObject *response_status(Response *self, void *closure) { return Py_NewRef(self->status); }
static PyObject *response_headers(Response *self, void *closure) { return Py_NewRef(self->headers); }
static PyObject *response_framer(Response *self, void *closure) { return Py_NewRef(self->framer); }

static int response_traverse(Response *self, visitproc visit, void *arg) {
    Py_VISIT(self->framer);
    Py_VISIT(self->reply);
    Py_VISIT(self->responder);
    Py_VISIT(self->poll_control);
    Py_VISIT(self->status);
    Py_VISIT(self->headers);
    return 0;
}

static int response_clear(Response *self) {
    Py_CLEAR(self->framer);
    Py_CLEAR(self->reply);
    Py_CLEAR(self->responder);
    Py_CLEAR(self->poll_control);
    Py_CLEAR(self->sender);
    Py_CLEAR(self->conn_id);
    Py_CLEAR(self->status);
    Py_CLEAR(self->headers);
    return 0;
}

static void response_dealloc(Response *self) {
    PyObject_GC_UnTrack(self);
    response_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef response_methods[] = {
    {"start_response", (PyCFunction)(void (*)(void))response_start_response, METH_FASTCALL | METH_KEYWORDS,
     "PEP 3333 start_response(status, headers, exc_info=None) -> write."},
    {"write", (PyCFunction)response_write, METH_O, "The legacy write() callable: send now."},
    {"send", (PyCFunction)(void (*)(void))response_send, METH_FASTCALL | METH_KEYWORDS,
     "send(data, body_length=None): frame and send, the head first."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef response_getset[] = {
    {"reply", (getter)response_reply, NULL, "The request's Reply, made on first use.", NULL},
    {"head_sent", (getter)response_head_sent, NULL, NULL, NULL},
    {"status", (getter)response_status, NULL, NULL, NULL},
    {"headers", (getter)response_headers, NULL, NULL, NULL},
    {"framer", (getter)response_framer, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ResponseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fleet.worker._lane.Response",
    .tp_basicsize = sizeof(Response),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "start_response's state for one request (fleet.wsgi.serve._Response's twin).",
    .tp_traverse = (traverseproc)response_traverse,
    .tp_clear = (inquiry)response_clear,
    .tp_dealloc = (destructor)response_dealloc,
    .tp_methods = response_methods,
    .tp_getset = response_getset,
};

/* -- serve ---------------------------------------------------------------------- */

/* ZMTP's single-frame head for a message of `size` bytes (fleet.mongrel2.zmtp.frame_head). */
static Py_ssize_t frame_head(char *p, Py_ssize_t size) {
    if (size < 256) {
        p[0] = 0;
        p[1] = (char)size;
        return 2;
    }
    p[0] = 2;
    for (int i = 0; i < 8; i++) p[1 + i] = (char)((uint64_t)size >> (56 - 8 * i));
    return 9;
}

/* One reply message to Mongrel2 as it goes on the wire: its frame head, then encode_response's
 * bytes with the body in two parts (a, then b). Written at p unless p is NULL; its size either way. */
static Py_ssize_t wire_message(char *p, PyObject *sender, PyObject *conn_id, const char *a, Py_ssize_t a_len,
                               const char *b, Py_ssize_t b_len) {
    char prefix[24];
    int n = snprintf(prefix, sizeof(prefix), " %zd:", PyBytes_GET_SIZE(conn_id));
    Py_ssize_t size = PyBytes_GET_SIZE(sender) + n + PyBytes_GET_SIZE(conn_id) + 2 + a_len + b_len;
    char head[9];
    Py_ssize_t head_len = frame_head(head, size);
    if (!p) return head_len + size;
    memcpy(p, head, head_len);
    p += head_len;
    memcpy(p, PyBytes_AS_STRING(sender), PyBytes_GET_SIZE(sender));
    p += PyBytes_GET_SIZE(sender);
    memcpy(p, prefix, n);
    p += n;
    memcpy(p, PyBytes_AS_STRING(conn_id), PyBytes_GET_SIZE(conn_id));
    p += PyBytes_GET_SIZE(conn_id);
    memcpy(p, ", ", 2);
    p += 2;
    memcpy(p, a, a_len);
    memcpy(p + a_len, b, b_len);
    return head_len + size;
}

/* What the worker's Python does next: (request, response, framer, result, error). */
static PyObject *hand_over(PyObject *request, Response *response, PyObject *result, PyObject *error) {
    return PyTuple_Pack(5, request, (PyObject *)response, response->framer, result ? result : Py_None,
                        error ? error : Py_None);
}

/* The Exception being raised, handed over for respond() to answer (NULL if even that fails). */
static PyObject *hand_over_error(PyObject *request, Response *response) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb) PyException_SetTraceback(value, tb);
    PyObject *outcome = hand_over(request, response, NULL, value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return outcome;
}

/* The tail of the common case: a list or tuple of bytes after start_response. NULL with
 * no error set: not the common case, nothing done. */
static PyObject *finish_common(PyObject *request, Response *response, PyObject *result) {
    if (response->status == Py_None || response->head_sent) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(result), size = 0;
    PyObject **items = PySequence_Fast_ITEMS(result);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyBytes_CheckExact(items[i])) return NULL;
        size += PyBytes_GET_SIZE(items[i]);
    }
    PyObject *data;
    if (n == 1) {
        data = Py_NewRef(items[0]);
    } else {
        if (!(data = PyBytes_FromStringAndSize(NULL, size))) return NULL;
        char *p = PyBytes_AS_STRING(data);
        for (Py_ssize_t i = 0; i < n; i++) {
            memcpy(p, PyBytes_AS_STRING(items[i]), PyBytes_GET_SIZE(items[i]));
            p += PyBytes_GET_SIZE(items[i]);
        }
    }
    PyObject *length = PyLong_FromSsize_t(size), *head = NULL, *body = NULL, *end = NULL, *outcome = NULL;
    if (!length) goto done;
    PyObject *args[4] = {response->framer, response->status, response->headers, length};
    head = PyObject_VectorcallMethod(s_start, args, 4, NULL);
    if (!head) {
        /* Refused before anything was committed: respond() makes the same call and answers it. */
        if (!PyErr_ExceptionMatches(PyExc_Exception)) goto done;
        PyErr_Clear();
        outcome = hand_over(request, response, result, NULL);
        goto done;
    }
    response->head_sent = 1;
    if (!(body = PyObject_CallMethodOneArg(response->framer, s_body, data))) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) goto done;
        outcome = hand_over_error(request, response);
        goto done;
    }
    if (!(end = PyObject_CallMethodNoArgs(response->framer, s_end))) goto done;
    PyObject *keep = PyObject_GetAttr(response->framer, s_keep_alive);
    if (!keep) goto done;
    int closed = !PyObject_IsTrue(keep);
    Py_DECREF(keep);
    /* What Reply.send(head + body), then Reply.finish(end, close) would send: one message, the
     * end in a second one only if there is one, then the close. Returned framed for the wire:
     * the worker's outbox sends it with the replies and DONEs of the requests around it. */
    PyObject *sender = response->sender, *conn_id = response->conn_id;
    const char *h = PyBytes_AS_STRING(head), *b = PyBytes_AS_STRING(body), *e = PyBytes_AS_STRING(end);
    Py_ssize_t h_len = PyBytes_GET_SIZE(head), b_len = PyBytes_GET_SIZE(body), e_len = PyBytes_GET_SIZE(end);
    Py_ssize_t wire_size = wire_message(NULL, sender, conn_id, h, h_len, b, b_len);
    if (e_len) wire_size += wire_message(NULL, sender, conn_id, e, e_len, "", 0);
    if (closed) wire_size += wire_message(NULL, sender, conn_id, "", 0, "", 0);
    PyObject *wire = PyBytes_FromStringAndSize(NULL, wire_size);
    if (!wire) goto done;
    char *p = PyBytes_AS_STRING(wire);
    p += wire_message(p, sender, conn_id, h, h_len, b, b_len);
    if (e_len) p += wire_message(p, sender, conn_id, e, e_len, "", 0);
    if (closed) wire_message(p, sender, conn_id, "", 0, "", 0);
    outcome = Py_BuildValue("(OOON)", conn_id, closed ? Py_True : Py_False, response->status, wire);
done:
    Py_DECREF(data);
    Py_XDECREF(length);
    Py_XDECREF(head);
    Py_XDECREF(body);
    Py_XDECREF(end);
    return outcome;
}

/* serve(app, raw, responder, poll_control, multithread, multiprocess) */
static PyObject *serve(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) return PyErr_Format(PyExc_TypeError, "serve() takes 6 arguments (%zd given)", nargs);
    PyObject *app = args[0], *raw = args[1], *responder = args[2], *poll_control = args[3];
    PyObject *request = PyObject_CallOneArg(parse_message, raw);
    if (!request) {
        if (!PyErr_ExceptionMatches(ProtocolError)) return NULL;
        PyErr_Clear();
        Py_RETURN_NONE; /* the worker parses it again and says what is wrong */
    }
    PyObject *headers = NULL, *framer = NULL, *input = NULL, *environ = NULL, *start = NULL, *result = NULL,
             *outcome = NULL, *connection_text = NULL;
    Response *response = NULL;
    if (Py_TYPE(request) != (PyTypeObject *)RequestType) goto not_taken;
    if (!(headers = PyObject_GetAttr(request, s_headers))) goto done;
    if (!PyDict_CheckExact(headers)) goto not_taken;
    /* Uploads and flow control: the worker's own path. */
    int upload_start = PyDict_Contains(headers, s_upload_start), upload_done = PyDict_Contains(headers, s_upload_done),
        credits = PyDict_Contains(headers, s_DOWNLOAD_CREDITS);
    if (upload_start < 0 || upload_done < 0 || credits < 0) goto done;
    if (upload_start || upload_done || credits) goto not_taken;
    PyObject *method = PyDict_GetItemWithError(headers, s_METHOD), *version = PyDict_GetItemWithError(headers, s_VERSION);
    if (PyErr_Occurred()) goto done;
    if (!method) method = s_GET;
    if (!version) version = s_HTTP_11;
    if (!PyUnicode_CheckExact(method) || !PyUnicode_CheckExact(version)) goto not_taken;
    PyObject *connection = PyDict_GetItemWithError(headers, s_connection);
    if (!connection) {
        if (PyErr_Occurred()) goto done;
        connection = Py_None;
    } else if (PyList_CheckExact(connection)) { /* Request.header(): a repeated header, joined */
        if (!(connection = connection_text = PyUnicode_Join(s_joiner, connection))) goto done;
    } else if (!PyUnicode_CheckExact(connection)) {
        goto not_taken;
    }
    PyObject *framer_args[4] = {method, version, connection, Py_None};
    if (!(framer = PyObject_Vectorcall(Framer, framer_args, 0, framer_kwnames))) goto done;
    PyObject *body = PyObject_GetAttr(request, s_body);
    if (!body) goto done;
    Py_ssize_t body_len = PyBytes_Check(body) ? PyBytes_GET_SIZE(body) : -1;
    input = PyObject_CallOneArg(BytesIO, body);
    Py_DECREF(body);
    if (!input) goto done;
    if (body_len < 0) goto not_taken;
    PyObject *length = PyLong_FromSsize_t(body_len);
    if (!length) goto done;
    PyObject *errors = PySys_GetObject("stderr");
    PyObject *environ_args[7] = {request, input, length, errors ? errors : Py_None, args[4], args[5]};
    environ = PyObject_Vectorcall(build_environ, environ_args, 1, environ_kwnames);
    Py_DECREF(length);
    if (!environ) goto done;

    if (!(response = PyObject_GC_New(Response, &ResponseType))) goto done;
    response->framer = Py_NewRef(framer);
    response->reply = NULL;
    response->responder = Py_NewRef(responder);
    response->poll_control = Py_NewRef(poll_control);
    response->sender = PyObject_GetAttr(request, s_sender);
    response->conn_id = PyObject_GetAttr(request, s_conn_id);
    response->status = Py_NewRef(Py_None);
    response->headers = PyList_New(0);
    response->head_sent = 0;
    PyObject_GC_Track(response);
    if (!response->sender || !response->conn_id || !response->headers) goto done;
    if (!(start = PyObject_GetAttr((PyObject *)response, s_start_response))) goto done;

    PyObject *app_args[2] = {environ, start};
    result = PyObject_Vectorcall(app, app_args, 2, NULL);
    if (!result) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) goto done; /* KeyboardInterrupt and the like go on up */
        outcome = hand_over_error(request, response);
        goto done;
    }
    if (PyList_CheckExact(result) || PyTuple_CheckExact(result)) {
        outcome = finish_common(request, response, result);
        if (outcome || PyErr_Occurred()) goto done;
    }
    outcome = hand_over(request, response, result, NULL);
    goto done;
not_taken:
    outcome = Py_NewRef(Py_None);
done:
    Py_DECREF(request);
    Py_XDECREF(headers);
    Py_XDECREF(connection_text);
    Py_XDECREF(framer);
    Py_XDECREF(input);
    Py_XDECREF(environ);
    Py_XDECREF(start);
    Py_XDECREF(result);
    Py_XDECREF(response);
    return outcome;
}

static PyMethodDef methods[] = {
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL,
     "serve(app, raw, responder, poll_control, multithread, multiprocess)\n"
     "-> None (not taken: nothing done), (conn_id, closed, status, wire) (served: wire is\n"
     "the reply framed for Mongrel2, not yet sent), or\n"
     "(request, response, framer, result, error) for fleet.wsgi.serve.respond."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fleet.worker._lane",
                                    "The worker's fast lane for the common Mongrel2 request.", -1, methods};

static PyObject *attribute(const char *module_name, const char *name) {
    PyObject *from = PyImport_ImportModule(module_name);
    if (!from) return NULL;
    PyObject *value = PyObject_GetAttrString(from, name);
    Py_DECREF(from);
    return value;
}

PyMODINIT_FUNC PyInit__lane(void) {
    if (!(parse_message = attribute("fleet.mongrel2._codec", "parse_message")) ||
        !(ProtocolError = attribute("fleet.mongrel2.codec", "ProtocolError")) ||
        !(RequestType = attribute("fleet.mongrel2.codec", "Request")) ||
        !(Framer = attribute("fleet.wsgi._response", "ResponseFramer")) ||
        !(build_environ = attribute("fleet.wsgi._environ", "build_environ")) ||
        !(BytesIO = attribute("io", "BytesIO")) || !(ReplyType = attribute("fleet.mongrel2.reply", "Reply")) ||
        !(s_upload_start = attribute("fleet.mongrel2.uploads", "START_HEADER")) ||
        !(s_upload_done = attribute("fleet.mongrel2.uploads", "DONE_HEADER")))
        return NULL;
#define INTERN(var, text) if (!(var = PyUnicode_InternFromString(text))) return NULL
    INTERN(s_headers, "headers");
    INTERN(s_sender, "sender");
    INTERN(s_conn_id, "conn_id");
    INTERN(s_body, "body");
    INTERN(s_METHOD, "METHOD");
    INTERN(s_VERSION, "VERSION");
    INTERN(s_connection, "connection");
    INTERN(s_DOWNLOAD_CREDITS, "DOWNLOAD_CREDITS");
    INTERN(s_GET, "GET");
    INTERN(s_HTTP_11, "HTTP/1.1");
    INTERN(s_joiner, ", ");
    INTERN(s_start, "start");
    INTERN(s_end, "end");
    INTERN(s_keep_alive, "keep_alive");
    INTERN(s_send, "send");
    INTERN(s_write, "write");
    INTERN(s_start_response, "start_response");
    INTERN(s_with_traceback, "with_traceback");
#undef INTERN
    if (!(framer_kwnames = Py_BuildValue("(ssss)", "method", "version", "connection", "now")) ||
        !(environ_kwnames = Py_BuildValue("(sssss)", "body", "content_length", "errors", "multithread",
                                          "multiprocess")) ||
        !(reply_kwnames = Py_BuildValue("(s)", "poll_control")))
        return NULL;
    if (PyType_Ready(&ResponseType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Response", (PyObject *)&ResponseType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
