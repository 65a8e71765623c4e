"""One worker process as the supervisor sees it: its state, its signals, its memory."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass

import psutil


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    generation: int
    started_at: float
    max_requests: int = 0  # this worker's recycle point, jitter included; 0: never
    ready: bool = False
    retiring: bool = False
    retire_deadline: float | None = None
    replace_reason: str | None = None  # set: start a successor, then retire this one
    harakiri: bool = False  # killed, or being killed, for holding a request too long
    harakiri_at: float = 0.0
    quiet_since: float | None = None  # since when only its stuck threads hold requests
    killed: bool = False
    psutil: psutil.Process | None = None
    app_version: str | None = None  # the application's __version__, as the worker loaded it

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: int) -> None:
        try:
            self.process.send_signal(signum)
        except ProcessLookupError:
            pass

    def rss(self) -> int | None:
        """Resident memory in bytes, None if it cannot be read (the process is gone)."""
        return self.usage()[0]

    def usage(self) -> tuple[int | None, float | None]:
        """(RSS bytes, CPU percent since the last call), each None if unreadable."""
        if self.psutil is None:
            return None, None
        try:
            with self.psutil.oneshot():
                return self.psutil.memory_info().rss, self.psutil.cpu_percent(None)
        except psutil.Error:
            return None, None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
