"""Fast requests beside slow ones, on threads: does a fast request ever wait for a slow one?

    .venv/bin/python -m bench.blocking_mix [--duration 10] [--clients 16] [--slow 0.05] [--threads 8]

What `--threads` is for: an app that blocks (bench/blocking_app.py: /slow waits
50 ms with the GIL released). Clients on keep-alive connections through a real
Mongrel2 to `fleet master -p 2 --threads 8` send requests back to back, a
share of them slow; the latency of the fast ones, whose p99 shows any that
waited behind a slow one (the dispatcher may give a thread its next request
while it serves one; the worker gives it back when the one ahead is slow).
Compare two trees by running each (`PYTHONPATH=TREE`, from TREE).
"""

from __future__ import annotations

import argparse
import http.client
import random
import statistics
import sys
import threading
import time

from bench.common import BENCH, Contender, finish, make_rig


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def client(port: int, until: float, slow_share: float, seed: int, fast: list[float], slow: list[float],
           failures: list[str]) -> None:
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.monotonic() < until:
        is_slow = rng.random() < slow_share
        started = time.perf_counter()
        try:
            conn.request("GET", "/slow" if is_slow else "/fast")
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as error:
            failures.append(repr(error))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        took = time.perf_counter() - started
        if response.status != 200 or body != b"Hello world!":
            failures.append(f"{response.status} {body[:40]!r}")
        (slow if is_slow else fast).append(took)
    conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--slow", type=float, default=0.05, help="share of requests that are slow")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("-p", "--processes", type=int, default=2)
    args = parser.parse_args(argv)
    rig = make_rig("fleet-mix-")
    zmq = f"{rig.route.send_spec},{rig.route.recv_spec}"
    fleet = Contender("fleet", [sys.executable, "-m", "fleet", "master", "--pythonpath", str(BENCH),
                                "--module", "blocking_app", "-p", str(args.processes),
                                "--threads", str(args.threads), "--zeromq", zmq], "master ready", rig.workdir)
    fast: list[float] = []
    slow: list[float] = []
    failures: list[str] = []
    try:
        rig.server.start()
        fleet.start()
        until = time.monotonic() + 1.0  # warm-up, not counted
        client(rig.server.port, until, args.slow, 0, [], [], failures)
        until = time.monotonic() + args.duration
        clients = [threading.Thread(target=client, args=(rig.server.port, until, args.slow, seed, fast, slow,
                                                          failures)) for seed in range(1, args.clients + 1)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
    finally:
        fleet.stop()
        rig.server.stop()
    total = len(fast) + len(slow)
    print(f"-p {args.processes} --threads {args.threads}, {args.clients} clients, {args.slow:.0%} slow "
          f"({total / args.duration:.0f} req/s, {len(failures)} failed)")
    for name, values in (("fast", fast), ("slow", slow)):
        ms = [v * 1000 for v in values]
        if not ms:
            continue
        print(f"  {name}: {len(ms):6d} requests, p50 {percentile(ms, 0.5):7.2f} ms, "
              f"p99 {percentile(ms, 0.99):7.2f} ms, p99.9 {percentile(ms, 0.999):7.2f} ms, "
              f"max {max(ms):7.2f} ms, mean {statistics.fmean(ms):6.2f} ms")
    waited = sum(1 for v in fast if v >= 0.04)
    print(f"  fast requests that took 40 ms or more (waited behind a slow one): {waited}")
    return finish(rig.workdir, bool(failures))


if __name__ == "__main__":
    sys.exit(main())
