"""Frames between the per-host dispatcher and worker threads (see fleet.link).

Kept tiny and fixed-width because they cross the hop on every request.

The first frame is a kind byte, followed for requests by the index of the
Mongrel2 endpoint the message came from (one byte).

dispatcher -> thread
    [REQUEST+index, raw]    a Mongrel2 request
    [REQUEST+index, raw, credits]  the same on a flow-controlled connection,
                            with the download credits it has left
    [CONTROL+index, raw]    a Mongrel2 control message (disconnect, credits)
                            for a connection this thread holds
    [RETIRED]               retire acknowledged: nothing more will come
thread -> dispatcher
    [HELLO, ident]          first message on a link: who this thread is
    [CREDIT, count]         send me up to ``count`` more requests
    [DONE+index, conn_id]   finished that request; one more credit
    [DONE+index, conn_id, sent]  the same for a flow-controlled connection:
                            bytes sent, with a trailing "c" if it was closed
    [DONE_LAST+index, conn_id]  finished it; no credit (retiring)
    [GIVE_BACK+index, conn_id]  the thread never started that request (it is
                            stuck in the one before): give it to another; one
                            more credit, unless retiring
    [STREAM+index, conn_id] the connection this thread holds is a stream now (a
                            WebSocket): what Mongrel2 sends for it comes to this
                            thread as CONTROL until its DONE, instead of waiting
    [RETIRE]                give me nothing more
    [READY, version]        (a worker's control identity) the app is loaded
                            (version: its __version__, or empty),
                            replies can reach Mongrel2
    [FIGURES, payload]      (the control identity) what the worker has served
                            so far (msgpack; fleet.worker.tally)
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable

REQUEST = b"Q"
CONTROL = b"C"
RETIRED = b"!"

CREDIT = b"+"
DONE = b"="
DONE_LAST = b"-"
GIVE_BACK = b"<"
STREAM = b"W"
RETIRE = b"!"
READY = b"R"
FIGURES = b"F"
HELLO = b"H"

CONTROL_THREAD = b"c"


def thread_ident(pid: int, thread: int) -> bytes:
    return b"%d/%d" % (pid, thread)


def done(index: int, conn_id: bytes, sent: int | None, closed: bool, credit: bool) -> list[bytes]:
    """A thread's DONE for the request of (index, conn_id); ``credit``: it wants another
    (DONE_LAST otherwise: retiring, or the slot was given back already)."""
    frames = [tagged(DONE if credit else DONE_LAST, index), conn_id]
    if sent is not None:  # a flow-controlled connection: bytes sent, "c" if closed
        frames.append(b"%d%s" % (sent, b"c" if closed else b""))
    elif closed:  # what Mongrel2 still sends for this connection is to be dropped
        frames.append(b"c")
    return frames


def control_ident(pid: int) -> bytes:
    return b"%d/%s" % (pid, CONTROL_THREAD)


def ident_pid(ident: bytes) -> int:
    return int(ident.split(b"/", 1)[0])


_INDEX_BYTES = [bytes((i,)) for i in range(256)]


def tagged(kind: bytes, index: int) -> bytes:
    """A kind byte followed by the endpoint index: one frame instead of two."""
    return kind + _INDEX_BYTES[index]


_U32 = struct.Struct("!I")
_pack = _U32.pack
_unpack_from = _U32.unpack_from


def encode(frames: list[bytes]) -> bytes:
    parts = [b""]
    size = 0
    for frame in frames:
        parts.append(_pack(len(frame)))
        parts.append(frame)
        size += 4 + len(frame)
    parts[0] = _pack(size)
    return b"".join(parts)


def decode(data: bytes | bytearray, out: list | deque) -> int:
    """Append every complete message in data to out; returns the bytes used."""
    pos = 0
    end_of_data = len(data)
    while end_of_data - pos >= 4:
        end = pos + 4 + _unpack_from(data, pos)[0]
        if end > end_of_data:
            break
        frames = []
        i = pos + 4
        while i < end:
            length = _unpack_from(data, i)[0]
            i += 4
            frames.append(bytes(data[i:i + length]))
            i += length
        out.append(frames)
        pos = end
    return pos


class Inbox:
    """Bytes in, whole messages out; keeps an incomplete tail for the next read."""

    __slots__ = ("tail", "decode")

    def __init__(self, decode: Callable[[bytes | bytearray, list | deque], int] = decode) -> None:
        self.tail = bytearray()
        self.decode = decode  # this module's, or its compiled twin (fleet.dispatch.link passes it)

    def feed(self, data: bytes, out: list | deque) -> None:
        if self.tail:
            self.tail += data
            used = self.decode(self.tail, out)
            del self.tail[:used]
        else:
            used = self.decode(data, out)  # the usual case: no copy
            if used < len(data):
                self.tail += data[used:]
