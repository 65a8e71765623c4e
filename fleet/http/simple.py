"""The common HTTP/1.1 request, parsed without h11: a strict subset, everything else to h11.

Sans-I/O. Most requests a server sees are simple: an origin-form target,
HTTP/1.0 or 1.1, well-formed header lines, no Transfer-Encoding, no Expect,
at most one plain Content-Length whose body has already arrived. For those
``parse_simple`` gives the request's parts in one pass; for anything else
(including anything malformed) it returns None and fleet.http.parser lets
h11 decide, so h11 stays the authority on every answer (400, 413, 431, 501,
100-continue, chunked bodies, the smuggling shapes). The subset is chosen
so that whatever it accepts h11 accepts the same way (a property test in
tests/unit/test_http_simple.py holds the two to it).
"""

from __future__ import annotations

import re

# tchar and the request line of RFC 9112; the target must be origin-form.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*) HTTP/1\.([01])\r\n")
# A header line: a token, a colon, the value without surrounding blanks. The
# value has visible characters and obs-text, blanks only between them.
_VISIBLE = rb"[\x21-\x7e\x80-\xff]+"
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:" + _VISIBLE + rb"(?:[ \t]+" + _VISIBLE + rb")*)?)[ \t]*\r\n")
_DIGITS = re.compile(rb"[0-9]{1,18}")

SimpleRequest = tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]], int, int]


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
