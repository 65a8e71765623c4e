"""Requests exactly as Mongrel2 writes them, in both protocols: for the codec's tests and the fuzzers.

Mongrel2 sends ``SENDER SP CONN_ID SP PATH SP HEADERS BODY``, HEADERS a
tnetstring dict (protocol='tnetstring') or a netstring of JSON (its default),
BODY a netstring.
"""

from __future__ import annotations

from collections.abc import Callable

import tnetstring

from fleet.mongrel2.codec import Request


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def _latin1(text: str) -> bytes:
    return text.encode("latin-1")


def encode_tnetstring_request(sender: bytes, conn_id: bytes, path: bytes, headers: dict, body: bytes) -> bytes:
    """protocol='tnetstring': HEADERS is a tnetstring dict of bytes (lists for repeats).

    Items are dumped one by one to keep Mongrel2's key order: tnetstring3's
    ``dumps`` of a whole dict writes the items in reverse order.
    """
    items = b"".join(
        tnetstring.dumps(_latin1(k))
        + tnetstring.dumps([_latin1(x) for x in v] if isinstance(v, list) else _latin1(v))
        for k, v in headers.items()
    )
    return b"%s %s %s %d:%s}%s" % (sender, conn_id, path, len(items), items, netstring(body))


def _json_string(text: str) -> bytes:
    """Mongrel2 escapes only '"' and '\\'; every other byte is written raw."""
    return b'"' + _latin1(text).replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def encode_json_request(sender: bytes, conn_id: bytes, path: bytes, headers: dict, body: bytes) -> bytes:
    """protocol='json': HEADERS is a netstring holding Mongrel2's (maybe invalid) JSON."""
    items = []
    for key, value in headers.items():
        if isinstance(value, list):
            encoded = b"[" + b",".join(_json_string(v) for v in value) + b"]"
        else:
            encoded = _json_string(value)
        items.append(_json_string(key) + b":" + encoded)
    payload = b"{" + b",".join(items) + b"}"
    return b"%s %s %s %s%s" % (sender, conn_id, path, netstring(payload), netstring(body))


Encoder = Callable[[bytes, bytes, bytes, dict, bytes], bytes]
ENCODERS: list[Encoder] = [encode_tnetstring_request, encode_json_request]


def message_of(request: Request, encode: Encoder) -> bytes:
    """``request`` as Mongrel2 would send it with the protocol of ``encode``."""
    return encode(request.sender, request.conn_id, request.path, request.headers, request.body)
