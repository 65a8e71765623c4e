"""``--http``: plain HTTP/1.1 sockets served by a worker's own request threads.

The supervisor binds the listening sockets once and every worker inherits
them, so a reload never refuses a connection: old workers stop accepting,
new ones already do. In each worker one I/O thread owns every idle
connection: it accepts, reads and parses (fleet.http.parser) without ever
blocking, enforces the time limits, and hands a complete request to the
request threads through a HandOff (which wakes one idle thread). A slow
client therefore costs a file descriptor, never a thread. The request
thread that takes a request owns its connection until the response is
written, then gives it back (or closes it). One request at a time per
connection, so pipelined requests are answered in order.

A worker with one thread and no Mongrel2 has nobody to hand off to that
could serve sooner: there the I/O thread serves each request itself
(``inline``), and the two thread wake-ups of a hand-off are saved.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fleet import native
from fleet.config import HttpAddress
from fleet.exitcodes import CRASHED
from fleet.http import simple
from fleet.http.parser import CONTINUE, NeedData, PeerClosed, Rejected, RequestReader, RequestReady, SendContinue
from fleet.wsgi.response import error_response

log = logging.getLogger("fleet.http")

# Every request is tried first as a simple one: in C when built (fleet/http/_simple.c), else the reference.
take_simple = native.twin("fleet.http._simple", "take_simple", simple.take_simple)

LISTEN_BACKLOG = 1024
# Request bodies larger than this go to a temporary file instead of memory.
SPOOL_LIMIT = 1 << 20
RECV_SIZE = 64 * 1024
ACCEPT_BATCH = 16  # connections accepted per wake-up, so reading is not starved
# ... when the I/O thread serves requests itself: one, so that a burst of
# connections spreads over the workers (each takes one, serves, comes back)
# instead of all landing on the first worker awake.
INLINE_ACCEPT_BATCH = 1
TICK = 0.25  # the I/O thread looks at deadlines and the retire flag this often
# After the last response, how long unread client bytes are drained before the
# close: closing with unread data sends a reset that can destroy the response
# on its way (what Apache and nginx call a lingering close).
LINGER = 2.0
# A retiring worker keeps an idle keep-alive connection this long, so that a
# request already on its way is answered (with Connection: close) instead of
# meeting a closed socket; then it closes.
RETIRE_GRACE = 1.0
# Out of file descriptors: stop accepting this long (the backlog waits, or
# another worker takes the connections) instead of spinning on accept().
ACCEPT_PAUSE = 0.5


def listen(address: HttpAddress) -> socket.socket:
    """Bind and listen on one --http address (done once, in the supervisor)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


@dataclass(slots=True)
class Client:
    """One accepted connection and where its current request stands."""

    sock: socket.socket
    reader: RequestReader
    deadline: float = 0.0
    request_deadline: float | None = None  # set when the first byte of a request arrives
    lingering: bool = False  # our side is shut: reading only to discard, until EOF or deadline


@dataclass(slots=True)
class Exchange:
    """A complete request, handed to a request thread together with its connection."""

    client: Client
    ready: RequestReady


class Waiter:
    """A request thread's own wake-up: an eventfd it polls beside its other sockets."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self.fd

    def clear(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


class HandOff:
    """Exchanges waiting for a request thread, and the threads waiting for one.

    A put() wakes exactly one idle thread (its Waiter), not all of them: with
    a shared wake-up every idle thread would run for each request, only to
    find it taken, and fight over the GIL.
    """

    def __init__(self) -> None:
        self.items: deque[Exchange] = deque()
        self._idle: list[Waiter] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items)

    def put(self, exchange: Exchange) -> None:
        with self._lock:
            self.items.append(exchange)
            waiter = self._idle.pop() if self._idle else None
        if waiter is not None:
            os.eventfd_write(waiter.fd, 1)

    def take_or_wait(self, waiter: Waiter) -> Exchange | None:
        """An exchange now, or None: then ``waiter`` is woken by the next put()."""
        with self._lock:
            if self.items:
                return self.items.popleft()
            self._idle.append(waiter)
        return None

    def stop_waiting(self, waiter: Waiter) -> Exchange | None:
        """After the thread's poll returned (for whatever reason): an exchange if one is there."""
        waiter.clear()
        with self._lock:
            if waiter in self._idle:
                self._idle.remove(waiter)
            return self.items.popleft() if self.items else None


@dataclass
class HttpLimits:
    keepalive: float  # idle seconds between requests; 0 closes after each response
    timeout: float  # seconds for a request to arrive whole, and for each write
    max_body: int


@dataclass
class _Returned:
    client: Client
    keep: bool


@dataclass
class HttpFront:
    """One worker's HTTP side: the I/O thread and the hand-off to request threads."""

    listeners: list[socket.socket]
    limits: HttpLimits
    threads: int
    # Serves an exchange on the I/O thread itself and says whether to keep the
    # connection (the worker's only serving thread); None: hand off to request threads.
    inline: Callable[[Exchange], bool] | None = None
    handoff: HandOff = field(default_factory=HandOff)
    retiring: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._returned: deque[_Returned] = deque()
        self._clients: dict[int, Client] = {}  # fd -> client, while the I/O thread owns it
        self._handed = 0  # clients a request thread owns
        self._lock = threading.Lock()
        self._idle_threads = self.threads
        self._accepting = False
        self._accept_paused_until = 0.0
        self._next_id = 0
        self._next_sweep = 0.0
        for listener in self.listeners:
            listener.setblocking(False)
        self.thread = threading.Thread(target=self._run, name="http-io", daemon=True)

    # -- called from other threads ------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def retire(self) -> None:
        """Stop accepting; finish what was received, then close every connection."""
        self.retiring.set()
        self.wake()

    def wake(self) -> None:
        os.eventfd_write(self._wake, 1)

    def thread_busy(self) -> None:
        with self._lock:
            self._idle_threads -= 1

    def thread_idle(self) -> None:
        with self._lock:
            self._idle_threads += 1
        if not self._accepting:
            self.wake()  # there may be room to accept again

    def give_back(self, client: Client, keep: bool) -> None:
        """A request thread is done with ``client``; keep it open for the next request or not."""
        self._returned.append(_Returned(client, keep))
        self.wake()

    # -- the I/O thread --------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._done():
                self._loop_once()
        except Exception:
            log.exception("the HTTP I/O thread crashed; the worker exits so it is replaced")
            os._exit(CRASHED)
        finally:
            self._close_everything()
            self.finished.set()  # request threads look at it at least every TICK

    def _done(self) -> bool:
        return (self.retiring.is_set() and not self._clients and not self._handed
                and not self._returned and not len(self.handoff))

    def _loop_once(self) -> None:
        self._update_accepting()
        for fd, _events in self._epoll.poll(TICK):
            if fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
            elif fd in self._clients:
                self._read(self._clients[fd])
            else:
                self._accept(fd)
        self._take_back_returned()
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + TICK
            self._expire(now)
        if self.retiring.is_set():
            self._shorten_idle(now)

    def _update_accepting(self) -> None:
        """Accept only while a request thread could take the request: a busy
        worker leaves new connections in the shared backlog for an idle one."""
        want = (not self.retiring.is_set() and self._idle_threads > len(self.handoff)
                and time.monotonic() >= self._accept_paused_until)
        if want != self._accepting:
            for listener in self.listeners:
                if want:
                    self._epoll.register(listener.fileno(), select.EPOLLIN)
                else:
                    self._epoll.unregister(listener.fileno())
            self._accepting = want
        if self.retiring.is_set() and self.listeners:
            for listener in self.listeners:
                listener.close()  # the other workers and the supervisor keep it open
            self.listeners = []

    def _accept(self, fd: int) -> None:
        listener = next((s for s in self.listeners if s.fileno() == fd), None)
        if listener is None:
            return
        for _ in range(ACCEPT_BATCH if self.inline is None else INLINE_ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker took it
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not self._accept_paused_until:
                        log.error("cannot accept HTTP connections (%d open): %s; pausing accept "
                                  "while it lasts", len(self._clients) + self._handed, error)
                    self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                    return
                continue  # e.g. ECONNABORTED: that client is gone already
            self._accept_paused_until = 0.0
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._next_id += 1
            reader = RequestReader(b"http-%d-%d" % (os.getpid(), self._next_id), remote_addr_of(address),
                                   max_body=self.limits.max_body, body_store=spooled_body, simple=take_simple)
            self._own(Client(sock, reader, deadline=time.monotonic() + self.limits.timeout))

    def _own(self, client: Client) -> None:
        self._clients[client.sock.fileno()] = client
        self._epoll.register(client.sock.fileno(), select.EPOLLIN)

    def _disown(self, client: Client) -> None:
        fd = client.sock.fileno()
        if self._clients.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def _read(self, client: Client) -> bool:
        """Read and act on what the client sent; False if nothing was there."""
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""  # reset by the peer: same as a close here
        if client.lingering:
            if not data:
                self._drop(client)
            return True
        client.reader.feed(data)
        self._pump(client)
        return True

    def _pump(self, client: Client) -> None:
        """Act on everything the client's bytes make complete."""
        while True:
            event = client.reader.next_event()
            if isinstance(event, NeedData):
                now = time.monotonic()
                if client.reader.mid_request:
                    if client.request_deadline is None:
                        client.request_deadline = now + self.limits.timeout
                    client.deadline = client.request_deadline
                return
            if isinstance(event, SendContinue):
                if not self._send_small(client, CONTINUE):
                    self._close(client)
                    return
                continue
            if isinstance(event, RequestReady):
                if self.inline is None:
                    self._disown(client)
                    self._handed += 1
                    self.handoff.put(Exchange(client, event))
                    return
                if not self.inline(Exchange(client, event)) or self.limits.keepalive <= 0:
                    self._close(client)
                    return
                self._await_next(client)
                continue  # the client may have pipelined the next request already
            if isinstance(event, Rejected):
                log.warning("refused an HTTP request from %s with %d: %s",
                            client.reader.remote_addr, event.status, event.reason)
                self._send_small(client, error_response(event.status))
                self._close(client)
                return
            if isinstance(event, PeerClosed):
                self._drop(client)
                return

    def _take_back_returned(self) -> None:
        while self._returned:
            returned = self._returned.popleft()
            self._handed -= 1
            client = returned.client
            if not returned.keep or self.limits.keepalive <= 0:
                self._close(client)
                continue
            self._await_next(client)
            self._own(client)
            self._pump(client)  # the client may have pipelined the next request already

    def _await_next(self, client: Client) -> None:
        """A response is out and the connection stays: wait up to keep-alive for the next request."""
        client.reader.next_request()
        client.request_deadline = None
        client.deadline = time.monotonic() + self.limits.keepalive

    def _expire(self, now: float) -> None:
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            if self.inline is not None and not client.lingering and self._clients.get(client.sock.fileno()) is client \
                    and self._read(client):
                continue  # its bytes came while this thread was serving another: it was not silent
            if client.lingering:
                self._drop(client)
            elif client.reader.mid_request:
                log.info("HTTP client %s too slow: no whole request in %.0f s",
                         client.reader.remote_addr, self.limits.timeout)
                self._send_small(client, error_response(408))
            self._close(client)

    def _shorten_idle(self, now: float) -> None:
        last = now + RETIRE_GRACE
        for client in self._clients.values():
            if not client.reader.mid_request and not client.lingering and client.deadline > last:
                client.deadline = last

    def _send_small(self, client: Client, data: bytes) -> bool:
        """A short answer from the I/O thread, which never waits on a client."""
        try:
            return client.sock.send(data) == len(data)
        except OSError:
            return False

    def _close(self, client: Client) -> None:
        """Shut our side, then drain what the client still sends for up to LINGER."""
        client.reader.close()
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(client)
            return
        client.lingering = True
        client.deadline = time.monotonic() + LINGER
        if client.sock.fileno() not in self._clients:
            self._own(client)

    def _drop(self, client: Client) -> None:
        self._disown(client)
        client.reader.close()
        client.sock.close()

    def _close_everything(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        for listener in self.listeners:
            listener.close()
        self._epoll.close()


def spooled_body() -> tempfile.SpooledTemporaryFile:
    """Where a request body is written: memory up to SPOOL_LIMIT, a temporary file past it."""
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_LIMIT)


def remote_addr_of(address) -> str:
    """The client's address as REMOTE_ADDR (empty for a Unix socket peer)."""
    if isinstance(address, tuple) and address:
        return str(address[0])
    return ""
