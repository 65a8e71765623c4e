"""``--http`` for ASGI apps: the worker's event loop accepts and reads HTTP/1.1 itself.

The same listening sockets as the WSGI side (bound once by the supervisor,
inherited by every worker, so a reload refuses no connection) and the same
sans-I/O request reader (fleet.http.parser: the simple parser first, h11 for
the rest, every refusal kept), driven by asyncio instead of an I/O thread.
One request at a time per connection, so pipelined requests are answered in
order. A worker at --asgi-concurrency stops accepting and leaves new
connections in the shared backlog for a worker with room.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable

from wsproto import ConnectionType
from wsproto.connection import Connection as WsConnection
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from fleet.asgi.reply import ClientDisconnected
from fleet.http.front import (
    ACCEPT_BATCH,
    ACCEPT_PAUSE,
    RETIRE_GRACE,
    HttpLimits,
    remote_addr_of,
    spooled_body,
    take_simple,
)
from fleet.http.parser import CONTINUE, NeedData, PeerClosed, Rejected, RequestReader, RequestReady, SendContinue
from fleet.wsgi.response import error_response

log = logging.getLogger("fleet.http")

# Pipelined bytes a connection may buffer while its current request is served.
PIPELINE_LIMIT = 256 * 1024


class TransportReply:
    """The outgoing side of one --http request (what fleet.asgi.worker sends through):
    writes to the client's transport, and waits while the client does not read."""

    credits = None  # no download credits on plain HTTP

    def __init__(self, connection: HttpConnection) -> None:
        self.connection = connection
        self.conn_id = connection.conn_id
        self.gone = False
        self.status: str | None = None
        self.bytes_sent = 0
        self.messages_sent = 0
        self.close_requested = False

    def disconnect(self) -> None:
        self.gone = True

    async def send(self, data: bytes) -> None:
        if self.gone:
            raise ClientDisconnected(f"HTTP client {self.conn_id.decode()} is gone")
        if data:
            self.connection.transport.write(data)
            self.bytes_sent += len(data)
            self.messages_sent += 1
        await self.connection.drained()

    async def finish(self, tail: bytes = b"", close: bool = False) -> None:
        if self.gone:
            return
        try:
            await self.send(tail)
        except ClientDisconnected:
            return
        self.close_requested = close


class HttpConnection(asyncio.Protocol):
    """One client connection: bytes into the reader, whole requests to the worker."""

    def __init__(self, side: HttpSide, conn_id: bytes, remote_addr: str) -> None:
        self.side = side
        self.conn_id = conn_id
        self.reader = RequestReader(conn_id, remote_addr, max_body=side.limits.max_body,
                                    body_store=spooled_body, simple=take_simple)
        self.transport: asyncio.Transport | None = None
        self.exchange = None  # the request being served (fleet.asgi.worker.Exchange)
        self.closing = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._timer: asyncio.TimerHandle | None = None
        self._timing_request = False  # the timer is the request's deadline (not keep-alive's)
        self.frames: FrameReader | None = None  # after a WebSocket handshake: the client's frames

    # -- asyncio's callbacks ------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.side.connections.add(self)
        self._expire_in(self.side.limits.timeout)

    def data_received(self, data: bytes) -> None:
        if self.frames is not None:
            self.frames.feed(data)
            return
        self.reader.feed(data)
        if self.exchange is None:
            self._pump()
        elif self.reader.buffered > PIPELINE_LIMIT:
            self.transport.pause_reading()  # resumed when the current request is answered

    def eof_received(self) -> bool:
        """The client closed its side. While its request is served, that is a client that left
        (as uvicorn and nginx take it); between requests, a last pipelined one is still answered."""
        if self.exchange is not None or self.frames is not None:
            return False  # asyncio closes the transport: connection_lost tells the app
        self.reader.feed(b"")
        self._pump()
        return True

    def connection_lost(self, error: Exception | None) -> None:
        self.side.forget(self)
        self._cancel_timer()
        self._writable.set()
        self.closing = True
        if self.exchange is not None:
            self.exchange.client_left()
        self.reader.close()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- the worker's side ---------------------------------------------------

    async def drained(self) -> None:
        """Wait while the client does not read; it must make progress within --http-timeout."""
        if self._writable.is_set():
            return
        try:
            await asyncio.wait_for(self._writable.wait(), self.side.limits.timeout)
        except TimeoutError:
            log.info("HTTP client %s stopped reading for %.0f s; closed", self.reader.remote_addr,
                     self.side.limits.timeout)
            self.transport.abort()
        if self.closing:
            raise ClientDisconnected(f"HTTP client {self.conn_id.decode()} is gone")

    def finished(self, closed: bool) -> None:
        """The request's response is out: wait for the next one, or close."""
        reply = self.exchange.reply
        self.exchange = None
        if self.closing:
            return
        if closed or self.frames is not None or reply.close_requested or reply.gone \
                or self.side.limits.keepalive <= 0:
            self._close()
            return
        self.reader.next_request()
        self.transport.resume_reading()
        # Retiring, the response said keep-alive: the client's next request, maybe on its way,
        # is still answered (with Connection: close) if it comes within RETIRE_GRACE.
        self._expire_in(min(self.side.limits.keepalive, RETIRE_GRACE) if self.side.retiring
                        else self.side.limits.keepalive)
        self._pump()  # the client may have pipelined the next request already

    async def end(self) -> None:
        """A WebSocket's end: close the connection once what is written has left."""
        self._close()

    def close_if_idle(self) -> None:
        """Retiring: an idle keep-alive connection closes (a request on its way gets RETIRE_GRACE)."""
        if self.exchange is None and not self.reader.mid_request:
            self._expire_in(RETIRE_GRACE)

    # -- internals -------------------------------------------------------------

    def _pump(self) -> None:
        while not self.closing and self.exchange is None:
            event = self.reader.next_event()
            if isinstance(event, NeedData):
                if self.reader.mid_request and self._timer is not None and not self._timing_request:
                    self._expire_in(self.side.limits.timeout, request=True)
                return
            if isinstance(event, SendContinue):
                self.transport.write(CONTINUE)
                continue
            if isinstance(event, RequestReady):
                self._cancel_timer()
                request = event.request
                if is_websocket_handshake(request):
                    event.body.close()
                    if self.side.retiring:  # a socket would outlive this worker: another one takes it
                        self.transport.write(error_response(503))
                        self._close()
                        return
                    self.frames = FrameReader(self.side.websocket_max_size)
                    self.exchange = self.side.serve_websocket(self, request)
                    self.frames.exchange = self.exchange
                    if rest := self.reader.take_rest():
                        self.frames.feed(rest)
                    return
                if self.side.retiring or self.side.limits.keepalive <= 0:
                    request.headers["connection"] = "close"  # the framer then says so to the client
                self.exchange = self.side.serve(self, request, event.body)
                return
            if isinstance(event, Rejected):
                log.warning("refused an HTTP request from %s with %d: %s",
                            self.reader.remote_addr, event.status, event.reason)
                self.transport.write(error_response(event.status))
                self._close()
                return
            if isinstance(event, PeerClosed):
                self._close()
                return

    def _expire_in(self, seconds: float, request: bool = False) -> None:
        self._cancel_timer()
        self._timing_request = request
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.exchange is not None or self.closing:
            return
        if self.reader.mid_request:
            log.info("HTTP client %s too slow: no whole request in %.0f s",
                     self.reader.remote_addr, self.side.limits.timeout)
            self.transport.write(error_response(408))
        self._close()

    def _close(self) -> None:
        self.closing = True
        self._cancel_timer()
        self.reader.close()
        self.transport.close()  # after what is buffered has been written


def is_websocket_handshake(request) -> bool:
    """RFC 6455 4.2.1's opening handshake: a GET with Upgrade: websocket, Connection: upgrade and a key."""
    tokens = {t.strip().lower() for t in (request.header("connection") or "").split(",")}
    return (request.headers.get("METHOD") == "GET" and (request.header("upgrade") or "").lower() == "websocket"
            and "upgrade" in tokens and bool(request.header("sec-websocket-key")))


class FrameReader:
    """An --http WebSocket's client frames, parsed by wsproto (masking, fragments, control
    frames, UTF-8), as whole messages for the exchange."""

    def __init__(self, max_size: int) -> None:
        self.connection = WsConnection(ConnectionType.SERVER)
        self.exchange = None  # fleet.asgi.sockets.WebSocketExchange
        self.max_size = max_size
        self.parts: list[bytes | str] = []
        self.size = 0

    def feed(self, data: bytes) -> None:
        try:
            self.connection.receive_data(data)
            for event in self.connection.events():
                self._event(event)
        except RemoteProtocolError as error:
            self.exchange.broke_protocol(1002, str(error)[:100])
        except LocalProtocolError:
            pass  # frames after the close: nothing more to read

    def _event(self, event) -> None:
        if isinstance(event, (TextMessage, BytesMessage)):
            self.parts.append(event.data)
            self.size += len(event.data)
            if self.size > self.max_size:
                self.exchange.broke_protocol(1009, "")
                self.parts, self.size = [], 0
                return
            if event.message_finished:
                joiner = "" if isinstance(event, TextMessage) else b""
                message, self.parts, self.size = joiner.join(self.parts), [], 0
                self.exchange.incoming(0x1 if isinstance(event, TextMessage) else 0x2, message)
        elif isinstance(event, Ping):
            self.exchange.incoming(0x9, bytes(event.payload))
        elif isinstance(event, CloseConnection):
            self.exchange.incoming(0x8, (event.code, event.reason or ""))


class HttpSide:
    """The worker's listening sockets, accepted from while it has room."""

    def __init__(self, listeners: list[socket.socket], limits: HttpLimits, websocket_max_size: int,
                 has_room: Callable[[], bool], serve: Callable, serve_websocket: Callable,
                 drained: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        """``serve(connection, request, body)`` starts a request and returns its exchange,
        ``serve_websocket(connection, request)`` a WebSocket; ``has_room()`` says whether the
        worker can take one more; ``drained()`` is called when, retiring, the last connection
        has closed."""
        self.listeners = listeners
        self.limits = limits
        self.websocket_max_size = websocket_max_size
        self.has_room = has_room
        self.serve = serve
        self.serve_websocket = serve_websocket
        self.on_drained = drained
        self.loop = loop
        self.connections: set[HttpConnection] = set()
        self.retiring = False
        self.drained = False
        self.accepting = False
        self._paused_until = 0.0
        self._next_id = 0
        self._adopting = 0  # accepted sockets asyncio has not set up yet
        for listener in listeners:
            listener.setblocking(False)
        self.update_accepting()

    def update_accepting(self) -> None:
        want = not self.retiring and self.has_room() and time.monotonic() >= self._paused_until
        if want == self.accepting:
            return
        self.accepting = want
        for listener in self.listeners:
            if want:
                self.loop.add_reader(listener.fileno(), self._accept, listener)
            else:
                self.loop.remove_reader(listener.fileno())

    def retire(self) -> None:
        """Stop accepting; close idle connections soon; the others after their response."""
        self.retiring = True
        self.update_accepting()
        for listener in self.listeners:
            listener.close()  # the other workers and the supervisor keep it open
        self.listeners = []
        for connection in list(self.connections):
            connection.close_if_idle()
        self._check_drained()

    def forget(self, connection: HttpConnection) -> None:
        """A connection has closed."""
        self.connections.discard(connection)
        self._check_drained()

    def _check_drained(self) -> None:
        # Retired with every connection closed: the idle ones after RETIRE_GRACE (a request
        # already on its way is answered, with Connection: close), the others after their response.
        if self.retiring and not self.connections and not self._adopting and not self.drained:
            self.drained = True
            self.on_drained()

    def close(self) -> None:
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self.has_room():
                self.update_accepting()
                return
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker took it
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept HTTP connections (%d open): %s; pausing accept",
                              len(self.connections), error)
                    self._paused_until = time.monotonic() + ACCEPT_PAUSE
                    self.update_accepting()
                    self.loop.call_later(ACCEPT_PAUSE, self.update_accepting)
                    return
                continue  # e.g. ECONNABORTED: that client is gone already
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._next_id += 1
            conn_id = b"http-%d-%d" % (os.getpid(), self._next_id)
            connection = HttpConnection(self, conn_id, remote_addr_of(address))
            self._adopting += 1
            self.loop.create_task(self._adopt(connection, sock))

    async def _adopt(self, connection: HttpConnection, sock: socket.socket) -> None:
        """Hand an accepted socket to asyncio; until then it counts, so a retiring worker waits for it."""
        try:
            await self.loop.connect_accepted_socket(lambda: connection, sock)
        except OSError as error:
            log.info("lost a new HTTP connection before it was set up: %s", error)
            sock.close()
        finally:
            self._adopting -= 1
            self._check_drained()
