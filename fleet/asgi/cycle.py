"""The response side of one ASGI HTTP request, with no I/O: the messages the
application sends in, the bytes for the client out.

The framing is fleet.wsgi.response.ResponseFramer's, as for a WSGI app:
Content-Length when the whole body came in the first body message, chunked
(or close-delimited for HTTP/1.0) when it streams, no body for HEAD, 1xx,
204 and 304, keep-alive and close as the request asked. The head waits for
the first body message, so a one-message response leaves as one write.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from fleet.wsgi.response import ResponseFramer

_START, _BODY, _DONE = "start", "body", "done"


class AsgiProtocolError(ValueError):
    """The application sent a message ASGI does not allow here; str(error) says which."""


class ResponseCycle:
    """One response: ``send(message)`` returns the bytes to write now."""

    __slots__ = ("framer", "state", "status", "headers")

    def __init__(self, framer: ResponseFramer) -> None:
        self.framer = framer
        self.state = _START
        self.status: str | None = None  # the status line's code and reason, once started
        self.headers: list[tuple[str, str]] = []

    @property
    def started(self) -> bool:
        """Whether the application sent http.response.start."""
        return self.state != _START

    @property
    def head_sent(self) -> bool:
        """Whether bytes of the response have been handed out (a 500 is then too late)."""
        return self.state != _START and self.framer.status_code is not None

    @property
    def complete(self) -> bool:
        return self.state == _DONE

    @property
    def keep_alive(self) -> bool:
        return self.framer.keep_alive

    def send(self, message: dict[str, Any]) -> bytes:
        kind = message.get("type") if isinstance(message, dict) else None
        if self.state == _START:
            if kind != "http.response.start":
                raise AsgiProtocolError(f"expected http.response.start, got {kind!r}")
            self.status = _status_line(message.get("status"))
            self.headers = _headers(message.get("headers", ()))
            self.state = _BODY
            return b""
        if self.state == _DONE:
            if kind == "http.response.trailers":
                return b""  # asked for in start ("trailers": true); HTTP/1.1 here drops them
            raise AsgiProtocolError(f"{kind!r} sent after the response was complete")
        if kind != "http.response.body":
            raise AsgiProtocolError(f"expected http.response.body, got {kind!r}")
        body = message.get("body", b"")
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise AsgiProtocolError(f"http.response.body: body must be bytes, not {type(body).__name__}")
        more = bool(message.get("more_body", False))
        out = b""
        if self.framer.status_code is None:
            # The whole body in the first message: its length is known.
            out = self.framer.start(self.status, self.headers, None if more else len(body))
        out += self.framer.body(bytes(body))
        if not more:
            out += self.framer.end()
            self.state = _DONE
        return out


def _status_line(status: Any) -> str:
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise AsgiProtocolError(f"http.response.start: status must be an int from 100 to 599, not {status!r}")
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _headers(headers: Iterable[Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    try:
        for name, value in headers:
            if not isinstance(name, (bytes, bytearray)) or not isinstance(value, (bytes, bytearray)):
                raise AsgiProtocolError("http.response.start: header names and values must be bytes")
            out.append((bytes(name).decode("latin-1"), bytes(value).decode("latin-1")))
    except (TypeError, ValueError) as error:
        if isinstance(error, AsgiProtocolError):
            raise
        raise AsgiProtocolError(f"http.response.start: headers must be (name, value) pairs: {error}") from None
    return out
