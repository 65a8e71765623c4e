"""HTTP/1.1 requests from a client's byte stream, for ``--http``: h11 parses, this shapes.

Sans-I/O: ``feed()`` bytes, ``next_event()`` typed events, no sockets. A
finished request comes out as the same ``fleet.mongrel2.Request`` that
Mongrel2 would have sent (METHOD, PATH, QUERY, ... plus lower-case client
headers), so one WSGI layer serves both. One reader per connection; after a
request, ``next_request()`` carries pipelined bytes over to the next one.

h11 only frames requests here: responses are written by fleet.wsgi.response,
exactly as for Mongrel2. That is why each request gets a fresh h11
connection (h11 would otherwise insist on sending the response itself).

The common request whose bytes have all arrived is parsed first by
fleet.http.simple (a strict subset of the grammar, about ten times faster);
whatever it does not take, h11 reads as before.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO

import h11

from fleet.http.simple import SimpleTaker, shape_request, take_simple
from fleet.mongrel2.codec import Request

# h11's own default; beyond it a request head is refused with 431.
DEFAULT_HEADER_LIMIT = 16 * 1024
# A head may exceed the limit by less than this before it is refused.
HEAD_SLICE = 512
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# A body larger than this is read through h11 even when it has all arrived
# (the body store then decides where it goes, memory or disk).
SIMPLE_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class NeedData:
    """Nothing complete yet: read more from the client."""


@dataclass(frozen=True, slots=True)
class SendContinue:
    """The client waits for ``100 Continue`` before sending its body: write CONTINUE."""


@dataclass(frozen=True, slots=True)
class RequestReady:
    """A whole request: head and body (rewound, ready for wsgi.input)."""

    request: Request
    body: IO[bytes]
    length: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """The client broke HTTP or a limit: answer ``status`` and close."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The client closed its side; ``mid_request`` if it did so halfway through a request."""

    mid_request: bool


Event = NeedData | SendContinue | RequestReady | Rejected | PeerClosed


class RequestReader:
    """Turns one connection's bytes into requests, one at a time, in order."""

    def __init__(self, conn_id: bytes, remote_addr: str, *, max_body: int,
                 header_limit: int = DEFAULT_HEADER_LIMIT, scheme: str = "http",
                 body_store: Callable[[], IO[bytes]] = io.BytesIO,
                 simple: SimpleTaker | None = take_simple) -> None:
        """``body_store`` makes the file a request body is written to, at its first
        byte (the caller's choice: --http spools big bodies to disk). ``simple``
        takes the common request before h11 (fleet.http.simple.take_simple or its
        compiled twin, which fleet.http.front passes); None: h11 reads everything."""
        self.conn_id = conn_id
        self.body_store = body_store
        self.remote_addr = remote_addr
        self.max_body = max_body
        self.header_limit = header_limit
        self.scheme = scheme
        self._take_simple = simple
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=header_limit)
        self._head: h11.Request | None = None
        self._body: IO[bytes] | None = None
        self._length = 0
        self._continue_sent = False
        self._fed = False  # h11 has had bytes of the current request
        self._out = False  # the simple parser gave the current request: nothing until next_request()
        self._bytes_seen = False
        self._eof = False
        self._eof_fed = False
        # Bytes not given to h11 yet. Until the head is parsed it gets them in
        # HEAD_SLICE pieces: h11 only limits a head that is still incomplete,
        # so a whole oversized head fed at once would pass.
        self._pending = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received and not parsed yet (pipelined behind the request being served)."""
        return len(self._pending)

    @property
    def mid_request(self) -> bool:
        """True once any byte of the current request has arrived."""
        return self._bytes_seen or self._head is not None

    def feed(self, data: bytes) -> None:
        """Bytes from the client; b"" means it closed its side."""
        if data:
            self._bytes_seen = True
            self._pending += data
        else:
            self._eof = True

    def next_event(self) -> Event:
        try:
            return self._next_event()
        except h11.RemoteProtocolError as error:
            self._discard_body()
            if self._eof:  # h11's complaint is only that the client left halfway
                return PeerClosed(mid_request=True)
            return Rejected(error.error_status_hint, str(error) or "malformed request")

    def next_request(self) -> None:
        """The previous request was answered and the connection stays open:
        start on the next one with whatever the client already pipelined."""
        if self._fed or self._eof_fed:  # else the connection is still fresh: keep it
            data, closed = self._h11.trailing_data
            self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.header_limit)
            self._pending[:0] = data
            self._eof = self._eof or closed
        self._fed = False
        self._out = False
        self._head = None
        self._body = None
        self._length = 0
        self._continue_sent = False
        self._bytes_seen = bool(self._pending)
        self._eof_fed = False

    def take_rest(self) -> bytes:
        """After a request that switches protocols (a WebSocket handshake): the bytes that came
        after it, which are the new protocol's; this reader reads nothing more."""
        rest = bytes(self._h11.trailing_data[0]) if self._fed else b""
        rest += bytes(self._pending)
        self._pending.clear()
        return rest

    def close(self) -> None:
        self._discard_body()

    # -- internals -------------------------------------------------------

    def _next_event(self) -> Event:
        if self._out:
            return NeedData()  # as h11's PAUSED: a request is out
        if not self._fed:
            if not self._pending and not self._eof:
                return NeedData()  # between requests: nothing for h11 either
            ready = self._simple() if self._pending and self._take_simple is not None else None
            if ready is not None:
                return ready
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA and self._give_h11_more():
                continue
            if event is h11.NEED_DATA:
                if self._head is not None and self._length + self._chunk_left() > self.max_body:
                    return self._too_big()  # a chunk header that announces too much: no need to wait for it
                if self._head is not None and self._h11.they_are_waiting_for_100_continue \
                        and not self._continue_sent:
                    self._continue_sent = True
                    return SendContinue()
                return NeedData()
            if isinstance(event, h11.Request):
                self._head = event
                fault = framing_fault(event)
                if fault is not None:
                    return Rejected(400, fault)
                declared = _declared_length(event)
                if declared is not None and declared > self.max_body:
                    return Rejected(413, f"a body of {declared} bytes is over the limit of {self.max_body}")
                continue
            if isinstance(event, h11.Data):
                self._length += len(event.data)
                if self._length + self._chunk_left() > self.max_body:
                    return self._too_big()
                if self._body is None:  # made at the first byte: most requests have no body
                    self._body = self.body_store()
                self._body.write(event.data)
                continue
            if isinstance(event, h11.EndOfMessage):
                assert self._head is not None
                body, self._body = self._body or io.BytesIO(), None
                body.seek(0)
                head = self._head
                return RequestReady(self._request(head.method, head.target, head.http_version, head.headers),
                                    body, self._length)
            if isinstance(event, h11.ConnectionClosed):
                mid = self.mid_request
                self._discard_body()
                return PeerClosed(mid_request=mid)
            if event is h11.PAUSED:
                return NeedData()  # a request is out; next_request() resumes
            # h11.InformationalResponse and the like cannot come from a client.

    def _simple(self) -> RequestReady | None:
        """The whole request at the start of the pending bytes, if it is a simple one."""
        taken = self._take_simple(self._pending, self.header_limit, min(self.max_body, SIMPLE_BODY_LIMIT),
                            self.conn_id, self.remote_addr, self.scheme)
        if taken is None:
            return None
        request, body, used = taken
        del self._pending[:used]
        self._length = len(body)
        self._out = True
        return RequestReady(request, io.BytesIO(body), len(body))

    def _give_h11_more(self) -> bool:
        """Move pending bytes (at most a head's limit while no head is parsed) to h11."""
        if self._pending:
            self._fed = True
            size = HEAD_SLICE if self._head is None else len(self._pending)
            self._h11.receive_data(bytes(self._pending[:size]))
            del self._pending[:size]
            return True
        if self._eof and not self._eof_fed:
            self._eof_fed = True
            self._h11.receive_data(b"")
            return True
        return False

    def _request(self, method: bytes, target: bytes, version: bytes,
                 fields: Iterable[tuple[bytes, bytes]]) -> Request:
        return shape_request(method, target, version, fields, self._length, self.conn_id, self.remote_addr,
                             self.scheme)

    def _chunk_left(self) -> int:
        """Bytes of the current chunk still to come, as its header announced.

        h11 keeps this in its chunked reader and has no public accessor; a
        test (test_http_parser) fails if the attribute ever moves, and until
        then the body is refused only as it arrives."""
        return getattr(self._h11._reader, "_bytes_in_chunk", 0) or 0

    def _too_big(self) -> Rejected:
        self._discard_body()
        return Rejected(413, f"the body is over the limit of {self.max_body} bytes")

    def _discard_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None


def framing_fault(head: h11.Request) -> str | None:
    """Why a request's body framing cannot be trusted, or None (RFC 9112 6.1).

    Transfer-Encoding with Content-Length is the classic request-smuggling
    shape: h11 would read chunked and ignore the length, a front proxy might
    do the opposite. Transfer-Encoding in HTTP/1.0 is faulty framing too.
    Both are refused (400, then the connection closes), as gunicorn does.
    h11 already refuses any coding but chunked (501), a repeated or
    conflicting Content-Length (400) and malformed header lines (400)."""
    names = {name for name, _ in head.headers}
    if b"transfer-encoding" not in names:
        return None
    if b"content-length" in names:
        return "both Transfer-Encoding and Content-Length: the framing is ambiguous (request smuggling)"
    if head.http_version != b"1.1":
        return f"Transfer-Encoding in an HTTP/{head.http_version.decode('latin-1')} request"
    return None


def _declared_length(head: h11.Request) -> int | None:
    for name, value in head.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is one non-negative integer
    return None
