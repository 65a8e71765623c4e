"""Sending one ASGI response to one Mongrel2 connection, without blocking the loop.

The same limits as fleet.mongrel2.reply (the arithmetic is fleet.mongrel2.pacing):
at most a burst of messages and then one per PACE_INTERVAL, so Mongrel2 never
holds 16 undelivered messages for a connection; with download.flow_control,
no more bytes than Mongrel2 has granted. Where the thread-per-request Reply
sleeps, this one buffers (a fast stream coalesces into fewer messages) and
flushes from a timer, and a send waits only when Mongrel2's credits are
spent or a megabyte is waiting.
"""

from __future__ import annotations

import asyncio
import time

from fleet.mongrel2.codec import encode_close, encode_response
from fleet.mongrel2.connection import Publisher
from fleet.mongrel2.pacing import MAX_BUFFERED, PACE_INTERVAL, CreditWindow, Pacer

# How long a flow-controlled response waits for Mongrel2 to return credits.
CREDIT_WAIT = 60.0


class ClientDisconnected(OSError):
    """send() after the client went away (ASGI asks for an OSError subclass)."""


class AsyncReply:
    def __init__(self, responder: Publisher, sender: bytes, conn_id: bytes, credits: int | None) -> None:
        self.responder = responder
        self.sender = sender
        self.conn_id = conn_id
        self.credits = CreditWindow(credits) if credits is not None else None
        self.gone = False
        self.status: str | None = None
        self.bytes_sent = 0
        self.messages_sent = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._pacer = Pacer(time.monotonic())
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()  # credits granted or the client gone
        self._timer: asyncio.TimerHandle | None = None

    # -- from Mongrel2's control messages ---------------------------------

    def grant(self, credits: int) -> None:
        if self.credits is not None:
            self.credits.grant(credits)
            self._changed.set()

    def disconnect(self) -> None:
        self.gone = True
        self._changed.set()
        self._cancel_timer()

    # -- from the application's send() ------------------------------------

    async def send(self, data: bytes) -> None:
        if self.gone:
            raise ClientDisconnected(f"client of connection {self.conn_id.decode()} is gone")
        if data:
            self._buffer.append(data)
            self._buffered += len(data)
        if self._pacer.may_flush(time.monotonic(), self._buffered) and not self._lock.locked():
            await self._flush()
        elif self._timer is None and self._buffered:
            self._timer = asyncio.get_running_loop().call_later(PACE_INTERVAL, self._flush_later)
        if self._buffered >= MAX_BUFFERED:
            await self._flush()  # the app outruns Mongrel2: it waits here

    async def finish(self, tail: bytes = b"", close: bool = False) -> None:
        """Send what is buffered and ``tail``, then the close if asked."""
        if self.gone:
            return
        if tail:
            self._buffer.append(tail)
            self._buffered += len(tail)
        await self._flush()
        if close and not self.gone:
            await self._wait_token()
            self.responder.send(encode_close(self.sender, [self.conn_id]))
            self.messages_sent += 1

    # -- internals --------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flush_later(self) -> None:
        self._timer = None
        if self._buffered and not self.gone:
            asyncio.ensure_future(self._flush_quietly())

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except ClientDisconnected:
            pass

    async def _flush(self) -> None:
        if self.credits is None and not self._lock.locked() and self._pacer.take(time.monotonic()):
            self._send_all_now()  # the common case: nothing to wait for, so no lock to take
            return
        async with self._lock:
            self._cancel_timer()
            if not self._buffered:
                return
            data = b"".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            while data:
                size = len(data)
                if self.credits is not None:
                    await self._wait_credits()
                    size = self.credits.take(size)
                piece, data = data[:size], data[size:]
                await self._wait_token()
                self.responder.send(encode_response(self.sender, [self.conn_id], piece))
                self.bytes_sent += len(piece)
                self.messages_sent += 1

    def _send_all_now(self) -> None:
        """What is buffered, as one message, with the pace's token already taken."""
        self._cancel_timer()
        if not self._buffered:
            self._pacer.tokens += 1  # not used after all
            return
        data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer.clear()
        self._buffered = 0
        self.responder.send(encode_response(self.sender, [self.conn_id], data))
        self.bytes_sent += len(data)
        self.messages_sent += 1

    async def _wait_token(self) -> None:
        while not self._pacer.take(time.monotonic()):
            await asyncio.sleep(PACE_INTERVAL)

    async def _wait_credits(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CREDIT_WAIT
        while not self.credits.open and not self.gone:
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.gone = True
                break
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass
        if self.gone:
            raise ClientDisconnected(f"client of connection {self.conn_id.decode()} is gone")
