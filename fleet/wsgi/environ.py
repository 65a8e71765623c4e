"""Build a PEP 3333 WSGI environ from a Mongrel2 request, with no I/O.

Mongrel2 sends its own facts about a request as UPPER case header keys
(METHOD, PATH, VERSION, URI, QUERY, PATTERN, URL_SCHEME, REMOTE_ADDR, ...)
and lower-cases every client header name, so the case of a key tells who set
it: a client cannot pose as Mongrel2. String values were already decoded as
latin-1 by the codec, which is exactly the "bytes as str" form PEP 3333 wants.
Modelled on werkzeug's ``serving.make_environ``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, BinaryIO, TextIO
from urllib.parse import unquote_to_bytes

from fleet.mongrel2.codec import HeaderValue, Request

WSGI_VERSION = (1, 0)

# Used when the request carries no usable Host header (HTTP/1.0 clients may
# omit it; Mongrel2 then routes to its default_host and sends no "host" key).
# The worker cannot know Mongrel2's listening address, so it names no host in
# particular; PEP 3333 URL reconstruction uses HTTP_HOST first anyway.
DEFAULT_SERVER_NAME = "localhost"
DEFAULT_PORTS = {"http": "80", "https": "443"}
DEFAULT_URL_SCHEME = "http"
DEFAULT_PROTOCOL = "HTTP/1.1"

# Written by Mongrel2 itself for the upload protocol (lower case although
# internal); a client can forge them, so they never reach the application.
INTERNAL_HEADERS = frozenset({"x-mongrel2-upload-start", "x-mongrel2-upload-done"})

# Repeated client headers are joined like this (RFC 9110 5.3; cookies RFC 6265 5.4).
HEADER_JOINER = ", "
JOINERS = {"cookie": "; "}

# These two become CONTENT_TYPE / CONTENT_LENGTH, never HTTP_* (PEP 3333, CGI).
CONTENT_HEADERS = {"content-type": "CONTENT_TYPE", "content-length": "CONTENT_LENGTH"}

MAX_PORT = 65535

# Header names and Host values come from clients, so the caches keyed by them
# stay bounded; what arrives after a cache is full is handled, not remembered.
MAX_CACHED_NAMES = 1024
MAX_CACHED_HOSTS = 64


# Every key build_environ sets, in its order; None marks a per-request value.
# build_environ copies this dict and fills it in: copying clones the hash
# table in one step, cheaper than a 21-key literal inserting key by key.
_ENVIRON_TEMPLATE: dict[str, Any] = {
    "wsgi.version": WSGI_VERSION,
    "wsgi.url_scheme": None,
    "wsgi.input": None,
    "wsgi.errors": None,
    "wsgi.multithread": None,
    "wsgi.multiprocess": None,
    "wsgi.run_once": False,
    # Mongrel2 hands over a complete body, so reading to EOF is safe
    # (the WSGI 1.0.1 extension honoured by werkzeug and Flask).
    "wsgi.input_terminated": True,
    "REQUEST_METHOD": None,
    "SCRIPT_NAME": None,
    "PATH_INFO": None,
    "QUERY_STRING": None,
    "SERVER_NAME": None,
    "SERVER_PORT": None,
    "SERVER_PROTOCOL": None,
    # Set by Mongrel2 from the peer address; unforgeable (upper-case key).
    "REMOTE_ADDR": None,
    # Non-standard, raw request target as sent (mod_wsgi, uWSGI).
    "REQUEST_URI": None,
    # Non-standard, the same, under gunicorn's name.
    "RAW_URI": None,
    # Non-standard: the Mongrel2 route pattern that matched (e.g. "/t/").
    "mongrel2.pattern": None,
    # Non-standard: Mongrel2's id of the client TCP connection (decimal).
    "mongrel2.conn_id": None,
    # Non-standard: the URI header exactly as Mongrel2 sent it.
    "mongrel2.uri": None,
}


def build_environ(
    request: Request,
    *,
    body: BinaryIO,
    content_length: int | None,
    errors: TextIO,
    multithread: bool,
    multiprocess: bool,
    script_name: str = "",
) -> dict[str, Any]:
    """Return the WSGI environ for ``request``; every value of a CGI key is a str.

    ``body`` is the ready-to-read request body (wsgi.input); ``content_length``
    overrides the client's Content-Length (pass the real size: len(body) inline,
    the temp file's size for uploads). ``script_name`` is where the app is
    mounted; it is stripped from PATH_INFO. Raises ValueError when the request
    has no METHOD (not an HTTP request, e.g. an upload-stream chunk).
    """
    headers = request.headers
    get = headers.get
    method = single_value(get("METHOD"))
    if not method:
        raise ValueError("not an HTTP request: Mongrel2 sent no METHOD")
    scheme = single_value(get("URL_SCHEME")) or DEFAULT_URL_SCHEME
    raw_path = single_value(get("PATH")) or request.path.decode("latin-1")
    query = single_value(get("QUERY")) or ""
    raw_uri = single_value(get("URI")) or (f"{raw_path}?{query}" if query else raw_path)
    path = decode_path(raw_path)
    if script_name:
        mounted_at, path_info = split_script_name(path, script_name)
    else:  # mounted at the root, the common case: nothing to strip
        mounted_at, path_info = "", path
    server_name, server_port = _parse_host_cached(single_value(get("host")), scheme)

    environ = _ENVIRON_TEMPLATE.copy()  # see _ENVIRON_TEMPLATE for what each key is
    environ["wsgi.url_scheme"] = scheme
    environ["wsgi.input"] = body
    environ["wsgi.errors"] = errors
    environ["wsgi.multithread"] = multithread
    environ["wsgi.multiprocess"] = multiprocess
    environ["REQUEST_METHOD"] = method
    environ["SCRIPT_NAME"] = mounted_at
    environ["PATH_INFO"] = path_info
    environ["QUERY_STRING"] = query
    environ["SERVER_NAME"] = server_name
    environ["SERVER_PORT"] = server_port
    environ["SERVER_PROTOCOL"] = single_value(get("VERSION")) or DEFAULT_PROTOCOL
    environ["REMOTE_ADDR"] = single_value(get("REMOTE_ADDR")) or ""
    environ["REQUEST_URI"] = environ["RAW_URI"] = environ["mongrel2.uri"] = raw_uri
    environ["mongrel2.pattern"] = single_value(get("PATTERN")) or ""
    environ["mongrel2.conn_id"] = request.conn_id.decode("ascii", "replace")
    # Written straight into the environ: no key above can collide with them.
    _add_client_headers(headers, environ)
    if content_length is not None:
        environ["CONTENT_LENGTH"] = str(content_length)
    return environ


def decode_path(raw_path: str) -> str:
    """URL-decode a raw path into PEP 3333 form: the decoded bytes as latin-1.

    Encodes back to latin-1 first (the codec decoded the wire bytes that way);
    ``unquote_to_bytes`` on a str would use UTF-8 and mangle raw 8-bit bytes.
    Like werkzeug, ``%2F`` becomes ``/``; REQUEST_URI keeps the raw form.
    """
    if "%" not in raw_path and raw_path.isascii():  # most paths: nothing to decode
        return raw_path
    return unquote_to_bytes(raw_path.encode("latin-1")).decode("latin-1")


def split_script_name(path: str, script_name: str) -> tuple[str, str]:
    """Return (SCRIPT_NAME, PATH_INFO) for a decoded ``path`` under a mount point.

    ``script_name`` loses any trailing slash ("/" means the root, ""). It is
    stripped only on a segment boundary: "/app" matches "/app" and "/app/x",
    not "/apple". A path outside the mount point gives SCRIPT_NAME "" and the
    whole path, so SCRIPT_NAME + PATH_INFO always rebuilds the request path.
    """
    mount = script_name.rstrip("/")
    if mount and not mount.startswith("/"):
        raise ValueError(f"script_name must start with '/': {script_name!r}")
    if mount and (path == mount or path.startswith(mount + "/")):
        return mount, path[len(mount):]
    return "", path


def parse_host(host: str | None, scheme: str) -> tuple[str, str]:
    """Split a Host header into (SERVER_NAME, SERVER_PORT).

    Handles ``name``, ``name:port``, ``[v6]`` and ``[v6]:port``; an IPv6 name
    keeps its brackets (RFC 3875 4.1.14) so URL reconstruction stays valid. A
    missing or malformed port falls back to the scheme's default port; a
    missing host to DEFAULT_SERVER_NAME.
    """
    default_port = DEFAULT_PORTS.get(scheme, DEFAULT_PORTS[DEFAULT_URL_SCHEME])
    host = (host or "").strip()
    if not host:
        return DEFAULT_SERVER_NAME, default_port
    if host.startswith("["):
        end = host.find("]")
        if end == -1:
            return host, default_port
        name, rest = host[: end + 1], host[end + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = host.partition(":")
    if not name:
        name = DEFAULT_SERVER_NAME
    if not (port.isascii() and port.isdigit() and int(port) <= MAX_PORT):
        port = default_port
    return name, port


# Most requests repeat the same Host header: parse each value once.
_parse_host_cached = lru_cache(maxsize=MAX_CACHED_HOSTS)(parse_host)


def client_headers(headers: dict[str, HeaderValue]) -> dict[str, str]:
    """Map the client's headers to CONTENT_TYPE, CONTENT_LENGTH and HTTP_* keys.

    Skipped: keys with an upper-case letter (Mongrel2's own, e.g. METHOD),
    names containing "_" (so ``X_Foo`` cannot pose as ``X-Foo`` once both
    become HTTP_X_FOO) and Mongrel2's internal upload headers. Repeated
    headers are joined with ", " ("; " for cookie). A Content-Length that is
    not one non-negative integer is left out.
    """
    out: dict[str, str] = {}
    _add_client_headers(headers, out)
    return out


# Client header name -> environ key, "" for a name the app must not see.
_ENVIRON_KEYS: dict[str, str] = {}


def _add_client_headers(headers: dict[str, HeaderValue], out: dict[str, Any]) -> None:
    """client_headers(), written into ``out``: one cached dict lookup per name."""
    keys = _ENVIRON_KEYS
    for name, value in headers.items():
        try:
            key = keys[name]
        except KeyError:  # a name not seen yet
            key = _environ_key(name)
            if len(keys) < MAX_CACHED_NAMES:
                keys[name] = key
        if not key:
            continue
        if key == "CONTENT_LENGTH":
            length = _valid_length(value)
            if length is not None:
                out["CONTENT_LENGTH"] = length
            continue
        if isinstance(value, list):
            value = JOINERS.get(name, HEADER_JOINER).join(value)
        out[key] = value


def _environ_key(name: str) -> str:
    """The environ key for a client header name; "" when it is skipped (see client_headers)."""
    if name != name.lower() or "_" in name or name in INTERNAL_HEADERS:
        return ""
    return CONTENT_HEADERS.get(name) or "HTTP_" + name.upper().replace("-", "_")


def _valid_length(value: HeaderValue) -> str | None:
    """The client's Content-Length if it is one non-negative integer, else None.

    Repeated identical values collapse to one (RFC 9112 6.3); anything else
    is left out rather than handing the app a value int() would reject.
    """
    values = {v.strip() for v in value} if isinstance(value, list) else {value.strip()}
    if len(values) != 1:
        return None
    (length,) = values
    return length if length.isascii() and length.isdigit() else None


def single_value(value: HeaderValue | None) -> str | None:
    """One value of a Mongrel2 key; the first if it was (oddly) repeated. (fleet.asgi.scope too.)"""
    if isinstance(value, list):
        return value[0] if value else None
    return value
