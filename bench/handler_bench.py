"""Handler throughput behind one real Mongrel2: the raw pyzmq floor vs `fleet master`.

    .venv/bin/python -m bench.handler_bench [--duration 10] [--rounds 3] [--only floor,...]

Starts one Mongrel2 (fleet.dev.mongrel2) with one route, then runs each
contender in turn against the same server, interleaved over the rounds: a
warm-up, then `wrk` with a Lua script that checks every response body is
exactly "Hello world!". Prints each contender's median run (requests/s, p50,
p99, ratio to the floor of the same round, CPU µs per request per process)
and writes bench/results/handler_bench.json. Everything is stopped in `finally`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import (
    BENCH,
    RESULTS,
    Contender,
    add_wrk_args,
    check_wrk_args,
    finish,
    make_rig,
    medians,
    print_results,
    run_rounds,
    write_results,
)
from fleet.dev.mongrel2 import HandlerRoute

BASELINE = "floor"


def contenders(route: HandlerRoute, processes: int, logdir: Path) -> dict[str, Contender]:
    zmq = f"{route.send_spec},{route.recv_spec}"
    fleet = [sys.executable, "-m", "fleet", "master", "--zeromq", zmq, "--pythonpath", str(BENCH),
             "--module", "hello_app", "-p", str(processes), "--log-level", "info"]
    return {
        "floor": Contender("floor", [sys.executable, str(BENCH / "floor_handler.py"),
                                     route.send_spec, route.recv_spec, "-p", str(processes)],
                           "processes ready", logdir),
        "fleet-broker": Contender("fleet-broker", fleet, "master ready", logdir),
        "fleet-direct": Contender("fleet-direct", [*fleet, "--dispatch", "direct"], "master ready", logdir),
        # The same with 4 threads per process: more requests in flight per worker.
        "fleet-broker-t4": Contender("fleet-broker-t4", [*fleet, "--threads", "4"], "master ready", logdir),
        "fleet-direct-t4": Contender("fleet-direct-t4", [*fleet, "--threads", "4", "--dispatch", "direct"],
                                     "master ready", logdir),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_wrk_args(parser, rounds=1)
    parser.add_argument("-p", "--processes", type=int, default=2, help="handler processes")
    parser.add_argument("--only", default="floor,fleet-broker,fleet-direct,fleet-broker-t4,fleet-direct-t4",
                        help="comma-separated contenders to run")
    parser.add_argument("--json-out", type=Path, default=RESULTS / "handler_bench.json")
    args = parser.parse_args(argv)
    check_wrk_args(parser, args)

    rig = make_rig("fleet-bench-")
    pool = contenders(rig.route, args.processes, rig.workdir)
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(wanted) - set(pool)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")

    failures: dict[str, str] = {}
    try:
        rig.server.start()
        # Rounds interleave the contenders, so a slow spell of the machine
        # hits all of them rather than one; each ratio is taken within a round.
        runs = run_rounds(rig, {name: (contender, 0) for name, contender in pool.items()}, wanted, BASELINE,
                          args, failures)
    finally:
        for contender in pool.values():
            contender.stop()
        rig.server.stop()

    results = medians(runs, wanted)
    print_results(results, BASELINE, title="handler")
    for name, error in failures.items():
        print(f"{name}: FAILED ({error.splitlines()[0] if error else ''})")
    write_results(args.json_out, "handler_bench", args, results, baseline=BASELINE, runs=runs, failures=failures)
    return finish(rig.workdir, bool(failures) or any(r.bad for r in results), args.keep)


if __name__ == "__main__":
    sys.exit(main())
