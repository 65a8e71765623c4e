"""Socket activation for --http: the listening socket comes from the service manager
(LISTEN_FDS, from fd 3, as systemd passes it), and fleet serves on it instead of binding."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.harness import APPS, REPO, wait_for

# What systemd does between fork and exec: the socket at fd 3, LISTEN_PID the service's own pid.
LAUNCHER = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "fleet", *sys.argv[2:]])
"""


def test_fleet_serves_on_the_socket_it_was_given(tmp_path: Path) -> None:
    given = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    given.bind(("127.0.0.1", 0))
    given.listen(16)
    port = given.getsockname()[1]
    log = tmp_path / "master.stderr"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(given.fileno()), "master", "--module", "apps:router",
             "--pythonpath", str(APPS), "-p", "2", "--http", f"127.0.0.1:{port}"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=err, stderr=err, pass_fds=[given.fileno()],
            start_new_session=True)
    try:
        # The port is taken by our socket: had fleet bound one of its own, it would have failed.
        wait_for(lambda: "master ready" in log.read_text() or proc.poll() is not None, 30, what="master ready")
        assert proc.poll() is None, log.read_text()
        for _ in range(4):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/h/hello")
            assert conn.getresponse().read() == b"Hello world!"
            conn.close()
        assert "LISTEN_FDS" not in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        given.close()
