/* take_simple in C: fleet.http._simple.take_simple.
 *
 * The twin of fleet.http.simple.take_simple (the reference; read its module
 * docstring): the same subset of HTTP/1.1 requests, the same Request, the
 * same body and byte count; None for everything else, which h11 then reads.
 * A request this code is unsure of is never an error, only h11's to read.
 * tests/unit/test_http_simple.py holds the two to the same answers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "../mongrel2/_request_slots.h"

/* The reference's "[0-9]{1,18}": a length that fits a long long. */
#define MAX_LENGTH_DIGITS 18

static PyObject *s_content_length, *s_METHOD, *s_VERSION, *s_URI, *s_PATH, *s_QUERY, *s_PATTERN, *s_URL_SCHEME,
    *s_REMOTE_ADDR, *s_HTTP_10, *s_HTTP_11, *s_slash, *s_sender;

/* RFC 9110 tchar */
static int is_tchar(unsigned char c) {
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return 1;
    return c && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* A field value's characters: visible, obs-text, and blanks between them. */
static int is_value_char(unsigned char c) { return (c >= 0x21 && c != 0x7f) || c == ' ' || c == '\t'; }

static int is_blank(unsigned char c) { return c == ' ' || c == '\t'; }

/* name (length n, as received) equals the lower-case `lower` */
static int name_is(const unsigned char *name, Py_ssize_t n, const char *lower) {
    if ((size_t)n != strlen(lower)) return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if ((name[i] | ((name[i] >= 'A' && name[i] <= 'Z') ? 0x20 : 0)) != (unsigned char)lower[i]) return 0;
    return 1;
}

typedef struct {
    const unsigned char *name, *value;
    Py_ssize_t name_len, value_len;
} Field;

#define MAX_FIELDS 100 /* more header lines than this: h11's to read */

/* headers[name] = value, a repeat making a list, as shape_request does. */
static int add_header(PyObject *headers, const Field *f) {
    char lower[256];
    PyObject *name = NULL;
    if (f->name_len <= (Py_ssize_t)sizeof lower) {
        for (Py_ssize_t i = 0; i < f->name_len; i++)
            lower[i] = (char)(f->name[i] | ((f->name[i] >= 'A' && f->name[i] <= 'Z') ? 0x20 : 0));
        name = PyUnicode_FromStringAndSize(lower, f->name_len); /* ASCII: a token */
    } else {
        PyObject *raw = PyUnicode_DecodeLatin1((const char *)f->name, f->name_len, NULL);
        if (raw) name = PyObject_CallMethod(raw, "lower", NULL);
        Py_XDECREF(raw);
    }
    PyObject *value = name ? PyUnicode_DecodeLatin1((const char *)f->value, f->value_len, NULL) : NULL;
    int result = -1;
    if (!value) goto done;
    PyObject *present = PyDict_GetItemWithError(headers, name);
    if (!present) {
        if (!PyErr_Occurred()) result = PyDict_SetItem(headers, name, value);
    } else if (PyList_CheckExact(present)) {
        result = PyList_Append(present, value);
    } else {
        PyObject *both = PyList_New(2);
        if (both) {
            PyList_SET_ITEM(both, 0, Py_NewRef(present));
            PyList_SET_ITEM(both, 1, Py_NewRef(value));
            result = PyDict_SetItem(headers, name, both);
            Py_DECREF(both);
        }
    }
done:
    Py_XDECREF(name);
    Py_XDECREF(value);
    return result;
}

static int set_str(PyObject *headers, PyObject *key, const unsigned char *p, Py_ssize_t n) {
    PyObject *value = PyUnicode_DecodeLatin1((const char *)p, n, NULL);
    if (!value) return -1;
    int result = PyDict_SetItem(headers, key, value);
    Py_DECREF(value);
    return result;
}

static PyObject *take_simple(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) return PyErr_Format(PyExc_TypeError, "take_simple() takes 6 arguments (%zd given)", nargs);
    PyObject *conn_id = args[3], *remote_addr = args[4], *scheme = args[5];
    Py_ssize_t head_limit = PyLong_AsSsize_t(args[1]), max_body = PyLong_AsSsize_t(args[2]);
    if ((head_limit == -1 || max_body == -1) && PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *data = view.buf;
    Py_ssize_t size = view.len;
    PyObject *result = NULL;
    Field fields[MAX_FIELDS];
    int n_fields = 0;

    /* the head: up to the first blank line, within the limit */
    Py_ssize_t search = size < head_limit + 4 ? size : head_limit + 4;
    const unsigned char *blank = search >= 4 ? memmem(data, search, "\r\n\r\n", 4) : NULL;
    if (!blank) goto not_simple;
    const unsigned char *end = blank + 2; /* after the last line's CRLF */

    /* request line: method SP origin-form SP HTTP/1.x CRLF */
    const unsigned char *p = data, *method = p;
    while (p < end && is_tchar(*p)) p++;
    Py_ssize_t method_len = p - method;
    if (!method_len || p >= end || *p++ != ' ') goto not_simple;
    const unsigned char *target = p;
    if (p >= end || *p != '/') goto not_simple;
    while (p < end && *p >= 0x21 && *p <= 0x7e) p++;
    Py_ssize_t target_len = p - target;
    if (end - p < 11 || memcmp(p, " HTTP/1.", 8) != 0 || (p[8] != '0' && p[8] != '1') || p[9] != '\r' ||
        p[10] != '\n')
        goto not_simple;
    int minor = p[8] - '0';
    p += 11;

    /* header lines: token ":" OWS value OWS CRLF */
    long long length = -1;
    int hosts = 0;
    while (p < end) {
        Field *f = &fields[n_fields];
        if (n_fields == MAX_FIELDS) goto not_simple;
        f->name = p;
        while (p < end && is_tchar(*p)) p++;
        f->name_len = p - f->name;
        if (!f->name_len || p >= end || *p++ != ':') goto not_simple;
        while (p < end && is_blank(*p)) p++;
        const unsigned char *value = p;
        while (p < end && is_value_char(*p)) p++;
        if (end - p < 2 || p[0] != '\r' || p[1] != '\n') goto not_simple;
        const unsigned char *stop = p;
        while (stop > value && is_blank(stop[-1])) stop--;
        f->value = value;
        f->value_len = stop - value;
        p += 2;
        if (name_is(f->name, f->name_len, "content-length")) {
            if (length >= 0 || f->value_len < 1 || f->value_len > MAX_LENGTH_DIGITS) goto not_simple;
            length = 0;
            for (Py_ssize_t i = 0; i < f->value_len; i++) {
                if (f->value[i] < '0' || f->value[i] > '9') goto not_simple;
                length = length * 10 + (f->value[i] - '0');
            }
        } else if (name_is(f->name, f->name_len, "host")) {
            hosts++;
        } else if (name_is(f->name, f->name_len, "transfer-encoding") || name_is(f->name, f->name_len, "expect")) {
            goto not_simple;
        }
        n_fields++;
    }
    if (hosts > 1 || (hosts == 0 && minor == 1)) goto not_simple;
    Py_ssize_t head_size = (blank + 4) - data;
    long long body_size = length > 0 ? length : 0;
    if (body_size > max_body || size - head_size < body_size) goto not_simple;

    /* the Request, shaped as shape_request shapes it */
    PyObject *headers = PyDict_New();
    if (!headers) goto done;
    for (int i = 0; i < n_fields; i++) {
        if (name_is(fields[i].name, fields[i].name_len, "content-length") ||
            name_is(fields[i].name, fields[i].name_len, "transfer-encoding"))
            continue;
        if (add_header(headers, &fields[i]) < 0) goto fail_headers;
    }
    const unsigned char *question = memchr(target, '?', target_len);
    Py_ssize_t path_len = question ? question - target : target_len;
    PyObject *length_text = PyUnicode_FromFormat("%lld", body_size);
    if (!length_text) goto fail_headers;
    int failed = PyDict_SetItem(headers, s_content_length, length_text);
    Py_DECREF(length_text);
    if (failed || set_str(headers, s_METHOD, method, method_len) < 0 ||
        PyDict_SetItem(headers, s_VERSION, minor ? s_HTTP_11 : s_HTTP_10) < 0 ||
        set_str(headers, s_URI, target, target_len) < 0 || set_str(headers, s_PATH, target, path_len) < 0 ||
        (question && set_str(headers, s_QUERY, question + 1, target_len - path_len - 1) < 0) ||
        PyDict_SetItem(headers, s_PATTERN, s_slash) < 0 || PyDict_SetItem(headers, s_URL_SCHEME, scheme) < 0 ||
        PyDict_SetItem(headers, s_REMOTE_ADDR, remote_addr) < 0)
        goto fail_headers;
    PyObject *parts[REQUEST_FIELDS] = {Py_NewRef(s_sender), Py_NewRef(conn_id),
                                       PyBytes_FromStringAndSize((const char *)target, path_len), headers,
                                       PyBytes_FromStringAndSize(NULL, 0)};
    headers = NULL; /* parts holds it */
    PyObject *request = request_from_parts(parts);
    if (!request) goto done;
    PyObject *body = PyBytes_FromStringAndSize((const char *)data + head_size, (Py_ssize_t)body_size);
    if (body) result = Py_BuildValue("(NNn)", request, body, head_size + (Py_ssize_t)body_size);
    else Py_DECREF(request);
    goto done;

fail_headers:
    Py_XDECREF(headers);
    goto done;
not_simple:
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"take_simple", (PyCFunction)(void (*)(void))take_simple, METH_FASTCALL,
     "take_simple(data, head_limit, max_body, conn_id, remote_addr, scheme) -> (Request, body, used) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fleet.http._simple",
                                    "take_simple in C (fleet.http.simple is the reference).", -1, methods};

#define INTERN(var, text) \
    if (!(var = PyUnicode_InternFromString(text))) return NULL

PyMODINIT_FUNC PyInit__simple(void) {
    PyObject *codec = PyImport_ImportModule("fleet.mongrel2.codec");
    if (!codec) return NULL;
    int failed = request_slots_init(codec, "_simple.c") < 0;
    Py_DECREF(codec);
    if (failed) return NULL;
    INTERN(s_content_length, "content-length");
    INTERN(s_METHOD, "METHOD");
    INTERN(s_VERSION, "VERSION");
    INTERN(s_URI, "URI");
    INTERN(s_PATH, "PATH");
    INTERN(s_QUERY, "QUERY");
    INTERN(s_PATTERN, "PATTERN");
    INTERN(s_URL_SCHEME, "URL_SCHEME");
    INTERN(s_REMOTE_ADDR, "REMOTE_ADDR");
    INTERN(s_HTTP_10, "HTTP/1.0");
    INTERN(s_HTTP_11, "HTTP/1.1");
    INTERN(s_slash, "/");
    if (!(s_sender = PyBytes_FromString("http"))) return NULL;
    return PyModule_Create(&module);
}
