"""The fork server: one process per supervisor that has imported the worker code, and forks each new worker.

A worker started as ``python -m fleet.worker`` spends about 120 ms of CPU
before it serves: the interpreter, fleet, pyzmq, h11 and the rest. Forked
from a process that did that once, it spends about 3 ms, and imports only the
application. That is most of what a reload costs a host, and of what a
50-host rolling reload waits for, turn after turn.

What a reload renews is therefore the application, not fleet: the workers
run the fleet code the fork server imported when its supervisor started (as
gunicorn's and uWSGI's workers run their master's). A new fleet is a restart.
The server imports no application and starts no thread, so a fork is safe.

The server talks to its supervisor over one Unix socket, in lines:

- supervisor -> server: ``fork SPEC_JSON`` and ``close-fds`` (a stop: let go
  of the inherited --http sockets, so they stop accepting);
- server -> supervisor: ``ready PID`` once, ``forked PID`` (or ``failed
  WHY``) for each fork in order, ``exited PID CODE`` when a worker ends (CODE as subprocess's
  returncode: negative for a signal).

It ignores the signals meant for its supervisor or its workers (a terminal's
Ctrl-C reaches the whole process group): it ends when its supervisor does,
by end of file on the socket or the kernel's parent-death signal, and its
workers then die with it (PR_SET_PDEATHSIG), as they would with the supervisor.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys

from setproctitle import setproctitle

from fleet.supervisor.signals import SignalQueue
from fleet.worker.start import die_with_parent

FLAG = "--fork-server"
# Left to the workers: each installs its own handlers for these.
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                   signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)


def worker_argv(argv: list[str]) -> list[str]:
    """A worker entry point's arguments. Started as a fork server (``FLAG FD HELD_FDS PARENT``),
    this serves forks and returns only in a forked worker, with that worker's arguments."""
    if argv[:1] != [FLAG]:
        return argv
    control_fd, held, parent = argv[1:4]
    return ForkServer(int(control_fd), [int(fd) for fd in held.split(",") if fd], int(parent)).serve()


class ForkServer:
    def __init__(self, control_fd: int, held_fds: list[int], parent: int) -> None:
        self.control = socket.socket(fileno=control_fd)
        self.parent = parent
        self.held_fds = held_fds
        self.pid = os.getpid()
        self.children_exited: SignalQueue | None = None  # SIGCHLD wakes the select
        self._defaults = {signum: signal.getsignal(signum) for signum in (*IGNORED_SIGNALS, signal.SIGCHLD)}

    def serve(self) -> list[str]:
        die_with_parent()
        if os.getppid() != self.parent:  # the supervisor died before we could tie our life to it
            os._exit(0)
        setproctitle(f"fleet: fork server (supervisor {self.parent})")
        for signum in IGNORED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        self.children_exited = SignalQueue((signal.SIGCHLD,))
        self._say(f"ready {self.pid}")
        pending = b""
        while True:
            readable, _, _ = select.select([self.control, self.children_exited.fileno()], [], [])
            for _ in self.children_exited.take():
                pass  # which child is waitpid's to say
            self._report_exits()
            if self.control not in readable:
                continue
            data = self.control.recv(65536)
            if not data:  # the supervisor is gone
                os._exit(0)
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                command, _, argument = line.partition(b" ")
                if command == b"fork":
                    try:
                        child = os.fork()
                    except OSError as error:
                        self._say(f"failed {error}")
                        continue
                    if child == 0:
                        return self._become_worker(argument.decode())
                    self._say(f"forked {child}")
                elif command == b"close-fds":
                    self._close_held_fds()
                else:
                    print(f"fleet fork server {self.pid}: unknown command {command[:40]!r}; ignored",
                          file=sys.stderr, flush=True)

    def _become_worker(self, spec_json: str) -> list[str]:
        """In the child: undo what is the server's, so it starts as a fresh worker process would."""
        self.children_exited.close()
        for signum, handler in self._defaults.items():
            signal.signal(signum, handler)
        self.control.close()
        setproctitle(f"fleet: worker (supervisor {self.parent})")
        return [spec_json]

    def _report_exits(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._say(f"exited {pid} {os.waitstatus_to_exitcode(status)}")

    def _close_held_fds(self) -> None:
        for fd in self.held_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.held_fds = []

    def _say(self, line: str) -> None:
        try:
            self.control.sendall(line.encode() + b"\n")
        except OSError:  # the supervisor is gone
            os._exit(0)
