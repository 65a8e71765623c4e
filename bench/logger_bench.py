"""What `--logger zeromq:` costs: `fleet master` throughput behind one real Mongrel2
with no logger, with the logger pointing at a live `fleet logs` collector, and
with it pointing at an endpoint where nothing listens (a dead collector).

    .venv/bin/python bench/logger_bench.py [--duration 10] [--rounds 3]

The app (bench/log_hello_app.py) logs one line per request; every contender
keeps its local log (stderr to a file), so the difference is the collector's
part alone. Rounds interleave the contenders; the table shows each one's
median round and its ratio to "no-logger" within that round. Uses
handler_bench's wrk driver, which checks every response body. Writes
bench/results/logger_bench.json; everything is stopped in `finally`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from handler_bench import (  # noqa: E402
    READY_TIMEOUT, REPO, Contender, Result, check_wrk_args, finish, make_rig, measure, median_run,
)

from fleet.dev.mongrel2 import HandlerRoute, free_port  # noqa: E402

CONTENDERS = ("no-logger", "live-collector", "dead-collector")


class LogCollector:
    """A real `fleet logs --bind` writing to a file, for the live-collector runs."""

    def __init__(self, endpoint: str, workdir: Path) -> None:
        self.endpoint = endpoint
        self.output = workdir / "collected.log"
        self.stderr = workdir / "collector.stderr"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "fleet", "logs", "--bind", self.endpoint,
                                          "--output", str(self.output)], cwd=REPO, stdin=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while "collecting on" not in self.stderr.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fleet logs did not start: {self.stderr.read_text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        """Stop it; the number of lines it collected (from its exit line)."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)
        self.proc = None
        found = re.search(r"(\d+) line\(s\) collected", self.stderr.read_text())
        return int(found.group(1)) if found else 0


def app_lines(path: Path) -> int:
    return path.read_text(errors="replace").count("log_hello_app: GET") if path.exists() else 0


def contenders(route: HandlerRoute, processes: int, threads: int, live: str, dead: str,
               workdir: Path) -> dict[str, Contender]:
    fleet = [sys.executable, "-m", "fleet", "master", "--zeromq", f"{route.send_spec},{route.recv_spec}",
             "--pythonpath", str(BENCH), "--module", "log_hello_app", "-p", str(processes),
             "--threads", str(threads), "--log-level", "info"]
    return {
        "no-logger": Contender("no-logger", fleet, "master ready", workdir),
        "live-collector": Contender("live-collector", [*fleet, "--logger", f"zeromq:{live}"], "master ready",
                                    workdir),
        "dead-collector": Contender("dead-collector", [*fleet, "--logger", f"zeromq:{dead}"], "master ready",
                                    workdir),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per contender")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("-p", "--processes", type=int, default=2, help="worker processes")
    parser.add_argument("--handler-threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=BENCH / "results" / "logger_bench.json")
    args = parser.parse_args(argv)
    check_wrk_args(parser, args)

    rig = make_rig("fleet-logger-bench-")
    workdir, route, server, script = rig.workdir, rig.route, rig.server, rig.script
    collector = LogCollector(f"tcp://127.0.0.1:{free_port()}", workdir)
    pool = contenders(route, args.processes, args.handler_threads, collector.endpoint,
                      f"tcp://127.0.0.1:{free_port()}", workdir)
    runs: list[Result] = []
    collected: list[dict] = []
    try:
        server.start()
        for number in range(args.rounds):
            base = None
            for name in CONTENDERS:
                print(f"-- round {number + 1}: {name}", file=sys.stderr)
                if name == "live-collector":
                    collector.output.unlink(missing_ok=True)
                    collector.start()
                try:
                    result = measure(name, pool[name], server, script, args)
                finally:
                    lines = collector.stop() if name == "live-collector" else None
                if lines is not None:
                    # Every request (warm-up, measured, checks) logged one app line locally;
                    # the collector should have the same number unless lines were dropped.
                    collected.append({"round": number + 1, "lines_collected": lines,
                                      "app_lines_collected": app_lines(collector.output),
                                      "app_lines_logged_locally": app_lines(pool[name].log),
                                      "requests_measured": result.requests})
                base = result if name == "no-logger" else base
                result.ratio_to_floor = result.requests_per_s / base.requests_per_s  # here: ratio to no-logger
                runs.append(result)
    finally:
        for contender in pool.values():
            contender.stop()
        collector.stop()
        server.stop()

    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    print(f"{'contender':<16} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'bad':>5} "
          f"{'vs none':>8} {'worker us/req':>14}  each round: req/s (ratio to no-logger)")
    results = []
    for name in CONTENDERS:
        mine = [r for r in runs if r.name == name]
        best = median_run(mine)
        results.append(best)
        ratio = statistics.median(r.ratio_to_floor for r in mine)  # the median of the in-round ratios
        worker_cpu = statistics.median(r.cpu_us["workers"] for r in mine)
        print(f"{name:<16} {best.requests_per_s:>9.0f} {best.p50_ms:>8.2f} {best.p99_ms:>8.2f} "
              f"{sum(sum(r.errors.values()) for r in mine):>7} {sum(r.mismatches for r in mine):>5} {ratio:>7.2f}x "
              f"{worker_cpu:>14.0f}  " + " ".join(f"{r.requests_per_s:.0f} ({r.ratio_to_floor:.2f}x)" for r in mine))
    for row in collected:
        print(f"live collector, round {row['round']}: {row['app_lines_collected']} app lines collected of "
              f"{row['app_lines_logged_locally']} logged locally ({row['lines_collected']} lines in all)")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wrk": {"threads": args.threads, "connections": args.connections, "duration_s": args.duration,
                "warmup_s": args.warmup},
        "loadavg_at_end": os.getloadavg(),
        "processes": args.processes, "handler_threads": args.handler_threads, "rounds": args.rounds,
        "note": "ratio_to_floor is the ratio to the no-logger run of the same round",
        "results": [asdict(r) for r in results], "runs": [asdict(r) for r in runs], "collected": collected,
    }, indent=2) + "\n")
    return finish(workdir, any(r.mismatches or sum(r.errors.values()) for r in runs))


if __name__ == "__main__":
    sys.exit(main())
