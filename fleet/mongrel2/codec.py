"""Mongrel2 handler protocol codec, sans-I/O: bytes in, typed events out.

Requests arrive as ``SENDER SP CONN_ID SP PATH SP HEADERS BODY`` where HEADERS
is a tnetstring dict (``protocol='tnetstring'``) or a netstring holding JSON
(Mongrel2's default); the protocol is detected per message. Replies are
``UUID SP LEN:ID ID ..., SP BODY``, as Mongrel2 1.12 sends and reads them.

``parse_message`` is the single receive entry point: for any input bytes it
returns an event or raises ``ProtocolError``, nothing else. The encoders raise
``ValueError``/``TypeError`` for arguments Mongrel2 would silently drop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import tnetstring

HeaderValue = str | list[str]

# --- protocol constants -----------------------------------------------------

#: Path of control messages Mongrel2 itself sends (disconnect, credits).
#: A client can reach a route starting with ``@`` (``@t``), never ``@*``.
CONTROL_PATH = b"@*"

#: Mongrel2's ``limits.handler_targets``: a reply with 129 ids is dropped whole.
MAX_TARGETS = 128

# --- limits on input, each with its reason ------------------------------------

#: A send_ident is a UUID (36 chars); anything much longer is not one.
MAX_SENDER_BYTES = 256
#: Mongrel2 writes conn ids with ``%d`` from a C int: at most 10 digits.
MAX_CONN_ID_DIGITS = 10
#: A netstring length cannot exceed the message size; longer digit runs are
#: garbage, and capping them bounds the work of ``int()``.
MAX_LENGTH_DIGITS = 10
#: Mongrel2's own limits (``limits.buffer_size`` 4 KiB for the request head,
#: ``limits.header_count``) keep real HEADERS at a few KiB; this bounds the
#: decoding work a bad message can cause while leaving room for big configs.
MAX_HEADERS_BYTES = 1024 * 1024
#: Control bodies are ~20 bytes of JSON (``{"type":"disconnect"}``); cap the
#: JSON decode work spent on a strange one.
MAX_CONTROL_BODY_BYTES = 64 * 1024
#: Mongrel2 keeps credits in a C int.
MAX_CREDITS = 2**31 - 1

_SENDER_RE = re.compile(rb"[A-Za-z0-9-]+")
# Reused: json.loads(..., strict=False) would build a new decoder per call.
# strict=False because Mongrel2 writes raw control characters (tabs) in strings.
_JSON = json.JSONDecoder(strict=False)
#: Its scanner, ``(obj, end) = _JSON_SCAN(text, idx)``: what _JSON.decode
#: calls once text is known to start with a value (see _headers_from_json).
_JSON_SCAN = _JSON.scan_once

_COMMA = 0x2C  # ','
_BRACE = 0x7D  # '}'
_ZERO = 0x30  # '0'


class ProtocolError(ValueError):
    """A message that is not valid Mongrel2 handler protocol; log it and drop it."""


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request (or client JSON/WebSocket message) routed to this handler.

    Header keys are as Mongrel2 sent them: its own keys are upper case
    (METHOD, PATH, VERSION, URI, QUERY, PATTERN, URL_SCHEME, REMOTE_ADDR, ...),
    client header names are lower case. Values are str decoded as latin-1
    (PEP 3333); a repeated client header is a list of str.
    """

    sender: bytes
    conn_id: bytes
    path: bytes
    headers: dict[str, HeaderValue]
    body: bytes = b""

    @property
    def method(self) -> str:
        """The HTTP method, or JSON / WEBSOCKET / WEBSOCKET_HANDSHAKE (always set by parse_message)."""
        return self.headers["METHOD"]  # type: ignore[return-value]

    @property
    def version(self) -> str | None:
        """``HTTP/1.1`` etc.; None if Mongrel2 sent no VERSION."""
        value = self.headers.get("VERSION")
        return value if isinstance(value, str) else None

    def header(self, name: str) -> str | None:
        """A client header by name (lower-cased here, so Mongrel2's upper-case
        keys can never be returned); a repeated header is joined with ", "."""
        value = self.headers.get(name.lower())
        if value is None or isinstance(value, str):
            return value
        return ", ".join(value)

    @property
    def upload_start(self) -> str | None:
        """``x-mongrel2-upload-start`` (temp file path); forgeable, see fleet.uploads."""
        return self.header("x-mongrel2-upload-start")

    @property
    def upload_done(self) -> str | None:
        """``x-mongrel2-upload-done`` (temp file path); forgeable, see fleet.uploads."""
        return self.header("x-mongrel2-upload-done")

    @property
    def download_credits(self) -> int | None:
        """Initial ``DOWNLOAD_CREDITS`` (``download.flow_control=1``), or None."""
        value = self.headers.get("DOWNLOAD_CREDITS")
        return None if value is None else parse_credits(value)

    @property
    def is_jssocket(self) -> bool:
        """A client JSSocket message (METHOD JSON on a client route, not ``@*``)."""
        return self.headers.get("METHOD") == "JSON"

    @property
    def is_websocket(self) -> bool:
        """A WebSocket handshake or frame rather than an HTTP request."""
        return self.headers.get("METHOD") in ("WEBSOCKET", "WEBSOCKET_HANDSHAKE")

    def should_close(self) -> bool:
        """True if the handler must close after answering: Mongrel2 never does.

        HTTP/1.1 closes only on ``Connection: close``; HTTP/1.0 and older keep
        the connection only on ``Connection: keep-alive``.
        """
        version = self.version
        if version is None:
            return False
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if version == "HTTP/1.1":
            return "close" in tokens
        return "keep-alive" not in tokens


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Mongrel2 says the client of ``conn_id`` has gone. Never answer it."""

    sender: bytes
    conn_id: bytes


@dataclass(frozen=True, slots=True)
class Credits:
    """Flow control (``download.flow_control=1``): ``credits`` more bytes may be sent."""

    sender: bytes
    conn_id: bytes
    credits: int


@dataclass(frozen=True, slots=True)
class Control:
    """Any other control message from Mongrel2 (path ``@*``); ``data`` is its JSON body."""

    sender: bytes
    conn_id: bytes
    data: dict = field(default_factory=dict)


Event = Request | Disconnect | Credits | Control

# Request(...) for parse_message without the frozen dataclass __init__, which
# sets each field through object.__setattr__: the slot descriptors' own
# setters build the same object in half the time. Request has no
# __post_init__; tests check this list is its fields, in order.
_REQUEST_FIELDS = ("sender", "conn_id", "path", "headers", "body")
_set_sender, _set_conn_id, _set_path, _set_headers, _set_body = (
    Request.__dict__[name].__set__ for name in _REQUEST_FIELDS
)


def _new_request(
    sender: bytes, conn_id: bytes, path: bytes, headers: dict[str, HeaderValue], body: bytes
) -> Request:
    request = object.__new__(Request)
    _set_sender(request, sender)
    _set_conn_id(request, conn_id)
    _set_path(request, path)
    _set_headers(request, headers)
    _set_body(request, body)
    return request


# --- decoding -----------------------------------------------------------------

# Fast-path framing. _HEAD_RE makes the checks of _check_route (sender
# [A-Za-z0-9-]{1,256}, canonical conn id of at most 10 digits), of the
# non-empty path, and _netstring's on the HEADERS length prefix (canonical,
# at most 10 digits); _BODY_RE makes the same prefix check on BODY and those
# of _parse_body (',' terminator, nothing after it) except the length, which
# parse_message compares. A message they do not accept goes to
# _split_checked, which finds the exact error.
_LENGTH = rb"(0|[1-9][0-9]{0,%d})" % (MAX_LENGTH_DIGITS - 1)
_ROUTE = rb"([A-Za-z0-9-]{1,%d}) (0|[1-9][0-9]{0,%d}) " % (
    MAX_SENDER_BYTES,
    MAX_CONN_ID_DIGITS - 1,
)
_HEAD_RE = re.compile(_ROUTE + rb"([^ ]+) " + _LENGTH + rb":")
_BODY_RE = re.compile(_LENGTH + rb":(.*),\Z", re.S)
_PEEK_RE = re.compile(_ROUTE + rb"([^ ]*) ")


def parse_message(raw: bytes) -> Event:
    """Decode one message from Mongrel2's PUSH socket (either protocol).

    Raises ProtocolError, and only that, for anything that is not a message
    Mongrel2 could have sent and fleet can answer.
    """
    if type(raw) is not bytes:  # a bytes subclass too: the parts are plain bytes anyway
        raw = bytes(memoryview(raw))
    # Fast path: two matches check all the framing (route, both netstrings,
    # nothing after BODY) and give the parts.
    head = _HEAD_RE.match(raw)
    tail = None
    if head is not None:
        sender, conn_id, path, length = head.groups()
        start = head.end()  # of the HEADERS payload
        end = start + int(length)  # its terminator
        if end - start <= MAX_HEADERS_BYTES:
            tail = _BODY_RE.match(raw, end + 1)  # None if end + 1 >= len(raw)
    if tail is not None:
        body_length, body = tail.groups()
        terminator = raw[end]
        if len(body) != int(body_length):
            tail = None  # a BODY length that lies: let _split_checked say how
        elif terminator == _BRACE:  # tnetstring, decoded with its LEN: prefix
            headers = _headers_from_tnetstring(raw[start - len(length) - 1 : end + 1])
        elif terminator == _COMMA:
            headers = _headers_from_json(raw[start:end])
        else:
            tail = None  # HEADERS ends in neither '}' nor ','
    if tail is None:
        sender, conn_id, path, headers, body = _split_checked(raw)

    if path == CONTROL_PATH:
        return _control_event(sender, conn_id, headers, body)
    if type(headers.get("METHOD")) is not str:
        # upload.stream chunks carry only UPLOAD_STREAM(_DONE): fleet has no
        # streaming uploads, and a message without a method is no request.
        raise ProtocolError("no METHOD header (upload.stream chunk?)")
    credits = headers.get("DOWNLOAD_CREDITS")
    if credits is not None:
        parse_credits(credits)
    return _new_request(sender, conn_id, path, headers, body)


def peek_route(raw: bytes) -> tuple[bytes, bytes, bool]:
    """(sender, conn_id, is_control) without decoding headers or body.

    For a broker that only routes: is_control means the path is ``@*``.
    Sender and conn_id are validated exactly as parse_message does.
    """
    if type(raw) is bytes:  # fast path: one match for what _check_route checks
        route = _PEEK_RE.match(raw)
        if route is not None:
            return route[1], route[2], route[3] == CONTROL_PATH
    parts = raw.split(b" ", 3)
    if len(parts) != 4:
        raise ProtocolError(
            f"expected 'SENDER CONN_ID PATH HEADERS BODY', found {len(parts) - 1} of 3 spaces"
        )
    sender, conn_id, path, _ = parts
    _check_route(sender, conn_id)
    return sender, conn_id, path == CONTROL_PATH


def parse_credits(value: HeaderValue) -> int:
    """A DOWNLOAD_CREDITS value as int, or ProtocolError."""
    if (
        type(value) is not str
        or not value.isascii()
        or not value.isdigit()
        or len(value) > len(str(MAX_CREDITS))
        or int(value) > MAX_CREDITS
    ):
        raise ProtocolError(f"invalid DOWNLOAD_CREDITS {value!r}")
    return int(value)


def _check_route(sender: bytes, conn_id: bytes) -> None:
    """Sender must be echoable (Mongrel2 drops replies with other UUID chars)
    and conn_id a canonical decimal (so one connection has one key)."""
    if len(sender) > MAX_SENDER_BYTES or _SENDER_RE.fullmatch(sender) is None:
        raise ProtocolError(
            f"sender {sender[:64]!r} is not [A-Za-z0-9-]{{1,{MAX_SENDER_BYTES}}}:"
            " Mongrel2 would drop any reply to it"
        )
    if (
        len(conn_id) > MAX_CONN_ID_DIGITS
        or not conn_id.isdigit()  # bytes.isdigit: ASCII digits only, False if empty
        or (conn_id[0] == _ZERO and len(conn_id) > 1)
    ):
        raise ProtocolError(f"conn id {conn_id[:32]!r} is not a decimal number")


def _split_checked(
    raw: bytes,
) -> tuple[bytes, bytes, bytes, dict[str, HeaderValue], bytes]:
    """(sender, conn_id, path, headers, body), checking step by step: for
    messages the fast path of parse_message does not take, so that each
    malformed one gets its exact error (headers are decoded before BODY is)."""
    parts = raw.split(b" ", 3)
    if len(parts) != 4:
        raise ProtocolError(
            f"expected 'SENDER CONN_ID PATH HEADERS BODY', found {len(parts) - 1} of 3 spaces"
        )
    sender, conn_id, path, rest = parts
    _check_route(sender, conn_id)
    if not path:
        raise ProtocolError("empty path")
    headers_end, headers = _parse_headers(rest)
    body = _parse_body(rest, headers_end + 1)
    return sender, conn_id, path, headers, body


def _netstring(data: bytes, start: int, what: str) -> tuple[int, int]:
    """Offsets (payload_start, payload_end) of the netstring at ``start``;
    ``data[payload_end]`` exists and is its terminator (checked by the caller)."""
    colon = data.find(b":", start, start + MAX_LENGTH_DIGITS + 1)
    if colon < 0:
        raise ProtocolError(f"{what}: no 'LEN:' netstring prefix")
    digits = data[start:colon]
    if not digits.isdigit() or (digits[0] == _ZERO and len(digits) > 1):
        raise ProtocolError(f"{what}: bad netstring length {digits!r}")
    length = int(digits)
    end = colon + 1 + length
    if end >= len(data):
        raise ProtocolError(
            f"{what}: netstring needs {length} bytes and a terminator,"
            f" only {len(data) - colon - 1} bytes follow"
        )
    return colon + 1, end


def _parse_headers(rest: bytes) -> tuple[int, dict[str, HeaderValue]]:
    """Decode HEADERS at the start of ``rest``; returns (terminator offset, headers)."""
    start, end = _netstring(rest, 0, "headers")
    if end - start > MAX_HEADERS_BYTES:
        raise ProtocolError(f"headers: {end - start} bytes, limit {MAX_HEADERS_BYTES}")
    terminator = rest[end]
    if terminator == _BRACE:
        return end, _headers_from_tnetstring(rest[: end + 1])
    if terminator == _COMMA:
        return end, _headers_from_json(rest[start:end])
    raise ProtocolError(
        f"headers: netstring ends in {bytes([terminator])!r}, expected '}}' (tnetstring) or ',' (json)"
    )


def _headers_from_tnetstring(data: bytes) -> dict[str, HeaderValue]:
    """The whole HEADERS tnetstring ``LEN:...}`` -> headers; tnetstring3
    returns bytes keys/values, made latin-1 str here."""
    try:
        decoded = tnetstring.loads(data)
    except Exception as e:  # the C decoder raises ValueError, RecursionError, ...
        raise ProtocolError(f"headers: invalid tnetstring: {e}") from None
    if type(decoded) is not dict:
        raise ProtocolError("headers: not a dict")
    if data.isascii():
        # Fast path (nearly all requests): on ASCII bytes, decode() without an
        # argument (UTF-8, no codec name to look up) is the same as latin-1.
        # AttributeError: a key or value that is not bytes -> the loop below.
        try:
            if b"]" not in data:  # no list (repeated header) anywhere
                return {k.decode(): v.decode() for k, v in decoded.items()}
            return {
                k.decode(): v.decode() if type(v) is bytes else _odd_value(k.decode(), v)
                for k, v in decoded.items()
            }
        except AttributeError:
            pass
    headers: dict[str, HeaderValue] = {}
    for key, value in decoded.items():
        if type(key) is not bytes:
            raise ProtocolError(f"headers: key {key!r} is not a string")
        name = key.decode("latin-1")
        if type(value) is bytes:
            headers[name] = value.decode("latin-1")
        else:
            headers[name] = _odd_value(name, value)
    return headers


def _headers_from_json(payload: bytes) -> dict[str, HeaderValue]:
    """Mongrel2's JSON escapes only '"' and '\\': latin-1 maps each raw byte to
    one char, strict=False accepts raw control characters."""
    text = payload.decode("latin-1")
    # Fast path: _JSON.decode(text) is raw_decode after skipping whitespace,
    # then a check that only whitespace follows; for Mongrel2's '{...}' with
    # no whitespace around it the scanner alone gives the same result. Any
    # other outcome goes to _JSON.decode, which makes the same checks and
    # raises the same error.
    try:
        decoded, stop = _JSON_SCAN(text, 0)
    except Exception:  # StopIteration, JSONDecodeError, RecursionError, ...
        stop = -1
    if stop != len(text):
        try:
            decoded = _JSON.decode(text)
        except Exception as e:  # JSONDecodeError, RecursionError, int digit limit
            raise ProtocolError(f"headers: invalid JSON: {e}") from None
    if type(decoded) is not dict:
        raise ProtocolError("headers: JSON is not an object")
    # JSON keys are always str; fix up the values that are not (repeated
    # headers, numbers) in place, in order, so the first bad one is reported.
    for name in [name for name, value in decoded.items() if type(value) is not str]:
        decoded[name] = _odd_value(name, decoded[name])
    if b"\\u" in payload:
        # Only a \uXXXX escape can produce chars above U+00FF, which no raw
        # byte can; Mongrel2 never writes one (it would write "\\u").
        _check_latin1(decoded)
    return decoded


def _odd_value(name: str, value: object) -> HeaderValue:
    """A header value that is not a plain string: a repeated header or a number."""
    if type(value) is list and value:
        items: list[str] = []
        for item in value:
            if type(item) is bytes:
                items.append(item.decode("latin-1"))
            elif type(item) is str:
                items.append(item)
            elif type(item) is int:
                items.append(str(item))
            else:
                raise ProtocolError(f"headers: {name!r} has an item of type {type(item).__name__}")
        return items
    if type(value) is int:
        return str(value)
    raise ProtocolError(f"headers: {name!r} has a value of type {type(value).__name__}")


def _check_latin1(headers: dict[str, HeaderValue]) -> None:
    """Reject chars outside latin-1: they cannot come from HTTP bytes (PEP 3333)."""
    for name, value in headers.items():
        for text in (name, *(value if isinstance(value, list) else (value,))):
            if not text.isascii():
                try:
                    text.encode("latin-1")
                except UnicodeEncodeError:
                    raise ProtocolError(
                        f"headers: {name[:64]!r} has characters outside latin-1"
                    ) from None


def _parse_body(rest: bytes, start: int) -> bytes:
    """BODY is always a plain netstring ``LEN:data,`` ending the message."""
    body_start, body_end = _netstring(rest, start, "body")
    if rest[body_end] != _COMMA:
        raise ProtocolError("body: netstring does not end in ','")
    extra = len(rest) - body_end - 1
    if extra:
        raise ProtocolError(f"{extra} bytes of trailing garbage after the body")
    return rest[body_start:body_end]


def _control_event(
    sender: bytes, conn_id: bytes, headers: dict[str, HeaderValue], body: bytes
) -> Disconnect | Credits | Control:
    """A message at ``@*``: its body is a JSON object saying what it is."""
    if len(body) > MAX_CONTROL_BODY_BYTES:
        raise ProtocolError(f"control body: {len(body)} bytes, limit {MAX_CONTROL_BODY_BYTES}")
    try:
        data = _JSON.decode(body.decode("latin-1"))
    except Exception as e:  # JSONDecodeError, RecursionError, int digit limit
        raise ProtocolError(f"control body: invalid JSON: {e}") from None
    if type(data) is not dict:
        raise ProtocolError("control body: JSON is not an object")
    if data.get("type") == "disconnect":
        return Disconnect(sender, conn_id)
    credits = headers.get("DOWNLOAD_CREDITS")
    if credits is not None:
        return Credits(sender, conn_id, parse_credits(credits))
    return Control(sender, conn_id, data)


# --- encoding -----------------------------------------------------------------


def encode_response(sender: bytes, conn_ids: Sequence[bytes], body: bytes) -> bytes:
    """``SENDER SP LEN:ID ID..., SP BODY``: send ``body`` to 1..MAX_TARGETS clients.

    Raises ValueError for anything Mongrel2's strict parser would drop whole.
    """
    # Fast path, one id (every reply but broadcasts): the checks of _id_list
    # and _check_sender_out, with a sender validated once and remembered.
    if type(conn_ids) is list or type(conn_ids) is tuple:
        if len(conn_ids) == 1 and type(body) is bytes and type(sender) is bytes:
            conn_id = conn_ids[0]
            if (
                type(conn_id) is bytes
                and len(conn_id) < len(_ID_PREFIX)
                and conn_id.isdigit()  # False if empty
                and sender in _SENDERS_OK
            ):
                return b"".join((sender, _ID_PREFIX[len(conn_id)], conn_id, b", ", body))
    ids = _id_list(conn_ids)
    _check_sender_out(sender)
    return b"%s %d:%s, %s" % (sender, len(ids), ids, body)


def encode_close(sender: bytes, conn_ids: Sequence[bytes]) -> bytes:
    """An empty body: Mongrel2 flushes what is queued, then closes those connections."""
    return encode_response(sender, conn_ids, b"")


def encode_ctl(sender: bytes, conn_id: bytes, key: str, args: dict) -> bytes:
    """Extended control message ``SENDER SP LEN:X ID, SP TNETSTRING([key, args])``.

    e.g. ``encode_ctl(s, b"53", "ctl", {"cancel": 1})``; str becomes a
    tnetstring string (``,``) because Mongrel2 knows no unicode tag.
    """
    _check_sender_out(sender)
    _id_list((conn_id,))
    ids = b"X " + conn_id
    payload = tnetstring.dumps([key.encode(), _to_tnetstring(args)])
    return b"%s %d:%s, %s" % (sender, len(ids), ids, payload)


#: ``b" LEN:"`` before one conn id of LEN (< 21) digits, indexed by LEN.
_ID_PREFIX = tuple(b" %d:" % n for n in range(21))
#: Senders that passed _check_sender_out: a handler replies to a few UUIDs.
_SENDERS_OK: set[bytes] = set()
_SENDERS_OK_MAX = 64


def _check_sender_out(sender: bytes) -> None:
    if type(sender) is not bytes or _SENDER_RE.fullmatch(sender) is None:
        raise ValueError(f"sender {sender!r} is not [A-Za-z0-9-]+: Mongrel2 would drop the reply")
    if len(_SENDERS_OK) < _SENDERS_OK_MAX:
        _SENDERS_OK.add(sender)


def _id_list(conn_ids: Sequence[bytes]) -> bytes:
    """Space-separated ids, validated: 1..MAX_TARGETS decimal ids."""
    if isinstance(conn_ids, (bytes, bytearray, memoryview, str)):
        raise TypeError("conn_ids must be a sequence of ids, not a single id")
    if not 1 <= len(conn_ids) <= MAX_TARGETS:
        raise ValueError(
            f"{len(conn_ids)} conn ids: Mongrel2 accepts 1 to {MAX_TARGETS} and drops the rest"
        )
    for conn_id in conn_ids:
        if type(conn_id) is not bytes or not conn_id.isdigit():
            raise ValueError(f"conn id {conn_id!r} is not a decimal number")
    return b" ".join(conn_ids)


def _to_tnetstring(value: object) -> object:
    """Make ``value`` encodable by tnetstring3, which refuses str: str -> utf-8 bytes."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict):
        return {_to_tnetstring(k): _to_tnetstring(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_tnetstring(v) for v in value]
    return value
