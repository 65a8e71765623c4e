"""Stream sockets to Mongrel2's ZeroMQ endpoints, spoken in raw ZMTP (fleet.mongrel2.zmtp).

``Publisher`` stands for a ZeroMQ PUB connected to Mongrel2's SUB (replies):
one per thread and endpoint, written with one blocking ``sendall`` per
message, so a reply leaves in the calling thread with no hand-over to an I/O
thread. ``Puller`` stands for a PULL connected to Mongrel2's PUSH (requests):
non-blocking from the connect on, driven by its owner's poll loop.

Both reconnect the way libzmq does: after a failure, no attempt for
RECONNECT_INTERVAL. A reply that cannot be sent is dropped with one log line
(libzmq's PUB drops it silently): its client belonged to a Mongrel2 that is
gone, and a new Mongrel2 knows nothing of it. A Mongrel2 restart is noticed
before a reply is sent to the old connection (see ``Publisher.send``).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import time

from fleet.config import tcp_host_port
from fleet.mongrel2.zmtp import FrameReader, Handshake, ZmtpError, frame_head, opening

log = logging.getLogger("fleet.mongrel2")

# libzmq's default ZMQ_RECONNECT_IVL.
RECONNECT_INTERVAL = 0.1
# How long a connect plus handshake may take.
CONNECT_TIMEOUT = 2.0
# A reply that cannot be written for this long (Mongrel2 stopped reading) breaks the connection.
SEND_TIMEOUT = 60.0
# A publisher looks for Mongrel2's FIN this often before sending: a restarted
# Mongrel2 needs far longer than this to start and route a request to us, so
# no reply meant for the new one is written to the old connection.
LIVENESS_INTERVAL = 0.01
RECV_SIZE = 1 << 16


class ConnectFailed(OSError):
    """No ZMTP connection to that endpoint now; the message says why in one line."""


def open_stream(spec: str, timeout: float) -> socket.socket:
    """A connected stream socket for a tcp:// or ipc:// ZeroMQ endpoint."""
    address = tcp_host_port(spec)
    try:
        if address is not None:
            sock = socket.create_connection(address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        if spec.startswith("ipc://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(spec.removeprefix("ipc://"))
            except OSError:
                sock.close()
                raise
            return sock
    except OSError as error:
        raise ConnectFailed(f"cannot connect to {spec}: {error.strerror or error}") from None
    raise ConnectFailed(f"{spec}: not a tcp:// or ipc:// endpoint")


def connect(spec: str, socket_type: bytes, timeout: float = CONNECT_TIMEOUT) -> tuple[socket.socket, bytes]:
    """Connect and complete the ZMTP handshake; (socket in blocking mode, bytes already read after it)."""
    sock = open_stream(spec, timeout)
    deadline = time.monotonic() + timeout
    handshake = Handshake(socket_type)
    try:
        sock.sendall(opening(socket_type))
        while not handshake.done:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data = sock.recv(RECV_SIZE)
            if not data:
                raise ConnectFailed(f"{spec} closed the connection during the ZMTP handshake")
            handshake.feed(data)
    except ZmtpError as error:
        sock.close()
        raise ConnectFailed(f"{spec}: {error}") from None
    except OSError as error:
        sock.close()
        if isinstance(error, ConnectFailed):
            raise
        raise ConnectFailed(f"{spec}: ZMTP handshake failed: {error.strerror or error}") from None
    sock.settimeout(None)
    return sock, handshake.rest


class Publisher:
    """Replies to one Mongrel2 (its recv_spec). One thread's own: not thread-safe."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.sock: socket.socket | None = None
        self.retry_at = 0.0
        self.checked_at = 0.0
        self.dropped = 0  # replies that found no connection
        self._warned = False

    def connect(self) -> bool:
        """Connect now unless a recent attempt failed; True if connected."""
        if self.sock is not None:
            return True
        now = time.monotonic()
        if now < self.retry_at:
            return False
        try:
            sock, _ = connect(self.spec, b"PUB")
        except ConnectFailed as error:
            self.retry_at = time.monotonic() + RECONNECT_INTERVAL
            if not self._warned:
                log.warning("%s; replies are dropped until it answers", error)
                self._warned = True
            return False
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(SEND_TIMEOUT))
        if self._warned:
            log.info("connected to Mongrel2 at %s again", self.spec)
            self._warned = False
        self.sock = sock
        self.checked_at = now
        return True

    def wait_connected(self, timeout: float) -> bool:
        """Try to connect for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.connect():
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(RECONNECT_INTERVAL, max(0.0, deadline - time.monotonic())))
        return True

    def send(self, message: bytes) -> bool:
        """Send one message; False (and the message dropped) if there is no connection."""
        if len(message) < 65536:
            return self.send_framed(frame_head(len(message)) + message)
        return self.send_framed(frame_head(len(message)), message)  # no copy of a large body

    def send_framed(self, *parts: bytes | bytearray) -> bool:
        """Send bytes already framed as ZMTP messages (fleet.mongrel2.zmtp.frame_head), in order."""
        now = time.monotonic()
        if self.sock is not None and now - self.checked_at >= LIVENESS_INTERVAL:
            self.checked_at = now
            self._check_alive()
        if self.sock is None and not self.connect():
            self.dropped += 1
            return False
        try:
            for part in parts:
                self.sock.sendall(part)
            return True
        except OSError as error:
            log.warning("lost the connection to Mongrel2 at %s (%s): a reply was dropped",
                        self.spec, error.strerror or error)
            self._drop()
            self.dropped += 1
            return False

    def _check_alive(self) -> None:
        """Read what Mongrel2 sent (its subscription, or EOF when it is gone)."""
        try:
            while True:
                data = self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
                if not data:
                    log.info("Mongrel2 at %s closed the reply connection; reconnecting", self.spec)
                    self.close()  # no reconnect delay: it went away, we did not fail to reach it
                    return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop()

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.retry_at = time.monotonic() + RECONNECT_INTERVAL

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Puller:
    """Requests from one Mongrel2 (its send_spec), for an owner's poll loop: never blocks.

    The owner polls ``fileno()`` for ``events()`` (both change as the
    connection goes from connecting to open, and after a reconnect) and calls
    ``ready()`` when the poll says so. The connect and the handshake are
    non-blocking too, so a Mongrel2 that does not answer holds up no other.
    """

    CLOSED, CONNECTING, HANDSHAKE, OPEN = "closed", "connecting", "handshake", "open"

    def __init__(self, spec: str, *, hand_over: bool = False) -> None:
        """``hand_over``: once open, the owner takes the socket (``take_socket``)
        and reads it itself, so the bytes after the handshake are kept for it."""
        self.spec = spec
        self.hand_over = hand_over
        self.rest = b""
        self.sock: socket.socket | None = None
        self.state = self.CLOSED
        self.reader = FrameReader()
        self.handshake: Handshake | None = None
        self.retry_at = 0.0
        self.deadline = 0.0
        self.letting_go = False  # we half-closed it: its EOF is expected
        self._warned = False

    def connect(self, now: float) -> bool:
        """Start connecting if closed and due; True if there is a socket to poll."""
        if self.sock is not None:
            return True
        if now < self.retry_at:
            return False
        address = tcp_host_port(self.spec)
        try:
            if address is not None:
                family, _, _, _, sockaddr = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sockaddr = self.spec.removeprefix("ipc://")
            sock.setblocking(False)
            code = sock.connect_ex(sockaddr)
        except OSError as error:
            self._failed(f"cannot connect to {self.spec}: {error.strerror or error}")
            return False
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            self._failed(f"cannot connect to {self.spec}: {os.strerror(code)}")
            return False
        self.sock = sock
        self.state = self.CONNECTING
        self.deadline = now + CONNECT_TIMEOUT
        return True

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    @property
    def writable_wanted(self) -> bool:
        """Poll for writability (the connect is in progress) rather than readability."""
        return self.state == self.CONNECTING

    def ready(self, out: list[bytes], now: float) -> bool:
        """The poll said this socket is ready: advance, and append what arrived to ``out``.
        False if the connection failed or ended (the owner unregisters the fd it had)."""
        if self.state == self.OPEN:
            return self._read(out)
        if self.state == self.CONNECTING:
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                return self._lost(f"cannot connect to {self.spec}: {os.strerror(code)}")
            try:
                self.sock.send(opening(b"PULL"))  # 100 bytes into an empty socket buffer
            except OSError as error:
                return self._lost(f"cannot connect to {self.spec}: {error.strerror or error}")
            self.state = self.HANDSHAKE
            self.handshake = Handshake(b"PULL")
            return True
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as error:
            return self._lost(f"{self.spec}: ZMTP handshake failed: {error.strerror or error}")
        if not data:
            return self._lost(f"{self.spec} closed the connection during the ZMTP handshake")
        try:
            if not self.handshake.feed(data):
                return True
        except ZmtpError as error:
            return self._lost(f"{self.spec}: {error}")
        self.state = self.OPEN
        if self._warned:
            log.info("connected to Mongrel2 at %s", self.spec)
            self._warned = False
        self.reader = FrameReader()
        if self.hand_over:
            self.rest = self.handshake.rest
        else:
            self.reader.feed(self.handshake.rest, out)
        self.handshake = None
        return True

    def take_socket(self) -> tuple[int, bytes]:
        """An open connection's fd, now the caller's to read and close, and the
        bytes that came after the handshake. The puller counts as closed after."""
        fd = self.sock.detach()
        rest, self.rest = self.rest, b""
        self.sock = None
        self.state = self.CLOSED
        return fd, rest

    def lost(self) -> None:
        """The owner of a taken socket saw it end: reconnect after the interval."""
        self.retry_at = time.monotonic() + RECONNECT_INTERVAL
        if not self.letting_go:
            log.warning("Mongrel2 at %s closed the connection; reconnecting", self.spec)

    def check_timeout(self, now: float) -> bool:
        """False (and closed) if a connect or handshake has taken too long."""
        if self.state in (self.CONNECTING, self.HANDSHAKE) and now >= self.deadline:
            return self._lost(f"{self.spec}: no ZMTP handshake within {CONNECT_TIMEOUT:.0f} s")
        return True

    def _read(self, out: list[bytes]) -> bool:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            return self._lost(f"Mongrel2 at {self.spec} closed the connection")
        dropped = self.reader.multipart_dropped
        try:
            self.reader.feed(data, out)
        except ZmtpError as error:
            return self._lost(f"Mongrel2 at {self.spec} sent a broken ZMTP stream ({error})")
        if self.reader.multipart_dropped != dropped:
            log.warning("dropped a multi-part message from Mongrel2 at %s (it sends single frames)", self.spec)
        return True

    def shut_down_sending(self) -> None:
        """Half-close: Mongrel2 reads EOF and stops giving us work; what it wrote still arrives."""
        if self.sock is not None and self.state == self.OPEN:
            self.letting_go = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _lost(self, why: str) -> bool:
        was_open = self.state == self.OPEN
        self.close()
        self.retry_at = time.monotonic() + RECONNECT_INTERVAL
        if self.letting_go:
            log.debug("%s (we asked it to)", why)
        elif was_open:
            log.warning("%s; reconnecting", why)
        elif not self._warned:
            log.warning("%s; waiting for it", why)
            self._warned = True
        return False

    def _failed(self, why: str) -> None:
        self.retry_at = time.monotonic() + RECONNECT_INTERVAL
        if not self._warned:
            log.warning("%s; waiting for it", why)
            self._warned = True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.state = self.CLOSED
        self.handshake = None


class PullerSet:
    """Pullers kept registered in a poll or epoll object (``select.poll`` and
    ``select.epoll`` share the POLLIN/POLLOUT values and the method names), as
    their sockets come and go with reconnects."""

    def __init__(self, pullers: list[Puller], poller) -> None:
        self.pullers = pullers
        self.poller = poller
        self.registered: dict[int, tuple[int, int]] = {}  # fd -> (puller index, event mask)
        self.fds: list[int] = [-1] * len(pullers)

    def refresh(self, now: float) -> bool:
        """Connect what is due, give up slow handshakes, keep the poller in step.
        True if every puller is open (else the caller should come back soon)."""
        all_open = True
        for index, puller in enumerate(self.pullers):
            if puller.sock is not None and not puller.check_timeout(now):
                self._forget(index)
            if puller.sock is None:
                self._forget(index)
                if not puller.connect(now):
                    all_open = False
                    continue
            all_open = all_open and puller.state == Puller.OPEN
            fd = puller.fileno()
            mask = select.POLLOUT if puller.writable_wanted else select.POLLIN
            if self.fds[index] != fd:
                self._forget(index)
                self.poller.register(fd, mask)
            elif self.registered[fd][1] != mask:
                self.poller.modify(fd, mask)
            self.fds[index] = fd
            self.registered[fd] = (index, mask)
        return all_open

    def index(self, fd: int) -> int | None:
        entry = self.registered.get(fd)
        return entry[0] if entry is not None else None

    def ready(self, index: int, out: list[bytes], now: float) -> bool:
        """Let puller ``index`` act on its poll event; False if its connection is gone."""
        if self.pullers[index].ready(out, now):
            return True
        self._forget(index)
        return False

    def _forget(self, index: int) -> None:
        fd = self.fds[index]
        if fd < 0:
            return
        self.fds[index] = -1
        self.registered.pop(fd, None)
        try:
            self.poller.unregister(fd)
        except (OSError, KeyError, ValueError):
            pass  # closed already: the kernel dropped it from the poll set

    def close(self) -> None:
        for index, puller in enumerate(self.pullers):
            self._forget(index)
            puller.close()


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))
