"""The ASGI HTTP connection scope of one request, with no I/O.

The request is what fleet.mongrel2.codec (or the --http parser, which writes
the same keys) made of it: Mongrel2's own facts under upper-case keys
(METHOD, PATH, QUERY, VERSION, URL_SCHEME, REMOTE_ADDR, PATTERN), the client's
headers under lower-case names, values as latin-1 str. The scope gives the
application the same facts fleet.wsgi.environ gives a WSGI app, in ASGI's
form: bytes for headers, query and raw path, a UTF-8 decoded path.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

from fleet.mongrel2.codec import HeaderValue, Request
from fleet.wsgi.environ import DEFAULT_URL_SCHEME, INTERNAL_HEADERS, parse_host, single_value

ASGI = {"version": "3.0", "spec_version": "2.3"}
HTTP_VERSIONS = {"HTTP/1.1": "1.1", "HTTP/1.0": "1.0", "HTTP/2": "2", "HTTP/2.0": "2"}


class NotHttp(ValueError):
    """The message carries no HTTP request (a JSON or WebSocket message of Mongrel2's)."""


def http_scope(request: Request, *, root_path: str = "", state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``http`` scope for ``request``. ``root_path`` is where the app is mounted;
    ``state`` is what the app's lifespan startup put there (each request gets a copy)."""
    get = request.headers.get
    method = single_value(get("METHOD"))
    if not method or request.is_jssocket or request.is_websocket:
        raise NotHttp(f"not an HTTP request: METHOD {method!r}")
    scope = connection_scope(request, "http", root_path=root_path, state=state)
    scope["http_version"] = HTTP_VERSIONS.get(single_value(get("VERSION")) or "", "1.1")
    scope["method"] = method
    return scope


def connection_scope(request: Request, kind: str, *, root_path: str, state: dict[str, Any] | None,
                     schemes: dict[str, str] | None = None) -> dict[str, Any]:
    """What the ``http`` and ``websocket`` scopes share. ``schemes`` maps Mongrel2's URL_SCHEME
    to the scope's (a WebSocket's http is ws)."""
    get = request.headers.get
    scheme = single_value(get("URL_SCHEME")) or DEFAULT_URL_SCHEME
    raw_path = single_value(get("PATH")) or request.path.decode("latin-1")
    server_name, server_port = parse_host(single_value(get("host")), scheme)
    remote = single_value(get("REMOTE_ADDR"))
    scope: dict[str, Any] = {
        "type": kind,
        "asgi": ASGI,
        "http_version": "1.1",
        "scheme": schemes.get(scheme, scheme) if schemes else scheme,
        "path": decode_path(raw_path),
        "raw_path": raw_path.encode("latin-1"),
        "query_string": (single_value(get("QUERY")) or "").encode("latin-1"),
        "root_path": root_path,
        "headers": asgi_headers(request.headers),
        # Mongrel2 tells the peer's address, not its port.
        "client": (remote, 0) if remote else None,
        "server": (server_name.strip("[]"), int(server_port)),
        "extensions": {},
    }
    if state is not None:
        scope["state"] = dict(state)
    return scope


def decode_path(raw_path: str) -> str:
    """Percent-decoded, then UTF-8 decoded, as ASGI asks (WSGI keeps latin-1 instead)."""
    if "%" not in raw_path and raw_path.isascii():
        return raw_path
    return unquote_to_bytes(raw_path.encode("latin-1")).decode("utf-8", "replace")


def asgi_headers(headers: dict[str, HeaderValue]) -> list[tuple[bytes, bytes]]:
    """The client's headers as (lower-case name, value) bytes, a repeated one once per value.

    Left out, as in the WSGI environ: Mongrel2's own upper-case keys (a client
    cannot send those) and its internal upload headers (a client can forge them)."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers.items():
        if name != name.lower() or name in INTERNAL_HEADERS:
            continue
        key = name.encode("latin-1")
        if isinstance(value, list):
            out.extend((key, item.encode("latin-1")) for item in value)
        else:
            out.append((key, value.encode("latin-1")))
    return out

