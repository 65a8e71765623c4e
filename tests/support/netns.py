"""Hosts made of network namespaces joined by veth pairs to a private bridge, for multi-host tests.

    net = Network(hosts=3)          # namespaces <token>-br (the bridge), <token>-h1.. <token>-hN
    net.create()
    h1 = net.host(1)                # address 198.18.0.1 on its eth0
    proc = h1.popen([...], log)     # `ip netns exec NS ...`, in its own process group
    h1.call(fn, *args)              # run fn in a thread that lives in h1's namespace
    net.drop_multicast()            # the bridge drops IPv4 multicast, like a cloud network
    net.destroy()                   # kill every process, delete namespaces (idempotent)

Nothing touches the real interface: the veth pairs are created inside the
bridge's namespace and their peers moved straight into the host namespaces;
there is no default route anywhere, only the 198.18.0.0/24 link route and a
multicast route (224.0.0.0/4 dev eth0) in each host. Namespace names carry a
random per-run token, so parallel or leftover runs cannot collide.

`call()` uses a long-lived thread per host that has setns(2)'d into the
host's network namespace: sockets it (and threads or processes it starts)
creates live in that namespace. Mongrel2's runner and the HTTP clients run
there, so the test process itself can talk to the hosts without any veth in
the root namespace.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.support.harness import APPS, REPO, is_worker, wait_for

T = TypeVar("T")

SUBNET = "198.18.0"
CLONE_NEWNET = 0x40000000
IP = "ip"
NFT = "nft"
NFT_TABLE = "fleet_no_multicast"


class NetnsUnavailable(RuntimeError):
    """Why namespace hosts cannot be built here (used as a skip reason)."""


def unavailable_reason() -> str | None:
    """None if we can build namespace hosts, else why not."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "multi-host tests need root (ip netns add)"
    if shutil.which(IP) is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"fleetprobe-{secrets.token_hex(3)}"
    try:
        made = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"`ip netns` is unavailable: {error}"
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run([IP, "netns", "del", probe], capture_output=True, timeout=10)
    return None


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)
    if check and out.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


_libc = ctypes.CDLL(None, use_errno=True)


def _enter(ns_path: str) -> None:
    """setns(2) the calling thread into the network namespace at ns_path."""
    fd = os.open(ns_path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({ns_path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


class Host:
    """One namespace on the bridge, with address 198.18.0.INDEX on eth0."""

    def __init__(self, network: Network, index: int) -> None:
        self.network = network
        self.index = index
        self.name = f"h{index}"
        self.ns = f"{network.token}-h{index}"
        self.address = f"{SUBNET}.{index}"
        self.procs: list[subprocess.Popen] = []
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address} ns={self.ns}>"

    @property
    def ns_inode(self) -> int:
        """The namespace's inode: what /proc/self/ns/net stat()s to for a process in it."""
        return os.stat(f"/run/netns/{self.ns}").st_ino

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(IP, "netns", "exec", self.ns, IP, *args, check=check)

    def exec(self, cmd: list[str], timeout: float = 30.0, env: dict[str, str] | None = None,
             cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run a command on this host and wait (captured)."""
        return subprocess.run([IP, "netns", "exec", self.ns, *cmd], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, env=env, cwd=cwd)

    def popen(self, cmd: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen:
        """Start a command on this host in its own process group (`ip netns exec` execs it in place)."""
        with open(log, "ab") as err:
            proc = subprocess.Popen([IP, "netns", "exec", self.ns, *cmd], stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err, env=env, cwd=cwd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn in this host's long-lived namespace thread and return its result."""
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=self.ns, initializer=_enter,
                initargs=(f"/run/netns/{self.ns}",))
        return self._thread.submit(fn, *args, **kwargs).result()

    def link(self, up: bool) -> None:
        """Take eth0 down (a partition) or up again; re-adds the multicast route the kernel drops."""
        self.ip("link", "set", "eth0", "up" if up else "down")
        if up:
            self.ip("route", "replace", "224.0.0.0/4", "dev", "eth0")

    def pids(self) -> list[int]:
        out = _run(IP, "netns", "pids", self.ns, check=False)
        return [int(p) for p in out.stdout.split()]

    def kill_all(self) -> None:
        """SIGKILL the process groups we started, then anything else still in the namespace."""
        for proc in self.procs:  # the leader may be gone while its group lives on
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def close_thread(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)
            self._thread = None


class Network:
    """A bridge namespace and N host namespaces on 198.18.0.0/24."""

    def __init__(self, hosts: int = 3, token: str | None = None) -> None:
        if not 1 <= hosts <= 250:
            raise ValueError("1..250 hosts")
        self.token = token or f"fl{secrets.token_hex(3)}"
        self.bridge_ns = f"{self.token}-br"
        self.hosts = [Host(self, i) for i in range(1, hosts + 1)]
        self._created: list[str] = []

    def host(self, index: int) -> Host:
        return self.hosts[index - 1]

    def create(self) -> Network:
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise
        return self

    def _create(self) -> None:
        for ns in [self.bridge_ns] + [h.ns for h in self.hosts]:
            _run(IP, "netns", "add", ns)
            self._created.append(ns)
        br = [IP, "netns", "exec", self.bridge_ns, IP]
        _run(*br, "link", "add", "br0", "type", "bridge")
        # No IGMP snooping: without a querier it could stop forwarding the group.
        _run(*br, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0", check=False)
        _run(*br, "link", "set", "br0", "up")
        _run(*br, "link", "set", "lo", "up")
        for host in self.hosts:
            veth = f"veth{host.index}"
            # Made inside the bridge namespace, the peer goes straight into the host: the
            # root namespace (and its real interface) never sees either end.
            _run(*br, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            _run(*br, "link", "set", veth, "master", "br0")
            _run(*br, "link", "set", veth, "up")
            host.ip("addr", "add", f"{host.address}/24", "dev", "eth0")
            host.ip("link", "set", "eth0", "up")
            host.ip("link", "set", "lo", "up")
            host.ip("route", "add", "224.0.0.0/4", "dev", "eth0")

    def drop_multicast(self, hosts: list[Host] | None = None) -> None:
        """Make the bridge drop IPv4 multicast (to and from `hosts`' ports, or all), as cloud
        networks and most VPNs do: an nftables rule of the bridge family in the bridge namespace.
        Unicast and ARP still pass. The rule counts what it drops (multicast_dropped())."""
        if shutil.which(NFT) is None:
            raise NetnsUnavailable("the `nft` command (nftables) is not installed")
        nft = [IP, "netns", "exec", self.bridge_ns, NFT]
        _run(*nft, "add", "table", "bridge", NFT_TABLE)
        _run(*nft, "add", "chain", "bridge", NFT_TABLE, "forward",
             "{ type filter hook forward priority 0; policy accept; }")
        for port in ([f"veth{h.index}" for h in hosts] if hosts is not None else [None]):
            match = [] if port is None else ["iifname", port]
            _run(*nft, "add", "rule", "bridge", NFT_TABLE, "forward", *match,
                 "ip", "daddr", "224.0.0.0/4", "counter", "drop")
            if port is not None:  # and what the other hosts send towards it
                _run(*nft, "add", "rule", "bridge", NFT_TABLE, "forward", "oifname", port,
                     "ip", "daddr", "224.0.0.0/4", "counter", "drop")

    def multicast_dropped(self) -> int:
        """Packets the drop_multicast() rules have dropped so far."""
        out = _run(IP, "netns", "exec", self.bridge_ns, NFT, "list", "table", "bridge", NFT_TABLE)
        return sum(int(word) for word in
                   (line.split("packets ")[1].split()[0] for line in out.stdout.splitlines() if "packets " in line))

    def destroy(self) -> list[str]:
        """Kill every process and delete every namespace; returns problems (never raises)."""
        problems = []
        for host in self.hosts:
            try:
                host.kill_all()
            except Exception as error:  # keep going: the namespaces must go
                problems.append(f"{host}: kill: {error!r}")
        for host in self.hosts:
            try:
                host.close_thread()
            except Exception as error:
                problems.append(f"{host}: thread: {error!r}")
        for ns in reversed(self._created):
            out = _run(IP, "netns", "del", ns, check=False)
            if out.returncode != 0:
                problems.append(f"ip netns del {ns}: {out.stderr.strip()}")
        self._created.clear()
        return problems

    def __enter__(self) -> Network:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def leftover_namespaces(prefix: str) -> list[str]:
    out = _run(IP, "netns", "list", check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(prefix)]


# -- a fleet cluster on those hosts ----------------------------------------------------------


READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class FleetProc:
    """`python -m fleet COMMAND ...` on a host, in its own process group."""

    def __init__(self, host: Host, command: str, args: list[str], log: Path) -> None:
        self.host = host
        self.command = command
        self.args = args
        self.log = log
        env = dict(os.environ, FLEET_TEST_HOST=host.name)
        self.proc = host.popen([sys.executable, "-m", "fleet", command, *args], log, env=env, cwd=REPO)
        self.pid = self.proc.pid
        self.started = time.monotonic()

    def __repr__(self) -> str:
        return f"<fleet {self.command} on {self.host.name} pid {self.pid}>"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> FleetProc:
        marker = f"{self.command} ready"
        deadline = time.monotonic() + timeout
        while marker not in self.log_text():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self} exited with {self.proc.returncode} before ready:\n"
                                     f"{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self} not ready after {timeout}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        return self

    def descendants(self) -> list:
        import psutil

        try:
            return [p for p in psutil.Process(self.pid).children(recursive=True)
                    if p.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            return []

    def worker_pids(self) -> set[int]:
        """Live worker processes (not the throwaway app-import check, nor the fork server)."""
        return {proc.pid for proc in self.descendants() if is_worker(proc)}

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        """Signal (unless sig is None), wait, then SIGKILL whatever is left of the group;
        the exit code (None if it had to be killed)."""
        if sig is not None:
            self.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.kill_group()
        self.proc.wait(timeout=5)
        return code


class Observer:
    """A passive cluster member (role "observer") in a host's namespace, polled every 10 ms.

    Records, per hostname, when (time.monotonic()) each state was first seen.
    """

    def __init__(self, cluster: FleetCluster, host: Host, transport: str | None = None) -> None:
        import threading

        from fleet.cluster.agent import ClusterAgent

        options = cluster.options(host, "observer", f"observer-{host.name}", transport=transport)
        self.agent = host.call(ClusterAgent, options, "observer")  # its socket lives in host's namespace
        self.lock = threading.Lock()
        self.states: dict[str, str] = {}
        self.history: list[tuple[float, str, str]] = []  # (monotonic, hostname, state)
        self.views: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="observer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            self.agent.receive(now)
            self.agent.tick(now, None)
            mono = time.monotonic()
            with self.lock:
                for view in self.agent.members.status(now)["hosts"]:
                    name = view["hostname"]
                    self.views[name] = view
                    if self.states.get(name) != view["state"]:
                        self.states[name] = view["state"]
                        self.history.append((mono, name, view["state"]))
            self._stop.wait(0.01)

    def state(self, hostname: str) -> str | None:
        with self.lock:
            return self.states.get(hostname)

    def wait_state(self, hostname: str, states: str | tuple[str, ...], timeout: float,
                   since: float = 0.0) -> float:
        """The monotonic time `hostname` was first seen in one of `states` at or after `since`."""
        states = (states,) if isinstance(states, str) else states

        def seen() -> float | None:
            with self.lock:
                for moment, name, state in self.history:
                    if name == hostname and state in states and moment >= since:
                        return moment
                if self.states.get(hostname) in states:
                    return max(since, 1e-9)
            return None

        return wait_for(seen, timeout, 0.01, what=f"{hostname} {'/'.join(states)} (observer)")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.agent.close()


class FleetCluster:
    """Mongrel2 and `fleet master` on h1, `fleet node`s on the other hosts; all on one key."""

    def __init__(self, net: Network, workdir: Path) -> None:
        from fleet.cluster.protocol import keygen

        self.net = net
        self.workdir = workdir
        self.key = workdir / "cluster.key"
        self.key.write_text(keygen())
        self.key.chmod(0o600)
        self.wrong_key = workdir / "wrong.key"
        self.wrong_key.write_text(keygen())
        self.wrong_key.chmod(0o600)
        rnd = secrets.randbelow
        self.group = f"239.255.{rnd(250) + 1}.{rnd(250) + 1}:{20000 + rnd(10000)}"
        self.name = f"c{net.token}"
        self.transport = "multicast"  # the default of every process; see transport_args()
        self.m2 = None
        self.procs: list[FleetProc] = []
        self.observers: list[Observer] = []
        self.master: FleetProc | None = None
        self.nodes: dict[int, FleetProc] = {}

    @property
    def h1(self) -> Host:
        return self.net.host(1)

    @property
    def seed(self) -> str:
        """The unicast seed every host is given: the master's address on h1, at the cluster's port."""
        return f"{self.h1.address}:{self.group.rsplit(':', 1)[1]}"

    def transport_args(self, host: Host, transport: str | None = None) -> list[str]:
        """How `host` reaches the cluster: "multicast" (the group), "seeds" (unicast to the
        master's address, which h1 is given too: a shared seed list names every host) or "both"."""
        transport = transport or self.transport
        args = {"multicast": ["--cluster", self.group], "seeds": ["--cluster-peers", self.seed],
                "both": ["--cluster", self.group, "--cluster-peers", self.seed]}[transport]
        return args + ["--cluster-iface", host.address]

    def cluster_args(self, host: Host, key: Path | None = None, transport: str | None = None) -> list[str]:
        return self.transport_args(host, transport) + [
            "--cluster-key-file", str(key or self.key), "--cluster-name", self.name, "--node-name", host.name]

    def options(self, host: Host, role: str, node_name: str, key: Path | None = None,
                transport: str | None = None):
        """ClusterOptions as `fleet ROLE` on `host` would build them from the same flags."""
        from fleet.cli import build_parser
        from fleet.cluster.options import cluster_options

        args = build_parser().parse_args(["status", *self.transport_args(host, transport),
                                          "--cluster-key-file", str(key or self.key),
                                          "--cluster-name", self.name, "--node-name", node_name])
        return cluster_options(args, role)

    # -- Mongrel2 ------------------------------------------------------------------

    def start_mongrel2(self):
        from fleet.dev.mongrel2 import HandlerRoute, Mongrel2, free_port, new_ident

        address = self.h1.address
        route = HandlerRoute("/t/", f"tcp://{address}:{free_port()}", f"tcp://{address}:{free_port()}",
                             new_ident(), "tnetstring")
        # Started from h1's namespace thread: Mongrel2 runs in h1 (and dies with that thread).
        server = Mongrel2(self.workdir / "m2", [route], bind_address=address)
        self.h1.call(server.start)
        self.m2 = server
        return server

    # -- fleet processes -------------------------------------------------------------

    def master_args(self, processes: int = 1, threads: int = 2, transport: str | None = None) -> list[str]:
        assert self.m2 is not None, "start_mongrel2() first"
        args = []
        for route in self.m2.routes:
            args += ["--zeromq", f"{route.send_spec},{route.recv_spec}"]
        return args + ["--module", "hostapp", "--pythonpath", str(APPS), "-p", str(processes),
                       "--threads", str(threads), "--graceful-timeout", "5",
                       *self.cluster_args(self.h1, transport=transport)]

    def start_master(self, processes: int = 1, threads: int = 2, ready: bool = True,
                     transport: str | None = None) -> FleetProc:
        proc = FleetProc(self.h1, "master", self.master_args(processes, threads, transport),
                         self.workdir / f"master-{len(self.procs)}.log")
        self.procs.append(proc)
        self.master = proc
        return proc.wait_ready() if ready else proc

    def start_node(self, index: int, key: Path | None = None, ready: bool = True,
                   extra: list[str] | None = None, transport: str | None = None) -> FleetProc:
        host = self.net.host(index)
        proc = FleetProc(host, "node", self.cluster_args(host, key, transport) + list(extra or []),
                         self.workdir / f"node-{host.name}-{len(self.procs)}.log")
        self.procs.append(proc)
        self.nodes[index] = proc
        return proc.wait_ready() if ready else proc

    def start_all(self, nodes: tuple[int, ...] = (2, 3), processes: int = 1, threads: int = 2) -> None:
        """Mongrel2 and the master, then the nodes (started together)."""
        self.start_mongrel2()
        self.start_master(processes, threads)
        started = [self.start_node(i, ready=False) for i in nodes]
        for proc in started:
            proc.wait_ready()

    def fleet(self, host: Host, *args: str, key: Path | None = None,
              timeout: float = 60.0, transport: str | None = None) -> subprocess.CompletedProcess:
        """A fleet cluster command (status, reload, log) run on `host`."""
        cluster = [*self.transport_args(host, transport),
                   "--cluster-key-file", str(key or self.key), "--cluster-name", self.name,
                   "--node-name", f"cli-{host.name}"]
        return host.exec([sys.executable, "-m", "fleet", args[0], *cluster, *args[1:]], timeout=timeout,
                         cwd=REPO)

    def status(self, host: Host | None = None, transport: str | None = None) -> dict[str, dict]:
        """`fleet status --json` on `host` (h1 by default): hostname -> host entry."""
        out = self.fleet(host or self.h1, "status", "--json", transport=transport)
        assert out.returncode == 0, out.stdout + out.stderr
        import json

        return {h["hostname"]: h for h in json.loads(out.stdout)["hosts"]}

    def observer(self, host: Host | None = None, transport: str | None = None) -> Observer:
        obs = Observer(self, host or self.h1, transport)
        self.observers.append(obs)
        return obs

    # -- HTTP through Mongrel2 (from h1) ---------------------------------------------

    def host_of(self, answer: dict) -> str:
        for host in self.net.hosts:
            if host.ns_inode == answer["netns"]:
                return host.name
        return f"?netns={answer['netns']}"

    def get(self, path: str = "/t/", timeout: float = 10.0) -> dict:
        import http.client
        import json

        def one() -> dict:
            conn = http.client.HTTPConnection(self.m2.bind_address, self.m2.port, timeout=timeout)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
                assert resp.status == 200, (resp.status, body)
                return json.loads(body)
            finally:
                conn.close()

        return self.h1.call(one)

    def served_by(self, count: int, timeout: float = 10.0) -> dict[str, set[int]]:
        """Send `count` requests on one keep-alive connection; host name -> worker pids that answered.

        One connection on purpose: Mongrel2 round-robins its disconnect notices
        over the handlers too, so with a new connection per request and two
        handlers every request would land on the same one.
        """
        from tests.support.load import json_answers

        out: dict[str, set[int]] = {}
        for answer in self.h1.call(json_answers, self.m2.bind_address, self.m2.port, "/t/", count, timeout):
            name = self.host_of(answer)
            assert answer["host"] in (None, name), answer  # the env var agrees with the namespace
            out.setdefault(name, set()).add(answer["pid"])
        return out

    def load(self, clients: int = 4, timeout: float = 5.0, max_duration: float = 60.0):
        """A started bounded Load through Mongrel2 from h1; `load.hosts` counts answers per host."""
        import json
        import threading
        from collections import Counter

        from tests.support.load import Load

        inodes = {host.ns_inode: host.name for host in self.net.hosts}
        hosts: Counter = Counter()
        lock = threading.Lock()

        def expect(body: bytes) -> bool:
            try:
                name = inodes.get(json.loads(body)["netns"])
            except (ValueError, KeyError, TypeError):
                return False
            with lock:
                hosts[name] += 1
            return name is not None

        load = Load(self.m2.port, "/t/", expect=expect, clients=clients, timeout=timeout,
                    max_duration=max_duration, host=self.m2.bind_address)
        load.hosts = hosts  # type: ignore[attr-defined]
        return self.h1.call(load.start)  # its client threads inherit h1's namespace

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop every fleet process (TERM, then KILL of the group), observers and Mongrel2."""
        problems = []
        for obs in self.observers:
            try:
                obs.close()
            except Exception as error:
                problems.append(f"observer: {error!r}")
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                if proc.stop(None, timeout=STOP_TIMEOUT) is None:
                    problems.append(f"{proc} did not exit within {STOP_TIMEOUT}s of SIGTERM")
            except Exception as error:
                problems.append(f"{proc}: stop: {error!r}")
        if self.m2 is not None:
            try:
                self.m2.stop()
            except Exception as error:
                problems.append(f"mongrel2: stop: {error!r}")
        return problems
