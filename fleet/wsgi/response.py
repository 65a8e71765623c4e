"""Sans-I/O HTTP/1.x response framing for a WSGI app behind Mongrel2.

Mongrel2 copies a handler's bytes to the client verbatim and never closes a
connection by itself (only a zero-length reply closes it), so the
handler writes the status line, the headers and the body framing, and decides
whether the connection must be closed afterwards. This module only turns the
app's status, headers and body chunks into bytes and that decision; the
worker sends the bytes and, when ``keep_alive`` is False, the close message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from http import HTTPStatus

LAST_CHUNK = b"0\r\n\r\n"
HTTP_10 = "HTTP/1.0"
HTTP_11 = "HTTP/1.1"

# Hop-by-hop headers (RFC 9110 7.6.1): PEP 3333 forbids an app to send them,
# framing and persistence are the server's business.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# ... except for a 101 Switching Protocols (WebSocket handshake), which must
# carry "Upgrade" and "Connection: Upgrade" from the app.
UPGRADE_HEADERS = frozenset({"connection", "upgrade"})
SWITCHING_PROTOCOLS = 101
# Final statuses that never carry a body (RFC 9110 6.4.1, 15.3.5, 15.4.5).
NO_BODY_STATUSES = frozenset({204, 304})
# A server must not send Content-Length with these (RFC 9110 8.6).
NO_LENGTH_STATUSES = frozenset({204})
MIN_STATUS, MAX_STATUS = 100, 599

STATUS_RE = re.compile(r"([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.6.2
VERSION_RE = re.compile(r"HTTP/([0-9]+)\.([0-9]+)")

# The two versions nearly every request has, known without the regex.
KNOWN_VERSIONS = {HTTP_11: (True, False), HTTP_10: (False, True)}
# Apps repeat the same few statuses and header names; each is validated once.
# Bounded because an app may build them from data; past the bound they are
# validated every time.
MAX_CACHED = 256
_STATUSES: dict[str, tuple[int, str]] = {}  # valid status -> (code, reason)
_HEADER_NAMES: dict[str, str] = {}  # valid header name -> its lower case


class ResponseError(ValueError):
    """The app broke HTTP or PEP 3333: bad status or header, too much body...

    Raised by start(): nothing was sent yet, answer error_response(500).
    Raised by body(): the response is already broken, close the connection.
    """


# ResponseFramer states; plain strings, as an Enum member lookup costs ~0.1 µs.
_IDLE, _SENDING, _DONE = "IDLE", "SENDING", "DONE"


class ResponseFramer:
    """Frames one response to one request; create one per request.

    ``method``, ``version`` and ``connection`` come from the request (METHOD,
    VERSION and the client's "connection" header; a list is read as its
    values joined). Pass ``now`` (seconds since the epoch) to add a Date
    header, as RFC 9110 6.6.1 asks of servers with a clock.
    """

    __slots__ = ("_head", "_http11", "_http10", "_status_version", "_keep_alive", "_now",
                 "_state", "_no_body", "_chunked", "_length", "_sent", "status_code")

    def __init__(self, *, method: str, version: str, connection: str | Sequence[str] | None,
                 now: float | None = None) -> None:
        self._head = method == "HEAD"
        http11, http10 = _version_semantics(version)
        self._http11, self._http10 = http11, http10
        self._status_version = HTTP_10 if http10 else HTTP_11
        if connection is None:  # the common case; without tokens only 1.1 persists
            self._keep_alive = http11
        else:
            tokens = _tokens(connection)
            if http11:
                self._keep_alive = "close" not in tokens
            else:
                self._keep_alive = http10 and "keep-alive" in tokens and "close" not in tokens
        self._now = now
        self._state = _IDLE
        self._no_body = self._head
        self._chunked = False
        self._length: int | None = None
        self._sent = 0
        self.status_code: int | None = None

    @property
    def keep_alive(self) -> bool:
        """Must the connection stay open after this response? Final after start() and end()."""
        return self._keep_alive

    def start(self, status: str, headers: Iterable[tuple[str, str]],
              body_length: int | None = None) -> bytes:
        """Return the status line and headers, ending with the blank line.

        ``body_length`` is the body size when the worker knows it (e.g. the app
        returned a one-item list); it becomes Content-Length if the app gave none.
        """
        if self._state is not _IDLE:
            raise RuntimeError("start() called twice")
        code, reason = _check_status(status)
        lines, app_lengths, has_date = _check_headers(code, headers)
        no_body = self._head or code < 200 or code in NO_BODY_STATUSES
        length: int | None = None
        if app_lengths and code not in NO_LENGTH_STATUSES and code >= 200:
            length = _check_length(app_lengths)
        elif body_length is not None and not no_body:
            length = body_length
        elif body_length and self._head and code not in NO_BODY_STATUSES:
            # The app built the GET body for HEAD: its size is the right
            # Content-Length. An empty one means the app skipped the body.
            length = body_length
        # Everything is valid: commit.
        self._state = _SENDING
        self.status_code = code
        self._no_body = no_body
        self._length = length
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        self._frame(code, lines)
        if self._now is not None and code >= 200 and not has_date:
            lines.append(f"Date: {http_date(self._now)}\r\n")
        lines.append("\r\n")
        return f"{self._status_version} {code} {reason}\r\n{''.join(lines)}".encode("latin-1")

    def _frame(self, code: int, lines: list[str]) -> None:
        """Choose the body framing and persistence; add Transfer-Encoding/Connection."""
        if code == SWITCHING_PROTOCOLS:
            self._keep_alive = True  # the connection now speaks the new protocol
            return
        if not self._no_body and self._length is None:
            if self._http11:
                self._chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
            else:
                self._keep_alive = False  # the body ends when the connection does
        if not self._keep_alive:
            lines.append("Connection: close\r\n")
        elif self._http10:
            lines.append("Connection: keep-alive\r\n")

    def body(self, data: bytes) -> bytes:
        """Return ``data`` framed for the wire; b"" when this response has no body."""
        if self._state is not _SENDING:
            raise RuntimeError(f"body() called in state {self._state}")
        if data.__class__ is not bytes:  # bytes, the usual chunk, needs no check or copy
            if not isinstance(data, (bytes, bytearray, memoryview)):
                self._keep_alive = False
                raise ResponseError(f"app yielded {type(data).__name__}, not bytes")
            data = bytes(data)  # a memoryview's len() counts items, not bytes
        if self._no_body:
            return b""
        if not data:  # a 0-size chunk mid-stream would end a chunked body
            return b""
        size = len(data)
        if self._length is not None and self._sent + size > self._length:
            self._keep_alive = False
            raise ResponseError(f"app sent more than its Content-Length of {self._length}")
        self._sent += size
        if self._chunked:
            return b"%x\r\n%b\r\n" % (size, data)
        return data

    def end(self) -> bytes:
        """Return the end of the body framing; a short body forbids keep-alive."""
        if self._state is not _SENDING:
            raise RuntimeError(f"end() called in state {self._state}")
        self._state = _DONE
        if self._chunked:
            return LAST_CHUNK
        if not self._no_body and self._length is not None and self._sent < self._length:
            self._keep_alive = False  # the client still waits for the missing bytes
        return b""


def error_response(status: int, version: str = HTTP_11, *, now: float | None = None) -> bytes:
    """A complete small text/plain response for the worker's own errors, with Connection: close.

    ``version`` is the request's VERSION; the reply uses HTTP/1.0 for a 1.0
    request and HTTP/1.1 otherwise, like ResponseFramer.
    """
    if not 400 <= status <= MAX_STATUS:
        raise ValueError(f"not an error status: {status}")
    phrase, body = _error_text(status)
    head = [
        f"{HTTP_10 if _version_semantics(version)[1] else HTTP_11} {status} {phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if now is not None:
        head.append(f"Date: {http_date(now)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


# At most the 200 statuses 400-599: HTTPStatus(status) costs ~1 µs.
# typed: 500 and 500.0 are equal keys, but format differently.
@lru_cache(maxsize=None, typed=True)
def _error_text(status: int) -> tuple[str, bytes]:
    """(reason phrase, body) of error_response(status)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return phrase, f"{status} {phrase}\n".encode("ascii")


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@lru_cache(maxsize=1)
def _http_date_for(second: int) -> str:
    t = datetime.fromtimestamp(second, UTC)
    return (f"{_DAYS[t.weekday()]}, {t.day:02d} {_MONTHS[t.month - 1]} {t.year:04d} "
            f"{t.hour:02d}:{t.minute:02d}:{t.second:02d} GMT")


def http_date(now: float) -> str:
    """IMF-fixdate for ``now``, formatted once per second (RFC 9110 5.6.7)."""
    return _http_date_for(int(now))


def _version_semantics(version: str) -> tuple[bool, bool]:
    """(speaks HTTP/1.1, speaks HTTP/1.0) for a request's VERSION; a later 1.x counts as 1.1."""
    try:
        known = KNOWN_VERSIONS.get(version)
    except TypeError:  # unhashable, so not a str: the checks below decide
        known = None
    if known is not None:
        return known
    match = VERSION_RE.fullmatch(version or "")
    if not match or match.group(1) != "1":
        return False, False
    minor = int(match.group(2))
    return minor >= 1, minor == 0


def _tokens(connection: str | Sequence[str] | None) -> set[str]:
    """The lower-cased comma-separated tokens of a Connection header."""
    if connection is None:
        return set()
    if not isinstance(connection, str):
        connection = ",".join(connection)
    return {t.strip().lower() for t in connection.split(",") if t.strip()}


def _check_status(status: str) -> tuple[int, str]:
    """Validate a PEP 3333 status ("NNN Reason") and return (code, reason).

    Interim 1xx statuses other than 101 are refused: WSGI has one response
    per request, and a client given only "100 Continue" would wait forever.
    """
    if isinstance(status, str):
        known = _STATUSES.get(status)
        if known is not None:
            return known
    match = STATUS_RE.fullmatch(status) if isinstance(status, str) else None
    if not match or not MIN_STATUS <= int(match.group(1)) <= MAX_STATUS:
        raise ResponseError(f"invalid status {status!r}")
    code = int(match.group(1))
    if code < 200 and code != SWITCHING_PROTOCOLS:
        raise ResponseError(f"interim status {status!r} cannot be the response")
    parsed = code, match.group(2) or ""
    if len(_STATUSES) < MAX_CACHED:
        _STATUSES[status] = parsed
    return parsed


def _check_headers(code: int, headers: Iterable[tuple[str, str]],
                   ) -> tuple[list[str], list[str], bool]:
    """Validate the app's headers; reject hop-by-hop ones and response splitting.

    Returns the "Name: value\\r\\n" lines without Content-Length, the values of
    Content-Length, and whether there is a Date header.
    """
    lines: list[str] = []
    lengths: list[str] = []
    has_date = False
    for item in headers:
        if not (isinstance(item, tuple) and len(item) == 2
                and isinstance(item[0], str) and isinstance(item[1], str)):
            raise ResponseError(f"header is not a (str, str) tuple: {item!r}")
        name, value = item
        lower = _HEADER_NAMES.get(name)
        if lower is None:  # a name not validated yet
            if not TOKEN_RE.fullmatch(name):
                raise ResponseError(f"invalid header name {name!r}")
            lower = name.lower()
            if len(_HEADER_NAMES) < MAX_CACHED:
                _HEADER_NAMES[name] = lower
        # Three substring tests are ~4x cheaper than the regex search.
        if "\r" in value or "\n" in value or "\0" in value:
            raise ResponseError(f"CR, LF or NUL in header {name}: {value!r}")
        if not value.isascii() and not _is_latin1(value):  # isascii() is O(1)
            raise ResponseError(f"header {name} is not latin-1: {value!r}")
        if lower in HOP_BY_HOP:
            if not (code == SWITCHING_PROTOCOLS and lower in UPGRADE_HEADERS):
                raise ResponseError(f"hop-by-hop header {name!r} set by the app")
            if lower == "connection" and "upgrade" not in _tokens(value):
                raise ResponseError(f"101 with Connection: {value!r}, expected Upgrade")
        if lower == "content-length":  # the framer decides; see start()
            lengths.append(value)
            continue
        if lower == "date":
            has_date = True
        lines.append(f"{name}: {value}\r\n")
    return lines, lengths, has_date


def _check_length(values: list[str]) -> int:
    """The app's Content-Length: one non-negative integer (repeats must agree)."""
    lengths = {v.strip() for v in values}
    if len(lengths) == 1:
        (length,) = lengths
        if length.isascii() and length.isdigit():  # [0-9]+ without a regex
            return int(length)
    raise ResponseError(f"invalid Content-Length {values!r}")


def _is_latin1(text: str) -> bool:
    """PEP 3333: header values are str holding latin-1 code points only."""
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True
