/* parse_message in C: fleet.mongrel2._codec.parse_message.
 *
 * The twin of fleet.mongrel2.codec.parse_message (the reference; read its
 * docstring): same input, same Request, same ProtocolError. This file
 * decodes only the message every request is: tnetstring HEADERS whose keys
 * are strings and whose values are strings or non-empty lists of strings,
 * a path that is not "@*", a METHOD, no DOWNLOAD_CREDITS. Anything else
 * (JSON headers, control messages, flow control, every malformed message)
 * goes to the reference, which decides and says exactly what is wrong; so a
 * doubt here is never an error, only a slower path.
 * tests/unit/test_mongrel2_native.py checks both give the same answers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_request_slots.h"

/* Equal to the reference's limits (codec.py); the test checks. */
#define MAX_SENDER_BYTES 256
#define MAX_CONN_ID_DIGITS 10
#define MAX_LENGTH_DIGITS 10
#define MAX_HEADERS_BYTES (1024 * 1024)
/* tnetstring lengths inside HEADERS: tnetstring3 reads at most 9 digits. */
#define MAX_TNET_DIGITS 9

static PyObject *reference_parse;  /* fleet.mongrel2.codec.parse_message */
static PyObject *str_method, *str_download_credits;

/* A canonical decimal of 1..max_digits digits ending at `stop`; its value, or -1. */
static long long decimal(const char *p, const char *end, char stop, int max_digits, const char **after) {
    const char *q = p;
    long long value = 0;
    while (q < end && *q >= '0' && *q <= '9') {
        if (q - p >= max_digits) return -1;
        value = value * 10 + (*q - '0');
        q++;
    }
    if (q == p || q >= end || *q != stop) return -1;
    if (*p == '0' && q - p > 1) return -1;
    *after = q + 1;
    return value;
}

/* One tnetstring item at p: its payload [*start, *stop) and its type; 0 or -1. */
static int tnet_item(const char *p, const char *end, const char **start, const char **stop, char *type) {
    const char *payload;
    long long n = decimal(p, end, ':', MAX_TNET_DIGITS, &payload);
    if (n < 0 || n >= end - payload) return -1;  /* the payload and its type byte */
    *start = payload;
    *stop = payload + n;
    *type = payload[n];
    return 0;
}

/* Header names seen before are decoded once. A request's keys are then the same interned
 * str objects every time: their hash is known, and the environ's caches (and every lookup
 * by an interned constant such as "METHOD") match them by identity, not by comparing bytes.
 * Bounded, since clients choose names: past NAME_SLOTS names, or NAME_PROBES taken slots,
 * a name is decoded afresh, as it always was. Only threads holding the GIL come here. */
#define NAME_SLOTS 512  /* a power of two */
#define NAME_PROBES 4
#define MAX_CACHED_NAME 64
static PyObject *names[NAME_SLOTS];

static PyObject *header_name(const char *start, Py_ssize_t size) {
    if (size > MAX_CACHED_NAME) return PyUnicode_DecodeLatin1(start, size, NULL);
    uint32_t hash = 2166136261u;  /* FNV-1a */
    for (Py_ssize_t i = 0; i < size; i++) hash = (hash ^ (unsigned char)start[i]) * 16777619u;
    for (int probe = 0; probe < NAME_PROBES; probe++) {
        PyObject **slot = &names[(hash + probe) & (NAME_SLOTS - 1)];
        if (!*slot) {
            PyObject *name = PyUnicode_DecodeLatin1(start, size, NULL);
            if (!name) return NULL;
            PyUnicode_InternInPlace(&name);
            *slot = Py_NewRef(name);
            return name;
        }
        if (PyUnicode_GET_LENGTH(*slot) == size && memcmp(PyUnicode_1BYTE_DATA(*slot), start, size) == 0)
            return Py_NewRef(*slot);
    }
    return PyUnicode_DecodeLatin1(start, size, NULL);
}

/* A header value: a string, or a non-empty list of strings; NULL (no error set) otherwise. */
static PyObject *header_value(const char *start, const char *stop, char type) {
    if (type == ',') return PyUnicode_DecodeLatin1(start, stop - start, NULL);
    if (type != ']' || start == stop) return NULL;
    PyObject *items = PyList_New(0);
    if (!items) return NULL;
    const char *p = start;
    while (p < stop) {
        const char *a, *b;
        char t;
        if (tnet_item(p, stop, &a, &b, &t) < 0 || t != ',') goto fail;
        PyObject *item = PyUnicode_DecodeLatin1(a, b - a, NULL);
        if (!item || PyList_Append(items, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
        p = b + 1;
    }
    return items;
fail:
    Py_DECREF(items);
    return NULL;
}

/* The HEADERS dict payload [p, end); NULL with no error set when it is not the common kind. */
static PyObject *headers_dict(const char *p, const char *end) {
    PyObject *headers = PyDict_New();
    if (!headers) return NULL;
    while (p < end) {
        const char *ks, *ke, *vs, *ve;
        char kt, vt;
        if (tnet_item(p, end, &ks, &ke, &kt) < 0 || kt != ',') goto other;
        p = ke + 1;
        if (tnet_item(p, end, &vs, &ve, &vt) < 0) goto other;
        p = ve + 1;
        PyObject *key = header_name(ks, ke - ks);
        if (!key) goto fail;
        int seen = PyDict_Contains(headers, key);
        PyObject *value = seen == 0 ? header_value(vs, ve, vt) : NULL;
        if (!value) {
            Py_DECREF(key);
            if (PyErr_Occurred()) goto fail;
            goto other;  /* a repeated key or an odd value: the reference decides */
        }
        int failed = PyDict_SetItem(headers, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (failed < 0) goto fail;
    }
    return headers;
other:
fail:
    Py_DECREF(headers);
    return NULL;
}

/* The common request: its Request, or NULL with no error set for the reference to decide. */
static PyObject *parse_common(const char *raw, Py_ssize_t size) {
    const char *end = raw + size, *p = raw;
    /* SENDER: [A-Za-z0-9-]{1,256} */
    const char *sender = p;
    while (p < end && (Py_ISALNUM(*p) || *p == '-')) p++;
    if (p == sender || p - sender > MAX_SENDER_BYTES || p >= end || *p != ' ') return NULL;
    Py_ssize_t sender_len = p - sender;
    /* CONN_ID: a canonical decimal */
    const char *conn_id = ++p, *after;
    if (decimal(p, end, ' ', MAX_CONN_ID_DIGITS, &after) < 0) return NULL;
    Py_ssize_t conn_len = after - 1 - conn_id;
    /* PATH: one or more bytes that are not a space; "@*" is control */
    const char *path = p = after;
    while (p < end && *p != ' ') p++;
    if (p == path || p >= end) return NULL;
    Py_ssize_t path_len = p - path;
    if (path_len == 2 && path[0] == '@' && path[1] == '*') return NULL;
    /* HEADERS: LEN:...} */
    long long headers_len = decimal(p + 1, end, ':', MAX_LENGTH_DIGITS, &after);
    if (headers_len < 0 || headers_len > MAX_HEADERS_BYTES || headers_len + 1 >= end - after) return NULL;
    const char *headers_start = after, *headers_end = after + headers_len;
    if (*headers_end != '}') return NULL;
    /* BODY: LEN:data, and nothing after it */
    long long body_len = decimal(headers_end + 1, end, ':', MAX_LENGTH_DIGITS, &after);
    if (body_len < 0 || body_len != end - after - 1 || end[-1] != ',') return NULL;
    const char *body = after;

    PyObject *headers = headers_dict(headers_start, headers_end);
    if (!headers) return NULL;
    PyObject *method = PyDict_GetItemWithError(headers, str_method);
    if (!method || !PyUnicode_CheckExact(method) || PyDict_GetItemWithError(headers, str_download_credits)) {
        Py_DECREF(headers);
        return NULL;
    }
    PyObject *parts[REQUEST_FIELDS] = {
        PyBytes_FromStringAndSize(sender, sender_len), PyBytes_FromStringAndSize(conn_id, conn_len),
        PyBytes_FromStringAndSize(path, path_len), headers, PyBytes_FromStringAndSize(body, body_len)};
    return request_from_parts(parts);
}

static PyObject *parse_message(PyObject *module, PyObject *raw) {
    if (PyBytes_CheckExact(raw)) {
        PyObject *request = parse_common(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw));
        if (request || PyErr_Occurred()) return request;
    }
    return PyObject_CallOneArg(reference_parse, raw);
}

static PyMethodDef methods[] = {
    {"parse_message", parse_message, METH_O,
     "parse_message(raw) -> Event: fleet.mongrel2.codec.parse_message, the common request decoded in C."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fleet.mongrel2._codec",
                                    "parse_message in C (fleet.mongrel2.codec is the reference).", -1, methods};

PyMODINIT_FUNC PyInit__codec(void) {
    PyObject *codec = PyImport_ImportModule("fleet.mongrel2.codec");
    if (!codec) return NULL;
    reference_parse = PyObject_GetAttrString(codec, "parse_message");
    int failed = !reference_parse || request_slots_init(codec, "_codec.c") < 0;
    Py_DECREF(codec);
    if (failed) return NULL;
    if (!(str_method = PyUnicode_InternFromString("METHOD"))) return NULL;
    if (!(str_download_credits = PyUnicode_InternFromString("DOWNLOAD_CREDITS"))) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "MAX_SENDER_BYTES", MAX_SENDER_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_CONN_ID_DIGITS", MAX_CONN_ID_DIGITS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_LENGTH_DIGITS", MAX_LENGTH_DIGITS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HEADERS_BYTES", MAX_HEADERS_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
