"""Soak: load through Mongrel2 on three namespace hosts, a reload every minute, a worker killed every 2.

Topology (tests/support/netns.py): Mongrel2 + `fleet master -p 2 --threads 2`
on h1, `fleet node`s on h2 and h3 (namespaces on a private bridge). Load from
h1: 4 keep-alive GET clients pausing 50 ms between requests, and one client
POSTing 10-300 KB bodies (Mongrel2's temp-file upload path) every 0.5 s.
`fleet reload` on h1 every 60 s; a random worker (any host) SIGKILLed every
120 s, 30 s after a reload. The scenario is tests/support/scenario.py, the
same code tests/cluster/test_soak.py runs for 2 minutes.

Figures: requests sent/succeeded/failed/hung (GETs and uploads), failures
not explained by a SIGKILLed worker's in-flight requests (502 by design),
RSS and open fds per role at start and end, upload temp files left, processes
of the run still alive after teardown.

    sudo .venv/bin/python -m bench.soak --minutes 30

Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, write_results
from tests.support import netns, scenario
from tests.support.netns import Network

OUT = RESULTS / "soak.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--processes", type=int, default=2, help="workers per host")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    reason = netns.unavailable_reason()
    if reason:
        print(f"soak: cannot run: {reason}", file=sys.stderr)
        return 2

    plan = scenario.SoakPlan(seconds=args.minutes * 60)
    results: dict = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "plan": vars(plan) | {"processes_per_host": args.processes}}
    net = Network(hosts=3).create()
    cluster = scenario.ServingCluster(net, Path(tempfile.mkdtemp(prefix="soak-")))
    run = None
    try:
        cluster.start_all(processes=args.processes)
        cluster.wait_ready_hosts(3)
        run = scenario.run_soak(cluster, plan, say=lambda line: print(line, flush=True))
    finally:
        problems = cluster.close()
        if run is not None:
            # Before net.destroy(), which SIGKILLs whatever is left in the namespaces.
            left = scenario.orphans(run.seen)
            results["orphans_after_close"] = [vars(p) for p in left]
        results["left_in_namespaces"] = {h.name: h.pids() for h in net.hosts if h.pids()}
        problems += net.destroy()
        results["teardown_problems"] = problems
    results["summary"] = scenario.soak_summary(run)
    results["events"] = run.events
    results["samples"] = run.samples
    results["start_rows"], results["end_rows"] = run.start_rows, run.end_rows
    results["stats_end"] = run.stats_end
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, "soak", args, results)
    print_table(results)
    print(f"\nwritten: {args.out}")
    return 0


def print_table(r: dict) -> None:
    s = r["summary"]
    g, u = s["get"], s["uploads"]
    print(f"\nsoak {s['seconds'] / 60:.0f} min: {s['reloads']} reloads (exits {dict(s['reload_exits'])}, "
          f"median {s['reload_s_median']} s), {s['kills']} worker SIGKILLs")
    print(f"GET     sent {g['sent']}  ok {g['succeeded']}  failed {g['failed']} {g['failures']}  hung {g['hung']}  "
          f"p50 {g['p50_ms']} ms  p99 {g['p99_ms']} ms  worst {g['worst_latency_ms']} ms")
    print(f"upload  sent {u['sent']}  ok {u['succeeded']}  failed {u['failed']} {u['failures']}  hung {u['hung']}")
    print(f"failed not explained by a SIGKILLed worker's in-flight requests: {s['failed_outside_kills']}")
    print(f"502s answered by the masters: {s['answered_502']}; respawns: {s['respawns']}")
    print(f"upload temp files left: {len(s['upload_files_left'])}")
    print(f"orphans after close: {len(r.get('orphans_after_close', []))}; "
          f"left in namespaces: {r['left_in_namespaces']}; teardown problems: {r['teardown_problems']}")
    print(f"\n{'role':<14} {'n':>3}/{'n':<3} {'RSS MB start':>13} {'end':>7} {'(max)':>7}   "
          f"{'fds start':>9} {'end':>5} {'(max)':>6}")
    for role in sorted(set(s["start"]) | set(s["end"])):
        a, b = s["start"].get(role, {}), s["end"].get(role, {})
        print(f"{role:<14} {a.get('n', 0):>3}/{b.get('n', 0):<3} {a.get('rss_mb_median', '-'):>13} "
              f"{b.get('rss_mb_median', '-'):>7} {b.get('rss_mb_max', '-'):>7}   {a.get('fds_median', '-'):>9} "
              f"{b.get('fds_median', '-'):>5} {b.get('fds_max', '-'):>6}")


if __name__ == "__main__":
    raise SystemExit(main())
