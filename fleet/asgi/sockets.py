"""The event-loop side of one WebSocket: the app's receive() and send(), the
client's messages, writes kept in order, and the close handshake's timeout.

fleet.asgi.websocket decides what each message means; this module only
moves it. The transport is given as its reply (``send(bytes)``, ``disconnect()``)
and ``end()`` (close the connection), so the same exchange serves a
WebSocket that came through Mongrel2 (replies to it) and one on --http (its
socket).
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from fleet.asgi.cycle import AsgiProtocolError
from fleet.asgi.reply import ClientDisconnected
from fleet.asgi.websocket import CLOSED, CLOSING, END, OPEN, TOO_BIG, WebSocketSession
from fleet.mongrel2.codec import Request

log = logging.getLogger("fleet.worker")

# How long a close frame we sent waits for the client's echo before the connection is closed anyway.
CLOSE_TIMEOUT = 5.0


class WebSocketExchange:
    """One WebSocket, from its handshake to the end of its connection."""

    def __init__(self, kind: str, request: Request, session: WebSocketSession, reply: Any,
                 end: Callable[[], Awaitable[None]], opened: Callable[[], None] = lambda: None) -> None:
        """``reply``: the transport's (fleet.asgi.reply.AsyncReply or fleet.asgi.http.TransportReply);
        ``opened()`` is called when the app accepts the socket."""
        self.kind = kind  # "mongrel2" or "http", as the tally counts them
        self.request = request
        self.session = session
        self.reply = reply
        self.task: asyncio.Task | None = None
        self.accepted = False
        self._end = end
        self._opened = opened
        self._unread = 0  # bytes of client messages the app has not received yet
        self._close_timer: asyncio.TimerHandle | None = None
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._events.put_nowait({"type": "websocket.connect"})
        self._last_event: dict[str, Any] | None = None
        self._writing = asyncio.Lock()
        self._last_write: asyncio.Future | None = None
        self._ended = asyncio.Event()  # the connection is closed (by us) or gone

    @property
    def status(self) -> str | None:
        """How the handshake was answered, for the tally."""
        return self.session.status

    @property
    def is_open(self) -> bool:
        return not self._ended.is_set()

    # -- the client's side (called by the transport) -----------------------------------

    def incoming(self, opcode: int, payload: bytes | str | tuple) -> None:
        events, out = self.session.client_sends(opcode, payload)
        for event in events:
            self._unread += len(event.get("text") or event.get("bytes") or "")
            self._events.put_nowait(event)
        self._emit(out)
        if self._unread > self.session.max_size:
            # A client that sends faster than the app reads: through Mongrel2 there is no way to
            # slow one socket down, so its unread messages are bounded like one message is.
            self.broke_protocol(TOO_BIG, "too much unread")

    def client_left(self) -> None:
        self.reply.disconnect()
        for event in self.session.client_gone():
            self._events.put_nowait(event)
        self._ended.set()

    def broke_protocol(self, code: int, why: str) -> None:
        """The client's frames were malformed (--http): close with ``code``."""
        events, out = self.session.fail(code, why)
        for event in events:
            self._events.put_nowait(event)
        self._emit(out)

    def going_away(self, wait_for_echo: bool = True) -> None:
        """The worker is out of time (retiring): close with 1001. Without ``wait_for_echo`` (the
        client's frames cannot reach us any more) the connection ends at once."""
        self._emit_and_time(self.session.going_away())
        if not wait_for_echo:
            self._close_timed_out()

    def _emit_and_time(self, out: list[bytes]) -> None:
        self._emit(out)
        self._time_the_close()

    def _time_the_close(self) -> None:
        """If our close handshake has begun, give the client CLOSE_TIMEOUT to answer it."""
        if self.session.state == CLOSING and self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._close_timed_out)

    def _close_timed_out(self) -> None:
        events, out = self.session.close_timed_out()
        for event in events:
            self._events.put_nowait(event)
        self._emit(out)

    # -- the app's side ---------------------------------------------------------------------

    async def run(self, app: Any, scope: dict[str, Any]) -> bool:
        """Run the app on this WebSocket until the connection is closed; True (it always is)."""
        where = f"WebSocket {scope['path']}"
        try:
            await app(scope, self.receive, self.send)
        except (ClientDisconnected, asyncio.CancelledError):
            pass
        except AsgiProtocolError as error:
            log.error("application broke ASGI in %s: %s", where, error)
            self._emit(self.session.app_failed())
        except Exception:
            log.error("application error in %s\n%s", where, traceback.format_exc().rstrip())
            self._emit(self.session.app_failed())
        else:
            self._emit_and_time(self.session.app_returned())
        await self._closed()
        return True

    async def receive(self) -> dict[str, Any]:
        if self._last_event is not None and self._last_event["type"] == "websocket.disconnect":
            return self._last_event  # asked again after the end: the same answer
        self._last_event = event = await self._events.get()
        self._unread -= len(event.get("text") or event.get("bytes") or "")
        return event

    async def send(self, message: dict[str, Any]) -> None:
        if self.session.state in (CLOSING, CLOSED) or self._ended.is_set():
            if isinstance(message, dict) and message.get("type") == "websocket.close":
                return  # closing what is closing or closed already: nothing to do
            raise ClientDisconnected(f"WebSocket {self.request.conn_id.decode()} is closed")
        was = self.session.state
        out = self.session.app_sends(message)
        if self.session.state == OPEN and was != OPEN:
            self.accepted = True
            self._opened()
        if self._last_write is None or self._last_write.done():
            await self._write_all(out)  # the usual case: nothing else is being written, so no task
        else:
            self._emit(out)
            await self._flushed()
        self._time_the_close()  # if the app just closed

    # -- internals ---------------------------------------------------------------------------

    def _emit(self, out: list[bytes]) -> None:
        if out and not self._ended.is_set():
            self._last_write = asyncio.ensure_future(self._write_all(out))

    async def _write_all(self, out: list[bytes]) -> None:
        async with self._writing:  # in the order emitted: the lock is first come, first served
            for data in out:
                if self._ended.is_set():
                    return
                try:
                    if data is END:
                        self._ended.set()
                        await self._end()
                        return
                    await self.reply.send(data)
                except ClientDisconnected:
                    self.client_left()
                    return

    async def _flushed(self) -> None:
        """Wait until what was emitted so far is written (so send() paces the app). Writes
        start in the order they were emitted and take the lock in that order: the last one
        done means all are."""
        if self._last_write is not None and not self._last_write.done():
            await asyncio.shield(self._last_write)

    async def _closed(self) -> None:
        await self._flushed()
        if self.session.state == CLOSING and not self._ended.is_set():
            await self._ended.wait()  # the client's echo, or the close timer
        if self._close_timer is not None:
            self._close_timer.cancel()
        await self._flushed()
        if not self._ended.is_set():  # closed by the client's side with nothing to write
            self._ended.set()
            await self._end()
