"""Run one request through the WSGI application and send what it returns.

PEP 3333 in one place: start_response (with exc_info), the write() callable,
iterables closed whatever happens, and as few Mongrel2 messages as possible
(the status line, headers and a one-piece body travel as one message).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import IO, Any, Protocol

from fleet import native
from fleet.appload import WSGIApp
from fleet.mongrel2.codec import Request
from fleet.wsgi import environ as reference_environ
from fleet.wsgi import response as reference_response
from fleet.wsgi.response import ResponseError, error_response

log = logging.getLogger("fleet.worker")

# Every request's environ is built here: in C when built (fleet/wsgi/_environ.c), else by the reference.
build_environ = native.twin("fleet.wsgi._environ", "build_environ", reference_environ.build_environ)
# ... and framed: fleet/wsgi/_response.c, else the reference.
ResponseFramer = native.twin("fleet.wsgi._response", "ResponseFramer", reference_response.ResponseFramer)


class ClientGone(Exception):
    """The client disconnected; stop producing the response."""


class ReplyChannel(Protocol):
    """The outgoing side of one request, as serve() uses it. Two kinds implement
    it: fleet.mongrel2.reply.Reply (paced Mongrel2 messages) and
    fleet.http.reply.SocketReply (writes to a client's socket)."""

    conn_id: bytes
    gone: bool  # the client has gone: nothing more can reach it
    status: str | None  # the status line the client was sent, once it was (for the worker's tally)
    bytes_sent: int
    messages_sent: int

    def send(self, data: bytes) -> None:
        """Send (or queue) framed response bytes; ClientGone if the client left."""

    def finish(self, tail: bytes = b"", close: bool = False) -> None:
        """Send the rest and ``tail``; close the connection afterwards if asked."""


class _Response:
    """start_response's state for one request."""

    def __init__(self, framer: ResponseFramer, reply: ReplyChannel) -> None:
        self.framer = framer
        self.reply = reply
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.head_sent = False

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None):
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called a second time without exc_info")
        self.status, self.headers = status, list(headers)
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy write() callable: send now, in order with the iterable's chunks."""
        self.send(data)

    def send(self, data: bytes, body_length: int | None = None) -> None:
        if self.status is None:
            raise AssertionError("the application sent body data before calling start_response")
        if not self.head_sent:
            head = self.framer.start(self.status, self.headers, body_length)
            self.head_sent = True
            self.reply.status = self.status
            self.reply.send(head + self.framer.body(data))
        elif data:
            self.reply.send(self.framer.body(data))


def serve(
    app: WSGIApp,
    request: Request,
    reply: ReplyChannel,
    *,
    body: IO[bytes],
    content_length: int | None,
    multithread: bool,
    multiprocess: bool,
    now: float | None = None,
) -> bool:
    """Serve one request; returns True if the connection was closed.
    ``now`` (seconds since the epoch) adds a Date header: a server's duty that
    Mongrel2 does not take on, so only the --http side passes it."""
    method = request.headers.get("METHOD", "GET")
    version = request.headers.get("VERSION", "HTTP/1.1")
    framer = ResponseFramer(method=str(method), version=str(version), connection=request.header("connection"),
                            now=now)
    environ = build_environ(
        request,
        body=body,
        content_length=content_length,
        errors=sys.stderr,
        multithread=multithread,
        multiprocess=multiprocess,
    )
    response = _Response(framer, reply)
    try:
        result = app(environ, response.start_response)
    except Exception as error:
        return respond(request, reply, response, framer, error=error)
    return respond(request, reply, response, framer, result)


def respond(request: Request, reply: ReplyChannel, response: _Response, framer: ResponseFramer,
            result: Iterable[bytes] | None = None, error: Exception | None = None) -> bool:
    """The rest of serve() once the app was called: send what it returned (or
    answer the ``error`` it raised), finish the reply, close the iterable.
    Returns True if the connection was closed. The compiled worker lane
    (fleet/worker/_lane.c) hands over here what it does not finish itself."""
    try:
        if error is not None:
            raise error
        if isinstance(result, (list, tuple)):
            # The whole body is known: one message, with a Content-Length.
            data = b"".join(result)
            response.send(data, body_length=len(data))
        else:
            for chunk in result:
                if chunk:
                    response.send(chunk)
            if not response.head_sent:
                response.send(b"", body_length=0)
        reply.finish(framer.end(), close=not framer.keep_alive)
        return not framer.keep_alive
    except ClientGone:
        log.info("client %s went away; response stopped", request.conn_id.decode())
        return True
    except Exception as error:
        return _fail(request, reply, response, error)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("the application's iterable failed to close")


def _fail(request: Request, reply: ReplyChannel, response: _Response, error: Exception) -> bool:
    where = f"{request.headers.get('METHOD')} {request.path.decode('latin-1')}"
    if isinstance(error, ResponseError):
        log.error("application broke HTTP in %s: %s", where, error)
    else:
        log.error("application error in %s", where, exc_info=error)
    try:
        if response.head_sent:
            reply.finish(close=True)  # too late for a 500: cut the response short
        else:
            reply.status = "500"
            reply.finish(error_response(500), close=True)
    except ClientGone:
        pass
    return True
