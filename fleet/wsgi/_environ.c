/* build_environ in C: fleet.wsgi._environ.build_environ.
 *
 * The twin of fleet.wsgi.environ.build_environ (the reference; read its
 * docstrings): same arguments, same environ, keys in the same order. The
 * rules stay in one place: this file uses the reference's template, its
 * caches (client header name -> environ key, Host -> name and port) and its
 * helpers for the rare cases (a path with %-escapes, a mount point, a
 * Content-Length to check). A request whose Mongrel2 keys or header values
 * are not plain str goes to the reference whole.
 * tests/unit/test_environ_native.py checks both give the same environ.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *reference_build;   /* build_environ */
static PyObject *template_;         /* _ENVIRON_TEMPLATE */
static PyObject *environ_keys;      /* _ENVIRON_KEYS: the reference's cache, shared */
static PyObject *environ_key;       /* _environ_key(name) */
static PyObject *valid_length;      /* _valid_length(value) */
static PyObject *decode_path;       /* decode_path(raw_path) */
static PyObject *split_script_name; /* split_script_name(path, script_name) */
static PyObject *parse_host;        /* _parse_host_cached(host, scheme) */
static PyObject *joiners;           /* JOINERS */
static PyObject *header_joiner;     /* HEADER_JOINER */
static Py_ssize_t max_cached_names; /* MAX_CACHED_NAMES */

static PyObject *s_headers, *s_conn_id, *s_path, *s_empty, *s_http, *s_protocol, *s_content_length;
static PyObject *s_METHOD, *s_URL_SCHEME, *s_PATH, *s_QUERY, *s_URI, *s_host, *s_VERSION, *s_REMOTE_ADDR, *s_PATTERN;
static PyObject *k_url_scheme, *k_input, *k_errors, *k_multithread, *k_multiprocess, *k_method, *k_script_name,
    *k_path_info, *k_query, *k_server_name, *k_server_port, *k_protocol, *k_remote_addr, *k_request_uri, *k_raw_uri,
    *k_pattern, *k_conn_id, *k_uri;

/* Not handled here: the reference builds this environ. */
#define ODD ((PyObject *)-1)

/* _single(headers.get(key)) for a Mongrel2 key, as a truth value: a borrowed
 * non-empty str, NULL if absent or empty, ODD if not a plain str (or an error). */
static PyObject *single(PyObject *headers, PyObject *key) {
    PyObject *value = PyDict_GetItemWithError(headers, key);
    if (!value) return PyErr_Occurred() ? ODD : NULL;
    if (!PyUnicode_CheckExact(value)) return ODD;
    return PyUnicode_GET_LENGTH(value) ? value : NULL;
}

/* A client header value as the app sees it: a list is joined (", ", "; " for cookie). New reference. */
static PyObject *joined(PyObject *name, PyObject *value) {
    if (!PyList_CheckExact(value)) return Py_NewRef(value);
    PyObject *joiner = PyDict_GetItemWithError(joiners, name);
    if (!joiner && PyErr_Occurred()) return NULL;
    return PyUnicode_Join(joiner ? joiner : header_joiner, value);
}

/* _add_client_headers(headers, environ); 0, or -1 with an error set. */
static int add_client_headers(PyObject *headers, PyObject *environ) {
    Py_ssize_t pos = 0;
    PyObject *name, *value;
    while (PyDict_Next(headers, &pos, &name, &value)) {
        PyObject *key = PyDict_GetItemWithError(environ_keys, name);
        if (key) {
            Py_INCREF(key);
        } else {
            if (PyErr_Occurred() || !(key = PyObject_CallOneArg(environ_key, name))) return -1;
            if (PyDict_GET_SIZE(environ_keys) < max_cached_names && PyDict_SetItem(environ_keys, name, key) < 0) {
                Py_DECREF(key);
                return -1;
            }
        }
        int failed = 0;
        if (!PyUnicode_Check(key) || PyUnicode_GET_LENGTH(key) == 0) {
            /* a name the app must not see */
        } else if (PyUnicode_Compare(key, s_content_length) == 0) {
            PyObject *length = PyObject_CallOneArg(valid_length, value);
            failed = !length || (length != Py_None && PyDict_SetItem(environ, s_content_length, length) < 0);
            Py_XDECREF(length);
        } else {
            PyObject *text = joined(name, value);
            failed = !text || PyDict_SetItem(environ, key, text) < 0;
            Py_XDECREF(text);
        }
        Py_DECREF(key);
        if (failed) return -1;
    }
    return 0;
}

/* Only plain str values (or lists of them) in the client headers: what the codec gives. */
static int plain_headers(PyObject *headers) {
    Py_ssize_t pos = 0;
    PyObject *name, *value;
    while (PyDict_Next(headers, &pos, &name, &value)) {
        if (!PyUnicode_CheckExact(name)) return 0;
        if (PyUnicode_CheckExact(value)) continue;
        if (!PyList_CheckExact(value)) return 0;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(value); i++)
            if (!PyUnicode_CheckExact(PyList_GET_ITEM(value, i))) return 0;
    }
    return 1;
}

/* The environ, or ODD (no error set) for the reference to build. */
static PyObject *build(PyObject *request, PyObject *body, PyObject *content_length, PyObject *errors,
                       PyObject *multithread, PyObject *multiprocess, PyObject *script_name) {
    PyObject *headers = NULL, *conn_id = NULL, *raw_path = NULL, *raw_uri = NULL, *path = NULL,
             *mount = NULL, *host = NULL, *conn_text = NULL, *length_text = NULL, *environ = NULL;
    PyObject *result = ODD;
    if (!(headers = PyObject_GetAttr(request, s_headers))) return NULL;
    if (!PyDict_CheckExact(headers) || !plain_headers(headers)) goto done;
    PyObject *method = single(headers, s_METHOD), *scheme = single(headers, s_URL_SCHEME),
             *path_header = single(headers, s_PATH), *query = single(headers, s_QUERY),
             *uri = single(headers, s_URI), *version = single(headers, s_VERSION),
             *remote = single(headers, s_REMOTE_ADDR), *pattern = single(headers, s_PATTERN),
             *host_header = single(headers, s_host);
    if (!method || method == ODD || scheme == ODD || path_header == ODD || query == ODD || uri == ODD ||
        version == ODD || remote == ODD || pattern == ODD || host_header == ODD)
        goto done; /* the reference raises for a missing METHOD, or decides */
    if (!scheme) scheme = s_http;
    if (path_header) {
        raw_path = Py_NewRef(path_header);
    } else {
        PyObject *path_bytes = PyObject_GetAttr(request, s_path);
        if (!path_bytes) goto error;
        raw_path = PyBytes_CheckExact(path_bytes)
                       ? PyUnicode_DecodeLatin1(PyBytes_AS_STRING(path_bytes), PyBytes_GET_SIZE(path_bytes), NULL)
                       : NULL;
        Py_DECREF(path_bytes);
        if (!raw_path) goto error_or_odd;
    }
    if (!query) query = s_empty;
    if (uri) {
        raw_uri = Py_NewRef(uri);
    } else if (query != s_empty) {
        raw_uri = PyUnicode_FromFormat("%U?%U", raw_path, query);
        if (!raw_uri) goto error;
    } else {
        raw_uri = Py_NewRef(raw_path);
    }
    if (PyUnicode_IS_ASCII(raw_path) && PyUnicode_FindChar(raw_path, '%', 0, PyUnicode_GET_LENGTH(raw_path), 1) < 0)
        path = Py_NewRef(raw_path); /* most paths: nothing to decode */
    else if (!(path = PyObject_CallOneArg(decode_path, raw_path)))
        goto error;
    PyObject *mounted_at = s_empty, *path_info = path;
    int mounted = PyObject_IsTrue(script_name);
    if (mounted < 0) goto error;
    if (mounted) {
        if (!(mount = PyObject_CallFunctionObjArgs(split_script_name, path, script_name, NULL))) goto error;
        if (!PyTuple_CheckExact(mount) || PyTuple_GET_SIZE(mount) != 2) goto done;
        mounted_at = PyTuple_GET_ITEM(mount, 0);
        path_info = PyTuple_GET_ITEM(mount, 1);
    }
    if (!(host = PyObject_CallFunctionObjArgs(parse_host, host_header ? host_header : Py_None, scheme, NULL)))
        goto error;
    if (!PyTuple_CheckExact(host) || PyTuple_GET_SIZE(host) != 2) goto done;
    if (!(conn_id = PyObject_GetAttr(request, s_conn_id))) goto error;
    if (!PyBytes_CheckExact(conn_id)) goto done;
    if (!(conn_text = PyUnicode_DecodeASCII(PyBytes_AS_STRING(conn_id), PyBytes_GET_SIZE(conn_id), "replace")))
        goto error;

    if (!(environ = PyDict_Copy(template_))) goto error;
    if (PyDict_SetItem(environ, k_url_scheme, scheme) < 0 || PyDict_SetItem(environ, k_input, body) < 0 ||
        PyDict_SetItem(environ, k_errors, errors) < 0 || PyDict_SetItem(environ, k_multithread, multithread) < 0 ||
        PyDict_SetItem(environ, k_multiprocess, multiprocess) < 0 || PyDict_SetItem(environ, k_method, method) < 0 ||
        PyDict_SetItem(environ, k_script_name, mounted_at) < 0 ||
        PyDict_SetItem(environ, k_path_info, path_info) < 0 || PyDict_SetItem(environ, k_query, query) < 0 ||
        PyDict_SetItem(environ, k_server_name, PyTuple_GET_ITEM(host, 0)) < 0 ||
        PyDict_SetItem(environ, k_server_port, PyTuple_GET_ITEM(host, 1)) < 0 ||
        PyDict_SetItem(environ, k_protocol, version ? version : s_protocol) < 0 ||
        PyDict_SetItem(environ, k_remote_addr, remote ? remote : s_empty) < 0 ||
        PyDict_SetItem(environ, k_request_uri, raw_uri) < 0 || PyDict_SetItem(environ, k_raw_uri, raw_uri) < 0 ||
        PyDict_SetItem(environ, k_uri, raw_uri) < 0 ||
        PyDict_SetItem(environ, k_pattern, pattern ? pattern : s_empty) < 0 ||
        PyDict_SetItem(environ, k_conn_id, conn_text) < 0 || add_client_headers(headers, environ) < 0)
        goto error;
    if (content_length != Py_None) {
        if (!(length_text = PyObject_Str(content_length)) ||
            PyDict_SetItem(environ, s_content_length, length_text) < 0)
            goto error;
    }
    result = Py_NewRef(environ);
    goto done;
error_or_odd:
    if (!PyErr_Occurred()) goto done;
error:
    result = NULL;
done:
    Py_XDECREF(headers);
    Py_XDECREF(conn_id);
    Py_XDECREF(raw_path);
    Py_XDECREF(raw_uri);
    Py_XDECREF(path);
    Py_XDECREF(mount);
    Py_XDECREF(host);
    Py_XDECREF(conn_text);
    Py_XDECREF(length_text);
    Py_XDECREF(environ);
    return result;
}

static PyObject *kw_names[6]; /* interned: body, content_length, errors, multithread, multiprocess, script_name */

static PyObject *build_environ(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    /* build_environ(request, *, body, content_length, errors, multithread, multiprocess, script_name="") */
    PyObject *values[6] = {NULL, NULL, NULL, NULL, NULL, s_empty};
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    int usual = nargs == 1;
    for (Py_ssize_t i = 0; usual && i < nkw; i++) {
        PyObject *kw = PyTuple_GET_ITEM(kwnames, i);
        int j = 0;
        while (j < 6 && kw != kw_names[j]) j++; /* keyword names are interned: the usual call matches here */
        if (j == 6)
            for (j = 0; j < 6 && PyUnicode_Compare(kw, kw_names[j]) != 0; j++) {}
        usual = j < 6;
        if (usual) values[j] = args[nargs + i];
    }
    if (PyErr_Occurred()) return NULL;
    for (int j = 0; usual && j < 5; j++) usual = values[j] != NULL;
    if (usual) {
        PyObject *environ = build(args[0], values[0], values[1], values[2], values[3], values[4], values[5]);
        if (environ != ODD) return environ;
    }
    /* Odd arguments, or a request the reference builds: it also raises the right errors. */
    return PyObject_Vectorcall(reference_build, args, nargs, kwnames);
}

static PyMethodDef methods[] = {
    {"build_environ", (PyCFunction)(void (*)(void))build_environ, METH_FASTCALL | METH_KEYWORDS,
     "build_environ(request, *, body, content_length, errors, multithread, multiprocess, script_name='') -> dict\n"
     "fleet.wsgi.environ.build_environ, in C."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fleet.wsgi._environ",
                                    "build_environ in C (fleet.wsgi.environ is the reference).", -1, methods};

static int take(PyObject *from, const char *name, PyObject **into) {
    *into = PyObject_GetAttrString(from, name);
    return *into ? 0 : -1;
}

PyMODINIT_FUNC PyInit__environ(void) {
    PyObject *reference = PyImport_ImportModule("fleet.wsgi.environ");
    if (!reference) return NULL;
    PyObject *limit = NULL;
    int failed = take(reference, "build_environ", &reference_build) < 0 ||
                 take(reference, "_ENVIRON_TEMPLATE", &template_) < 0 ||
                 take(reference, "_ENVIRON_KEYS", &environ_keys) < 0 ||
                 take(reference, "_environ_key", &environ_key) < 0 ||
                 take(reference, "_valid_length", &valid_length) < 0 ||
                 take(reference, "decode_path", &decode_path) < 0 ||
                 take(reference, "split_script_name", &split_script_name) < 0 ||
                 take(reference, "_parse_host_cached", &parse_host) < 0 ||
                 take(reference, "JOINERS", &joiners) < 0 || take(reference, "HEADER_JOINER", &header_joiner) < 0 ||
                 take(reference, "DEFAULT_PROTOCOL", &s_protocol) < 0 ||
                 take(reference, "DEFAULT_URL_SCHEME", &s_http) < 0 ||
                 take(reference, "MAX_CACHED_NAMES", &limit) < 0;
    Py_DECREF(reference);
    if (failed) return NULL;
    max_cached_names = PyLong_AsSsize_t(limit);
    Py_DECREF(limit);
    if (max_cached_names < 0 && PyErr_Occurred()) return NULL;
    if (!PyDict_CheckExact(template_) || !PyDict_CheckExact(environ_keys) || !PyDict_CheckExact(joiners)) {
        PyErr_SetString(PyExc_ImportError, "fleet.wsgi.environ changed: its caches are no longer dicts");
        return NULL;
    }
#define INTERN(var, text) if (!(var = PyUnicode_InternFromString(text))) return NULL
    INTERN(s_headers, "headers");
    INTERN(s_conn_id, "conn_id");
    INTERN(s_path, "path");
    INTERN(s_empty, "");
    INTERN(s_content_length, "CONTENT_LENGTH");
    INTERN(s_METHOD, "METHOD");
    INTERN(s_URL_SCHEME, "URL_SCHEME");
    INTERN(s_PATH, "PATH");
    INTERN(s_QUERY, "QUERY");
    INTERN(s_URI, "URI");
    INTERN(s_host, "host");
    INTERN(s_VERSION, "VERSION");
    INTERN(s_REMOTE_ADDR, "REMOTE_ADDR");
    INTERN(s_PATTERN, "PATTERN");
    INTERN(k_url_scheme, "wsgi.url_scheme");
    INTERN(k_input, "wsgi.input");
    INTERN(k_errors, "wsgi.errors");
    INTERN(k_multithread, "wsgi.multithread");
    INTERN(k_multiprocess, "wsgi.multiprocess");
    INTERN(k_method, "REQUEST_METHOD");
    INTERN(k_script_name, "SCRIPT_NAME");
    INTERN(k_path_info, "PATH_INFO");
    INTERN(k_query, "QUERY_STRING");
    INTERN(k_server_name, "SERVER_NAME");
    INTERN(k_server_port, "SERVER_PORT");
    INTERN(k_protocol, "SERVER_PROTOCOL");
    INTERN(k_remote_addr, "REMOTE_ADDR");
    INTERN(k_request_uri, "REQUEST_URI");
    INTERN(k_raw_uri, "RAW_URI");
    INTERN(k_pattern, "mongrel2.pattern");
    INTERN(k_conn_id, "mongrel2.conn_id");
    INTERN(k_uri, "mongrel2.uri");
    INTERN(kw_names[0], "body");
    INTERN(kw_names[1], "content_length");
    INTERN(kw_names[2], "errors");
    INTERN(kw_names[3], "multithread");
    INTERN(kw_names[4], "multiprocess");
    INTERN(kw_names[5], "script_name");
#undef INTERN
    return PyModule_Create(&module);
}
