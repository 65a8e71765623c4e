"""In-process cost of one log call: local file only, + --logger to a live
`fleet logs` (another process), + --logger to a dead endpoint.

    .venv/bin/python -m bench.micro.log_push [--lines 50000] [--runs 3]

Prints the median CPU µs per `logger.info(...)` call (process time, so it counts
ZeroMQ's I/O thread too, and is less hurt by a busy machine than wall time) over `--runs`
runs (a run logs `--lines` lines from one thread, like a worker thread does).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fleet.logs.local import setup_logging

REPO = Path(__file__).resolve().parents[2]


def run(lines: int, logger: str | None, local: Path) -> float:
    setup_logging("info", str(local), logger)
    log = logging.getLogger("bench")
    start = time.process_time()  # CPU of the whole process: this thread and ZeroMQ's I/O thread
    for number in range(lines):
        log.info("GET /bench %d", number)
    elapsed = time.process_time() - start
    for handler in logging.getLogger().handlers:
        handler.close()
    logging.getLogger().handlers[:] = []
    return elapsed / lines * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fleet-micro-log-"))
    live, dead = f"ipc://{workdir}/live", f"ipc://{workdir}/dead"
    collector = subprocess.Popen([sys.executable, "-m", "fleet", "logs", "--bind", live, "--output", "/dev/null"],
                                 cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        assert "collecting on" in collector.stderr.readline()
        modes = {"local file only": None, "+ live collector": f"zeromq:{live}", "+ dead collector": f"zeromq:{dead}"}
        results: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(args.runs):  # interleaved, so a busy spell of the machine hits every mode
            for name, logger in modes.items():
                results[name].append(run(args.lines, logger, workdir / "local.log"))
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(timeout=10)
        print(collector.stderr.read().strip(), file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    base = statistics.median(results["local file only"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<18} {median:6.2f} µs/line (x{median / base:.2f}); runs: "
              + " ".join(f"{v:.2f}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
