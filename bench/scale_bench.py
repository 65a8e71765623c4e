"""fleet on many namespace hosts: join, status, failure detection, reload, group traffic, master CPU.

Topology (tests/support/netns.py, composed, not changed): for --hosts N,
N + 1 namespaces on one private bridge (198.18.0.0/24, nothing on the real
interface):

- h1: Mongrel2 and `fleet master -p 1 --threads 1` (app tests/apps/hostapp.py);
- h2 .. hN: `fleet node -p 1 --threads 1` (N - 1 nodes: N cluster hosts in all);
- h(N+1), the probe: a passive observer (ClusterAgent, role "observer",
  polled every 10 ms), a plain socket joined to the group that counts every
  datagram by kind, the `fleet status` and `fleet reload` commands, and eth0's
  counters (every multicast frame is flooded to it: the bridge snoops no IGMP).

Per round (fresh master and nodes each round; the namespaces are kept):

1. join: all nodes started at once (or --stagger S apart); times from the
   first start until the master logged every node joined / ready, until the
   observer saw every host ready, and until a `fleet status --json` run (run
   back to back on the probe once every node logged ready: run during the
   join, those processes would compete for the CPUs the nodes start on,
   which the floor's masters do not) listed every host ready; then at least one
   request answered through Mongrel2 by every host (proof they serve);
2. steady state, --window seconds: group packets/s and bytes/s (datagrams by
   kind from the counting socket; frames and bytes from the probe's eth0,
   IP fragments included), datagram sizes, UDP receive-buffer drops in the
   master's namespace, CPU of the master's supervisor (psutil cpu_times) and
   the mean CPU of the nodes' supervisors; the wall time of one `fleet status`;
3. failure detection: SIGKILL the process group of the node on hN (node and
   its worker); time until the observer shows it dead, and until the master
   logged it dead; the node is started again and waited for;
4. `fleet reload --timeout 600` on the probe: wall time until the command
   reports every host at the new generation, its exit code, the master's CPU
   during it, and how many nodes were passed over in their turn (stuck).

Then `decode_costs()`: in-process CPU per received heartbeat and per
announce build, at 1,000 hosts, for the projection in docs/scale.md.

    sudo .venv/bin/python -m bench.scale_bench                      # --hosts 50, 3 rounds
    sudo .venv/bin/python -m bench.scale_bench --hosts 10 25 50     # the fit points

Prints a table; writes bench/results/scale_bench.json. Namespaces and every
process are removed in `finally` (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from bench.common import RESULTS, cpu_seconds, write_results
from fleet.cluster import protocol as proto
from tests.support import netns
from tests.support.netns import FleetCluster, FleetProc, Network

OUT = RESULTS / "scale_bench.json"
NODE_ARGS = ["-p", "1", "--threads", "1"]
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


# -- the probe: counting what the group carries ---------------------------------------


class GroupCounter:
    """A socket in the probe's namespace joined to the group: datagrams and bytes by kind."""

    def __init__(self, probe: netns.Host, group: str) -> None:
        address, port = group.rsplit(":", 1)
        self.sock = probe.call(self._open, address, int(port), probe.address)
        self.lock = threading.Lock()
        self.count: Counter = Counter()
        self.bytes: Counter = Counter()
        self.largest: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="group-counter", daemon=True)
        self._thread.start()

    @staticmethod
    def _open(address: str, port: int, iface: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # count, never drop
        sock.bind((address, port))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        struct.pack("4s4s", socket.inet_aton(address), socket.inet_aton(iface)))
        sock.settimeout(0.2)
        return sock

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except (TimeoutError, OSError):
                continue
            try:
                kind = proto.Kind(data[4]).name
            except (IndexError, ValueError):
                kind = "other"
            with self.lock:
                self.count[kind] += 1
                self.bytes[kind] += len(data)
                self.largest[kind] = max(self.largest[kind], len(data))

    def snapshot(self) -> tuple[Counter, Counter]:
        with self.lock:
            return Counter(self.count), Counter(self.bytes)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def link_counters(host: netns.Host) -> tuple[int, int]:
    """(frames, bytes) received on the host's eth0."""
    out = host.ip("-s", "-j", "link", "show", "eth0")
    rx = json.loads(out.stdout)[0]["stats64"]["rx"]
    return rx["packets"], rx["bytes"]


def udp_snmp(host: netns.Host) -> dict[str, int]:
    """The Udp: line of /proc/net/snmp in the host's namespace."""
    out = host.exec(["cat", "/proc/net/snmp"])
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


# -- the master's log ---------------------------------------------------------------


def log_events(proc: FleetProc, pattern: str) -> dict[str, float]:
    """hostname -> wall time (epoch) of the first master log line 'cluster: HOST (id) PATTERN'."""
    found: dict[str, float] = {}
    rx = re.compile(r"cluster: (\S+) \([0-9a-f]{8}\) " + pattern)
    for line in proc.log_text().splitlines():
        stamp, match = LOG_TIME.match(line), rx.search(line)
        if stamp and match and match.group(1) not in found:
            moment = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
            found[match.group(1)] = moment.timestamp()
    return found


def first_line_at(proc: FleetProc, marker: str, after: int = 0) -> float | None:
    """Wall time (epoch) of the first log line containing `marker`, past the first `after` such lines."""
    seen = 0
    for line in proc.log_text().splitlines():
        if marker in line:
            seen += 1
            stamp = LOG_TIME.match(line)
            if seen > after and stamp:
                return datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def wait_lines(procs: list[FleetProc], marker: str, timeout: float, after: int = 0) -> list[float]:
    """Each process's wall time of its first `marker` line past `after` of them."""
    deadline = time.monotonic() + timeout
    while True:
        times = [first_line_at(proc, marker, after) for proc in procs]
        if all(t is not None for t in times):
            return times  # type: ignore[return-value]
        if time.monotonic() > deadline:
            late = [str(proc) for proc, t in zip(procs, times) if t is None]
            raise RuntimeError(f"{len(late)} processes without {marker!r} after {timeout}s: {late[:5]}")
        time.sleep(0.1)


def join_cpu_per_host(procs: list[FleetProc]) -> dict[str, float]:
    """Mean CPU seconds a host's processes have used so far: the supervisor, the children it
    reaped (the app check) and the live ones (fork server, workers), and their total."""
    parts = Counter()
    for proc in procs:
        try:
            top = psutil.Process(proc.pid)
            times = top.cpu_times()
            parts["supervisor"] += times.user + times.system
            parts["reaped"] += times.children_user + times.children_system
            parts["live_children"] += cpu_seconds(child.pid for child in top.children(recursive=True))
        except psutil.Error:
            pass
    mean = {part: round(value / max(1, len(procs)), 3) for part, value in parts.items()}
    mean["total"] = round(sum(parts.values()) / max(1, len(procs)), 3)
    return mean


def floor(cluster: FleetCluster, n: int) -> dict:
    """The same processes with no cluster at all: a standalone `fleet master` serving
    Mongrel2 with the same app and worker count on h2 .. hN, all started at once, then
    all HUPed at once: what starting and reloading that many workers costs this machine,
    the floor the cluster's join and reload are held to."""
    args = []
    for route in cluster.m2.routes:
        args += ["--zeromq", f"{route.send_spec},{route.recv_spec}"]
    args += ["--module", "hostapp", "--pythonpath", str(netns.APPS), *NODE_ARGS, "--graceful-timeout", "5"]
    wall0 = time.time()
    procs = []
    for i in range(2, n + 1):
        proc = FleetProc(cluster.net.host(i), "master", args, cluster.workdir / f"floor-h{i}-{len(cluster.procs)}.log")
        cluster.procs.append(proc)
        procs.append(proc)
    ready = wait_lines(procs, "master ready", 180)
    cpu = join_cpu_per_host(procs)
    result = {"floor_all_ready_s": round(max(ready) - wall0, 3), "floor_join_cpu_s_per_host": cpu.pop("total"),
              "floor_join_cpu_parts": cpu}
    time.sleep(1.0)
    hup = time.time()
    for proc in procs:
        proc.send_signal(signal.SIGHUP)
    done = wait_lines(procs, "reload complete", 180)
    result["floor_all_reloaded_s"] = round(max(done) - hup, 3)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.stop(None, timeout=netns.STOP_TIMEOUT)
    return result


# -- one round -------------------------------------------------------------------------


def status_hosts(cluster: FleetCluster, probe: netns.Host) -> tuple[dict[str, dict], float]:
    t = time.monotonic()
    out = cluster.fleet(probe, "status", "--json", timeout=120)
    took = time.monotonic() - t
    if out.returncode != 0:
        raise RuntimeError(f"fleet status: {out.returncode}: {out.stderr[-2000:]}")
    return {h["hostname"]: h for h in json.loads(out.stdout)["hosts"]}, took


def all_ready(hosts: dict[str, dict], names: list[str]) -> bool:
    return all(hosts.get(n, {}).get("state") == "ready" for n in names)


def serve_check(cluster: FleetCluster, names: list[str], tries: int = 8) -> dict[str, int]:
    """Requests through Mongrel2 until every host answered at least one: host -> answers."""
    answered: Counter = Counter()
    for _ in range(tries):
        for name, pids in cluster.served_by(4 * len(names), timeout=10).items():
            answered[name] += len(pids)
        if all(answered[n] for n in names):
            break
    return dict(answered)


def one_round(cluster: FleetCluster, n: int, args: argparse.Namespace) -> dict:
    net = cluster.net
    probe = net.host(n + 1)
    names = [f"h{i}" for i in range(1, n + 1)]
    node_names = names[1:]
    result: dict = {}
    counter = GroupCounter(probe, cluster.group)
    observer = cluster.observer(probe)
    try:
        result.update(floor(cluster, n))
        master = cluster.start_master(processes=1, threads=1)

        # 1. join
        cj0, bj0 = counter.snapshot()
        mj0 = cpu_seconds([master.pid])
        wall0, t0 = time.time(), time.monotonic()
        for i in range(2, n + 1):
            cluster.start_node(i, ready=False, extra=NODE_ARGS)
            if args.stagger:
                time.sleep(args.stagger)
        result["start_spread_s"] = round(time.monotonic() - t0, 3)
        # Wait on the nodes' own logs first: `fleet status` runs during the join would be Python
        # processes competing for the CPUs the nodes start on, which the floor does not have.
        node_procs = [cluster.nodes[i] for i in range(2, n + 1)]
        nodes_ready = wait_lines(node_procs, "node ready", args.join_timeout)
        cpu = join_cpu_per_host(node_procs)
        result["nodes_join_cpu_s_per_host"], result["nodes_join_cpu_parts"] = cpu.pop("total"), cpu
        status_runs = []
        deadline = t0 + args.join_timeout
        while True:
            hosts, took = status_hosts(cluster, probe)
            status_runs.append(round(took, 2))
            if all_ready(hosts, names):
                result["status_lists_all_ready_s"] = round(time.monotonic() - t0, 3)
                break
            if time.monotonic() > deadline:
                missing = [x for x in names if hosts.get(x, {}).get("state") != "ready"]
                raise RuntimeError(f"not all ready after {args.join_timeout}s: {missing[:10]}...")
        result["status_runs_during_join_s"] = status_runs
        cj1, bj1 = counter.snapshot()
        result["join_datagrams"] = {k: cj1[k] - cj0[k] for k in cj1}
        result["join_datagram_bytes"] = {k: bj1[k] - bj0[k] for k in bj1}
        result["master_cpu_s_during_join"] = round(cpu_seconds([master.pid]) - mj0, 3)
        ready_at = []
        for name in names:
            ready_at.append(observer.wait_state(name, "ready", 30) - t0)
        result["observer_all_ready_s"] = round(max(ready_at), 3)
        joined = log_events(master, "joined")
        ready = log_events(master, r"state: starting -> ready")
        missing = [x for x in node_names if x not in joined]
        result["master_log_all_joined_s"] = None if missing else round(max(joined[x] for x in node_names) - wall0, 3)
        result["master_log_all_ready_s"] = (None if any(x not in ready for x in node_names)
                                            else round(max(ready[x] for x in node_names) - wall0, 3))
        result["nodes_log_all_ready_s"] = round(max(nodes_ready) - wall0, 3)
        # The cluster's own part, per node: asking to configuration received; its ready to the master's log.
        asked = wait_lines(node_procs, "for its configuration", 5)
        received = wait_lines(node_procs, "configuration of generation", 5)
        config_s = [r - a for a, r in zip(asked, received)]
        seen_s = [ready[f"h{i}"] - t for i, t in zip(range(2, n + 1), nodes_ready) if f"h{i}" in ready]
        for key, values in (("node_config_s", config_s), ("master_sees_ready_s", seen_s)):
            if values:
                result[f"{key}_median"] = round(statistics.median(values), 3)
                result[f"{key}_worst"] = round(max(values), 3)
        served = serve_check(cluster, names)
        result["hosts_that_served"] = sum(1 for x in names if served.get(x))
        result["hosts_that_did_not_serve"] = [x for x in names if not served.get(x)]

        # 2. steady state
        time.sleep(2.0)  # let the serve check's requests drain out of the rate figures
        node_pids = [cluster.nodes[i].pid for i in range(2, n + 1)]
        c0, b0 = counter.snapshot()
        f0 = link_counters(probe)
        u0 = udp_snmp(net.host(1))
        m0, nd0, w0 = cpu_seconds([master.pid]), cpu_seconds(node_pids), time.monotonic()
        time.sleep(args.window)
        m1, nd1, w1 = cpu_seconds([master.pid]), cpu_seconds(node_pids), time.monotonic()
        c1, b1 = counter.snapshot()
        f1 = link_counters(probe)
        u1 = udp_snmp(net.host(1))
        span = w1 - w0
        result["window_s"] = round(span, 2)
        result["datagrams_per_s"] = {k: round((c1[k] - c0[k]) / span, 2) for k in c1}
        result["datagram_bytes_per_s"] = {k: round((b1[k] - b0[k]) / span, 1) for k in b1}
        result["datagram_mean_size"] = {k: round((b1[k] - b0[k]) / max(1, c1[k] - c0[k]), 1) for k in c1}
        result["datagram_largest"] = dict(counter.largest)
        result["frames_per_s"] = round((f1[0] - f0[0]) / span, 2)
        result["frame_bytes_per_s"] = round((f1[1] - f0[1]) / span, 1)
        result["master_udp"] = {k: u1[k] - u0[k] for k in ("InDatagrams", "RcvbufErrors", "InErrors")}
        result["master_cpu_pct"] = round(100 * (m1 - m0) / span, 2)
        result["node_cpu_pct_mean"] = round(100 * (nd1 - nd0) / span / len(node_pids), 2)
        result["status_wall_s"] = round(status_hosts(cluster, probe)[1], 3)

        # 3. failure detection: node and worker, SIGKILL
        # h9 sorts last by hostname: past MAX_ANNOUNCED_MEMBERS rows it is the one the
        # master's announced table leaves out.
        v = 9 if n >= 10 else n
        victim = cluster.nodes[v]
        observer.wait_state(f"h{v}", "ready", 15)
        killed_wall, killed = time.time(), time.monotonic()
        victim.kill_group()
        victim.proc.wait(5)
        dead_at = observer.wait_state(f"h{v}", "dead", 30, since=killed)
        result["detection_observer_s"] = round(dead_at - killed, 3)
        time.sleep(0.5)  # the master's log line
        dead = {k: t for k, t in log_events(master, "dead").items() if t >= killed_wall - 0.01}
        result["detection_master_log_s"] = round(dead[f"h{v}"] - killed_wall, 3) if f"h{v}" in dead else None
        # A `fleet status` started after the death knows it only from the master's announces.
        hosts = status_hosts(cluster, probe)[0]
        result["status_after_death_lists"] = len(hosts)
        result["status_after_death_victim_state"] = hosts.get(f"h{v}", {}).get("state")
        cluster.start_node(v, ready=False, extra=NODE_ARGS)
        deadline = time.monotonic() + 60
        while not all_ready(status_hosts(cluster, probe)[0], names):
            if time.monotonic() > deadline:
                raise RuntimeError("the restarted node did not come back ready")

        # 4. fleet reload, under load through Mongrel2, with the fleet's ready workers sampled
        load = cluster.load(clients=4, timeout=10.0, max_duration=args.reload_timeout + 60)
        load.wait_succeeded(20)
        serving: list[float] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.1):
                with observer.lock:
                    views = [v for v in observer.views.values() if v["state"] != "dead"]
                total = sum(v["workers_total"] for v in views)
                if total:
                    serving.append(sum(v["workers_ready"] for v in views) / total)

        sampler = threading.Thread(target=sample, name="serving-sampler", daemon=True)
        sampler.start()
        reload_pids = [proc.pid for proc in cluster.nodes.values()]
        m0, nr0, t = cpu_seconds([master.pid]), cpu_seconds(reload_pids), time.monotonic()
        try:
            out = cluster.fleet(probe, "reload", "--timeout", str(args.reload_timeout),
                                timeout=args.reload_timeout + 60)
            took = time.monotonic() - t
        finally:
            sampling.set()
            sampler.join(5)
            report = load.stop()
        result["reload_load"] = {"sent": report.sent, "succeeded": report.succeeded, "failed": report.failed,
                                 "hung": report.hung}
        result["reload_min_workers_serving_pct"] = round(100 * min(serving), 1) if serving else None
        m1, nr1 = cpu_seconds([master.pid]), cpu_seconds(reload_pids)
        result["node_cpu_pct_mean_during_reload"] = round(100 * (nr1 - nr0) / took / len(reload_pids), 2)
        result["reload_s"] = round(took, 3)
        result["reload_exit"] = out.returncode
        result["reload_first_line"] = out.stdout.splitlines()[0] if out.stdout else out.stderr[-300:]
        result["reload_hosts_ok"] = out.stdout.count(": ok")
        # Nodes reloading at once: from each node's "reload: starting" to its "reload complete".
        spans = []
        for proc in cluster.nodes.values():
            begin, end = first_line_at(proc, "reload: starting"), first_line_at(proc, "reload complete")
            if begin is not None and end is not None:
                spans.append((begin, end))
        result["nodes_reloading_at_once_max"] = max(
            (sum(1 for b, e in spans if b <= moment < e) for moment, _ in spans), default=0)
        result["master_cpu_pct_during_reload"] = round(100 * (m1 - m0) / took, 2)
        # Turns (fleet.cluster.turns): a node in its turn too long is passed over, logged by every waiter.
        result["nodes_passed_over_in_their_turn"] = len({
            line.split("cluster: node ")[1].split()[0] for p in cluster.nodes.values()
            for line in p.log_text().splitlines() if "the next node takes its turn" in line})
    finally:
        observer.close()
        cluster.observers.remove(observer)
        counter.close()
        problems = stop_fleet(cluster)
        if problems:
            result["teardown_problems"] = problems
    return result


def stop_fleet(cluster: FleetCluster) -> list[str]:
    """TERM every fleet process of this round (then KILL its group); Mongrel2 stays."""
    problems = []
    for proc in cluster.procs:
        proc.send_signal(signal.SIGTERM)
    for proc in cluster.procs:
        try:
            if proc.stop(None, timeout=netns.STOP_TIMEOUT) is None:
                problems.append(f"{proc} did not exit within {netns.STOP_TIMEOUT}s of SIGTERM")
        except Exception as error:
            problems.append(f"{proc}: stop: {error!r}")
    cluster.nodes.clear()  # cluster.procs stays: its length numbers the next round's log files
    cluster.master = None
    return problems


def run_size(n: int, args: argparse.Namespace) -> dict:
    made = time.monotonic()
    net = Network(hosts=n + 1)
    workdir = Path(tempfile.mkdtemp(prefix=f"scale-bench-{n}-"))
    rounds: list[dict] = []
    out: dict = {"hosts": n, "nodes": n - 1, "workdir": str(workdir), "rounds": rounds}
    cluster = None
    try:
        net.create()
        out["namespaces_create_s"] = round(time.monotonic() - made, 2)
        cluster = FleetCluster(net, workdir)
        cluster.start_mongrel2()
        for r in range(args.rounds):
            print(f"[{n} hosts] round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            try:
                rounds.append(one_round(cluster, n, args))
            except Exception as error:  # record it; the other rounds may still tell something
                rounds.append({"error": f"{type(error).__name__}: {error}"[:2000]})
            print(f"[{n} hosts] {json.dumps(rounds[-1])[:1500]}", file=sys.stderr, flush=True)
    finally:
        problems = cluster.close() if cluster is not None else []
        problems += net.destroy()
        left = netns.leftover_namespaces(net.token)
        if problems or left:
            out["teardown_problems"] = problems + [f"namespaces left: {left}"] * bool(left)
    out["median"] = medians(rounds)
    return out


def medians(rounds: list[dict]) -> dict:
    good = [r for r in rounds if "error" not in r]
    med = {}
    for key in ("start_spread_s", "master_log_all_joined_s", "master_log_all_ready_s", "observer_all_ready_s",
                "status_lists_all_ready_s", "status_wall_s", "frames_per_s", "frame_bytes_per_s",
                "master_cpu_pct", "node_cpu_pct_mean", "detection_observer_s", "detection_master_log_s",
                "reload_s", "master_cpu_pct_during_reload", "master_cpu_s_during_join",
                "nodes_passed_over_in_their_turn", "floor_all_ready_s", "floor_all_reloaded_s",
                "nodes_log_all_ready_s", "nodes_reloading_at_once_max", "node_config_s_median",
                "floor_join_cpu_s_per_host", "nodes_join_cpu_s_per_host",
                "node_config_s_worst", "master_sees_ready_s_median", "master_sees_ready_s_worst",
                "reload_min_workers_serving_pct", "node_cpu_pct_mean_during_reload"):
        values = [r[key] for r in good if r.get(key) is not None]
        med[key] = round(statistics.median(values), 3) if values else None
    for key in ("datagrams_per_s", "datagram_bytes_per_s", "datagram_mean_size", "join_datagrams"):
        kinds = {k for r in good for k in r.get(key, {})}
        med[key] = {k: round(statistics.median([r[key].get(k, 0) for r in good]), 2) for k in sorted(kinds)}
    med["rounds_ok"] = len(good)
    return med


# -- in-process costs for the projection ------------------------------------------------


def decode_costs(hosts: int = 1000) -> dict:
    """CPU per received heartbeat (decode + replay guard + membership), the announce build, the
    rolling-turn check and one status table, with `hosts` hosts known."""
    from fleet.cluster.agent import ClusterAgent, ClusterOptions
    from fleet.cluster.membership import Membership
    from fleet.multicast import Group

    keyring = proto.parse_key_file(proto.keygen())
    now = time.time()
    origins = [proto.Origin("scale", proto.derive_node_id(f"host{i}"), proto.new_boot_id()) for i in range(hosts)]
    datagrams = []
    for seq in range(1, 4):
        for i, origin in enumerate(origins):
            beat = origin.make(proto.Heartbeat, now, role="node", state="ready", generation=1, workers_ready=1,
                               workers_total=1, requests_served=seq * 1000, requests_per_second=10.0,
                               rss=50_000_000, hostname=f"web-{i:04d}.example.internal",
                               address=(f"10.0.{i // 250}.{i % 250}", 1717), app_version="1.2.3")
            datagrams.append(proto.encode(beat, keyring))
    guard, members = proto.ReplayGuard(), Membership(1.0)
    t = time.perf_counter()
    for data in datagrams:
        message = proto.decode(data, keyring, now, cluster="scale")
        guard.admit(message, now)
        members.observe(message, ("10.0.0.1", 1717), now)
    per_beat = (time.perf_counter() - t) / len(datagrams)
    t = time.perf_counter()
    for _ in range(20):
        members.tick(now)
    tick = (time.perf_counter() - t) / 20
    t = time.perf_counter()
    for _ in range(20):
        table = members.hosts(now)
    views = (time.perf_counter() - t) / 20
    # The announce: rows for every host, cut to MAX_ANNOUNCED_MEMBERS, encoded and signed.
    options = ClusterOptions(Group.parse("239.255.9.9:1717"), "127.0.0.1", keyring, name="scale")
    agent = ClusterAgent(options, "master", config={"app": "x"})
    agent.members = members
    sent: list[bytes] = []
    agent.channel.send = sent.append  # measure the build, send nothing
    t = time.perf_counter()
    for _ in range(20):
        agent.announce(now)
    announce = (time.perf_counter() - t) / 20
    agent.close()
    # What one heartbeat costs a node through ClusterAgent.take, awaiting a turn (read whole)
    # and not (dropped by its kind byte before the MAC).
    per_node = {}
    for awaiting in (True, False):
        node = ClusterAgent(options, "node")
        node.hears_peers = awaiting
        t = time.perf_counter()
        for data in datagrams:
            node.take(data, ("10.0.0.1", 1717), False, now)
        per_node[awaiting] = (time.perf_counter() - t) / len(datagrams)
        node.close()
    return {"hosts_known": hosts, "heartbeat_datagram_bytes": len(datagrams[0]),
            "node_takes_one_heartbeat_awaiting_a_turn_us": round(per_node[True] * 1e6, 2),
            "node_takes_one_heartbeat_otherwise_us": round(per_node[False] * 1e6, 2),
            "heartbeats_a_default_receive_buffer_holds": buffer_capacity(datagrams[0]),
            "receive_one_heartbeat_us": round(per_beat * 1e6, 1),
            "membership_tick_ms": round(tick * 1e3, 3), "members_hosts_table_ms": round(views * 1e3, 3),
            "announce_build_ms": round(announce * 1e3, 3), "announce_bytes": len(sent[-1]),
            "announced_rows": proto.MAX_ANNOUNCED_MEMBERS, "status_rows": len(table)}


def buffer_capacity(datagram: bytes, sent: int = 2000) -> int:
    """How many copies of `datagram` an unread UDP socket with the default receive buffer
    (net.core.rmem_default) queues before the kernel drops (loopback unicast)."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind(("127.0.0.1", 0))
        for _ in range(sent):
            sender.sendto(datagram, receiver.getsockname())
        receiver.setblocking(False)
        held = 0
        while True:
            try:
                receiver.recv(65535)
            except BlockingIOError:
                return held
            held += 1
    finally:
        receiver.close()
        sender.close()


# -- output ---------------------------------------------------------------------------------


def print_table(results: dict) -> None:
    sizes = results["sizes"]
    keys = ["floor_all_ready_s", "floor_all_reloaded_s", "nodes_log_all_ready_s", "floor_join_cpu_s_per_host",
            "nodes_join_cpu_s_per_host", "node_config_s_median",
            "node_config_s_worst", "master_sees_ready_s_median", "master_sees_ready_s_worst", "start_spread_s",
            "master_log_all_joined_s", "master_log_all_ready_s", "observer_all_ready_s",
            "status_lists_all_ready_s", "status_wall_s", "detection_observer_s", "detection_master_log_s",
            "reload_s", "frames_per_s", "frame_bytes_per_s", "master_cpu_pct", "master_cpu_pct_during_reload",
            "node_cpu_pct_mean", "master_cpu_s_during_join", "nodes_passed_over_in_their_turn",
            "nodes_reloading_at_once_max", "reload_min_workers_serving_pct", "node_cpu_pct_mean_during_reload",
            "rounds_ok"]
    width = max(map(len, keys))
    print("\nmedians" + " " * (width - 7) + "".join(f"{s['hosts']:>12} h" for s in sizes))
    for key in keys:
        print(f"{key:<{width}}" + "".join(f"{str(s['median'].get(key)):>14}" for s in sizes))
    for key in ("datagrams_per_s", "datagram_bytes_per_s", "datagram_mean_size", "join_datagrams"):
        print(f"{key}: " + " | ".join(f"{s['hosts']}h {s['median'].get(key)}" for s in sizes))
    print("fleet status after a death (hosts listed, the dead one's state): " + " | ".join(
        f"{s['hosts']}h " + str([(r.get("status_after_death_lists"), r.get("status_after_death_victim_state"))
                                  for r in s["rounds"]]) for s in sizes))
    print(f"in-process costs: {results.get('decode_costs')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, nargs="+", default=[50],
                        help="cluster sizes, master included (default 50)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=10.0, help="steady-state window, seconds")
    parser.add_argument("--stagger", type=float, default=0.0, help="seconds between node starts")
    parser.add_argument("--join-timeout", type=float, default=180.0)
    parser.add_argument("--reload-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if any(not 2 <= n <= 249 for n in args.hosts):
        print("scale_bench: error: --hosts must be 2..249 (one namespace more for the probe)", file=sys.stderr)
        return 2
    reason = netns.unavailable_reason()
    if reason:
        print(f"scale_bench: cannot run: {reason}", file=sys.stderr)
        return 2
    results: dict = {"cpus": psutil.cpu_count(), "load_avg_at_start": list(psutil.getloadavg()),
                     "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                     "args": {k: str(v) for k, v in vars(args).items()}, "sizes": []}
    for n in args.hosts:
        results["sizes"].append(run_size(n, args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_results(args.out, "scale_bench", args, results)  # keep what we have
    results["decode_costs"] = decode_costs()
    results["load_avg_at_end"] = list(psutil.getloadavg())
    write_results(args.out, "scale_bench", args, results)
    print_table(results)
    print(f"\nwritten: {args.out}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    # Ctrl-C and SIGTERM unwind through the finally blocks (namespaces, processes),
    # also when started in the background, where a shell ignores SIGINT for us.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # the finally blocks above already cleaned up
        print("scale_bench: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
