/* The link's framing in C: fleet.dispatch._frames.encode and decode.
 *
 * Twins of fleet.dispatch.frames.encode and decode (the reference; read its
 * docstring for the format: a u32 size, then u32-prefixed frames). A worker
 * thread encodes a DONE and decodes its requests on every request. What is
 * not the usual case (frames that are not bytes, a message whose frames do
 * not fill it exactly) goes to the reference, which then behaves exactly as
 * it always has. tests/unit/test_frames_native.py compares both.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *reference_encode, *reference_decode, *s_append;

static void put_u32(char *p, uint32_t v) {
    p[0] = (char)(v >> 24), p[1] = (char)(v >> 16), p[2] = (char)(v >> 8), p[3] = (char)v;
}

static uint32_t get_u32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static PyObject *encode(PyObject *module, PyObject *frames) {
    if (!PyList_CheckExact(frames)) return PyObject_CallOneArg(reference_encode, frames);
    Py_ssize_t n = PyList_GET_SIZE(frames), size = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *frame = PyList_GET_ITEM(frames, i);
        if (!PyBytes_CheckExact(frame) || PyBytes_GET_SIZE(frame) > UINT32_MAX - 4)
            return PyObject_CallOneArg(reference_encode, frames);
        size += 4 + PyBytes_GET_SIZE(frame);
    }
    if (size > UINT32_MAX) return PyObject_CallOneArg(reference_encode, frames); /* it raises */
    PyObject *out = PyBytes_FromStringAndSize(NULL, 4 + size);
    if (!out) return NULL;
    char *p = PyBytes_AS_STRING(out);
    put_u32(p, (uint32_t)size);
    p += 4;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *frame = PyList_GET_ITEM(frames, i);
        Py_ssize_t length = PyBytes_GET_SIZE(frame);
        put_u32(p, (uint32_t)length);
        memcpy(p + 4, PyBytes_AS_STRING(frame), length);
        p += 4 + length;
    }
    return out;
}

static int append(PyObject *out, PyObject *message) {
    if (PyList_CheckExact(out)) return PyList_Append(out, message);
    PyObject *r = PyObject_CallMethodOneArg(out, s_append, message);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* The frames of the message at [pos + 4, end) fill it exactly; their count, or -1. */
static Py_ssize_t count_frames(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end) {
    Py_ssize_t i = pos + 4, count = 0;
    while (i < end) {
        if (end - i < 4) return -1;
        Py_ssize_t length = (Py_ssize_t)get_u32(buf + i);
        if (length > end - i - 4) return -1;
        i += 4 + length;
        count++;
    }
    return count;
}

/* decode(data, out) -> bytes used */
static PyObject *decode(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) return PyErr_Format(PyExc_TypeError, "decode(data, out) takes 2 arguments");
    PyObject *data = args[0], *out = args[1];
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t len = view.len, pos = 0;
    /* First the check: a malformed message anywhere, and the reference decodes it all. */
    while (len - pos >= 4) {
        Py_ssize_t end = pos + 4 + (Py_ssize_t)get_u32(buf + pos);
        if (end > len) break;
        if (count_frames(buf, pos, end) < 0) {
            PyBuffer_Release(&view);
            PyObject *call[2] = {data, out};
            return PyObject_Vectorcall(reference_decode, call, 2, NULL);
        }
        pos = end;
    }
    Py_ssize_t used = pos;
    PyObject *result = NULL;
    for (pos = 0; pos < used;) {
        Py_ssize_t end = pos + 4 + (Py_ssize_t)get_u32(buf + pos), count = count_frames(buf, pos, end);
        PyObject *message = PyList_New(count);
        if (!message) goto done;
        Py_ssize_t i = pos + 4;
        for (Py_ssize_t k = 0; k < count; k++) {
            Py_ssize_t length = (Py_ssize_t)get_u32(buf + i);
            PyObject *frame = PyBytes_FromStringAndSize((const char *)buf + i + 4, length);
            if (!frame) {
                Py_DECREF(message);
                goto done;
            }
            PyList_SET_ITEM(message, k, frame);
            i += 4 + length;
        }
        int failed = append(out, message);
        Py_DECREF(message);
        if (failed) goto done;
        pos = end;
    }
    result = PyLong_FromSsize_t(used);
done:
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", (PyCFunction)encode, METH_O, "encode(frames) -> bytes: fleet.dispatch.frames.encode, in C."},
    {"decode", (PyCFunction)(void (*)(void))decode, METH_FASTCALL,
     "decode(data, out) -> int: fleet.dispatch.frames.decode, in C."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fleet.dispatch._frames",
                                    "The link's framing in C (fleet.dispatch.frames is the reference).", -1, methods};

PyMODINIT_FUNC PyInit__frames(void) {
    PyObject *reference = PyImport_ImportModule("fleet.dispatch.frames");
    if (!reference) return NULL;
    reference_encode = PyObject_GetAttrString(reference, "encode");
    reference_decode = PyObject_GetAttrString(reference, "decode");
    Py_DECREF(reference);
    if (!reference_encode || !reference_decode || !(s_append = PyUnicode_InternFromString("append"))) return NULL;
    return PyModule_Create(&module);
}
