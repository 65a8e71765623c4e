/* A fleet.mongrel2.codec.Request made in C, shared by the compiled twins
 * (fleet/mongrel2/_codec.c, fleet/http/_simple.c).
 *
 * A Request is made as codec._new_request makes it: allocated, and its slots
 * filled through the offsets of their member descriptors, without a Python
 * call. The offsets are looked up once, at import, and checked: if Request
 * stops being a slotted class of _REQUEST_FIELDS the import fails loudly
 * instead of writing into the wrong place.
 */
#ifndef FLEET_REQUEST_SLOTS_H
#define FLEET_REQUEST_SLOTS_H

#include <Python.h>
#include <structmember.h>

#define REQUEST_FIELDS 5 /* sender, conn_id, path, headers, body */

static PyTypeObject *request_type; /* fleet.mongrel2.codec.Request */
static Py_ssize_t field_offsets[REQUEST_FIELDS];

/* Looks Request and its slot offsets up in `codec` (fleet.mongrel2.codec); -1 with an exception set on failure.
 * `who` names the C file, for the message. */
static int request_slots_init(PyObject *codec, const char *who) {
    request_type = (PyTypeObject *)PyObject_GetAttrString(codec, "Request");
    PyObject *fields = PyObject_GetAttrString(codec, "_REQUEST_FIELDS");
    if (!request_type || !fields) {
        Py_XDECREF(fields);
        return -1;
    }
    int usable = PyType_Check(request_type) && PyTuple_Check(fields) && PyTuple_GET_SIZE(fields) == REQUEST_FIELDS;
    for (int i = 0; usable && i < REQUEST_FIELDS; i++) {
        PyObject *slot = PyDict_GetItemWithError(request_type->tp_dict, PyTuple_GET_ITEM(fields, i));
        usable = slot && Py_IS_TYPE(slot, &PyMemberDescr_Type) &&
                 ((PyMemberDescrObject *)slot)->d_member->type == T_OBJECT_EX;
        if (usable) field_offsets[i] = ((PyMemberDescrObject *)slot)->d_member->offset;
    }
    Py_DECREF(fields);
    if (usable) return 0;
    if (!PyErr_Occurred())
        PyErr_Format(PyExc_ImportError,
                     "fleet.mongrel2.codec.Request is no longer a slotted class of _REQUEST_FIELDS: %s must follow it",
                     who);
    return -1;
}

/* A Request from its parts, in _REQUEST_FIELDS order. Steals every part (NULL parts allowed: then the
 * result is NULL, with the exception their maker set). */
static PyObject *request_from_parts(PyObject *parts[REQUEST_FIELDS]) {
    PyObject *request = NULL;
    int complete = 1;
    for (int i = 0; i < REQUEST_FIELDS; i++) complete = complete && parts[i];
    if (complete && (request = request_type->tp_alloc(request_type, 0))) {
        for (int i = 0; i < REQUEST_FIELDS; i++) {
            *(PyObject **)((char *)request + field_offsets[i]) = parts[i]; /* the slot takes the reference */
            parts[i] = NULL;
        }
    }
    for (int i = 0; i < REQUEST_FIELDS; i++) Py_XDECREF(parts[i]);
    return request;
}

#endif
