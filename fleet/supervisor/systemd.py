"""systemd's notify protocol (``Type=notify``), spoken by the supervisor.

READY=1 once the first generation serves, RELOADING=1 (with MONOTONIC_USEC, as
systemd 253 and later expect) when a reload starts and READY=1 when it has
completed or failed, STOPPING=1 on a stop, and WATCHDOG=1 from the
supervisor's loop every half WatchdogSec, so a loop that hangs is restarted.
One datagram to $NOTIFY_SOCKET each, as sd_notify(3) sends them; without
that variable (not under systemd, or another Type) every call does nothing.

Socket activation (sd_listen_fds(3)): the listening sockets systemd passes
from fd 3 on serve the --http addresses they are bound to, instead of
sockets fleet binds itself (``activated_socket``).
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("fleet.supervisor")

SD_LISTEN_FDS_START = 3
_activated: list[socket.socket] | None = None  # taken once per process: a node makes several supervisors


def activated_socket(host: str, port: int) -> socket.socket | None:
    """A copy of the socket systemd passed for (host, port), or None."""
    for sock in _activated_sockets():
        try:
            bound = sock.getsockname()
        except OSError:
            continue
        if bound[1] == port and (bound[0] == host or (host in ("0.0.0.0", "") and bound[0] in ("0.0.0.0", "::"))):
            copy = sock.dup()
            copy.set_inheritable(True)
            return copy
    return None


def _activated_sockets() -> list[socket.socket]:
    global _activated
    if _activated is None:
        _activated = []
        if os.environ.get("LISTEN_PID") == str(os.getpid()):
            count = os.environ.get("LISTEN_FDS", "0")
            for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + (int(count) if count.isdigit() else 0)):
                try:
                    _activated.append(socket.socket(fileno=fd))
                except OSError as error:
                    log.warning("socket activation: fd %d is not a socket: %s", fd, error)
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)  # ours alone: not for the workers
    return _activated


class Notifier:
    def __init__(self, environ: dict[str, str] | os._Environ = os.environ) -> None:
        self.address = _address(environ.get("NOTIFY_SOCKET", ""))
        self.sock: socket.socket | None = None
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Watchdog: only when it is meant for this process (WATCHDOG_PID, when set, must be ours).
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if self.sock is not None and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._next_ping = 0.0
        self._warned = False

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def reloading(self, status: str) -> None:
        self._send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}\n"
                   f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self._send(f"STOPPING=1\nSTATUS={status}")

    def tick(self, now: float) -> None:
        """From the supervisor's loop: a watchdog ping when one is due."""
        if self.watchdog_interval is not None and now >= self._next_ping:
            self._next_ping = now + self.watchdog_interval
            self._send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _send(self, text: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto(text.encode(), self.address)
        except OSError as error:  # systemd gone or the socket full: never a reason to stop serving
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), error)


def _address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET: a path, or '@name' for the abstract namespace."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None
