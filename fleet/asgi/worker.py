"""An ASGI worker process: one event loop serving up to --asgi-concurrency requests at once.

Started as ``python -m fleet.asgi SPEC_JSON`` where the WSGI worker is
``python -m fleet.worker SPEC_JSON`` (so neither process imports the other's
stack), and seen the same way by the supervisor: READY and FIGURES on its control link, SIGTERM and
SIGHUP to retire, the same exit codes.

Requests reach the loop from one of two feeds, both sockets the loop watches:
- broker mode: one link to the host's dispatcher (fleet.dispatch.link) that
  asks for --asgi-concurrency requests at once and reports each one DONE, so
  the dispatcher still knows who holds what and reloads lose nothing; the
  disconnects and credit grants of the connections held come the same way;
- direct mode: a ZMTP pull from every Mongrel2, read only while fewer than
  --asgi-concurrency requests are in flight.
Replies go straight to Mongrel2 through one Publisher per endpoint.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import io
import logging
import os
import select
import signal
import socket
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import IO, Any

import msgpack

from fleet import native
from fleet.appload import AppLoadError, app_version, check_interface, load_app
from fleet.asgi.cycle import AsgiProtocolError, ResponseCycle
from fleet.asgi.http import HttpConnection, HttpSide, TransportReply
from fleet.asgi.lifespan import Lifespan, LifespanFailed
from fleet.asgi.outbox import LoopOutbox
from fleet.asgi.reply import AsyncReply, ClientDisconnected
from fleet.asgi.scope import NotHttp, http_scope
from fleet.asgi.sockets import CLOSE_TIMEOUT, WebSocketExchange
from fleet.asgi.websocket import WebSocketSession, accept_token, websocket_scope
from fleet.dispatch import frames
from fleet.dispatch.link import LinkClosed, ThreadLink, encode
from fleet.exitcodes import APP_LOAD_FAILED, BOOT_FAILED
from fleet.http.front import HttpLimits
from fleet.logs.local import reopen_log_file, setup_logging
from fleet.logs.push import lines_dropped
from fleet.mongrel2 import codec
from fleet.mongrel2.codec import Credits, Disconnect, ProtocolError, Request, encode_ctl, peek_route
from fleet.mongrel2.connection import Publisher, Puller, PullerSet
from fleet.mongrel2.uploads import (
    UploadGone,
    UploadPolicy,
    UploadRejected,
    UploadStarted,
    check_upload,
    open_upload,
    remove_upload,
)
from fleet.worker.sources import POLL_INTERVAL_MS
from fleet.worker.spec import WorkerSpec
from fleet.worker.start import adopt
from fleet.worker.tally import Tally, snapshot
from fleet.wsgi.response import ResponseError, error_response
from fleet.wsgi.serve import ResponseFramer

log = logging.getLogger("fleet.worker")

parse_message = native.twin("fleet.mongrel2._codec", "parse_message", codec.parse_message)

# How often (seconds) at most the worker tells the master what it has served.
FIGURES_INTERVAL = 1.0
# A request body reaches the app in http.request events of at most this size.
BODY_CHUNK = 64 * 1024
# Direct mode: how often the pullers are looked after (reconnects, slow handshakes).
DIRECT_REFRESH = 0.1
SUBSCRIBE_WAIT = 5.0
# How often an open WebSocket through Mongrel2 gets a ctl keep-alive (Mongrel2's min_ping is 120 s).
WEBSOCKET_KEEPALIVE = 60.0


def _opcode(frame: Request) -> int:
    """A Mongrel2 WebSocket message's opcode: FLAGS is its first frame byte, as "0x81"."""
    try:
        return int(str(frame.headers.get("FLAGS", "0x0")), 16) & 0x0F
    except ValueError:
        return -1  # the session closes with 1002


class Exchange:
    """One request in flight: its task, its reply and what its receive() has to give."""

    __slots__ = ("kind", "request", "reply", "task", "cycle", "disconnected", "receiving")
    accepted = False  # a request is never an accepted WebSocket (fleet.asgi.sockets)

    def __init__(self, kind: str, request: Request, reply: AsyncReply | TransportReply) -> None:
        self.kind = kind  # "mongrel2" or "http", as the tally counts them
        self.request = request
        self.reply = reply
        self.task: asyncio.Task | None = None
        self.cycle: ResponseCycle | None = None
        self.disconnected = asyncio.Event()  # the client left, or the response is complete
        self.receiving = False  # the app waits in receive(): a disconnect is its answer, not a cancel

    @property
    def status(self) -> str | None:
        """The status line the client was sent, for the tally."""
        return self.reply.status

    def client_left(self) -> None:
        """The client is gone: tell the reply, answer a receive(), or cancel the busy app. Not
        after a complete response: what the app does then (background tasks) is its own."""
        self.reply.disconnect()
        self.disconnected.set()
        complete = self.cycle is not None and self.cycle.complete
        if not self.receiving and not complete and self.task is not None and not self.task.done():
            self.task.cancel()


class AsgiWorker:
    def __init__(self, spec: WorkerSpec, app: Any) -> None:
        self.spec = spec
        self.config = spec.config
        self.app = app
        self.policy = UploadPolicy.of(self.config)
        self.publishers = [Publisher(e.recv_spec) for e in self.config.endpoints]
        self.lifespan = Lifespan(app)
        self.tally = Tally()
        self.exchanges: dict[tuple[int, bytes], Exchange] = {}
        self.in_flight = 0
        self.retiring = False
        self.finished = asyncio.Event()  # retired and every request answered
        self.outbox: LoopOutbox | None = None  # replies and DONEs, a loop pass at a time
        self.feed: BrokerFeed | DirectFeed | None = None  # Mongrel2's requests, if it has endpoints
        self.http: HttpSide | None = None  # --http
        self.websockets: dict[tuple[int, bytes], WebSocketExchange] = {}  # open ones; index -1: --http
        self.warned_direct_websocket = False
        self.stray_warned: set[bytes] = set()

    # -- requests -----------------------------------------------------------

    def take(self, index: int, raw: bytes, credits: int | None) -> None:
        """A message from Mongrel2: a request starts a task, a control message reaches its exchange."""
        try:
            event = parse_message(raw)
        except ProtocolError as error:
            log.warning("dropped a malformed Mongrel2 message: %s", error)
            try:
                self.feed.done(index, peek_route(raw)[1], None, False)
            except ProtocolError:
                pass
            return
        if not isinstance(event, Request):
            self.control(index, event)  # in broker mode the dispatcher sends these outside requests
            return
        method = event.headers.get("METHOD")
        if method == "WEBSOCKET_HANDSHAKE":
            self._take_websocket(index, event, credits)
            return
        if method == "WEBSOCKET":
            self._stray_frame(index, event)
            return
        reply = AsyncReply(self.outbox.senders[index], event.sender, event.conn_id, credits)
        exchange = Exchange("mongrel2", event, reply)
        key = (index, event.conn_id)
        self.exchanges[key] = exchange

        def finish(closed: bool) -> None:
            # In direct mode a second message for the connection (a pipelined request, an upload's
            # done message) may have taken its place: only this exchange's own entry goes.
            if self.exchanges.get(key) is exchange:
                del self.exchanges[key]
            self.feed.done(index, event.conn_id, reply.bytes_sent if reply.credits is not None else None, closed)

        self.start(exchange, self._serve_mongrel2(exchange), finish)

    def _take_websocket(self, index: int, handshake: Request, credits: int | None) -> None:
        """A WebSocket through Mongrel2: the handshake's body is the accept value Mongrel2
        computed; the client's frames follow as messages of their own."""
        conn_id = handshake.conn_id
        key = (index, conn_id)
        reply = AsyncReply(self.outbox.senders[index], handshake.sender, conn_id, credits)
        if not isinstance(self.feed, BrokerFeed):
            if not self.warned_direct_websocket:
                self.warned_direct_websocket = True
                log.warning("refused a WebSocket: through Mongrel2 they need --dispatch broker (Mongrel2 deals "
                            "each frame to any handler; only the dispatcher routes them to the connection's worker)")
            exchange = Exchange("mongrel2", handshake, reply)
            self.start(exchange, self._answer_error(reply, 503), lambda closed: None)
            return
        # Its frames come to this worker from now on; it holds no request slot meanwhile (its
        # DONE at the end returns no credit), so open sockets do not use up --asgi-concurrency.
        self.feed.stream(index, conn_id)
        session = WebSocketSession(handshake.body.decode("latin-1"), self.config.websocket_max_size)
        exchange = WebSocketExchange("mongrel2", handshake, session, reply, lambda: reply.finish(close=True),
                                     self._websocket_opened)
        self.exchanges[key] = exchange
        self.websockets[key] = exchange

        def finish(closed: bool) -> None:
            if self.exchanges.get(key) is exchange:
                del self.exchanges[key]
            self._websocket_ended(key)
            self.feed.done(index, conn_id, None, True, credit=False)

        scope = websocket_scope(handshake, state=self._state())
        self.start(exchange, exchange.run(self.app, scope), finish)

    def _stray_frame(self, index: int, frame: Request) -> None:
        """A WebSocket frame that came as a request: no worker of this host holds its connection."""
        if frame.conn_id not in self.stray_warned:
            if len(self.stray_warned) < 1024:
                self.stray_warned.add(frame.conn_id)
            log.warning("dropped a WebSocket frame for connection %s, which no worker here holds (is another host "
                        "attached to the same Mongrel2 handler? Mongrel2 deals a WebSocket's frames to any of "
                        "them)", frame.conn_id.decode())
        self.feed.done(index, frame.conn_id, None, False)

    def take_http(self, connection: HttpConnection, request: Request, body: IO[bytes]) -> Exchange:
        """A whole request from an --http client (fleet.asgi.http); its connection waits for it."""
        exchange = Exchange("http", request, TransportReply(connection))

        def finish(closed: bool) -> None:
            body.close()
            connection.finished(closed)

        self.start(exchange, self._serve_http(exchange, body), finish)
        return exchange

    def start(self, exchange: Exchange, work: Awaitable[bool], finish: Callable[[bool], None]) -> None:
        self.in_flight += 1
        exchange.task = asyncio.get_running_loop().create_task(self.serve(exchange, work, finish))

    def take_http_websocket(self, connection: HttpConnection, request: Request) -> WebSocketExchange:
        """An --http WebSocket handshake (fleet.asgi.http); its connection feeds it the client's frames."""
        session = WebSocketSession(accept_token(request.header("sec-websocket-key") or ""),
                                   self.config.websocket_max_size)
        exchange = WebSocketExchange("http", request, session, TransportReply(connection), connection.end,
                                     self._websocket_opened)
        key = (-1, request.conn_id)
        self.websockets[key] = exchange

        def finish(closed: bool) -> None:
            self._websocket_ended(key)
            connection.finished(True)

        scope = websocket_scope(request, state=self._state())
        self.start(exchange, exchange.run(self.app, scope), finish)
        return exchange

    def _websocket_opened(self) -> None:
        self.tally.websockets_opened += 1

    def _websocket_ended(self, key: tuple[int, bytes]) -> None:
        exchange = self.websockets.pop(key, None)
        if exchange is not None and exchange.accepted:
            self.tally.websockets_closed += 1

    def control(self, index: int, event: Disconnect | Credits | Request | Any) -> None:
        exchange = self.exchanges.get((index, event.conn_id))
        if exchange is None:
            return
        if isinstance(event, Request):  # a frame of a WebSocket this worker holds (a stream)
            if isinstance(exchange, WebSocketExchange) and event.headers.get("METHOD") == "WEBSOCKET":
                exchange.incoming(_opcode(event), event.body)
            return
        if isinstance(event, Credits):
            exchange.reply.grant(event.credits)
        elif isinstance(event, Disconnect):
            exchange.client_left()

    async def serve(self, exchange: Exchange, work: Awaitable[bool], finish: Callable[[bool], None]) -> None:
        """Run ``work`` (True if it closed the connection), then ``finish`` and count it, whatever happens."""
        started = time.monotonic()
        conn_id = exchange.request.conn_id.decode()
        closed = True
        # A WebSocket lasts as long as its client wants: --harakiri times requests, not sockets.
        harakiri = self.config.harakiri if isinstance(exchange, Exchange) else 0.0
        try:
            if harakiri:
                async with asyncio.timeout(harakiri):
                    closed = await work
            else:
                closed = await work
        except TimeoutError:
            log.error("harakiri: the request on connection %s ran past %g s; cancelled", conn_id, harakiri)
            closed = await self._harakiri(exchange)
        except asyncio.CancelledError:
            log.info("client %s went away; its request was cancelled", conn_id)
        except Exception:
            log.exception("internal error serving connection %s", conn_id)
        finally:
            try:
                finish(closed)
                # An accepted WebSocket is counted as one (opened, closed), not as a request
                # whose latency would be the socket's whole life.
                if not exchange.accepted:
                    self.tally.record(exchange.kind, exchange.status, time.monotonic() - started)
            except Exception:
                log.exception("internal error finishing connection %s", conn_id)
            self.in_flight -= 1
            self.resume()
            self.check_finished()

    async def _serve_http(self, exchange: Exchange, body: IO[bytes]) -> bool:
        scope = http_scope(exchange.request, state=self._state())
        return await self._run_app(exchange, scope, body, now=time.time())

    def _state(self) -> dict[str, Any] | None:
        return self.lifespan.state if self.lifespan.supported else None

    async def _serve_mongrel2(self, exchange: Exchange) -> bool:
        """Returns True if the connection was closed."""
        request, reply = exchange.request, exchange.reply
        try:
            upload = check_upload(request, self.policy)
        except UploadGone as error:
            log.info("ignored a late upload-start on connection %s: %s", request.conn_id.decode(), error)
            return False
        except UploadRejected as error:
            log.log(logging.DEBUG if error.repeats_start else logging.WARNING,
                    "refused upload on connection %s: %s", request.conn_id.decode(), error)
            return await self._answer_error(reply, 400)
        if isinstance(upload, UploadStarted):
            return False  # Mongrel2 is writing the body; the done message follows
        try:
            scope = http_scope(request, state=self._state())
        except NotHttp as error:
            log.warning("connection %s: %s (fleet serves ASGI http only)", request.conn_id.decode(), error)
            return await self._answer_error(reply, 400)
        if upload is None:
            return await self._run_app(exchange, scope, io.BytesIO(request.body))
        try:
            body = open_upload(upload)
        except UploadRejected as error:
            log.warning("refused upload on connection %s: %s", request.conn_id.decode(), error)
            return await self._answer_error(reply, 400)
        try:
            return await self._run_app(exchange, scope, body)
        finally:
            body.close()
            remove_upload(upload)

    async def _run_app(self, exchange: Exchange, scope: dict, body: IO[bytes], now: float | None = None) -> bool:
        """The app on one request whose ``body`` is ready to read; True if the connection was closed.
        ``now`` adds a Date header (--http: Mongrel2 does not take that duty on)."""
        request, reply = exchange.request, exchange.reply
        framer = ResponseFramer(method=scope["method"], version=request.version or "HTTP/1.1",
                                connection=request.header("connection"), now=now)
        cycle = exchange.cycle = ResponseCycle(framer)
        body_left = [True]

        async def receive() -> dict[str, Any]:
            if exchange.disconnected.is_set():
                return {"type": "http.disconnect"}
            if body_left[0]:
                chunk = body.read(BODY_CHUNK)
                more = len(chunk) == BODY_CHUNK
                body_left[0] = more
                return {"type": "http.request", "body": chunk, "more_body": more}
            exchange.receiving = True
            try:
                await exchange.disconnected.wait()
            finally:
                exchange.receiving = False
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if reply.gone:
                raise ClientDisconnected(f"client of connection {request.conn_id.decode()} is gone")
            was_complete = cycle.complete
            data = cycle.send(message)
            if cycle.status is not None and reply.status is None:
                reply.status = cycle.status
            if was_complete:
                return  # trailers after the body: HTTP/1.1 through Mongrel2 has no room for them
            if cycle.complete:
                await reply.finish(data, close=not cycle.keep_alive)
                exchange.disconnected.set()
            elif data:
                await reply.send(data)

        where = f"{scope['method']} {scope['path']}"
        try:
            await self.app(scope, receive, send)
        except (ClientDisconnected, asyncio.CancelledError):
            raise asyncio.CancelledError() from None
        except (AsgiProtocolError, ResponseError) as error:
            log.error("application broke ASGI in %s: %s", where, error)
            return await self._cut_short(exchange)
        except Exception:
            log.error("application error in %s\n%s", where, traceback.format_exc().rstrip())
            return await self._cut_short(exchange)
        if not cycle.complete:
            if not reply.gone:
                log.error("application returned without completing its response in %s", where)
            return await self._cut_short(exchange)
        return not cycle.keep_alive

    async def _harakiri(self, exchange: Exchange) -> bool:
        """A request cancelled for --harakiri: 504 if nothing was sent yet, else the connection cut."""
        if exchange.cycle is not None and exchange.cycle.head_sent:
            return await self._cut_short(exchange)
        return await self._answer_error(exchange.reply, 504)

    async def _cut_short(self, exchange: Exchange) -> bool:
        """After an application error: a 500 if nothing was sent yet, else the connection closed
        (unless the response was already whole: then it was good, and so is the connection)."""
        if exchange.reply.gone:
            return True
        if exchange.cycle is not None and exchange.cycle.complete:
            return not exchange.cycle.keep_alive
        if exchange.cycle is not None and exchange.cycle.head_sent:
            await exchange.reply.finish(close=True)
            return True
        return await self._answer_error(exchange.reply, 500)

    async def _answer_error(self, reply: AsyncReply, status: int) -> bool:
        reply.status = str(status)
        try:
            await reply.finish(error_response(status), close=True)
        except ClientDisconnected:
            pass
        return True

    # -- life ------------------------------------------------------------------

    def retire(self) -> None:
        """Finish what was received, take nothing new, then end (SIGTERM, SIGHUP)."""
        if self.retiring:
            return
        self.retiring = True
        for side in self.sides:
            side.retire()
        # Open WebSockets keep working until they close, or until just before the supervisor's
        # --graceful-timeout ends the worker: then each is closed properly, with 1001.
        margin = min(CLOSE_TIMEOUT, self.config.graceful_timeout / 2)  # room for the close handshake
        asyncio.get_running_loop().call_later(self.config.graceful_timeout - margin, self._websockets_going_away)
        self.check_finished()

    def _websockets_going_away(self, mongrel2_only: bool = False) -> None:
        for (index, _), exchange in list(self.websockets.items()):
            if index >= 0 or not mongrel2_only:
                # Detached from Mongrel2, a client's echo of the close cannot reach us: end at once.
                exchange.going_away(wait_for_echo=not mongrel2_only)

    def host_detached(self) -> None:
        """SIGUSR2: the host stopped taking work from Mongrel2 (a graceful stop), so the frames of
        its WebSockets through Mongrel2 no longer reach it: close them now, with 1001."""
        count = sum(index >= 0 for index, _ in self.websockets)
        if count:
            log.info("detached from Mongrel2: closing its %d WebSocket(s) with 1001", count)
        self._websockets_going_away(mongrel2_only=True)

    async def keep_websockets_alive(self) -> None:
        """Mongrel2 drops a WebSocket its client has not pinged for limits.min_ping (120 s by
        default), whatever the handler writes; a ctl keep-alive counts as a ping."""
        while True:
            await asyncio.sleep(WEBSOCKET_KEEPALIVE)
            for (index, conn_id), exchange in list(self.websockets.items()):
                if index >= 0 and exchange.is_open:
                    self.outbox.senders[index].send(
                        encode_ctl(exchange.request.sender, conn_id, "ctl", {"keep-alive": True}))

    @property
    def sides(self) -> list[BrokerFeed | DirectFeed | HttpSide]:
        return [side for side in (self.feed, self.http) if side is not None]

    def has_room(self) -> bool:
        """Whether one more request may start: open WebSockets do not count (each holds a
        connection for as long as its client wants, not a request slot)."""
        return self.in_flight - len(self.websockets) < self.config.asgi_concurrency

    def resume(self) -> None:
        """A request finished: there may be room to read or accept again."""
        if self.feed is not None:
            self.feed.resume()
        if self.http is not None:
            self.http.update_accepting()

    def check_finished(self) -> None:
        """Retired, every request received (the dispatcher said so) and answered: the worker can end."""
        if self.retiring and not self.in_flight and all(side.drained for side in self.sides):
            self.finished.set()

    async def report_figures(self, control: ThreadLink) -> None:
        last = None
        while True:
            await asyncio.sleep(FIGURES_INTERVAL)
            last = self.send_figures(control, last)

    def send_figures(self, control: ThreadLink, last: list[float] | None) -> list[float]:
        figures = snapshot([self.tally], lines_dropped())
        if figures != last:
            try:
                control.send([frames.FIGURES, msgpack.packb(figures)])
            except OSError:
                pass  # the master is going away: nobody to count them
        return figures


class BrokerFeed:
    """Broker mode: the dispatcher's link, read by the loop; credits for the whole concurrency."""

    def __init__(self, worker: AsgiWorker, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.loop = loop
        ident = frames.thread_ident(os.getpid(), 0)
        self.link = ThreadLink(worker.spec.dispatch_endpoint, ident, POLL_INTERVAL_MS / 1000)
        self.retire_sent = False
        self.drained = False  # the dispatcher acknowledged the retire: nothing more will come
        self.link.send([frames.CREDIT, b"%d" % worker.config.asgi_concurrency])
        loop.add_reader(self.link.socket.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            more = self.link.poll(0)
        except LinkClosed:
            log.warning("the dispatcher closed the link; the worker stops taking requests")
            self._stop_reading()
            self.drained = True
            self.worker.retire()
            self.worker.check_finished()
            return
        if not more:
            return
        while (received := self.link.take()) is not None:
            try:
                self._handle(received)
            except Exception:  # a fault of ours with one message must not strand the ones behind it
                log.exception("internal error handling a message from the dispatcher")

    def _handle(self, received: list[bytes]) -> None:
        head = received[0]
        kind = head[:1]
        if kind == frames.REQUEST:
            self.worker.take(head[1], received[1], int(received[2]) if len(received) > 2 else None)
        elif kind == frames.CONTROL:
            self._control(head[1], received[1])
        elif head == frames.RETIRED:
            # Nothing new will come; the link stays read: the frames of open WebSockets still do.
            self.drained = True
            self.worker.check_finished()

    def _control(self, index: int, raw: bytes) -> None:
        try:
            event = parse_message(raw)
        except ProtocolError as error:
            log.warning("dropped a malformed control message: %s", error)
            return
        self.worker.control(index, event)

    def done(self, index: int, conn_id: bytes, sent: int | None, closed: bool, credit: bool = True) -> None:
        """Leaves with the loop pass's batch, after the reply (fleet.asgi.outbox). ``credit``:
        the slot is free again (a WebSocket's gave its slot back when it became a stream)."""
        self.worker.outbox.send_link(encode(frames.done(index, conn_id, sent, closed,
                                                        credit=credit and not self.retire_sent)))

    def resume(self) -> None:
        """Credits come back with each DONE: nothing to do."""

    def stream(self, index: int, conn_id: bytes) -> None:
        """The connection is a WebSocket: its frames are to come here (fleet.dispatch.frames STREAM),
        and its request slot is free for another request (one more credit)."""
        message = encode([frames.tagged(frames.STREAM, index), conn_id])
        if not self.retire_sent:
            message += encode([frames.CREDIT, b"1"])
        self.worker.outbox.send_link(message)

    def retire(self) -> None:
        if not self.retire_sent:
            self.retire_sent = True
            try:
                self.worker.outbox.flush()  # the DONEs before the RETIRE
                self.link.send([frames.RETIRE])
            except OSError:
                pass

    def _stop_reading(self) -> None:
        try:
            self.loop.remove_reader(self.link.socket.fileno())
        except (ValueError, OSError):
            pass

    def close(self) -> None:
        self._stop_reading()
        self.link.close()


class _LoopPoller:
    """What fleet.mongrel2.connection.PullerSet registers its sockets with, as loop readers and writers."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ready) -> None:
        self.loop = loop
        self.ready = ready
        self.masks: dict[int, int] = {}
        self.paused = False

    def register(self, fd: int, mask: int) -> None:
        self.masks[fd] = mask
        self._watch(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.unregister(fd)
        self.register(fd, mask)

    def unregister(self, fd: int) -> None:
        self.masks.pop(fd, None)
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)

    def pause(self, paused: bool) -> None:
        """Stop (or start again) reading requests: at the concurrency limit the Mongrel2 queue waits."""
        if paused == self.paused:
            return
        self.paused = paused
        for fd, mask in self.masks.items():
            if paused:
                self.loop.remove_reader(fd)
            else:
                self._watch(fd, mask)

    def _watch(self, fd: int, mask: int) -> None:
        if mask & select.POLLOUT:
            self.loop.add_writer(fd, self.ready, fd)
        elif not self.paused:
            self.loop.add_reader(fd, self.ready, fd)


class DirectFeed:
    """Direct mode: the loop pulls from every Mongrel2 itself, while it has room."""

    def __init__(self, worker: AsgiWorker, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.poller = _LoopPoller(loop, self._ready)
        self.pullers = PullerSet([Puller(e.send_spec) for e in worker.config.endpoints], self.poller)
        self.arrived: list[bytes] = []
        self.stopped = False
        self.drained = True  # what was read is being served; what Mongrel2 queued here is lost, as in WSGI
        self.pullers.refresh(time.monotonic())
        self._refresher = loop.create_task(self._look_after())

    async def _look_after(self) -> None:
        while not self.stopped:
            self.pullers.refresh(time.monotonic())
            await asyncio.sleep(DIRECT_REFRESH)

    def _ready(self, fd: int) -> None:
        index = self.pullers.index(fd)
        if index is None:
            return
        self.pullers.ready(index, self.arrived, time.monotonic())
        arrived, self.arrived = self.arrived, []
        for raw in arrived:
            self.worker.take(index, raw, None)
        self.resume()

    def done(self, index: int, conn_id: bytes, sent: int | None, closed: bool, credit: bool = True) -> None:
        """Nobody to tell: Mongrel2 does not track handlers' requests."""

    def resume(self) -> None:
        self.poller.pause(self.stopped or not self.worker.has_room())

    def retire(self) -> None:
        self.stopped = True
        self._refresher.cancel()
        self.pullers.close()

    def close(self) -> None:
        self.retire()


def new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """asyncio's loop, or uvloop's when asked for or (auto) installed."""
    if choice != "asyncio" and (choice == "uvloop" or importlib.util.find_spec("uvloop") is not None):
        return importlib.import_module("uvloop").new_event_loop()
    return asyncio.new_event_loop()


async def run(spec: WorkerSpec, app: Any) -> int:
    loop = asyncio.get_running_loop()
    worker = AsgiWorker(spec, app)
    try:
        await worker.lifespan.startup()
    except LifespanFailed as error:
        log.error("%s", error)
        return APP_LOAD_FAILED
    for publisher in worker.publishers:
        if not publisher.wait_connected(SUBSCRIBE_WAIT):
            log.warning("Mongrel2 at %s does not answer yet; is it running? replies sent before it does are lost",
                        publisher.spec)
    if spec.config.endpoints:
        if spec.config.dispatch == "broker":
            worker.feed = BrokerFeed(worker, loop)
            worker.outbox = LoopOutbox(loop, worker.publishers, worker.feed.link.send_encoded)
        else:
            worker.feed = DirectFeed(worker, loop)
            worker.outbox = LoopOutbox(loop, worker.publishers, None)
    if spec.http_fds:
        config = spec.config
        worker.http = HttpSide([socket.socket(fileno=fd) for fd in spec.http_fds],
                               HttpLimits(config.http_keepalive, config.http_timeout, config.http_max_body),
                               config.websocket_max_size, worker.has_room, worker.take_http, worker.take_http_websocket,
                               worker.check_finished, loop)
    loop.add_signal_handler(signal.SIGTERM, worker.retire)
    loop.add_signal_handler(signal.SIGHUP, worker.retire)
    loop.add_signal_handler(signal.SIGUSR1, reopen_log_file)
    loop.add_signal_handler(signal.SIGUSR2, worker.host_detached)
    control = ThreadLink(spec.dispatch_endpoint, frames.control_ident(os.getpid()), POLL_INTERVAL_MS / 1000)
    control.send([frames.READY, (app_version(spec.config.app) or "").encode()])
    log.info("worker ready: ASGI on %s, up to %d requests at once, %s dispatch, replying to %s, HTTP %s",
             type(loop).__module__.split(".")[0], spec.config.asgi_concurrency, spec.config.dispatch,
             ", ".join(p.spec for p in worker.publishers) or "none", ", ".join(spec.config.http) or "none")
    reporter = loop.create_task(worker.report_figures(control))
    keeper = loop.create_task(worker.keep_websockets_alive())
    watchdog = loop.create_task(_watch_parent(spec.parent_pid))
    await worker.finished.wait()
    reporter.cancel()
    keeper.cancel()
    watchdog.cancel()
    await worker.lifespan.shutdown(spec.config.graceful_timeout)
    worker.lifespan.close()
    worker.send_figures(control, None)
    if worker.outbox is not None:
        worker.outbox.flush()
    for side in worker.sides:
        side.close()
    control.close()
    for publisher in worker.publishers:
        publisher.close()
    return 0


async def _watch_parent(parent_pid: int) -> None:
    while True:
        await asyncio.sleep(0.1)
        if os.getppid() != parent_pid:
            log.error("supervisor %d is gone; exiting", parent_pid)
            os._exit(BOOT_FAILED)


def main(argv: list[str]) -> int:
    """``python -m fleet.asgi SPEC_JSON``: the ASGI worker's life."""
    spec = adopt(argv)
    if spec is None:
        return BOOT_FAILED
    setup_logging(spec.log_level, spec.log_file, spec.config.logger)
    try:
        app = load_app(spec.config.app, spec.config.pythonpath)
        check_interface(app, spec.config.app, "asgi")
    except AppLoadError as error:
        log.error("%s", error)
        return APP_LOAD_FAILED
    for quick in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(quick, lambda *_: os._exit(0))
    loop = new_event_loop(spec.config.asgi_loop)
    try:
        return loop.run_until_complete(run(spec, app))
    finally:
        loop.close()

