"""Sending one response to one Mongrel2 connection within Mongrel2's limits
(fleet.mongrel2.pacing has the limits and the arithmetic; this module sends and waits)."""

from __future__ import annotations

import time
from collections.abc import Callable

from fleet.mongrel2.codec import Credits, Disconnect, Event, encode_close, encode_response
from fleet.mongrel2.connection import Publisher
from fleet.mongrel2.pacing import PACE_INTERVAL, CreditWindow, Pacer
from fleet.wsgi.serve import ClientGone

# How long a flow-controlled response waits for Mongrel2 to return credits.
CREDIT_WAIT = 60.0


ControlPoll = Callable[[float], list[Event]]


def no_control(timeout: float) -> list[Event]:
    """For a reply nobody can send control messages to (direct mode): just wait."""
    if timeout:
        time.sleep(timeout)
    return []


class Reply:
    """The outgoing side of one request: framed bytes in, paced Mongrel2 messages out
    (a fleet.wsgi.serve.ReplyChannel)."""

    def __init__(
        self,
        responder: Publisher,
        sender: bytes,
        conn_id: bytes,
        *,
        credits: int | None = None,
        poll_control: ControlPoll = no_control,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.responder = responder
        self.sender = sender
        self.conn_id = conn_id
        self.credits = CreditWindow(credits) if credits is not None else None
        self.poll_control = poll_control
        self.clock = clock
        self.gone = False
        self.status: str | None = None
        self.bytes_sent = 0
        self.messages_sent = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._pacer = Pacer(clock())

    def send(self, data: bytes) -> None:
        """Queue data; it leaves now if the pace allows, else with the next message."""
        if self.messages_sent:
            self._check_control()  # streaming: has the client gone meanwhile?
        if data:
            self._buffer.append(data)
            self._buffered += len(data)
        if self._pacer.may_flush(self.clock(), self._buffered):
            self._flush()

    def finish(self, tail: bytes = b"", close: bool = False) -> None:
        """Send what is buffered plus tail in one message, then the close if asked."""
        if self.gone:
            return
        if tail:
            self._buffer.append(tail)
            self._buffered += len(tail)
        self._flush()
        if close and not self.gone:
            self._wait_token()
            self.responder.send(encode_close(self.sender, [self.conn_id]))
            self.messages_sent += 1

    # -- internals -----------------------------------------------------

    def _check_control(self) -> None:
        for event in self.poll_control(0):
            self._apply(event)
        if self.gone:
            raise ClientGone(self.conn_id)

    def _apply(self, event: Event) -> None:
        if event.conn_id != self.conn_id:
            return
        if isinstance(event, Disconnect):
            self.gone = True
        elif isinstance(event, Credits) and self.credits is not None:
            self.credits.grant(event.credits)

    def _wait_token(self) -> None:
        while not self._pacer.take(self.clock()):
            time.sleep(PACE_INTERVAL)

    def _flush(self) -> None:
        if not self._buffered:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        while data:
            size = len(data)
            if self.credits is not None:
                self._wait_credits()
                size = self.credits.take(size)
            piece, data = data[:size], data[size:]
            self._wait_token()
            self.responder.send(encode_response(self.sender, [self.conn_id], piece))
            self.bytes_sent += len(piece)
            self.messages_sent += 1

    def _wait_credits(self) -> None:
        deadline = self.clock() + CREDIT_WAIT
        while not self.credits.open:
            remaining = deadline - self.clock()
            if remaining <= 0:
                self.gone = True
            if self.gone:
                raise ClientGone(self.conn_id)
            for event in self.poll_control(min(remaining, 1.0)):
                self._apply(event)
