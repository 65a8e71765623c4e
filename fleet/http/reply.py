"""Sending one ``--http`` response: straight to the client's socket, from the request thread."""

from __future__ import annotations

import socket

from fleet.wsgi.serve import ClientGone

WRITE_PIECE = 256 * 1024  # each piece of a response must leave within --http-timeout


class SocketReply:
    """The outgoing side of one HTTP request (a fleet.wsgi.serve.ReplyChannel),
    written straight to the client's socket. Every write must make progress
    within ``timeout``, so a client that stops reading frees the thread."""

    def __init__(self, sock: socket.socket, conn_id: bytes, timeout: float) -> None:
        self.sock = sock
        self.conn_id = conn_id
        self.gone = False
        self.close_requested = False
        self.bytes_sent = 0
        self.messages_sent = 0
        sock.settimeout(timeout)

    def send(self, data: bytes) -> None:
        if self.gone:
            raise ClientGone(self.conn_id)
        if not data:
            return
        view = memoryview(data)
        try:
            # In pieces: sendall's timeout covers a whole call, and a big body
            # to a slow but reading client must not count as no progress.
            for start in range(0, len(view), WRITE_PIECE):
                self.sock.sendall(view[start:start + WRITE_PIECE])
        except OSError as error:  # includes the timeout
            self.gone = True
            raise ClientGone(self.conn_id) from error
        self.bytes_sent += len(data)
        self.messages_sent += 1

    def finish(self, tail: bytes = b"", close: bool = False) -> None:
        if self.gone:
            return
        if tail:
            try:
                self.send(tail)
            except ClientGone:
                return
        self.close_requested = close
