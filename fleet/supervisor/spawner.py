"""How the supervisor starts its workers: forked by its fork server, or with exec where there is none.

The fork server (fleet.worker.forkserver) starts with the supervisor, for its
interface. Until it says it is ready no worker starts: the first ones wait
for its imports, as they would have waited for their own. A server that
cannot start leaves workers to be started as ``python -m ENTRY SPEC``, as
before it existed, and the log says so once. A server that dies later takes
its workers with it (they are its children, tied to it by the parent-death
signal): they are reaped as killed, and a new server starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque

from fleet.worker.forkserver import FLAG
from fleet.worker.spec import WorkerSpec

log = logging.getLogger("fleet.supervisor")

FORK_TIMEOUT = 10.0  # seconds the server may take to answer a fork before it counts as broken
READY_TIMEOUT = 60.0  # seconds it may take to import the worker code
KILLED = -signal.SIGKILL  # what its workers died of when the server died first


class ServerGone(Exception):
    """The fork server did not answer: it died, or was stopped for hanging."""


class ForkServerLink:
    """The supervisor's end of one fork server process."""

    def __init__(self, entry: str, held_fds: list[int]) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", entry, FLAG, str(theirs.fileno()), ",".join(map(str, held_fds)),
                 str(os.getpid())],
                pass_fds=[theirs.fileno(), *held_fds])
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock: socket.socket | None = ours
        self.pid = self.process.pid
        self.started_at = time.monotonic()
        self.ready = False
        self._pending = b""
        self._forked: deque[int | str] = deque()  # pids, or why a fork failed, in request order
        self._exits: dict[int, int] = {}
        self._children: set[int] = set()

    @property
    def gone(self) -> bool:
        return self.sock is None

    def fileno(self) -> int | None:
        return None if self.sock is None else self.sock.fileno()

    def pump(self) -> None:
        """Read what the server said, without waiting. What it said before it went counts
        (a worker forked just before: its exit is then known, killed with the server)."""
        ended = False
        while self.sock is not None:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                ended = True
                break
            self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            word, _, rest = line.decode(errors="replace").partition(" ")
            if word == "ready":
                self.ready = True
            elif word == "forked":
                self._forked.append(int(rest))
                self._children.add(int(rest))
            elif word == "failed":
                self._forked.append(rest)
            elif word == "exited":
                pid, code = rest.split()
                self._exits[int(pid)] = int(code)
        if ended:
            self._lost()

    def wait_readable(self, timeout: float) -> None:
        if self.sock is not None:
            select.select([self.sock], [], [], max(timeout, 0.0))

    def fork(self, spec_json: str) -> int:
        """The pid of a new worker with this spec. Raises ServerGone, or OSError if the fork failed."""
        self._send(f"fork {spec_json}")
        deadline = time.monotonic() + FORK_TIMEOUT
        while not self._forked:
            if self.gone:
                raise ServerGone(f"fork server {self.pid} died")
            if time.monotonic() >= deadline:
                self.stop()
                raise ServerGone(f"fork server {self.pid} did not answer a fork in {FORK_TIMEOUT:.0f} s")
            self.wait_readable(deadline - time.monotonic())
            self.pump()
        answer = self._forked.popleft()
        if isinstance(answer, str):
            raise OSError(f"fork server {self.pid}: {answer}")
        return answer

    def take_exit(self, pid: int) -> int | None:
        """How worker `pid` ended (as subprocess's returncode), once the server has said so."""
        code = self._exits.pop(pid, None)
        if code is not None:
            self._children.discard(pid)
        return code

    def close_fds(self) -> None:
        """Have the server let go of the --http sockets (a stop: they must stop accepting)."""
        try:
            self._send("close-fds")
        except ServerGone:
            pass

    def stop(self) -> None:
        """End the server (its workers, if any are left, die with it) and reap it."""
        self._lost()  # the socket closes: end of file, it exits
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _send(self, line: str) -> None:
        if self.sock is None:
            raise ServerGone(f"fork server {self.pid} is gone")
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(FORK_TIMEOUT)
            self.sock.sendall(line.encode() + b"\n")
        except OSError as error:
            self._lost()
            raise ServerGone(f"fork server {self.pid}: {error}") from None
        finally:
            if self.sock is not None:
                self.sock.setblocking(False)

    def _lost(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for pid in self._children:
            self._exits.setdefault(pid, KILLED)


@dataclasses.dataclass(eq=False)
class ForkedProcess:
    """A worker forked by the fork server, with the part of subprocess.Popen the supervisor uses."""

    server: ForkServerLink
    pid: int
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.server.pump()
            self.returncode = self.server.take_exit(self.pid)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            self.server.wait_readable(min(deadline - time.monotonic(), 0.1))
        return code


class Spawner:
    """Starts workers for one supervisor: forked while its fork server serves, else exec'd."""

    def __init__(self, entry: str, held_fds: list[int]) -> None:
        self.entry = entry
        self.held_fds = held_fds
        self.server: ForkServerLink | None = None
        self._start_server()

    def fileno(self) -> int | None:
        """The socket to poll for what the server says (None without a server)."""
        return None if self.server is None else self.server.fileno()

    def pump(self) -> None:
        """Read the server's news; replace it if it died."""
        server = self.server
        if server is None:
            return
        server.pump()
        if server.gone:
            self._server_died(server)
        elif not server.ready and time.monotonic() - server.started_at > READY_TIMEOUT:
            server.stop()
            self._give_up(f"fork server {server.pid} was not ready after {READY_TIMEOUT:.0f} s")

    def can_spawn(self) -> bool:
        """False while the fork server is still importing: the next pass tries again."""
        self.pump()
        return self.server is None or self.server.ready

    def spawn(self, spec: WorkerSpec) -> ForkedProcess | subprocess.Popen:
        """A new worker. Forked, it watches the fork server as its parent; exec'd, the supervisor."""
        server = self.server
        if server is not None and server.ready:
            try:
                pid = server.fork(dataclasses.replace(spec, parent_pid=server.pid).to_json())
                return ForkedProcess(server, pid)
            except ServerGone as why:
                log.error("%s; this worker starts with exec", why)
                self._server_died(server)
        return subprocess.Popen([sys.executable, "-m", self.entry, spec.to_json()], pass_fds=self.held_fds)

    def close_fds(self) -> None:
        self.held_fds = []
        if self.server is not None:
            self.server.close_fds()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()

    def _start_server(self) -> None:
        try:
            self.server = ForkServerLink(self.entry, self.held_fds)
        except OSError as error:
            self._give_up(f"cannot start a fork server: {error}")

    def _server_died(self, server: ForkServerLink) -> None:
        """Its workers died with it; they are reaped as killed (their exits are already known)."""
        self.server = None
        try:
            code = server.process.wait(1)
        except subprocess.TimeoutExpired:
            server.stop()
            code = server.process.returncode
        if not server.ready:
            self._give_up(f"fork server {server.pid} ended ({code}) before it was ready")
            return
        log.error("fork server %d ended (%s): its workers end with it; starting a new one", server.pid, code)
        self._start_server()

    def _give_up(self, why: str) -> None:
        log.error("%s: workers start with exec from now on (slower: each imports fleet itself)", why)
        self.server = None
