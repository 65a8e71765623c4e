"""Finished replies that wait, briefly, to leave together with the next ones.

Under load a request thread usually has the next request in hand when it
finishes one (the dispatcher gives it several; a direct-mode read brings
several). Sending each reply to Mongrel2 and each DONE to the dispatcher at
once costs one write and one wake-up of the peer per request, and Mongrel2's
wake-ups were the largest cost on a busy host (measured: bench.load_profile
fleet-broker, Mongrel2 109 -> 80 µs and the master 22 -> 14 µs of CPU per
request with this outbox, 9.6k -> 13.6k requests/s). So the lane's complete
replies, and the DONEs that follow them, wait here until the thread has
nothing more in hand, and leave in one write per peer.

What bounds the wait:
- the thread sends everything before it blocks for more work, before any
  request that does not go through the lane (streaming, uploads, flow
  control, --http), and before it tells the dispatcher it retires;
- after each request it sends what has waited HOLD_MAX or amounts to
  HOLD_BYTES;
- a thread that is inside a slow request cannot send: the worker's main
  thread sends for it what has waited STALL (flush_if_stale), or at once in
  broker mode once the thread has been in one request for GIVE_BACK_AFTER
  (fleet.worker.worker), so a reply never waits behind another request for
  long, nor dies with a worker that harakiri kills for that request.

Replies always leave before the DONEs written after them: a DONE tells the
dispatcher that the reply is out, and a worker that dies between the two
must not leave a client without an answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from fleet.mongrel2.connection import Publisher

log = logging.getLogger("fleet.worker")

# A finished reply waits at most this long for the thread's next requests
# (checked after each request).
HOLD_MAX = 0.002
# ... and the replies waiting in one outbox at most this many bytes.
HOLD_BYTES = 64 * 1024
# Replies of a thread stuck in a slow request are sent for it after this long.
STALL = 0.1


class Outbox:
    """One request thread's replies (per Mongrel2 endpoint) and DONEs not yet sent.

    The thread holds and flushes; the worker's main thread may flush a stale
    outbox (a thread inside a long request). The lock makes the two safe:
    everything the thread sends outside the outbox it sends after a flush,
    while the outbox is empty, so the main thread has nothing to send then.
    """

    def __init__(self, publishers: list[Publisher], send_done: Callable[[bytes], None] | None) -> None:
        """``send_done(data)`` writes encoded link messages to the dispatcher (None: direct mode)."""
        self.publishers = publishers
        self.send_done = send_done
        self.replies = [bytearray() for _ in publishers]
        self.dones = bytearray()
        self.since = 0.0  # when the oldest waiting reply was held; 0.0 when empty
        self.size = 0
        self.lock = threading.Lock()

    def hold(self, index: int, wire: bytes, done: bytes | None) -> None:
        """Keep a finished reply for endpoint ``index`` (already framed for the wire, as the
        lane returns it) and its encoded DONE (None: direct mode), which leaves after it."""
        with self.lock:
            if len(wire) >= HOLD_BYTES:  # large: no copy, after what waits
                self._flush()
                self.publishers[index].send_framed(wire)
            else:
                self.replies[index] += wire
                self.size += len(wire)
            if done is not None:
                self.dones += done
            if not self.since and (self.size or self.dones):
                self.since = time.monotonic()

    def due(self) -> bool:
        """Whether what waits should leave now, though more requests are in hand."""
        return bool(self.since) and (self.size >= HOLD_BYTES or time.monotonic() - self.since >= HOLD_MAX)

    def flush(self) -> None:
        """Send everything waiting: the replies, then the DONEs."""
        if self.since:
            with self.lock:
                self._flush()

    def flush_if_stale(self, now: float, stall: float = STALL) -> None:
        """The main thread's part: send for a thread that has held replies for ``stall``."""
        since = self.since
        if not since or now - since < stall:
            return
        with self.lock:
            if self.since and now - self.since >= stall:
                try:
                    self._flush()
                except OSError as error:  # the thread meets the same fault on its next write
                    log.warning("could not send a busy thread's finished replies: %s", error)

    def _flush(self) -> None:
        self.since = 0.0
        self.size = 0
        for publisher, reply in zip(self.publishers, self.replies):
            if reply:
                publisher.send_framed(reply)
                reply.clear()
        if self.dones:
            dones = bytes(self.dones)
            self.dones.clear()
            self.send_done(dones)

