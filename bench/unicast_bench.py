"""Unicast seeds vs multicast on three namespace hosts: join and reload, same run.

Each round builds two fresh networks (tests/support/netns.py), one per
transport, in alternating order:
- multicast: the bridge forwards multicast; every host is given --cluster;
- seeds: the bridge drops IPv4 multicast (nftables, bridge family); every host
  is given --cluster-peers 198.18.0.1:PORT (the master's address) and nothing else.
Mongrel2 and `fleet master -p 1 --threads 2` on h1, `fleet node` on h2 and h3.

Figures per transport (median of the rounds):
- node_config_s: from the node's "asking cluster" log line to its
  "configuration of generation N received" line (both its own log, ms
  timestamps): the transport's part of a join, without process start-up;
- node_seen_by_master_s: from starting `fleet node` on h2 to the master's
  "cluster: h2 (...) joined" log line (its log polled every 20 ms);
- node_first_served_s: from the same start to the first request h2 answers
  through Mongrel2 (requests every ~20 ms on a keep-alive connection);
- reload_s: wall time of `fleet reload` run on h1 (same transport) until all
  three hosts run the new generation; includes its 2.5 s of listening first;
  under a bounded load (4 keep-alive clients), failed+hung requests counted.

    sudo .venv/bin/python -m bench.unicast_bench [--rounds 3]

Prints a table; writes bench/results/unicast_bench.json.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, spread, write_results
from tests.support import netns
from tests.support.netns import FleetCluster, Network

OUT = RESULTS / "unicast_bench.json"
TRANSPORTS = ("multicast", "seeds")


def poll(condition, start: float, timeout: float = 30.0, what: str = "") -> float:
    deadline = start + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic() - start
        time.sleep(0.02)
    raise RuntimeError(f"{what} not within {timeout}s")


def served(cluster: FleetCluster, hostname: str) -> bool:
    try:
        return hostname in cluster.served_by(3, timeout=2.0)
    except Exception:
        return False


def log_gap(text: str, first: str, second: str) -> float:
    """Seconds between the first log lines containing `first` and `second` (fleet.logs.local format)."""
    def stamp(marker: str) -> datetime.datetime:
        line = next(line for line in text.splitlines() if marker in line)
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")

    return (stamp(second) - stamp(first)).total_seconds()


def one_round(transport: str) -> dict:
    net = Network(hosts=3).create()
    cluster = FleetCluster(net, Path(tempfile.mkdtemp(prefix=f"unicast-bench-{transport}-")))
    cluster.transport = transport
    result: dict = {}
    try:
        if transport == "seeds":
            net.drop_multicast()
        cluster.start_mongrel2()
        master = cluster.start_master()
        start = time.monotonic()
        node = cluster.start_node(2, ready=False)
        result["node_seen_by_master_s"] = round(
            poll(lambda: "cluster: h2 (" in master.log_text(), start, what="h2 in the master's log"), 3)
        result["node_first_served_s"] = round(poll(lambda: served(cluster, "h2"), start, what="h2 serving"), 3)
        node.wait_ready()
        result["node_config_s"] = round(log_gap(node.log_text(), "asking cluster", "configuration of generation"), 3)
        cluster.start_node(3)
        netns.wait_for(lambda: (s := cluster.status()) and len(s) == 3
                       and all(h["state"] == "ready" for h in s.values()), 30, what="three ready hosts")
        load = cluster.load(clients=4, timeout=5.0, max_duration=90)
        try:
            load.wait_succeeded(100, timeout=15)
            t = time.monotonic()
            out = cluster.fleet(net.host(1), "reload", "--timeout", "60", timeout=90)
            result["reload_s"] = round(time.monotonic() - t, 3)
            time.sleep(1.0)
        finally:
            report = load.stop()
        result.update(reload_exit=out.returncode, failed_during_reload=report.failed + report.hung,
                      requests_sent=report.sent, per_host=dict(load.hosts),
                      multicast_dropped_by_bridge=net.multicast_dropped() if transport == "seeds" else None)
    finally:
        problems = cluster.close() + net.destroy()
        if problems:
            result["teardown_problems"] = problems
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    reason = netns.unavailable_reason()
    if reason:
        print(f"unicast_bench: cannot run: {reason}", file=sys.stderr)
        return 2
    results: dict = {"rounds": args.rounds,
                     "runs": {t: [] for t in TRANSPORTS}}
    for number in range(args.rounds):
        order = TRANSPORTS if number % 2 == 0 else TRANSPORTS[::-1]  # alternate: the load on the box drifts
        for transport in order:
            run = one_round(transport)
            print(f"round {number + 1} {transport}: {run}", flush=True)
            results["runs"][transport].append(run)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, "unicast_bench", args, results)
    print(f"\nwritten: {args.out}")
    return 0



def print_table(results: dict) -> None:
    print()
    for transport in TRANSPORTS:
        runs = results["runs"][transport]
        print(transport)
        for key in ("node_config_s", "node_seen_by_master_s", "node_first_served_s", "reload_s"):
            print(f"  {key:<24} {spread([r[key] for r in runs if key in r])}")
        print(f"  {'reload exit codes':<24} {[r.get('reload_exit') for r in runs]}")
        print(f"  {'failed+hung in reload':<24} {[r.get('failed_during_reload') for r in runs]}")


if __name__ == "__main__":
    raise SystemExit(main())
