"""Hostile network: a fourth host floods the cluster's group while three hosts serve through Mongrel2.

Topology (tests/support/netns.py, 4 namespace hosts on a private bridge):
Mongrel2 + `fleet master -p 2 --threads 2` on h1, `fleet node`s on h2 and h3,
the attacker on h4 (tests/cluster/flood.py: it joins the group, captures
genuine datagrams for 4 s, then sends --count datagrams evenly over
--seconds: garbage, other-cluster, bad MAC, truncated, bit-flipped,
oversized up to 64 KB, replays, wrong-key and unsigned forgeries of
heartbeats/reloads/announces, and real-key datagrams with out-of-window
timestamps). Load: 4 keep-alive GET clients from h1 pausing 20 ms, 20 s
before the flood (baseline), during it, and 10 s after.

Figures per run: datagrams sent; what each victim's `fleet stats` counts
(accepted from h4's address: must be 0; genuine accepted; rejected by
reason; other cluster); kernel UDP counters in each victim namespace
(RcvbufErrors: dropped before fleet saw them); failed/hung requests;
p50/p99 in the baseline, flood and after windows of the same run; the
victims' (master/node supervisor processes: they own the cluster socket)
CPU% and RSS. The scenario is tests/support/scenario.py (run_hostile), the
same code tests/cluster/test_hostile.py runs with a short flood.

    sudo .venv/bin/python -m bench.hostile --runs 3

Writes bench/results/hostile.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, write_results
from tests.support import netns, scenario
from tests.support.netns import Network

OUT = RESULTS / "hostile.json"


def one_run(plan: scenario.HostilePlan, processes: int) -> dict:
    net = Network(hosts=4).create()
    cluster = scenario.ServingCluster(net, Path(tempfile.mkdtemp(prefix="hostile-")))
    try:
        cluster.start_all(processes=processes)
        return scenario.run_hostile(cluster, net.host(4), plan, say=lambda line: print(line, flush=True))
    finally:
        problems = cluster.close() + net.destroy()
        if problems:
            print(f"teardown problems: {problems}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=30000)
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--mixes", default="", help="flood.py --mixes (default: all)")
    parser.add_argument("--spoof-sources", type=int, default=0,
                        help="flood.py --spoof-sources: forge the source from N addresses (default: h4's own)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    reason = netns.unavailable_reason()
    if reason:
        print(f"hostile: cannot run: {reason}", file=sys.stderr)
        return 2
    plan = scenario.HostilePlan(count=args.count, flood_seconds=args.seconds, mixes=args.mixes,
                                spoof_sources=args.spoof_sources)
    results: dict = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
    for i in range(args.runs):
        run = one_run(plan, args.processes)
        results["runs"].append(run)
        print_run(i + 1, run)
    runs = results["runs"]
    med = lambda key, field: statistics.median(r[key][field] for r in runs)  # noqa: E731
    results["median"] = {"p99_baseline_ms": med("latency_baseline", "p99_ms"),
                         "p99_flood_ms": med("latency_flood", "p99_ms"),
                         "p99_after_ms": med("latency_after", "p99_ms")}
    print(f"\nmedian of {len(runs)} runs: p99 baseline {results['median']['p99_baseline_ms']} ms, "
          f"flood {results['median']['p99_flood_ms']} ms, after {results['median']['p99_after_ms']} ms; "
          f"accepted from the attacker in all runs: {sum(r['accepted_from_attacker_total'] for r in runs)}; "
          f"failed+hung: {sum(r['load']['failed'] + r['load']['hung'] for r in runs)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, "hostile", args, results)
    print(f"written: {args.out}")
    return 0


def print_run(n: int, r: dict) -> None:
    f, load = r["flood"], r["load"]
    print(f"\nrun {n}: flood sent {f['sent']} datagrams ({f['bytes'] / 1e6:.1f} MB) in {f['seconds']} s "
          f"(captured {f['captured']}); errors {f['send_errors']}")
    print(f"  by mix: {f['by_mix']}")
    print(f"  load: sent {load['sent']} ok {load['succeeded']} failed {load['failed']} hung {load['hung']}")
    for window in ("baseline", "flood", "after"):
        w = r[f"latency_{window}"]
        print(f"  {window:<8} n={w['n']:<6} p50 {w.get('p50_ms')} ms  p99 {w.get('p99_ms')} ms  "
              f"max {w.get('max_ms')} ms  not ok {w.get('not_ok')}")
    for name, v in r["victims"].items():
        print(f"  {name}: accepted from attacker {v['accepted_from_attacker']}  genuine accepted "
              f"{v['accepted_genuine']}  rejected {v['rejected']} {v['rejected_by_reason']}  other cluster "
              f"{v['other_cluster']}  kernel {v['kernel_udp']}")
        print(f"      cpu% baseline {v['cpu_pct_baseline']} flood {v['cpu_pct_flood']}  "
              f"rss MB {v['rss_mb_before']} -> {v['rss_mb_after']}")
    print(f"  heartbeat gap lines: {r['heartbeat_gap_lines']}  generations {r['generations']}  "
          f"states after {r['states_after']}")


if __name__ == "__main__":
    raise SystemExit(main())
