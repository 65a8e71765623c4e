"""Type=notify: the master speaks systemd's notify protocol to $NOTIFY_SOCKET (a real
AF_UNIX datagram socket here, bound by the test, as systemd binds its own)."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tests.support.harness import Harness, master_args, wait_for


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def read(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def saying(self, word: str) -> list[str]:
        return [m for m in self.read() if word in m.split("\n")]


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    listener = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    yield listener
    listener.sock.close()


def test_ready_reloading_stopping_and_the_watchdog(harness: Harness, notify: NotifySocket) -> None:
    m2 = harness.mongrel2()
    master = harness.master(master_args(m2, processes=2, threads=1))
    ready = wait_for(lambda: notify.saying("READY=1"), 10, what="READY=1")
    assert "STATUS=generation 1: 2 worker(s) ready" in ready[0]
    pings = len(notify.saying("WATCHDOG=1"))
    wait_for(lambda: len(notify.saying("WATCHDOG=1")) >= pings + 3, 10, what="watchdog pings")

    master.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(notify.saying("READY=1")) == 2, 30, what="READY=1 after the reload")
    reloading = notify.saying("RELOADING=1")
    assert len(reloading) == 1 and "MONOTONIC_USEC=" in reloading[0]
    order = [m for m in notify.read() if "READY=1" in m or "RELOADING=1" in m]
    assert ["RELOADING=1" in m for m in order] == [False, True, False]

    assert master.stop() == []
    assert len(notify.saying("STOPPING=1")) == 1
