"""A short end-to-end demo: real Mongrel2, a fleet cluster, a few real HTTP requests.

    python -m fleet.dev.demo [--keep]

Mongrel2 (in a temporary directory) routes `/` to a master serving
werkzeug's test page (`werkzeug.testapp:test_app`, -p 2 --threads 4) over the
tnetstring protocol, and `/hello/` to a cluster serving the small `hello_app`
below over the json protocol: a `fleet master --cluster` and two bare
`fleet node --cluster`, on loopback multicast (127.0.0.1, TTL 1, a fresh
key). The demo sends GET, POST, query and upload requests with http.client,
prints what came back and which host and worker answered, prints
`fleet status`, then stops everything and checks nothing is left running.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

from fleet.dev.mongrel2 import HandlerRoute, Mongrel2, new_ident, tcp_pair

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
HTTP_TIMEOUT = 30.0
CONTENT_LENGTH = 8192  # Mongrel2's limits.content_length; bigger bodies become uploads


def hello_app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """Says hello and tells who answered (the demo prints the worker pid from it)."""
    stream = environ["wsgi.input"]
    size = 0
    while chunk := stream.read(65536):
        size += len(chunk)
    body = json.dumps({
        "hello": "world", "method": environ["REQUEST_METHOD"],
        "query": environ.get("QUERY_STRING", ""), "body_bytes": size,
        "pid": os.getpid(), "thread": threading.get_ident(),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


class Master:
    """A `fleet master` child in its own process group, logging to a file."""

    def __init__(self, name: str, args: list[str], logdir: Path, command: str = "master") -> None:
        self.name = name
        self.command = command
        self.log = logdir / f"{name}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "fleet", command, *args],
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while f"{self.command} ready" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def workers(self) -> list[int]:
        try:
            return sorted(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.Error:
            return []

    def stop(self) -> list[int]:
        """SIGTERM, wait, SIGKILL the group if needed; return the pids that were left over."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        leftovers = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == self.proc.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    leftovers.append(proc.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)
        return leftovers


HOSTS: dict[int, str] = {}  # worker pid -> the master or node that runs it


def send(server: Mongrel2, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HTTP_TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    who = "-"
    note = ""
    if resp.getheader("Content-Type", "").startswith("application/json"):
        info = json.loads(data)
        who = f"{HOSTS.get(info['pid'], '?')} pid {info['pid']}"
        note = f"query={info['query']!r} body_bytes={info['body_bytes']}"
    elif b"Werkzeug" in data:
        note = "werkzeug test page"
    sent = f" ({len(body)} bytes sent)" if body else ""
    print(f"  {method:<4} {path:<18} -> {resp.status} {resp.reason:<3} {len(data):>6} bytes  "
          f"{who:<18} {note}{sent}")


def run(workdir: Path) -> int:
    web = HandlerRoute("/", *tcp_pair(), new_ident(), "tnetstring")
    hello = HandlerRoute("/hello/", *tcp_pair(), new_ident(), "json")
    server = Mongrel2(workdir / "mongrel2", [web, hello], content_length=CONTENT_LENGTH)
    common = ["--mongrel2-chroot", str(server.chroot),
              "--mongrel2-content-length", str(CONTENT_LENGTH), "--graceful-timeout", "5"]
    masters: list[Master] = []
    try:
        started = time.monotonic()
        server.start()
        print(f"mongrel2 pid {server.pid} on {server.url('/')} "
              f"(ready in {time.monotonic() - started:.2f}s, chroot {server.chroot})")
        masters.append(Master("werkzeug", [
            "--zeromq", f"{web.send_spec},{web.recv_spec}",
            "--module", "werkzeug.testapp:test_app", "-p", "2", "--threads", "4", *common], workdir))
        key = workdir / "cluster.key"
        key.write_text(subprocess.run([sys.executable, "-m", "fleet", "keygen"], capture_output=True,
                                      text=True, check=True).stdout)
        key.chmod(0o600)
        cluster = ["--cluster", f"239.255.77.{os.getpid() % 250 + 1}:{17000 + os.getpid() % 1000}",
                   "--cluster-iface", "127.0.0.1", "--cluster-key-file", str(key)]
        masters.append(Master("hello-master", [
            "--zeromq", f"{hello.send_spec},{hello.recv_spec}",
            "--module", "fleet.dev.demo:hello_app", "-p", "2", "--threads", "4", *common,
            *cluster, "--node-name", "hello-master"], workdir))
        masters[-1].wait_ready()
        for name in ("node-1", "node-2"):
            masters.append(Master(name, [*cluster, "--node-name", name], workdir, command="node"))
        for master in masters:
            master.wait_ready()
            HOSTS.update({pid: master.name for pid in master.workers()})
            print(f"fleet {master.command} {master.name}: pid {master.proc.pid}, "
                  f"workers {master.workers()}")
        print("requests:")
        send(server, "GET", "/")
        send(server, "GET", "/?lang=en&debug=1")
        send(server, "POST", "/", body=b"name=fleet&x=1",
             headers={"Content-Type": "application/x-www-form-urlencoded"})
        for i in range(9):
            send(server, "GET", f"/hello/?n={i}")
        send(server, "POST", "/hello/", body=b"name=fleet",
             headers={"Content-Type": "application/x-www-form-urlencoded"})
        send(server, "POST", "/hello/upload", body=os.urandom(200_000),
             headers={"Content-Type": "application/octet-stream"})
        print("fleet status:")
        status = subprocess.run([sys.executable, "-m", "fleet", "status", *cluster],
                                capture_output=True, text=True, timeout=30)
        print("  " + status.stdout.strip().replace("\n", "\n  "))
    finally:
        leftovers = {master.name: master.stop() for master in masters}
        server.stop()
    bad = {name: pids for name, pids in leftovers.items() if pids}
    if bad:
        print(f"stopped, but processes were left over: {bad}")
        return 1
    print("stopped: masters, workers and Mongrel2 all exited")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet.dev.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (Mongrel2 and master logs)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="fleet-demo-"))
    try:
        return run(workdir)
    finally:
        if args.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
