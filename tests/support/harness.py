"""Helpers for the integration tests: real Mongrel2 servers, real `fleet master` processes, HTTP clients.

Every process is started in its own session (process group) and is stopped in
a fixture teardown, also when the test fails; a master's teardown fails the
test if any process of its group outlives it (an orphaned worker).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from fleet.dev.mongrel2 import HandlerRoute, Mongrel2, new_ident, tcp_pair

REPO = Path(__file__).resolve().parents[2]
APPS = REPO / "tests" / "apps"  # the WSGI apps the tests serve, for --pythonpath
FLOOR_HANDLER = REPO / "bench" / "floor_handler.py"
CONTENT_LENGTH = 8192  # Mongrel2's limits.content_length here; the master is told the same
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
HTTP_TIMEOUT = 30.0


# -- processes ---------------------------------------------------------------


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of process group `pgid`."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
             what: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class FleetMaster:
    """One `python -m fleet master ...` process in its own process group."""

    def __init__(self, args: list[str], logdir: Path, name: str = "master", command: str = "master",
                 env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "fleet", command, *args]
        self.ready_marker = f"{command} ready"
        self.stderr_path = logdir / f"{name}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                start_new_session=True, env={**os.environ, **env} if env else None)
        self.pid = self.proc.pid
        self.seen: dict[int, psutil.Process] = {}  # every descendant ever observed

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> FleetMaster:
        deadline = time.monotonic() + timeout
        while self.ready_marker not in self.stderr_text():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"fleet master exited with {self.proc.returncode} before ready:\n{self.stderr_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"fleet master not ready after {timeout}s:\n{self.stderr_text()}")
            time.sleep(0.05)
        self.descendants()
        return self

    def descendants(self) -> list[psutil.Process]:
        """Live descendants of the master now (and remember them for the orphan check)."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            self.seen.setdefault(child.pid, child)
        return alive(children)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def leftovers(self) -> list[psutil.Process]:
        found = {p.pid: p for p in group_members(self.pid)}
        found.update({p.pid: p for p in alive(list(self.seen.values()))})
        return list(found.values())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> list[tuple[int, str]]:
        """Signal the master and wait; SIGKILL whatever is left of its group.

        Returns (pid, command line) of the processes that did not exit by
        themselves: the master if it ignored `sig` for `timeout` seconds, and
        any orphan it left behind.
        """
        stuck: list[psutil.Process] = []
        if self.proc.poll() is None:
            self.descendants()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stuck.append(psutil.Process(self.pid))
        orphans = [p for p in alive(self.leftovers()) if p.pid != self.pid]
        if orphans:
            time.sleep(1.0)  # a worker may still be finishing its own graceful exit
            orphans = alive(orphans)
        found = _names(stuck + orphans)
        for proc in orphans:
            try:
                proc.kill()
            except psutil.Error:
                pass
        self._kill_group()
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)
        return found

    def _kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _names(procs: list[psutil.Process]) -> list[tuple[int, str]]:
    out = []
    for proc in procs:
        try:
            out.append((proc.pid, " ".join(proc.cmdline())[:120]))
        except psutil.Error:
            out.append((proc.pid, "?"))
    return out


def zeromq_args(*servers: Mongrel2) -> list[str]:
    """One --zeromq SEND,RECV per handler route of the given Mongrel2 servers."""
    args = []
    for server in servers:
        for route in server.routes:
            args += ["--zeromq", f"{route.send_spec},{route.recv_spec}"]
    return args


def master_args(*servers: Mongrel2, module: str = "apps:router", processes: int = 2,
                threads: int = 4, extra: list[str] | None = None) -> list[str]:
    args = [*zeromq_args(*servers), "--module", module, "--pythonpath", str(APPS),
            "-p", str(processes), "--threads", str(threads),
            "--mongrel2-content-length", str(CONTENT_LENGTH), "--graceful-timeout", "5"]
    if servers:
        args += ["--mongrel2-chroot", str(servers[0].chroot)]
    return args + list(extra or [])


class Harness:
    """Starts Mongrel2 servers, masters and helper processes; stops them all in `close()`."""

    def __init__(self, basedir: Path) -> None:
        self.basedir = basedir
        self.servers: list[Mongrel2] = []
        self.masters: list[FleetMaster] = []
        self.popens: list[subprocess.Popen] = []

    def mongrel2(self, routes: list[tuple[str, str]] | None = None, **kwargs: object) -> Mongrel2:
        """A started Mongrel2; routes are (route, protocol) pairs, each with its own handler."""
        specs = []
        for route, protocol in routes or [("/t/", "tnetstring"), ("/j/", "json")]:
            send, recv = tcp_pair()
            specs.append(HandlerRoute(route, send, recv, new_ident(), protocol))
        workdir = self.basedir / f"m2-{len(self.servers)}"
        kwargs.setdefault("content_length", CONTENT_LENGTH)
        server = Mongrel2(workdir, specs, **kwargs)  # type: ignore[arg-type]
        self.servers.append(server)
        server.start()
        return server

    def master(self, args: list[str], ready: bool = True, env: dict[str, str] | None = None) -> FleetMaster:
        master = FleetMaster(args, self.basedir, name=f"master-{len(self.masters)}", env=env)
        self.masters.append(master)
        if ready:
            master.wait_ready()
        return master

    def node(self, args: list[str], ready: bool = True) -> FleetMaster:
        """A `fleet node` (same life cycle and checks as a master)."""
        node = FleetMaster(args, self.basedir, name=f"node-{len(self.masters)}", command="node")
        self.masters.append(node)
        if ready:
            node.wait_ready()
        return node

    def popen(self, cmd: list[str]) -> subprocess.Popen:
        with open(self.basedir / f"proc-{len(self.popens)}.stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
        self.popens.append(proc)
        return proc

    def close(self) -> list[str]:
        """Stop everything (each step runs even if another fails); describe any process left over."""
        problems = []
        for master in self.masters:
            try:
                orphans = master.stop()
            except Exception as error:  # keep cleaning up the rest
                problems.append(f"master {master.pid}: stop failed: {error!r}")
                continue
            if orphans:
                problems.append(f"master {master.pid}: did not exit by itself: {orphans}"
                                f"\n{master.stderr_text()[-3000:]}")
        for proc in self.popens:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=5)
        for server in self.servers:
            try:
                server.stop()
            except Exception as error:
                problems.append(f"mongrel2 {server.pid}: stop failed: {error!r}")
        return problems


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict:
        return json.loads(self.body)


def request(server: Mongrel2, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = HTTP_TIMEOUT) -> Response:
    """One request on a fresh http.client connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def raw_exchange(server: Mongrel2, data: bytes, timeout: float = HTTP_TIMEOUT,
                 until: bytes | None = None) -> tuple[bytes, bool]:
    """Send raw bytes, read until the server closes (or ``until`` has arrived);
    (bytes, closed_by_server)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return b"".join(chunks), False
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
            if until is not None and until in b"".join(chunks):
                return b"".join(chunks), False
        return b"".join(chunks), False


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def dechunk(body: bytes) -> bytes:
    """Decode an HTTP/1.1 chunked body strictly (fails on bad framing)."""
    out = []
    while True:
        size_line, sep, rest = body.partition(b"\r\n")
        assert sep, "truncated chunk size line"
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            assert rest.startswith(b"\r\n"), "missing final CRLF after the last chunk"
            return b"".join(out)
        assert rest[size:size + 2] == b"\r\n", "chunk not followed by CRLF"
        out.append(rest[:size])
        body = rest[size + 2:]


def upload_files(server: Mongrel2) -> list[Path]:
    """Mongrel2 upload temp files currently in the chroot's tmp/."""
    return sorted((server.chroot / "tmp").glob("mongrel2.upload.*"))


# -- supervisor tests: workers, log lines, `fleet stats` ---------------------------


def is_worker(proc: psutil.Process) -> bool:
    """A worker, not a throwaway app-import check or the fork server the workers come from."""
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return "fleet.appload" not in cmdline and "fleet: fork server" not in cmdline


def worker_processes(master: FleetMaster) -> list[psutil.Process]:
    """The master's live worker processes."""
    return [proc for proc in master.descendants() if is_worker(proc)]


def worker_pids(master: FleetMaster) -> set[int]:
    return {p.pid for p in worker_processes(master)}


def log_text(master: FleetMaster, log_file: Path | None = None) -> str:
    """What the master (and its workers) logged: its stderr, plus `log_file` if given."""
    text = master.stderr_text()
    if log_file is not None and log_file.exists():
        text += log_file.read_text(errors="replace")
    return text


def wait_log(master: FleetMaster, text: str, count: int = 1, timeout: float = 30.0,
             log_file: Path | None = None) -> str:
    """Wait until `text` occurs at least `count` times in the master's log; returns the log."""
    deadline = time.monotonic() + timeout
    while True:
        log = log_text(master, log_file)
        if log.count(text) >= count:
            return log
        if master.proc.poll() is not None:
            raise AssertionError(f"fleet master exited with {master.proc.returncode} while waiting for "
                                 f"{text!r}:\n{log[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged {count} time(s) within {timeout}s:\n{log[-3000:]}")
        time.sleep(0.05)


def ready_pids(log: str) -> set[int]:
    """Worker pids the master has logged as ready (`worker PID ready`)."""
    import re

    return {int(pid) for pid in re.findall(r"\bworker (\d+) ready\b", log)}


def wait_workers(master: FleetMaster, count: int, timeout: float = 30.0, without: set[int] = frozenset(),
                 log_file: Path | None = None) -> set[int]:
    """Wait until exactly `count` workers are alive, all logged ready and none of them in `without`."""
    state: dict[str, object] = {}

    def settled() -> bool:
        pids = worker_pids(master)
        state["pids"] = pids
        return len(pids) == count and not pids & set(without) and pids <= ready_pids(log_text(master, log_file))

    try:
        wait_for(settled, timeout, what=f"{count} ready worker(s)")
    except AssertionError as error:
        raise AssertionError(f"{error}; workers now {state.get('pids')}, excluded {set(without)}:\n"
                             f"{log_text(master, log_file)[-3000:]}") from None
    return state["pids"]  # type: ignore[return-value]


def fleet_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """`python -m fleet ARGS...`, captured."""
    return subprocess.run([sys.executable, "-m", "fleet", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def scrape_metrics(port: int) -> dict[tuple[str, tuple], float]:
    """A master's --metrics on 127.0.0.1:port, read by prometheus_client's own exposition-format
    parser: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def fleet_stats(endpoint: str, timeout: float = 5.0) -> dict:
    """`fleet stats --stats ENDPOINT --json`, parsed."""
    out = fleet_cli("stats", "--stats", endpoint, "--json", "--timeout", str(timeout), timeout=timeout + 30)
    assert out.returncode == 0, f"fleet stats exited with {out.returncode}: {out.stdout}{out.stderr}"
    return json.loads(out.stdout)
