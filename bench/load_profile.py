"""Where one contender's CPU goes under load: per-process CPU, context switches and syscalls per request,
and py-spy profiles of the master and a worker.

    .venv/bin/python -m bench.load_profile fleet-broker [--duration 10] [--py-spy] [--strace]

Runs one contender of bench.compare behind the same rig (a real Mongrel2, wrk
keep-alive, bodies checked). While wrk runs it reads, for every process of the
contender and for Mongrel2: CPU µs, voluntary and involuntary context switches
per request (from /proc); with --py-spy, a flame graph (SVG) and the top
functions of the master and of one worker (py-spy record --native); with
--strace, syscall counts per request of the master and of one worker
(strace -c -f; it slows them, so the counts matter, not the rate).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from bench.common import RESULTS, add_wrk_args, check_once, check_wrk_args, make_rig, run_wrk
from bench.compare import ALL, contenders


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every thread of pid so far."""
    vol = invol = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol += int(line.split()[1])
    except OSError:
        pass
    return vol, invol


def figures(pid: int) -> tuple[float, int, int]:
    try:
        t = psutil.Process(pid).cpu_times()
        cpu = t.user + t.system
    except psutil.Error:
        cpu = 0.0
    return (cpu, *switches(pid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contender", choices=ALL)
    add_wrk_args(parser, rounds=1)
    parser.add_argument("-p", "--processes", type=int, default=2)
    parser.add_argument("--py-spy", action="store_true", help="record the master and a worker with py-spy")
    parser.add_argument("--strace", action="store_true", help="count syscalls of the master and a worker")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile")
    args = parser.parse_args(argv)
    check_wrk_args(parser, args)
    args.out.mkdir(parents=True, exist_ok=True)

    rig = make_rig("fleet-profile-")
    contender, port = contenders([args.contender], args.processes, rig.route, rig.workdir)[args.contender]
    port = port or rig.server.port
    url = f"http://127.0.0.1:{port}/bench"
    try:
        rig.server.start()
        contender.start()
        check_once(port, "/bench")
        run_wrk(url, rig.script, args, args.warmup)
        master = contender.proc.pid
        children = psutil.Process(master).children(recursive=True)
        # The fork server is a child too (it serves nothing): named, and never the worker profiled.
        servers = [c.pid for c in children if "fork server" in " ".join(c.cmdline())]
        workers = [c.pid for c in children if c.pid not in servers]
        processes = {"mongrel2": rig.server.pid, "master": master,
                     **{f"worker{i}": pid for i, pid in enumerate(workers)},
                     **{"forkserver" if i == 0 else f"forkserver{i}": pid for i, pid in enumerate(servers)}}
        side: list[subprocess.Popen] = []
        if args.py_spy:
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            for role, pid in (("master", master), ("worker", workers[0] if workers else master)):
                side.append(subprocess.Popen(
                    [spy, "record", "--gil", "--nonblocking", "-r", "250", "-d", str(args.duration),
                     "-p", str(pid), "-f", "raw", "-o", str(args.out / f"{args.contender}-{role}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if args.strace:
            for role, pid in (("master", master), ("worker", workers[0] if workers else master)):
                side.append(subprocess.Popen(
                    ["strace", "-c", "-f", "-o", str(args.out / f"{args.contender}-{role}.strace"), "-p", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        before = {role: figures(pid) for role, pid in processes.items()}
        raw: dict = {}
        load = threading.Thread(target=lambda: raw.update(run_wrk(url, rig.script, args, args.duration)))
        load.start()
        load.join()
        after = {role: figures(pid) for role, pid in processes.items()}
        for proc in side:
            if args.strace and proc.args[0] == "strace":
                proc.send_signal(2)
            proc.wait(timeout=60)
    finally:
        contender.stop()
        rig.server.stop()
    requests = max(raw.get("requests", 1), 1)
    print(f"{args.contender}: {requests / (raw['duration_us'] / 1e6):.0f} req/s, {requests} requests, "
          f"p99 {raw['p99_us'] / 1000:.2f} ms, {raw['mismatches']} bad bodies")
    print(f"{'process':<10} {'cpu µs/req':>11} {'vol cs/req':>11} {'invol cs/req':>13}")
    for role in processes:
        cpu = (after[role][0] - before[role][0]) * 1e6 / requests
        vol = (after[role][1] - before[role][1]) / requests
        invol = (after[role][2] - before[role][2]) / requests
        print(f"{role:<10} {cpu:>11.1f} {vol:>11.2f} {invol:>13.2f}")
    if args.strace:
        for role in ("master", "worker"):
            path = args.out / f"{args.contender}-{role}.strace"
            if path.exists():
                print(f"-- syscalls per request, {role} (strace -c -f; slowed by strace)")
                for line in path.read_text().splitlines():
                    match = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
                    if match and int(match[1]) > requests / 100:
                        print(f"   {match[2]:<20} {int(match[1]) / requests:.2f}")
    if args.py_spy:
        for role in ("master", "worker"):
            path = args.out / f"{args.contender}-{role}.txt"
            if path.exists():
                print(f"-- py-spy {role}: top frames by samples ({path})")
                print(top_frames(path))
    return 0


def top_frames(path: Path, limit: int = 25) -> str:
    """Self and total samples per function from py-spy's raw (collapsed stacks) output."""
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
        for frame in set(frames):
            total_counts[frame] = total_counts.get(frame, 0) + n
    lines = [f"   {'self%':>6} {'total%':>6}  function"]
    for frame, n in sorted(self_counts.items(), key=lambda kv: -kv[1])[:limit]:
        lines.append(f"   {100 * n / samples:>6.1f} {100 * total_counts[frame] / samples:>6.1f}  {frame[:150]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
