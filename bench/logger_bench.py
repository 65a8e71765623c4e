"""What `--logger zeromq:` costs: `fleet master` throughput behind one real Mongrel2
with no logger, with the logger pointing at a live `fleet logs` collector, and
with it pointing at an endpoint where nothing listens (a dead collector).

    .venv/bin/python -m bench.logger_bench [--duration 10] [--rounds 3]

The app (bench/log_hello_app.py) logs one line per request; every contender
keeps its local log (stderr to a file), so the difference is the collector's
part alone. Rounds interleave the contenders; the table shows each one's
median round and its ratio to "no-logger" within that round. Uses
bench.common's wrk driver, which checks every response body. Writes
bench/results/logger_bench.json; everything is stopped in `finally`.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    BENCH,
    READY_TIMEOUT,
    REPO,
    RESULTS,
    Contender,
    Result,
    add_wrk_args,
    check_wrk_args,
    finish,
    make_rig,
    measure,
    median_run,
    write_results,
)
from fleet.dev.mongrel2 import HandlerRoute, free_port

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
    add_wrk_args(parser)
    parser.add_argument("-p", "--processes", type=int, default=2, help="worker processes")
    parser.add_argument("--handler-threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--json-out", type=Path, default=RESULTS / "logger_bench.json")
    args = parser.parse_args(argv)
    check_wrk_args(parser, args)

    rig = make_rig("fleet-logger-bench-")
    workdir, route, server = rig.workdir, rig.route, rig.server
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
                    result = measure(pool[name], server.port, rig.script, args, mongrel2=server)
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
                result.ratio = result.requests_per_s / base.requests_per_s
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
        ratio = statistics.median(r.ratio for r in mine)  # the median of the in-round ratios
        worker_cpu = statistics.median(r.cpu_us["workers"] for r in mine)
        print(f"{name:<16} {best.requests_per_s:>9.0f} {best.p50_ms:>8.2f} {best.p99_ms:>8.2f} "
              f"{sum(sum(r.errors.values()) for r in mine):>7} {sum(r.mismatches for r in mine):>5} {ratio:>7.2f}x "
              f"{worker_cpu:>14.0f}  " + " ".join(f"{r.requests_per_s:.0f} ({r.ratio:.2f}x)" for r in mine))
    for row in collected:
        print(f"live collector, round {row['round']}: {row['app_lines_collected']} app lines collected of "
              f"{row['app_lines_logged_locally']} logged locally ({row['lines_collected']} lines in all)")
    write_results(args.json_out, "logger_bench", args, results, baseline="no-logger", runs=runs,
                  collected=collected)
    return finish(workdir, any(r.bad for r in runs), args.keep)


if __name__ == "__main__":
    sys.exit(main())
