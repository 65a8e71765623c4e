"""Sending one ``--http`` response: straight to the client's socket, from the request thread."""

from __future__ import annotations

import socket

from fleet.wsgi.serve import ClientGone

WRITE_PIECE = 256 * 1024  # each piece of a response must leave within --http-timeout


class SocketReply:
    """The outgoing side of one HTTP request (a fleet.wsgi.serve.ReplyChannel),
    written straight to the client's socket. Every write must make progress
    within ``timeout``, so a client that stops reading frees the thread.

    The socket comes non-blocking from the I/O thread and a response usually
    fits its send buffer: it is written at once, and only a write that does
    not fit waits (the socket is then given the timeout, and ``release()``
    makes it non-blocking again)."""

    def __init__(self, sock: socket.socket, conn_id: bytes, timeout: float) -> None:
        self.sock = sock
        self.conn_id = conn_id
        self.timeout = timeout
        self.gone = False
        self.status: str | None = None
        self.close_requested = False
        self.bytes_sent = 0
        self.messages_sent = 0
        self._waiting = False  # the socket has the timeout set (blocking mode)

    def send(self, data: bytes) -> None:
        if self.gone:
            raise ClientGone(self.conn_id)
        if not data:
            return
        view = memoryview(data)
        try:
            sent = 0 if self._waiting else self._send_now(view)
            if sent < len(view):
                if not self._waiting:
                    self.sock.settimeout(self.timeout)
                    self._waiting = True
                # In pieces: sendall's timeout covers a whole call, and a big body
                # to a slow but reading client must not count as no progress.
                for start in range(sent, len(view), WRITE_PIECE):
                    self.sock.sendall(view[start:start + WRITE_PIECE])
        except OSError as error:  # includes the timeout
            self.gone = True
            raise ClientGone(self.conn_id) from error
        self.bytes_sent += len(data)
        self.messages_sent += 1

    def _send_now(self, view: memoryview) -> int:
        try:
            return self.sock.send(view)
        except (BlockingIOError, InterruptedError):
            return 0

    def finish(self, tail: bytes = b"", close: bool = False) -> None:
        if self.gone:
            return
        if tail:
            try:
                self.send(tail)
            except ClientGone:
                return
        self.close_requested = close

    def release(self) -> None:
        """The response is over: the socket goes back to the I/O thread, non-blocking."""
        if self._waiting:
            self._waiting = False
            try:
                self.sock.setblocking(False)
            except OSError:
                self.gone = True
