"""Scenarios shared by the soak/hostile tests and their bench scripts (same code, other durations).

    cluster = ServingCluster(net, workdir)      # FleetCluster + uploads + a --stats endpoint per host
    cluster.start_all(processes=2)
    result = run_soak(cluster, seconds=120)      # load, a reload every minute, a worker SIGKILLed every 2
    cluster.close(); gone = orphans(cluster)     # every process the run saw must be gone

Built on tests/support/netns.py's public API only (FleetCluster, Host.call, ...).

Load: `load.Load` GET clients at a fixed pace (keep-alive http.client), plus
one upload client POSTing bodies over Mongrel2's limits.content_length, so
each goes through Mongrel2's temp-file upload path; the app answers the
length and SHA-256 it read, which the client checks.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fleet.ctl import fetch_stats
from tests.support.harness import APPS
from tests.support.load import FAILED, HUNG, OK, Load, Sample  # noqa: I001
from tests.support.netns import FleetCluster, Host


class ServingCluster(FleetCluster):
    """A FleetCluster whose app (soakapp) reads uploads, with `fleet stats` on every fleet process."""

    def stats_endpoint(self, host: Host) -> str:
        return f"ipc://{self.workdir}/stats-{host.name}"

    def master_args(self, processes: int = 1, threads: int = 2, transport: str | None = None) -> list[str]:
        args = super().master_args(processes, threads, transport)
        args[args.index("--module") + 1] = "soakapp"
        assert str(APPS) in args
        return args + ["--mongrel2-chroot", str(self.m2.chroot),
                       "--mongrel2-content-length", str(self.m2.content_length),
                       "--stats", self.stats_endpoint(self.h1)]

    def start_node(self, index: int, key: Path | None = None, ready: bool = True,
                   extra: list[str] | None = None):
        extra = ["--stats", self.stats_endpoint(self.net.host(index)), *(extra or [])]
        return super().start_node(index, key, ready, extra)

    def stats(self, index: int, timeout: float = 3.0) -> dict | None:
        """`fleet stats` of the fleet process on host `index` (ipc: reachable from any namespace)."""
        return fetch_stats(self.stats_endpoint(self.net.host(index)), timeout)

    def upload_files(self) -> list[Path]:
        return sorted((self.m2.chroot / "tmp").glob("mongrel2.upload.*"))

    def wait_ready_hosts(self, count: int = 3, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        seen: dict = {}
        while time.monotonic() < deadline:
            seen = self.status()
            if len(seen) >= count and all(h["state"] == "ready" for h in seen.values()):
                return seen
            time.sleep(0.5)
        raise AssertionError(f"not {count} ready hosts after {timeout}s: {seen}")


# -- processes: who is who, RSS and open fds ----------------------------------------------


@dataclass(frozen=True)
class Proc:
    role: str  # master | node | master-worker | node-worker | mongrel2
    host: str
    pid: int
    created: float  # psutil create_time: tells a reused pid apart


def processes(cluster: FleetCluster) -> list[Proc]:
    """Every live process of the run: fleet master/nodes, their workers, Mongrel2."""
    found = []

    def add(role: str, host: str, pid: int) -> None:
        try:
            found.append(Proc(role, host, pid, psutil.Process(pid).create_time()))
        except psutil.Error:
            pass

    for proc in cluster.procs:
        if proc.running():
            add(proc.command, proc.host.name, proc.pid)
            for pid in proc.worker_pids():
                add(f"{proc.command}-worker", proc.host.name, pid)
    if cluster.m2 is not None and cluster.m2.pid is not None and cluster.m2.running():
        add("mongrel2", "h1", cluster.m2.pid)
    return found


def measure(procs: list[Proc]) -> list[dict]:
    rows = []
    for p in procs:
        try:
            ps = psutil.Process(p.pid)
            with ps.oneshot():
                rows.append({"role": p.role, "host": p.host, "pid": p.pid, "rss": ps.memory_info().rss,
                             "fds": ps.num_fds(), "threads": ps.num_threads()})
        except psutil.Error:
            continue
    return rows


def by_role(rows: list[dict]) -> dict[str, dict]:
    """Per role: how many processes, median and max RSS (MB) and open fds."""
    out: dict[str, dict] = {}
    for role in sorted({r["role"] for r in rows}):
        mine = [r for r in rows if r["role"] == role]
        rss = [r["rss"] / 1048576 for r in mine]
        fds = [r["fds"] for r in mine]
        out[role] = {"n": len(mine), "rss_mb_median": round(statistics.median(rss), 1),
                     "rss_mb_max": round(max(rss), 1), "fds_median": statistics.median(fds),
                     "fds_max": max(fds)}
    return out


def orphans(seen: dict[int, Proc]) -> list[Proc]:
    """Processes of the run still alive (same pid and start time)."""
    alive = []
    for p in seen.values():
        try:
            ps = psutil.Process(p.pid)
            if ps.create_time() == p.created and ps.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            continue
    return alive


# -- load ----------------------------------------------------------------------------------


def netns_checker(cluster: FleetCluster):
    inodes = {host.ns_inode for host in cluster.net.hosts}
    hosts: Counter = Counter()
    lock = threading.Lock()

    def expect(body: bytes) -> bool:
        try:
            inode = json.loads(body)["netns"]
        except (ValueError, KeyError, TypeError):
            return False
        with lock:
            hosts[inode] += 1
        return inode in inodes

    return expect, hosts


def start_get_load(cluster: FleetCluster, clients: int, pause: float, seconds: float,
                   timeout: float = 10.0) -> Load:
    expect, hosts = netns_checker(cluster)
    load = Load(cluster.m2.port, "/t/", expect=expect, clients=clients, timeout=timeout, pause=pause,
                max_duration=seconds, host=cluster.m2.bind_address)
    load.hosts = hosts  # type: ignore[attr-defined]
    return cluster.h1.call(load.start)  # its threads inherit h1's namespace


class Uploader:
    """One client POSTing random bodies (over the inline limit) every `interval` s; checks the digest."""

    def __init__(self, cluster: FleetCluster, interval: float, seconds: float, timeout: float = 20.0,
                 sizes: tuple[int, int] = (10_000, 300_000)) -> None:
        self.cluster = cluster
        self.interval = interval
        self.deadline = time.monotonic() + seconds
        self.timeout = timeout
        self.sizes = sizes
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)

    def start(self) -> Uploader:
        self.cluster.h1.call(self._thread.start)  # the thread lives in h1's namespace
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)

    def _run(self) -> None:
        rng = random.Random()
        m2 = self.cluster.m2
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            body = rng.randbytes(rng.randint(*self.sizes))
            start = time.monotonic()
            outcome, detail = FAILED, None
            conn = http.client.HTTPConnection(m2.bind_address, m2.port, timeout=self.timeout)
            try:
                conn.request("POST", "/t/upload", body=body, headers={"Content-Type": "application/octet-stream"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    detail = resp.status
                else:
                    answer = json.loads(data)
                    if (answer.get("length"), answer.get("sha256")) == (len(body), hashlib.sha256(body).hexdigest()):
                        outcome = OK
                    else:
                        detail = "digest"
            except TimeoutError:
                outcome, detail = HUNG, "timeout"
            except (OSError, http.client.HTTPException, ValueError) as error:
                detail = type(error).__name__
            finally:
                conn.close()
            self.samples.append(Sample(start, time.monotonic() - start, outcome, detail))
            if outcome != OK and len(self.errors) < 20:
                self.errors.append(f"{detail}")
            self._stop.wait(self.interval)

    def tally(self) -> dict:
        out = Counter(s.outcome for s in self.samples)
        return {"sent": len(self.samples), "succeeded": out[OK], "failed": out[FAILED], "hung": out[HUNG],
                "failures": dict(Counter(str(s.detail) for s in self.samples if s.outcome == FAILED)),
                "errors": self.errors[:10]}


# -- the soak --------------------------------------------------------------------------------


@dataclass
class SoakPlan:
    seconds: float
    reload_every: float = 60.0
    kill_every: float = 120.0
    kill_offset: float = 30.0  # kills fall between reloads, so each failure is attributable
    clients: int = 4
    pause: float = 0.05  # per GET client: at most ~20 req/s each (a shared 2-core box)
    upload_every: float = 0.5
    sample_every: float = 60.0


@dataclass
class SoakRun:
    plan: SoakPlan
    events: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)  # per-role figures over time
    start_rows: list[dict] = field(default_factory=list)
    end_rows: list[dict] = field(default_factory=list)
    seen: dict[int, Proc] = field(default_factory=dict)
    get_report: object = None
    uploads: dict = field(default_factory=dict)
    upload_samples: list[Sample] = field(default_factory=list)
    stats_end: dict = field(default_factory=dict)
    upload_files_left: list[str] = field(default_factory=list)
    kill_moments: list[float] = field(default_factory=list)


def _remember(run: SoakRun, procs: list[Proc]) -> None:
    for p in procs:
        run.seen.setdefault(p.pid, p)


def run_soak(cluster: ServingCluster, plan: SoakPlan, say=print) -> SoakRun:
    """Load through Mongrel2 for plan.seconds with a `fleet reload` every reload_every s and a
    random worker SIGKILLed every kill_every s; measures every process at start and end."""
    run = SoakRun(plan)
    rng = random.Random()
    load = start_get_load(cluster, plan.clients, plan.pause, plan.seconds + 30)
    uploader = Uploader(cluster, plan.upload_every, plan.seconds + 30).start()
    try:
        load.wait_succeeded(50, timeout=30)
        procs = processes(cluster)
        _remember(run, procs)
        run.start_rows = measure(procs)
        t0 = time.monotonic()
        end = t0 + plan.seconds
        next_reload, next_kill, next_sample = t0 + plan.reload_every, t0 + plan.kill_offset, t0 + plan.sample_every
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_kill:
                next_kill += plan.kill_every
                workers = [p for p in processes(cluster) if p.role.endswith("-worker")]
                _remember(run, workers)
                if workers:
                    victim = rng.choice(workers)
                    run.kill_moments.append(time.monotonic())
                    os.kill(victim.pid, signal.SIGKILL)
                    run.events.append({"t": round(now - t0, 1), "kill": victim.pid, "role": victim.role,
                                       "host": victim.host})
                    say(f"[soak {now - t0:6.0f}s] SIGKILL {victim.role} {victim.pid} on {victim.host}")
            if now >= next_reload:
                next_reload += plan.reload_every
                began = time.monotonic()
                out = cluster.fleet(cluster.h1, "reload", "--timeout", "60", timeout=90)
                took = time.monotonic() - began
                run.events.append({"t": round(now - t0, 1), "reload_exit": out.returncode,
                                   "reload_s": round(took, 2), "output": out.stdout.strip()[-300:]})
                say(f"[soak {now - t0:6.0f}s] fleet reload: exit {out.returncode} in {took:.1f}s; "
                    f"{load.progress()}")
                _remember(run, processes(cluster))
            if now >= next_sample:
                next_sample += plan.sample_every
                procs = processes(cluster)
                _remember(run, procs)
                run.samples.append({"t": round(now - t0), "roles": by_role(measure(procs))})
            time.sleep(0.2)
        # Settle: let the last reload's or kill's replacements come up before the end figures.
        cluster.wait_ready_hosts(3, timeout=60)
    finally:
        load.halt()
        uploader.stop()
        run.get_report = load.stop()
        run.uploads = uploader.tally()
        run.upload_samples = uploader.samples
    procs = processes(cluster)
    _remember(run, procs)
    run.end_rows = measure(procs)
    run.stats_end = {f"h{i}": cluster.stats(i) for i in (1, 2, 3)}
    deadline = time.monotonic() + 10
    while cluster.upload_files() and time.monotonic() < deadline:
        time.sleep(0.2)
    run.upload_files_left = [str(p) for p in cluster.upload_files()]
    return run


def failures_outside_kills(run: SoakRun, window: float = 1.0) -> list[Sample]:
    """Failed or hung GETs/uploads not in flight within `window` s of a worker SIGKILL.

    A SIGKILLed worker's in-flight requests are answered 502 by design
    (dispatcher.worker_gone); everything else must succeed.
    """
    bad = [s for s in run.get_report.samples if s.outcome != OK]
    bad += [s for s in run.upload_samples if s.outcome != OK]
    out = []
    for s in bad:
        if s.outcome == FAILED and s.detail == 502 and any(
                s.start - window <= k <= s.start + s.latency + window for k in run.kill_moments):
            continue
        out.append(s)
    return out


def soak_summary(run: SoakRun) -> dict:
    report = run.get_report
    kills = sum(1 for e in run.events if "kill" in e)
    reloads = [e for e in run.events if "reload_exit" in e]
    start, end = by_role(run.start_rows), by_role(run.end_rows)
    return {
        "seconds": run.plan.seconds,
        "get": report.as_dict(),
        "failed_outside_kills": len(failures_outside_kills(run)),
        "uploads": run.uploads,
        "kills": kills,
        "reloads": len(reloads),
        "reload_exits": Counter(e["reload_exit"] for e in reloads),
        "reload_s_median": round(statistics.median([e["reload_s"] for e in reloads]), 2) if reloads else None,
        "answered_502": {h: (s or {}).get("answered_502") for h, s in run.stats_end.items()},
        "respawns": {h: (s or {}).get("respawns") for h, s in run.stats_end.items()},
        "start": start,
        "end": end,
        "upload_files_left": run.upload_files_left,
        "processes_seen": len(run.seen),
    }


# -- the hostile network ----------------------------------------------------------------------

FLOOD = Path(__file__).resolve().parent / "flood.py"


@dataclass
class HostilePlan:
    baseline: float = 20.0  # seconds of load before the flood (the no-flood p99)
    flood_seconds: float = 25.0
    count: int = 30000  # datagrams, paced evenly over flood_seconds
    capture: float = 4.0  # seconds host 4 listens to the group first (for replays)
    after: float = 10.0  # seconds of load after the flood
    clients: int = 4
    pause: float = 0.02
    mixes: str = ""  # flood.py --mixes; empty: all of them
    spoof_sources: int = 0  # flood.py --spoof-sources: forge the source from this many addresses


def udp_counters(host: Host) -> dict[str, int]:
    """The kernel's UDP counters in the host's namespace (/proc/net/snmp is per namespace)."""
    lines = [line.split() for line in host.exec(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if line.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def _cpu(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    except psutil.Error:
        return float("nan")


def _rss(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def _delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)
            if after.get(k, 0) - before.get(k, 0)}


def _window(samples: list[Sample], start: float, end: float) -> dict:
    mine = sorted(s.latency for s in samples if start <= s.start < end)
    if not mine:
        return {"n": 0}
    p99 = mine[max(0, -(-99 * len(mine) // 100) - 1)]
    return {"n": len(mine), "p50_ms": round(mine[len(mine) // 2] * 1000, 2), "p99_ms": round(p99 * 1000, 2),
            "max_ms": round(mine[-1] * 1000, 2),
            "not_ok": sum(1 for s in samples if start <= s.start < end and s.outcome != OK)}


def heartbeat_gaps(cluster: FleetCluster) -> int:
    """Lines where some host noticed another's silence ("no heartbeat for ..."): lost or dead."""
    return sum(proc.log_text().count("no heartbeat for") for proc in cluster.procs)


def run_hostile(cluster: ServingCluster, attacker: Host, plan: HostilePlan, say=print) -> dict:
    """Load through Mongrel2, then host `attacker` floods the group; what the victims made of it."""
    victims = {f"h{i}": (i, (cluster.master if i == 1 else cluster.nodes[i])) for i in (1, 2, 3)}
    status_before = cluster.wait_ready_hosts(3)
    counters_before = {name: cluster.stats(i)["cluster"] for name, (i, _) in victims.items()}
    udp_before = {name: udp_counters(proc.host) for name, (_, proc) in victims.items()}
    gaps_before = heartbeat_gaps(cluster)
    total = plan.baseline + plan.capture + plan.flood_seconds + plan.after + 60
    load = start_get_load(cluster, plan.clients, plan.pause, total)
    result: dict = {"plan": vars(plan)}
    flood_log = cluster.workdir / "flood.log"
    try:
        load.wait_succeeded(50, timeout=30)
        cpu0 = {name: _cpu(proc.pid) for name, (_, proc) in victims.items()}
        base_start = time.monotonic()
        time.sleep(plan.baseline)
        base_end = time.monotonic()
        cpu1 = {name: _cpu(proc.pid) for name, (_, proc) in victims.items()}
        rss_before = {name: _rss(proc.pid) for name, (_, proc) in victims.items()}
        flood = attacker.popen(
            [sys.executable, str(FLOOD), "--group", cluster.group, "--iface", attacker.address,
             "--cluster", cluster.name, "--real-key-file", str(cluster.key), "--capture", str(plan.capture),
             "--count", str(plan.count), "--seconds", str(plan.flood_seconds),
             *(["--mixes", plan.mixes] if plan.mixes else []),
             *(["--spoof-sources", str(plan.spoof_sources)] if plan.spoof_sources else [])], flood_log)
        deadline = time.monotonic() + plan.capture + 30
        while "flooding" not in flood_log.read_text():
            if flood.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"flood did not start: {flood_log.read_text()[-2000:]}")
            time.sleep(0.02)
        flood_start = time.monotonic()
        cpu2 = {name: _cpu(proc.pid) for name, (_, proc) in victims.items()}
        flood.wait(timeout=plan.flood_seconds + 60)
        flood_end = time.monotonic()
        cpu3 = {name: _cpu(proc.pid) for name, (_, proc) in victims.items()}
        rss_after = {name: _rss(proc.pid) for name, (_, proc) in victims.items()}
        say(f"[hostile] flood done in {flood_end - flood_start:.1f}s; load {load.progress()}")
        time.sleep(plan.after)
        after_end = time.monotonic()
    finally:
        load.halt()
        report = load.stop()
    lines = flood_log.read_text().splitlines()
    sent = json.loads(next(line for line in reversed(lines) if line.startswith("{\"captured\"")))
    counters_after = {name: cluster.stats(i)["cluster"] for name, (i, _) in victims.items()}
    udp_after = {name: udp_counters(proc.host) for name, (_, proc) in victims.items()}
    status_after = cluster.wait_ready_hosts(3)
    per_victim = {}
    # The attacker's own address or any it forged: every address but the victims'.
    genuine = {proc.host.address for _, proc in victims.values()}
    for name in victims:
        b, a = counters_before[name], counters_after[name]
        base_wall, flood_wall = base_end - base_start, flood_end - flood_start
        per_victim[name] = {
            "accepted_from_attacker": sum(count - b["accepted_from"].get(source, 0)
                                          for source, count in a["accepted_from"].items() if source not in genuine),
            "accepted_genuine": a["accepted"] - b["accepted"],
            "rejected": a["rejected"] - b["rejected"],
            "rejected_by_reason": _delta(a["rejected_by_reason"], b["rejected_by_reason"]),
            "other_cluster": a["other_cluster"] - b["other_cluster"],
            "kernel_udp": _delta(udp_after[name], udp_before[name]),
            "cpu_pct_baseline": round(100 * (cpu1[name] - cpu0[name]) / base_wall, 1),
            "cpu_pct_flood": round(100 * (cpu3[name] - cpu2[name]) / flood_wall, 1),
            "rss_mb_before": round((rss_before[name] or 0) / 1048576, 1),
            "rss_mb_after": round((rss_after[name] or 0) / 1048576, 1),
        }
    result.update({
        "flood": sent,
        "flood_window_s": round(flood_end - flood_start, 2),
        "victims": per_victim,
        "accepted_from_attacker_total": sum(v["accepted_from_attacker"] for v in per_victim.values()),
        "load": report.as_dict(),
        "latency_baseline": _window(report.samples, base_start, base_end),
        "latency_flood": _window(report.samples, flood_start, flood_end),
        "latency_after": _window(report.samples, flood_end, after_end),
        "heartbeat_gap_lines": heartbeat_gaps(cluster) - gaps_before,
        "generations": {"before": sorted({h["generation"] for h in status_before.values()}),
                        "after": sorted({h["generation"] for h in status_after.values()})},
        "states_after": {name: h["state"] for name, h in status_after.items()},
    })
    return result
