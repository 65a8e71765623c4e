"""The common HTTP/1.1 request, parsed without h11: a strict subset, everything else to h11.

Sans-I/O. Most requests a server sees are simple: an origin-form target,
HTTP/1.0 or 1.1, well-formed header lines, no Transfer-Encoding, no Expect,
at most one plain Content-Length whose body has already arrived. For those
``parse_simple`` gives the request's parts in one pass (``take_simple``
also shapes its Request, in C when built: fleet/http/_simple.c); for anything else
(including anything malformed) it returns None and fleet.http.parser lets
h11 decide, so h11 stays the authority on every answer (400, 413, 431, 501,
100-continue, chunked bodies, the smuggling shapes). The subset is chosen
so that whatever it accepts h11 accepts the same way (a property test in
tests/unit/test_http_simple.py holds the two to it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from fleet.mongrel2.codec import HeaderValue, Request

# tchar and the request line of RFC 9112; the target must be origin-form.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*) HTTP/1\.([01])\r\n")
# A header line: a token, a colon, the value without surrounding blanks. The
# value has visible characters and obs-text, blanks only between them.
_VISIBLE = rb"[\x21-\x7e\x80-\xff]+"
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:" + _VISIBLE + rb"(?:[ \t]+" + _VISIBLE + rb")*)?)[ \t]*\r\n")
_DIGITS = re.compile(rb"[0-9]{1,18}")
# Headers that described the request's framing on the wire; the app gets the
# de-chunked body and its real Content-Length instead.
_FRAMING_HEADERS = frozenset({"transfer-encoding", "content-length"})

SimpleRequest = tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]], int, int]
# take_simple's signature, which its compiled twin shares.
SimpleTaker = Callable[[bytearray, int, int, bytes, str, str], "tuple[Request, bytes, int] | None"]


def parse_simple(data: bytes | bytearray, head_limit: int, max_body: int) -> SimpleRequest | None:
    """(method, target, version "1.0"/"1.1", [(lower-case name, value)], head size, body size)
    when ``data`` starts with a whole simple request (body included); else None."""
    end = data.find(b"\r\n\r\n", 0, head_limit + 4)
    if end < 0:
        return None
    line = _REQUEST_LINE.match(data, 0, end + 2)
    if line is None:
        return None
    method, target, minor = line.groups()
    headers: list[tuple[bytes, bytes]] = []
    pos = line.end()
    length = -1
    hosts = 0
    while pos < end + 2:
        field = _HEADER_LINE.match(data, pos, end + 2)
        if field is None:
            return None
        name, value = field.groups()
        name = name.lower()
        if name == b"content-length":
            if length >= 0 or not _DIGITS.fullmatch(value):
                return None
            length = int(value)
        elif name == b"host":
            hosts += 1
        elif name in (b"transfer-encoding", b"expect"):
            return None
        headers.append((name, value))
        pos = field.end()
    if hosts > 1 or (hosts == 0 and minor == b"1"):
        return None
    head_size = end + 4
    body_size = max(length, 0)
    if body_size > max_body or len(data) < head_size + body_size:
        return None
    return method, target, b"1." + minor, headers, head_size, body_size


def take_simple(data: bytearray, head_limit: int, max_body: int, conn_id: bytes, remote_addr: str,
                scheme: str) -> tuple[Request, bytes, int] | None:
    """parse_simple, then the Request shaped: (request, body, bytes used), or None."""
    parsed = parse_simple(data, head_limit, max_body)
    if parsed is None:
        return None
    method, target, version, fields, head_size, body_size = parsed
    request = shape_request(method, target, version, fields, body_size, conn_id, remote_addr, scheme)
    return request, bytes(data[head_size:head_size + body_size]), head_size + body_size


def shape_request(method: bytes, target: bytes, version: bytes, fields: Iterable[tuple[bytes, bytes]],
                  length: int, conn_id: bytes, remote_addr: str, scheme: str) -> Request:
    """The Request Mongrel2 would have sent for a parsed head (``fields``: lower-case
    name, value), with the body's real ``length``; both parsers' requests end here."""
    path = _origin_form(target.decode("latin-1"))
    raw_path, question, query = path.partition("?")
    headers: dict[str, HeaderValue] = {}
    for raw_name, raw_value in fields:
        name = raw_name.decode("latin-1")
        if name in _FRAMING_HEADERS:
            continue
        value = raw_value.decode("latin-1")
        present = headers.get(name)
        if present is None:
            headers[name] = value
        elif isinstance(present, list):
            present.append(value)
        else:
            headers[name] = [present, value]
    headers["content-length"] = str(length)
    # Mongrel2's own keys, upper case: client headers can never collide with them.
    headers["METHOD"] = method.decode("latin-1")
    headers["VERSION"] = "HTTP/" + version.decode("latin-1")
    headers["URI"] = path
    headers["PATH"] = raw_path
    if question:
        headers["QUERY"] = query
    headers["PATTERN"] = "/"
    headers["URL_SCHEME"] = scheme
    headers["REMOTE_ADDR"] = remote_addr
    return Request(sender=b"http", conn_id=conn_id, path=raw_path.encode("latin-1"), headers=headers)


def _origin_form(target: str) -> str:
    """``http://host/p?q`` (absolute form, from proxies) -> ``/p?q``; ``*`` stays."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        return rest[slash:] if slash >= 0 else "/"
    return target
