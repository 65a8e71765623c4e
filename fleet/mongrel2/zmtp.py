"""ZMTP 3.0, the wire protocol under ZeroMQ, as far as a Mongrel2 handler needs it: sans-I/O.

fleet speaks to Mongrel2's PUSH and SUB sockets over plain stream sockets
instead of through libzmq: every libzmq message crosses the library's own I/O
thread on each side, a wake-up that cost a third of a handler's CPU per
request (bench/experiments/raw_floor.py measures the two side by side).
This module is the protocol only, bytes in and typed results out; the
sockets are fleet.mongrel2.connection's.

A connection (RFC 23, ZMTP 3.0; libzmq 4.3 speaks 3.1 to 3.1 peers and 3.0
to us, since we announce 3.0):

    greeting   64 bytes each way: signature FF 00*8 7F, version 3.0,
               mechanism "NULL", as-server 0, filler
    READY      a command each way, naming the socket type ("PULL" to
               Mongrel2's PUSH, "PUB" to its SUB); an ERROR command instead
               means the peer refused us
    frames     flags byte (1 MORE, 2 LONG, 4 COMMAND), size (1 byte, or 8
               bytes big-endian when LONG), body

Mongrel2 only ever sends and reads single-frame messages; a multi-frame one
from it is counted and dropped, never merged.
"""

from __future__ import annotations

import struct

SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"
GREETING_SIZE = 64
# Ours: version 3.0, the NULL mechanism (no security: Mongrel2 offers none), client side.
GREETING = SIGNATURE + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
MAJOR_VERSION_AT = 10
MECHANISM_AT, MECHANISM_END = 12, 32

MORE, LONG, COMMAND = 0x01, 0x02, 0x04
# The largest frame accepted. Mongrel2 sends bodies inline only up to its
# limits.content_length (larger ones go to a temp file), so anything near
# this is a corrupt stream, not a request.
MAX_FRAME = 1 << 30
# A handshake longer than this (greeting + READY with its properties) is not one.
MAX_HANDSHAKE = 64 * 1024

# The socket types that may face ours (ZMTP 3.0 section "Socket compatibility").
PEERS = {b"PULL": b"PUSH", b"PUB": b"SUB", b"PUSH": b"PULL", b"SUB": b"PUB"}

_LONG_SIZE = struct.Struct("!Q")
_PROPERTY_SIZE = struct.Struct("!I")


class ZmtpError(ValueError):
    """The peer does not speak ZMTP 3 as we need it; the connection must be closed."""


def command(name: bytes, data: bytes) -> bytes:
    body = bytes((len(name),)) + name + data
    if len(body) < 256:
        return bytes((COMMAND, len(body))) + body
    return bytes((COMMAND | LONG,)) + _LONG_SIZE.pack(len(body)) + body


def ready(socket_type: bytes) -> bytes:
    """Our READY command: the only property ZMTP requires is Socket-Type."""
    name = b"Socket-Type"
    return command(b"READY", bytes((len(name),)) + name + _PROPERTY_SIZE.pack(len(socket_type)) + socket_type)


def opening(socket_type: bytes) -> bytes:
    """All we send before the first message: greeting and READY, in one write."""
    return GREETING + ready(socket_type)


def frame_head(size: int) -> bytes:
    """The flags and size of a single-frame message of ``size`` bytes."""
    if size < 256:
        return bytes((0, size))
    return b"\x02" + _LONG_SIZE.pack(size)


def frame(message: bytes) -> bytes:
    """One single-frame message, ready for the wire."""
    return frame_head(len(message)) + message


def properties(data: bytes) -> dict[bytes, bytes]:
    """A READY command's metadata: name (1-byte length) and value (4-byte length) pairs."""
    found: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        size = data[pos]
        name = data[pos + 1:pos + 1 + size]
        pos += 1 + size
        if len(name) != size or size == 0 or pos + 4 > len(data):
            raise ZmtpError("READY: truncated property")
        (length,) = _PROPERTY_SIZE.unpack_from(data, pos)
        pos += 4
        if pos + length > len(data):
            raise ZmtpError("READY: truncated property value")
        found[name.lower()] = data[pos:pos + length]
        pos += length
    return found


class Handshake:
    """The peer's half of the opening: its greeting, then its READY. Feed it what
    arrives; ``done`` once both came and suit us, with ``rest`` the bytes after them."""

    def __init__(self, socket_type: bytes) -> None:
        self.expected_peer = PEERS[socket_type]
        self.buffer = bytearray()
        self.greeted = False
        self.done = False
        self.rest = b""

    def feed(self, data: bytes) -> bool:
        """True once the handshake is complete. ZmtpError if the peer is not what we need."""
        self.buffer += data
        if not self.greeted:
            if self.buffer[:1] and self.buffer[0] != 0xFF:
                raise ZmtpError("the peer is not a ZMTP 3 socket (bad signature)")
            if len(self.buffer) < GREETING_SIZE:
                return False
            self._check_greeting(bytes(self.buffer[:GREETING_SIZE]))
            del self.buffer[:GREETING_SIZE]
            self.greeted = True
        parsed = _one_frame(self.buffer)
        if parsed is None:
            if len(self.buffer) > MAX_HANDSHAKE:
                raise ZmtpError("the peer's READY is too large")
            return False
        flags, body, used = parsed
        if not flags & COMMAND:
            raise ZmtpError("the peer sent a message before READY")
        self._check_ready(body)
        self.rest = bytes(self.buffer[used:])
        self.buffer.clear()
        self.done = True
        return True

    def _check_greeting(self, greeting: bytes) -> None:
        if greeting[9] != 0x7F:
            raise ZmtpError("the peer is not a ZMTP 3 socket (bad signature)")
        if greeting[MAJOR_VERSION_AT] < 3:
            raise ZmtpError(f"the peer speaks ZMTP {greeting[MAJOR_VERSION_AT]}, not 3")
        mechanism = greeting[MECHANISM_AT:MECHANISM_END].rstrip(b"\x00")
        if mechanism != b"NULL":
            raise ZmtpError(f"the peer wants the {mechanism.decode('ascii', 'replace')} mechanism, not NULL")

    def _check_ready(self, body: bytes) -> None:
        size = body[0] if body else 0
        name = body[1:1 + size]
        if name == b"ERROR":
            reason = body[2 + size:2 + size + body[1 + size]] if len(body) > 1 + size else b""
            raise ZmtpError(f"the peer refused us: {reason.decode('utf-8', 'replace') or 'no reason'}")
        if name != b"READY":
            raise ZmtpError(f"the peer sent {name[:32]!r} instead of READY")
        peer = properties(body[1 + size:]).get(b"socket-type")
        if peer != self.expected_peer:
            raise ZmtpError(f"the peer is a {peer!r} socket, expected {self.expected_peer.decode()}")


def _one_frame(buffer: bytearray) -> tuple[int, bytes, int] | None:
    """(flags, body, bytes used) of the frame at the start of buffer, or None if incomplete."""
    if len(buffer) < 2:
        return None
    flags = buffer[0]
    if flags & LONG:
        if len(buffer) < 9:
            return None
        size = _LONG_SIZE.unpack_from(buffer, 1)[0]
        start = 9
    else:
        size = buffer[1]
        start = 2
    if size > MAX_FRAME:
        raise ZmtpError(f"a frame of {size} bytes")
    if len(buffer) < start + size:
        return None
    return flags, bytes(buffer[start:start + size]), start + size


class FrameReader:
    """Bytes of an established connection in, single-frame messages out.

    Commands (a ZMTP 3.1 peer's PING or SUBSCRIBE) are skipped; so are the
    parts of a multi-frame message, counted in ``multipart_dropped``.
    """

    __slots__ = ("tail", "in_multipart", "multipart_dropped")

    def __init__(self) -> None:
        self.tail = b""
        self.in_multipart = False
        self.multipart_dropped = 0

    def feed(self, data: bytes, out: list[bytes]) -> None:
        """Append every complete message in the stream so far to ``out``."""
        if self.tail:
            data = self.tail + data
        end = len(data)
        pos = 0
        while end - pos >= 2:
            flags = data[pos]
            if flags & LONG:
                if end - pos < 9:
                    break
                size = _LONG_SIZE.unpack_from(data, pos + 1)[0]
                if size > MAX_FRAME:
                    raise ZmtpError(f"a frame of {size} bytes")
                start = pos + 9
            else:
                size = data[pos + 1]
                start = pos + 2
            stop = start + size
            if stop > end:
                break
            pos = stop
            if flags & COMMAND:
                continue
            if flags & MORE or self.in_multipart:
                if not self.in_multipart:
                    self.multipart_dropped += 1
                self.in_multipart = bool(flags & MORE)
                continue
            out.append(data[start:stop])
        self.tail = data[pos:] if pos < end else b""
