"""What one pass of an ASGI worker's event loop sends, in one write per peer.

Under load one pass of the loop finishes many requests. Writing each reply
to Mongrel2 and each DONE to the dispatcher at once costs a syscall and a
wake-up of the peer per request (Mongrel2's wake-ups were the largest cost
on a busy host; fleet.worker.outbox does the same for the WSGI threads). So
they are kept until the loop has run everything ready, then leave together:
the replies first, since a DONE tells the dispatcher that its reply is out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fleet.mongrel2.connection import Publisher
from fleet.mongrel2.zmtp import frame_head

# A message this big is not copied into the batch: what waits leaves, then it does.
BATCH_BYTES = 64 * 1024


class Into:
    """What a reply sends through in place of a Publisher: the outbox's ``reply(index, message)``."""

    __slots__ = ("put", "index")

    def __init__(self, put: Callable[[int, bytes], bool], index: int) -> None:
        self.put = put
        self.index = index

    def send(self, message: bytes) -> bool:
        return self.put(self.index, message)


class LoopOutbox:
    def __init__(self, loop: asyncio.AbstractEventLoop, publishers: list[Publisher],
                 send_done: Callable[[bytes], None] | None) -> None:
        """``send_done(data)`` writes encoded link messages to the dispatcher (None: direct mode)."""
        self.loop = loop
        self.publishers = publishers
        self.send_done = send_done
        self.replies = [bytearray() for _ in publishers]
        self.dones = bytearray()
        self.scheduled = False
        self.senders = [Into(self.reply, index) for index in range(len(publishers))]  # what replies send through

    def reply(self, index: int, message: bytes) -> bool:
        if len(message) >= BATCH_BYTES:
            self.flush()
            return self.publishers[index].send(message)
        reply = self.replies[index]
        reply += frame_head(len(message))
        reply += message
        self._schedule()
        return True

    def send_link(self, data: bytes) -> None:
        """Encoded messages for the dispatcher (DONEs, STREAMs), after this pass's replies."""
        self.dones += data
        self._schedule()

    def flush(self) -> None:
        self.scheduled = False
        for publisher, reply in zip(self.publishers, self.replies):
            if reply:
                publisher.send_framed(reply)
                reply.clear()
        if self.dones:
            dones = bytes(self.dones)
            self.dones.clear()
            self.send_done(dones)

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

