"""What the benches share: the Mongrel2 + wrk rig, CPU figures, tables and one results format.

A wrk bench makes a `Rig` (a work dir, a real Mongrel2 with one route, wrk's
body-checking script), starts each `Contender` in its own process group,
`measure`s it (warm-up, measured run, a checked request before and after) and
reports the median run of each contender with `print_results`; every bench
writes its figures with `write_results`, one JSON shape for all:

    {"bench": NAME, "when": ISO-8601, "machine": {"cpus", "python", "platform", "load_average"},
     "args": {the command line's options}, "results": [...], ...bench-specific keys}
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import psutil

from fleet.dev.mongrel2 import HandlerRoute, Mongrel2, new_ident, tcp_pair

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"

EXPECTED_BODY = "Hello world!"  # what bench/hello_app.py answers
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


# -- processes under test -------------------------------------------------------------


class Contender:
    """A server command run in its own process group; ready when `ready_marker` is in its output.
    `closes`: it closes every connection after one response (see Result.closes)."""

    def __init__(self, name: str, cmd: list[str], ready_marker: str, logdir: Path,
                 env: dict[str, str] | None = None, closes: bool = False) -> None:
        self.name = name
        self.closes = closes
        self.cmd = cmd
        self.ready_marker = ready_marker
        self.log = logdir / f"{name}.stderr"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err,  # granian logs to stdout
                                         start_new_session=True, env=self.env)
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


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds so far of these processes (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process ("master") and of all its descendants ("workers")."""
    try:
        children = [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        children = []
    return {"master": cpu_seconds([pid]), "workers": cpu_seconds(children)}


# -- wrk ------------------------------------------------------------------------------


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
    # requests_per_s over the baseline's in the same round (the bench names its baseline)
    ratio: float | None = None
    # CPU (user+system) per request during the measured run, in µs: "master"
    # (the contender's first process), "workers" (its descendants, summed),
    # "wrk", and "mongrel2" when the load went through Mongrel2.
    cpu_us: dict | None = None
    # The server closes the connection after every response without saying so
    # (uWSGI --http-socket): wrk counts each close as a read error, expected here.
    closes: bool = False

    @property
    def bad(self) -> bool:
        errors = {k: v for k, v in self.errors.items() if not (self.closes and k == "read")}
        return bool(self.mismatches or sum(errors.values()))


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


def measure(contender: Contender, port: int, script: Path, args: argparse.Namespace,
            mongrel2: Mongrel2 | None = None, path: str = "/bench") -> Result:
    """Start, check, warm up, measure with wrk, check again, stop; CPU per request of every process."""
    url = f"http://127.0.0.1:{port}{path}"
    contender.start()
    try:
        check_once(port, path)
        run_wrk(url, script, args, args.warmup)

        def snapshot() -> dict[str, float]:
            cpu = tree_cpu(contender.proc.pid)
            wrk = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk runs are this process's children
            cpu["wrk"] = wrk.ru_utime + wrk.ru_stime
            if mongrel2 is not None:
                cpu["mongrel2"] = cpu_seconds([mongrel2.pid])
            return cpu

        before = snapshot()
        raw = run_wrk(url, script, args, args.duration)
        after = snapshot()
        check_once(port, path)
    finally:
        contender.stop()
    requests = max(raw["requests"], 1)
    seconds = raw["duration_us"] / 1e6
    return Result(
        name=contender.name, command=" ".join(contender.cmd[1:]),
        requests_per_s=raw["requests"] / seconds, requests=raw["requests"], duration_s=seconds,
        p50_ms=raw["p50_us"] / 1000, p90_ms=raw["p90_us"] / 1000, p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000, checked=raw["checked"], mismatches=raw["mismatches"],
        errors=raw["errors"], closes=contender.closes,
        cpu_us={k: round((after[k] - before[k]) * 1e6 / requests, 1) for k in after})


def run_rounds(rig: Rig, pool: dict[str, tuple[Contender, int]], wanted: list[str], baseline: str,
               args: argparse.Namespace, failures: dict[str, str]) -> list[Result]:
    """Measure every contender of ``wanted`` ``args.rounds`` times, interleaved, the baseline
    first in each round (its ratio is to the baseline of the same round). ``pool`` maps a name
    to (contender, its HTTP port, or 0 for one wrk reaches through the rig's Mongrel2, which the
    caller has started). A contender that fails is written to ``failures``; the others go on."""
    runs: list[Result] = []
    for round_number in range(args.rounds):
        base = None
        for name in sorted(wanted, key=lambda n: n != baseline):
            contender, port = pool[name]
            print(f"-- round {round_number + 1}: {name}", file=sys.stderr)
            try:
                result = measure(contender, port or rig.server.port, rig.script, args,
                                 mongrel2=None if port else rig.server)
            except Exception as error:  # one broken contender must not hide the others
                failures[name] = str(error)[-2000:]
                print(f"-- {name} failed: {failures[name]}", file=sys.stderr)
                continue
            base = result if name == baseline else base
            result.ratio = result.requests_per_s / base.requests_per_s if base else None
            runs.append(result)
    return runs


def median_run(runs: list[Result]) -> Result:
    """The run with the median requests/s (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.requests_per_s)
    return ordered[(len(ordered) - 1) // 2]


def medians(runs: list[Result], names: Iterable[str]) -> list[Result]:
    """The median run of each name that has runs, in the order of `names`."""
    return [median_run(mine) for name in names if (mine := [r for r in runs if r.name == name])]


CPU_COLUMNS = ("mongrel2", "master", "workers", "wrk")


def print_results(results: list[Result], baseline: str, title: str = "server") -> None:
    """One row per contender: req/s, latency, checked bodies, errors, ratio, CPU µs per request."""
    print(f"{title:<18} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'checked':>9} "
          f"{'bad':>5} {'errors':>7} {'vs ' + baseline:>14}  cpu us/req {'/'.join(CPU_COLUMNS)}")
    for r in results:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        cpu = "/".join(f"{r.cpu_us[k]:.0f}" if k in r.cpu_us else "-" for k in CPU_COLUMNS) if r.cpu_us else "-"
        print(f"{r.name:<18} {r.requests_per_s:>9.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.max_ms:>8.1f} "
              f"{r.checked:>9} {r.mismatches:>5} {sum(r.errors.values()):>7} {ratio:>14}  {cpu}")


# -- the rig --------------------------------------------------------------------------


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


def add_wrk_args(parser: argparse.ArgumentParser, rounds: int = 3) -> None:
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per contender")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--rounds", type=int, default=rounds,
                        help="run every contender this many times, interleaved; report the median run")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (server logs); kept anyway on failure")


def check_wrk_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--duration and --warmup in range, and wrk installed: one line to fix otherwise."""
    if not 1 <= args.duration <= MAX_DURATION or not 1 <= args.warmup <= MAX_DURATION:
        parser.error(f"--duration and --warmup must be 1..{MAX_DURATION} seconds")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be 1..20")
    if shutil.which("wrk") is None:
        parser.error("wrk not found (apt-get install wrk)")


def finish(workdir: Path, bad: bool, keep: bool = False) -> int:
    """Keep the logs of a run that went wrong (or when asked), delete them otherwise; the exit code."""
    if bad or keep:
        print(f"logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if bad else 0


# -- reporting ------------------------------------------------------------------------


def spread(values: Sequence[float]) -> str:
    """median, min and max of a few measurements, on one line."""
    if not values:
        return "-"
    return f"median {statistics.median(values):.3f}  min {min(values):.3f}  max {max(values):.3f}  (n={len(values)})"


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_average": os.getloadavg()}


def _plain(value: object) -> object:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def write_results(path: Path, bench: str, args: argparse.Namespace | dict, results: object, **extra: object) -> None:
    """The one results format: bench, when, machine, args, results, then whatever the bench adds."""
    options = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    record = {"bench": bench, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
              "args": options, "results": results, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=_plain) + "\n")
    print(f"wrote {path}", file=sys.stderr)
