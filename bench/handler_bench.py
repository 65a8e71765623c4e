"""Handler throughput behind one real Mongrel2: the raw pyzmq floor vs `fleet master`.

    .venv/bin/python bench/handler_bench.py [--duration 10] [--connections 32] [--only floor,...]

Starts one Mongrel2 (fleet.dev.mongrel2) with one route, then runs each
contender in turn against the same server: a warm-up, then `wrk` with a Lua
script that checks every response body is exactly "Hello world!" and counts
mismatches. Prints a table (requests/s, p50, p99, ratio to the floor) and writes
bench/results/handler_bench.json. Everything is stopped in `finally`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from fleet.dev.mongrel2 import HandlerRoute, Mongrel2, new_ident, tcp_pair  # noqa: E402

EXPECTED_BODY = "Hello world!"
MAX_DURATION = 120  # seconds per measured run; keeps a typo from running for hours
READY_TIMEOUT = 30.0

WRK_SCRIPT = r"""
-- Counts responses whose status or body differ from the expected ones.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  responses = 0
  mismatches = 0
end

function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 or body ~= "__BODY__" then
    mismatches = mismatches + 1
  end
end

function done(summary, latency, requests)
  local r, m = 0, 0
  for _, t in ipairs(threads) do
    r = r + t:get("responses")
    m = m + t:get("mismatches")
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "checked": %d, "mismatches": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "errors": {"connect": %d, ' ..
    '"read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, r, m,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
""".replace("__BODY__", EXPECTED_BODY)


@dataclass
class Result:
    name: str
    command: str
    requests_per_s: float
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    checked: int
    mismatches: int
    errors: dict
    ratio_to_floor: float | None = None
    # CPU (user+system) spent per request during the measured run, in µs:
    # "mongrel2", "master" (the contender's first process), "workers" (its
    # children, summed), "wrk".
    cpu_us: dict | None = None


class Contender:
    """A handler command run in its own process group; ready when `ready_marker` is on stderr."""

    def __init__(self, name: str, cmd: list[str], ready_marker: str, logdir: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.ready_marker = ready_marker
        self.log = logdir / f"{name}.stderr"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while self.ready_marker not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left of its group
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=5)
        self.proc = None


def check_once(port: int, path: str) -> None:
    """One request (through Mongrel2, or to an HTTP server) must come back right before any load."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            if resp.status == 200 and body == EXPECTED_BODY.encode():
                return
            raise RuntimeError(f"unexpected answer {resp.status} {body[:100]!r}")
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_wrk(url: str, script: Path, args: argparse.Namespace, duration: int) -> dict:
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration}s", "--timeout", "5s",
           "--latency", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    match = re.search(r"^RESULT (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return json.loads(match.group(1))


def _cpu(proc: "psutil.Process") -> float:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def cpu_snapshot(server: Mongrel2, contender: Contender) -> dict[str, float]:
    """Seconds of CPU so far: Mongrel2, the contender's top process, its children."""
    master = psutil.Process(contender.proc.pid)
    return {
        "mongrel2": _cpu(psutil.Process(server.pid)),
        "master": _cpu(master),
        "workers": sum(_cpu(c) for c in master.children(recursive=True)),
    }


def measure(name: str, contender: Contender, server: Mongrel2, script: Path,
            args: argparse.Namespace) -> Result:
    contender.start()
    try:
        check_once(server.port, "/bench")
        run_wrk(server.url("/bench"), script, args, args.warmup)
        before = cpu_snapshot(server, contender)
        rusage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        raw = run_wrk(server.url("/bench"), script, args, args.duration)
        rusage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = cpu_snapshot(server, contender)
        check_once(server.port, "/bench")
    finally:
        contender.stop()
    requests = max(raw["requests"], 1)
    cpu_us = {k: round((after[k] - before[k]) * 1e6 / requests, 1) for k in after}
    cpu_us["wrk"] = round((rusage_after.ru_utime + rusage_after.ru_stime
                           - rusage_before.ru_utime - rusage_before.ru_stime) * 1e6 / requests, 1)
    seconds = raw["duration_us"] / 1e6
    return Result(
        name=name, command=" ".join(contender.cmd[1:]),
        requests_per_s=raw["requests"] / seconds, requests=raw["requests"], duration_s=seconds,
        p50_ms=raw["p50_us"] / 1000, p90_ms=raw["p90_us"] / 1000, p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000, checked=raw["checked"], mismatches=raw["mismatches"],
        errors=raw["errors"], cpu_us=cpu_us)


def contenders(route: HandlerRoute, processes: int, logdir: Path) -> dict[str, Contender]:
    zmq = f"{route.send_spec},{route.recv_spec}"
    fleet = [sys.executable, "-m", "fleet", "master", "--zeromq", zmq, "--pythonpath", str(BENCH),
             "--module", "hello_app", "-p", str(processes), "--log-level", "info"]
    return {
        "floor": Contender("floor", [sys.executable, str(BENCH / "floor_handler.py"),
                                     route.send_spec, route.recv_spec, "-p", str(processes)],
                           "processes ready", logdir),
        "fleet-broker": Contender("fleet-broker", fleet, "master ready", logdir),
        "fleet-direct": Contender("fleet-direct", [*fleet, "--dispatch", "direct"],
                                  "master ready", logdir),
        # The same with 4 threads per process: more requests in flight per worker.
        "fleet-broker-t4": Contender("fleet-broker-t4", [*fleet, "--threads", "4"], "master ready", logdir),
        "fleet-direct-t4": Contender("fleet-direct-t4", [*fleet, "--threads", "4", "--dispatch", "direct"],
                                     "master ready", logdir),
    }


def median_run(runs: list[Result]) -> Result:
    """The run with the median requests/s (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.requests_per_s)
    return ordered[(len(ordered) - 1) // 2]


def print_table(results: list[Result]) -> None:
    print(f"{'handler':<16} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'checked':>9} {'bad':>5} {'errors':>7} {'vs floor':>9}  cpu us/req m2/master/workers/wrk")
    for r in results:
        ratio = f"{r.ratio_to_floor:.2f}x" if r.ratio_to_floor is not None else "-"
        errors = sum(r.errors.values())
        cpu = "/".join(f"{r.cpu_us[k]:.0f}" for k in ("mongrel2", "master", "workers", "wrk")) if r.cpu_us else "-"
        print(f"{r.name:<16} {r.requests_per_s:>9.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
              f"{r.max_ms:>8.1f} {r.checked:>9} {r.mismatches:>5} {errors:>7} {ratio:>9}  {cpu}")


@dataclass
class Rig:
    """A work dir, a real Mongrel2 with one route to the handlers under test, and wrk's checking script."""

    workdir: Path
    route: HandlerRoute
    server: Mongrel2
    script: Path


def make_rig(prefix: str) -> Rig:
    """The set-up every wrk bench shares (the caller starts and stops the server)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    send, recv = tcp_pair()
    route = HandlerRoute("/", send, recv, new_ident())
    script = workdir / "check.lua"
    script.write_text(WRK_SCRIPT)
    return Rig(workdir, route, Mongrel2(workdir / "m2", [route]), script)


def check_wrk_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--duration and --warmup in range, and wrk installed: one line to fix otherwise."""
    if not 1 <= args.duration <= MAX_DURATION or not 1 <= args.warmup <= MAX_DURATION:
        parser.error(f"--duration and --warmup must be 1..{MAX_DURATION} seconds")
    if shutil.which("wrk") is None:
        parser.error("wrk not found (apt-get install wrk)")


def finish(workdir: Path, bad: bool, keep: bool = False) -> int:
    """Keep the logs of a run that went wrong (or when asked), delete them otherwise; the exit code."""
    if bad or keep:
        print(f"logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per contender")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("-p", "--processes", type=int, default=2, help="handler processes")
    parser.add_argument("--only", default="floor,fleet-broker,fleet-direct,fleet-broker-t4,fleet-direct-t4",
                        help="comma-separated contenders to run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every contender this many times, interleaved; report the median run")
    parser.add_argument("--json-out", type=Path, default=BENCH / "results" / "handler_bench.json")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (Mongrel2 and handler logs); kept anyway on failure")
    args = parser.parse_args(argv)
    check_wrk_args(parser, args)

    rig = make_rig("fleet-bench-")
    workdir, server, script = rig.workdir, rig.server, rig.script
    pool = contenders(rig.route, args.processes, workdir)
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(wanted) - set(pool)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")

    runs: list[Result] = []
    failures: dict[str, str] = {}
    try:
        server.start()
        # Rounds interleave the contenders, so a slow spell of the machine
        # hits all of them rather than one; each ratio is taken within a round.
        for round_number in range(args.rounds):
            floor = None
            for name in wanted:
                print(f"-- round {round_number + 1}: {name}: {args.warmup}s warm-up, {args.duration}s measured",
                      file=sys.stderr)
                try:
                    result = measure(name, pool[name], server, script, args)
                except Exception as error:  # one broken contender must not hide the others
                    failures[name] = str(error)[-2000:]
                    print(f"-- {name} failed: {failures[name]}", file=sys.stderr)
                    continue
                floor = result if name == "floor" else floor
                result.ratio_to_floor = result.requests_per_s / floor.requests_per_s if floor else None
                runs.append(result)
    finally:
        for contender in pool.values():
            contender.stop()
        server.stop()

    results = [median_run([r for r in runs if r.name == name]) for name in wanted
               if any(r.name == name for r in runs)]
    print_table(results)
    for name, error in failures.items():
        print(f"{name}: FAILED ({error.splitlines()[0] if error else ''})")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "wrk": {"threads": args.threads, "connections": args.connections,
                "duration_s": args.duration, "warmup_s": args.warmup},
        "handler_processes": args.processes,
        "rounds": args.rounds,
        "results": [asdict(r) for r in results],
        "runs": [asdict(r) for r in runs],
        "failures": failures,
    }, indent=2) + "\n")
    print(f"wrote {args.json_out}", file=sys.stderr)
    bad = bool(failures) or any(r.mismatches or sum(r.errors.values()) for r in results)
    return finish(workdir, bad, args.keep)


if __name__ == "__main__":
    sys.exit(main())
