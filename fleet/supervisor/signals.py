"""Signals for a poll loop: handlers only queue them, and a wake-up socket makes poll() return.

Python runs a signal handler between bytecodes of the main thread, so a
handler that logged or changed state could interrupt the loop halfway; this
one only appends the number. `signal.set_wakeup_fd` writes a byte for every
signal to a socket the loop polls, so a signal arriving during poll() ends the
wait at once instead of at the next tick.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterable, Iterator


class SignalQueue:
    def __init__(self, signums: Iterable[int]) -> None:
        self.pending: list[int] = []
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, self._queue)

    def _queue(self, signum: int, frame: object) -> None:
        self.pending.append(signum)  # no logging here: just queue the signal

    def fileno(self) -> int:
        """The socket to poll for readability."""
        return self._read.fileno()

    def __bool__(self) -> bool:
        return bool(self.pending)

    def take(self) -> Iterator[int]:
        """The queued signals, oldest first (also those that arrive meanwhile)."""
        try:
            self._read.recv(4096)  # the wake-up bytes; the numbers are in `pending`
        except BlockingIOError:
            pass
        while self.pending:
            yield self.pending.pop(0)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self._read.close()
        self._write.close()
