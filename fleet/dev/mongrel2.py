"""Run a real Mongrel2 1.12 server for the demo, the tests and the benchmarks.

`Mongrel2` writes an `m2.conf`, loads it with `m2sh load` and runs
`mongrel2 config.sqlite UUID` as a child process in the foreground
(`server.daemonize=0`), so we own its pid from the first instant and never
have to trust `run/mongrel2.pid`. As root it chroots into the work directory
and switches to the uid that owns it; its logs, pid file and uploads therefore
live inside the work directory (`logs/`, `run/`, `tmp/`).

Everything binds to 127.0.0.1 unless a `bind_address` is given (the HTTP
listener); handler specs bind wherever their tcp:// address says, so a test
can put Mongrel2 on a private test network (e.g. a network namespace's
198.18.0.1) for handlers on other hosts.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fleet.config import tcp_host_port

MONGREL2_BIN = "mongrel2"
M2SH_BIN = "m2sh"
LOOPBACK = "127.0.0.1"

# Mongrel2 corrupts uploads when limits.content_length < limits.buffer_size
# (4096); 8192 is the smallest value measured to be safe (protocol doc s.5).
MIN_CONTENT_LENGTH = 8192
# How long a SIGTERMed Mongrel2 gets before SIGKILL. Measured: it exits in a
# few ms (0.5 s right after start); with 3+ client connections still open it
# dies of SIGABRT/SIGSEGV in its own shutdown code, which is harmless here.
STOP_GRACE_SECONDS = 5.0
# Ports handed out by free_port() come from below the kernel's ephemeral range
# (32768-60999 here) so they cannot collide with client source ports (wrk).
_PORT_RANGE = (20000, 32000)
_IDENT_RE = re.compile(r"^[A-Za-z0-9-]+$")
_CONSOLE_LOG = "logs/console.log"  # Mongrel2's stdout/stderr before chroot


class Mongrel2Error(RuntimeError):
    """Mongrel2 could not be configured, started or stopped."""


@dataclass(frozen=True)
class HandlerRoute:
    """One route of the server, served by one ZeroMQ handler.

    Mongrel2 binds a PUSH socket on `send_spec` (requests out) and a SUB socket
    on `recv_spec` (replies in). The SUB subscribes to `send_ident`, i.e.
    `recv_ident == send_ident`, so replies echoing the sender field arrive and
    several servers sharing one handler pool never act on each other's replies.
    """

    route: str
    send_spec: str
    recv_spec: str
    send_ident: str
    protocol: str = "tnetstring"

    def __post_init__(self) -> None:
        if not self.route.startswith("/"):
            raise ValueError(f"route must start with '/': {self.route!r}")
        if not _IDENT_RE.match(self.send_ident):
            raise ValueError(f"send_ident must match [A-Za-z0-9-]+: {self.send_ident!r}")
        if self.protocol not in ("tnetstring", "json"):
            raise ValueError(f"protocol must be 'tnetstring' or 'json': {self.protocol!r}")
        for spec in (self.send_spec, self.recv_spec):
            if '"' in spec:
                raise ValueError(f"bad ZeroMQ spec: {spec!r}")


_handed_out: set[int] = set()
_port_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and not handed out before by this process."""
    with _port_lock:
        for _ in range(1000):
            port = random.randrange(*_PORT_RANGE)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((LOOPBACK, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    raise Mongrel2Error("no free TCP port found")


def tcp_pair() -> tuple[str, str]:
    """Two fresh loopback ZeroMQ specs: (send_spec, recv_spec)."""
    return f"tcp://{LOOPBACK}:{free_port()}", f"tcp://{LOOPBACK}:{free_port()}"


def new_ident() -> str:
    """A fresh uuid4 string, usable as a send_ident or a server uuid."""
    return str(uuid.uuid4())


def _quote(value: object) -> str:
    """A value in m2.conf syntax (strings double-quoted, ints bare)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if '"' in text or "\n" in text:
        raise ValueError(f"cannot write {text!r} into m2.conf")
    return f'"{text}"'


def _tcp_host_port(spec: str) -> tuple[str, int] | None:
    """(host, port) of a tcp://HOST:PORT spec (a wildcard host as loopback), None for other transports."""
    address = tcp_host_port(spec)
    if address is None:
        return None
    host, port = address
    return (LOOPBACK if host in ("*", "0.0.0.0") else host), port


def _accepts(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _child_setup() -> None:
    """preexec_fn: no core files (Mongrel2 may abort() on shutdown), and die with the parent.

    PR_SET_PDEATHSIG fires when the *thread* that started Mongrel2 ends, so
    start it from a long-lived thread (the main thread in tests and benches).
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Mongrel2:
    """A real Mongrel2 server with one host ("localhost", also the default host) and the given routes."""

    def __init__(self, workdir: Path, routes: list[HandlerRoute], *, port: int | None = None,
                 content_length: int = MIN_CONTENT_LENGTH,
                 upload_store: str = "/tmp/mongrel2.upload.XXXXXX",
                 flow_control: bool = False, extra_settings: dict | None = None,
                 bind_address: str = LOOPBACK) -> None:
        if content_length < MIN_CONTENT_LENGTH:
            raise ValueError(
                f"content_length {content_length} < {MIN_CONTENT_LENGTH} corrupts uploads")
        if not routes:
            raise ValueError("Mongrel2 needs at least one route")
        if len({r.route for r in routes}) != len(routes):
            raise ValueError("duplicate route")
        self.workdir = Path(workdir).resolve()
        self.routes = list(routes)
        self.port: int = port if port is not None else free_port()
        self.content_length = content_length
        self.upload_store = upload_store
        self.flow_control = flow_control
        self.extra_settings = dict(extra_settings or {})
        self.server_uuid = new_ident()
        self.bind_address = bind_address  # where the HTTP listener binds (Server bind_addr)
        self._proc: subprocess.Popen | None = None

    # -- paths and info -------------------------------------------------------

    @property
    def chroot(self) -> Path:
        """The directory Mongrel2 chroots into; uploads land in chroot/tmp/."""
        return self.workdir

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def url(self, path: str = "/") -> str:
        return f"http://{self._connect_host()}:{self.port}{path}"

    def _connect_host(self) -> str:
        """Where a client reaches the HTTP listener (loopback for a wildcard bind)."""
        return LOOPBACK if self.bind_address in ("0.0.0.0", "*") else self.bind_address

    def log_text(self) -> str:
        """Mongrel2's console output and error log (startup, errors, shutdown)."""
        parts = []
        for name in (_CONSOLE_LOG, "logs/error.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(f"--- {name}\n" + path.read_text(errors="replace"))
        return "\n".join(parts)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- configuration --------------------------------------------------------

    def settings(self) -> dict[str, object]:
        settings: dict[str, object] = {
            "limits.content_length": self.content_length,
            "upload.temp_store": self.upload_store,
            "server.daemonize": 0,
        }
        if self.flow_control:
            settings["download.flow_control"] = 1
        settings.update(self.extra_settings)
        return settings

    def config_text(self) -> str:
        lines = []
        route_items = []
        for index, route in enumerate(self.routes):
            lines.append(
                f"handler_{index} = Handler(send_spec={_quote(route.send_spec)}, "
                f"send_ident={_quote(route.send_ident)}, recv_spec={_quote(route.recv_spec)}, "
                f"recv_ident={_quote(route.send_ident)}, protocol={_quote(route.protocol)})")
            route_items.append(f"{_quote(route.route)}: handler_{index}")
        settings = ", ".join(f"{_quote(k)}: {_quote(v)}" for k, v in self.settings().items())
        lines += [
            "main = Server(",
            f"    uuid={_quote(self.server_uuid)},",
            '    chroot="./",',
            '    access_log="/logs/access.log",',
            '    error_log="/logs/error.log",',
            '    pid_file="/run/mongrel2.pid",',
            '    default_host="localhost",',
            '    name="main",',
            f"    bind_addr={_quote(self.bind_address)},",
            f"    port={self.port},",
            '    hosts=[Host(name="localhost", routes={' + ", ".join(route_items) + "})]",
            ")",
            f"settings = {{{settings}}}",
            "servers = [main]",
            "",
        ]
        return "\n".join(lines)

    def _prepare(self) -> None:
        for sub in ("run", "logs", "tmp"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        # A pid file left by an aborted run makes Mongrel2 refuse to start if
        # that pid has been reused; the control ipc socket is recreated anyway.
        for stale in ("run/mongrel2.pid", "run/control", "config.sqlite"):
            (self.workdir / stale).unlink(missing_ok=True)
        (self.workdir / "m2.conf").write_text(self.config_text())
        load = subprocess.run(
            [M2SH_BIN, "load", "-config", "m2.conf", "-db", "config.sqlite"],
            cwd=self.workdir, capture_output=True, text=True, timeout=30,
            env=self._env())
        if load.returncode != 0 or not (self.workdir / "config.sqlite").exists():
            raise Mongrel2Error(
                f"m2sh load failed ({load.returncode}): {load.stdout}{load.stderr}")

    @staticmethod
    def _env() -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("LOGNAME", "fleet")  # Mongrel2 complains without one
        return env

    # -- lifecycle ------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Configure and start Mongrel2; return when the HTTP port and all handler sockets accept."""
        if self.running():
            return
        if shutil.which(MONGREL2_BIN) is None or shutil.which(M2SH_BIN) is None:
            raise Mongrel2Error("mongrel2/m2sh not found (apt-get install mongrel2-core)")
        self._prepare()
        console = open(self.workdir / _CONSOLE_LOG, "ab")
        try:
            self._proc = subprocess.Popen(
                [MONGREL2_BIN, "config.sqlite", self.server_uuid],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=console,
                stderr=subprocess.STDOUT, env=self._env(),
                start_new_session=True, preexec_fn=_child_setup)
        finally:
            console.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _endpoints(self) -> list[tuple[str, int]]:
        """(host, port) of the HTTP listener and of every tcp:// handler socket."""
        endpoints = [(self._connect_host(), self.port)]
        for route in self.routes:
            endpoints += [e for e in (_tcp_host_port(route.send_spec), _tcp_host_port(route.recv_spec)) if e]
        return endpoints

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = self._endpoints()
        while pending:
            if self._proc is not None and self._proc.poll() is not None:
                raise Mongrel2Error(
                    f"mongrel2 exited with {self._proc.returncode} during start\n{self.log_text()}")
            pending = [(h, p) for h, p in pending if not _accepts(p, h)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise Mongrel2Error(
                    f"mongrel2 not accepting on ports {[p for _, p in pending]} after {timeout}s\n{self.log_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM Mongrel2, wait, SIGKILL if it lingers. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except ProcessLookupError:
                pass
        # After abort() or SIGKILL these are left behind.
        for stale in ("run/mongrel2.pid", "run/control"):
            (self.workdir / stale).unlink(missing_ok=True)

    def __enter__(self) -> Mongrel2:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
