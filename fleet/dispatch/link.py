"""The dispatcher <-> worker thread hop: length-prefixed frames on Unix sockets.

This hop used to be ZeroMQ (ROUTER in the dispatcher, a DEALER per thread).
Each ZeroMQ message between processes wakes the sender's I/O thread, the
receiver's I/O thread and then the receiving thread, and the broker sends two
messages per request (REQUEST, DONE). Measured alone (bench notes in the
commit): 29 + 28 µs of CPU per request (dispatcher + worker) over ipc://
ROUTER/DEALER, 9 + 9 µs over a Unix stream socket, where the only wake-up is
the peer's own thread. Mongrel2 still speaks ZeroMQ; only this hop changed.

A message is a list of frames (bytes), encoded by fleet.dispatch.frames.

Each thread connects once and first sends [HELLO, ident]. The dispatcher
multiplexes every connection with one epoll, whose fd the supervisor's
zmq.Poller watches next to the Mongrel2 sockets; the worker threads block in
recv with SO_RCVTIMEO. A closed connection is how the dispatcher learns that
a thread vanished (ZeroMQ needed ROUTER_MANDATORY for that, and only noticed
on the next send).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
from collections import deque

from fleet import native
from fleet.dispatch import frames as reference_frames
from fleet.dispatch.frames import HELLO, Inbox

# Every request's frames cross here: in C when built (fleet/dispatch/_frames.c), else the reference.
encode = native.twin("fleet.dispatch._frames", "encode", reference_frames.encode)
decode = native.twin("fleet.dispatch._frames", "decode", reference_frames.decode)

log = logging.getLogger("fleet.link")

# One recv takes up to this much: many messages at once when a peer is ahead.
# Below glibc's mmap threshold (128 KiB) on purpose: a 256 KiB buffer made every
# read an mmap + munmap (and TLB-shootdown IPIs), a quarter of the master's CPU.
RECV_SIZE = 1 << 16


class LinkClosed(Exception):
    """The dispatcher closed the link (it is shutting down or gone)."""


class ThreadLink:
    """A worker thread's end: blocking, one socket per thread. The worker's main thread
    may use it too, for a thread stuck in a request (its stale DONEs, what it gives back):
    reads are the caller's to serialize (fleet.worker.sources holds a lock around them);
    writes take a lock here, since two writers must not interleave a message."""

    def __init__(self, path: str, ident: bytes, timeout: float) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.connect(path)
        seconds = int(timeout)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                               struct.pack("ll", seconds, int((timeout - seconds) * 1e6)))
        self.inbox = Inbox(decode)
        self.messages: deque[list[bytes]] = deque()
        self._writing = threading.Lock()
        self.send([HELLO, ident])

    def send(self, frames: list[bytes]) -> None:
        with self._writing:
            self.socket.sendall(encode(frames))

    def send_encoded(self, data: bytes) -> None:
        """Send messages already encoded (fleet.dispatch.frames.encode), in one write."""
        with self._writing:
            self.socket.sendall(data)

    def read_arrived(self) -> None:
        """Buffer every message that has arrived, without waiting for more."""
        while self._read(socket.MSG_DONTWAIT):
            pass

    def receive(self) -> list[bytes] | None:
        """The next message, or None after the timeout with nothing."""
        if not self.messages and not self._read(0):
            return None
        return self.messages.popleft() if self.messages else None

    def poll(self, timeout: float) -> bool:
        """Wait up to timeout (seconds) for a message; it is then buffered."""
        if self.messages:
            return True
        if timeout > 0 and not select.select([self.socket], [], [], timeout)[0]:
            return False
        return self._read(socket.MSG_DONTWAIT) and bool(self.messages)

    def take(self) -> list[bytes] | None:
        """A buffered message, without reading the socket."""
        return self.messages.popleft() if self.messages else None

    def _read(self, flags: int) -> bool:
        try:
            data = self.socket.recv(RECV_SIZE, flags)
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionResetError:
            data = b""  # the dispatcher closed with our message unread
        if not data:
            raise LinkClosed()
        self.inbox.feed(data, self.messages)
        return True

    def close(self) -> None:
        self.socket.close()


class _Conn:
    __slots__ = ("socket", "fd", "ident", "inbox", "out", "waiting")

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.fd = sock.fileno()
        self.ident: bytes | None = None
        self.inbox = Inbox(decode)
        self.out = bytearray()
        self.waiting = False  # a full socket: the rest leaves on EPOLLOUT


class LinkServer:
    """The dispatcher's end: every thread's connection behind one epoll, never blocking."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(512)
        self.listener.setblocking(False)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.conns: dict[int, _Conn] = {}
        self.by_ident: dict[bytes, _Conn] = {}
        self.dirty: list[_Conn] = []  # connections with something queued by send()

    def fileno(self) -> int:
        """Readable whenever a connection has something for us (for zmq.Poller)."""
        return self.epoll.fileno()

    def receive(self, out: list[tuple[bytes, list[bytes] | None]]) -> None:
        """Append (ident, frames) for every message waiting, (ident, None) for a
        thread whose connection closed. Never blocks."""
        listener_fd = self.listener.fileno()
        for fd, events in self.epoll.poll(0):
            if fd == listener_fd:
                self._accept()
                continue
            conn = self.conns.get(fd)
            if conn is None:
                continue
            if events & select.EPOLLOUT:
                self._flush(conn)
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self._read(conn, out)

    def send(self, ident: bytes, frames: list[bytes]) -> bool:
        """Queue a message for a thread; False if it has no connection (any more).

        It leaves with flush(): what a pass of the dispatcher has for one
        thread goes in one write, so the thread wakes once for all of it."""
        conn = self.by_ident.get(ident)
        if conn is None:
            return False
        if not conn.out:
            self.dirty.append(conn)
        conn.out += encode(frames)
        return True

    def flush(self) -> None:
        """Write what send() queued; a full socket keeps the rest for EPOLLOUT."""
        dirty = self.dirty
        for conn in dirty:
            if self.conns.get(conn.fd) is conn and not conn.waiting:
                self._flush(conn)
        dirty.clear()

    def close(self) -> None:
        for conn in list(self.conns.values()):
            conn.socket.close()
        self.conns.clear()
        self.by_ident.clear()
        self.listener.close()
        self.epoll.close()

    # -- internals -----------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            conn = _Conn(sock)
            self.conns[conn.fd] = conn
            self.epoll.register(conn.fd, select.EPOLLIN)

    def _read(self, conn: _Conn, out: list) -> None:
        try:
            data = conn.socket.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            if conn.ident is not None:
                out.append((conn.ident, None))
            return
        messages: list[list[bytes]] = []
        conn.inbox.feed(data, messages)
        ident = conn.ident
        for frames in messages:
            if ident is None:
                if frames[0] == HELLO and len(frames) == 2:
                    ident = conn.ident = frames[1]
                    old = self.by_ident.get(ident)
                    if old is not None and old is not conn:
                        self._drop(old)
                    self.by_ident[ident] = conn
                else:
                    log.warning("dropped a link that did not introduce itself")
                    self._drop(conn)
                    return
                continue
            out.append((ident, frames))

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.socket.send(conn.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(conn)
            return
        del conn.out[:sent]
        if conn.out and not conn.waiting:
            conn.waiting = True
            self.epoll.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)
        elif not conn.out and conn.waiting:
            conn.waiting = False
            self.epoll.modify(conn.fd, select.EPOLLIN)

    def _drop(self, conn: _Conn) -> None:
        if self.conns.pop(conn.fd, None) is None:
            return
        try:
            self.epoll.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        if conn.ident is not None and self.by_ident.get(conn.ident) is conn:
            del self.by_ident[conn.ident]
        conn.socket.close()
