"""fleet on three namespace hosts: join, failure detection, cluster reload.

Topology (tests/support/netns.py): namespaces h1, h2, h3 on a private bridge
(198.18.0.0/24, nothing on the real interface); Mongrel2 and `fleet master`
on h1, bare `fleet node`s on h2 and h3; HTTP from h1 through Mongrel2.
Needs root.

Figures:
- node_start_to_first_served_s: from starting `fleet node` on a host to the
  first request that host answers (requests sent every ~20 ms on a keep-alive
  connection), with the part spent starting Python and importing fleet and
  the app measured separately on the same host;
- failure_detection_s: SIGKILL a node's process group; time until a passive
  observer (a ClusterAgent, role "observer", in h1, polled every 10 ms) shows
  it dead; also what one `fleet status --json` run right after shows;
- reload_s: wall time of `fleet reload` on h1 until every host runs the new
  generation (includes its own 2.5 s of listening first);
- failed requests during each reload, under a bounded load (4 keep-alive
  clients through Mongrel2; target zero).

    sudo .venv/bin/python -m bench.cluster_bench [--rounds 3]

Prints a table; writes bench/results/cluster_bench.json.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, RESULTS, spread, write_results
from tests.support import netns
from tests.support.harness import APPS
from tests.support.netns import FleetCluster, Network

OUT = RESULTS / "cluster_bench.json"


def first_served(cluster: FleetCluster, hostname: str, start: float, timeout: float = 30.0) -> float:
    deadline = start + timeout
    while time.monotonic() < deadline:
        try:
            if hostname in cluster.served_by(3, timeout=2.0):
                return time.monotonic() - start
        except Exception:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{hostname} served nothing within {timeout}s")


def import_cost(host: netns.Host) -> dict[str, float]:
    """Python start + `import fleet.cli` + the app, timed on the host (median of 3)."""
    code = ("import time, sys; t0 = time.perf_counter(); "
            "import fleet.cli, fleet.supervisor.supervisor, fleet.cluster.agent; "
            f"t1 = time.perf_counter(); sys.path.insert(0, {str(APPS)!r}); import hostapp; "  # as --pythonpath does
            "t2 = time.perf_counter(); print(t1 - t0, t2 - t1)")
    walls, fleet_imports, app_imports = [], [], []
    for _ in range(3):
        t = time.monotonic()
        out = host.exec([sys.executable, "-c", code], cwd=REPO)
        walls.append(time.monotonic() - t)
        a, b = out.stdout.split()
        fleet_imports.append(float(a))
        app_imports.append(float(b))
    return {"python_start_and_imports_wall_s": round(statistics.median(walls), 3),
            "fleet_import_s": round(statistics.median(fleet_imports), 3),
            "app_import_s": round(statistics.median(app_imports), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    reason = netns.unavailable_reason()
    if reason:
        print(f"cluster_bench: cannot run: {reason}", file=sys.stderr)
        return 2

    results: dict = {"rounds": args.rounds, "topology": "h1: Mongrel2 + master -p 1 --threads 2; "
                     "h2, h3: fleet node; netns on a bridge"}
    net = Network(hosts=3).create()
    cluster = FleetCluster(net, Path(tempfile.mkdtemp(prefix="cluster-bench-")))
    try:
        cluster.start_mongrel2()
        cluster.start_master()
        results["imports_on_h2"] = import_cost(net.host(2))

        # 1. fleet node start -> first request served by that host.
        joins = []
        for i in range(args.rounds):
            index = 2 if i == 0 else 3
            if index in cluster.nodes and cluster.nodes[index].running():
                cluster.nodes[index].stop(signal.SIGTERM)
            start = time.monotonic()
            proc = cluster.start_node(index, ready=False)
            joins.append(first_served(cluster, f"h{index}", start))
            proc.wait_ready()
        results["node_start_to_first_served_s"] = [round(x, 3) for x in joins]
        if 3 not in cluster.nodes or not cluster.nodes[3].running():
            cluster.start_node(3)

        # 2. failure detection by a passive observer.
        observer = cluster.observer()
        detections, status_after = [], []
        for _ in range(args.rounds):
            observer.wait_state("h3", "ready", 15)
            node = cluster.nodes[3]
            killed = time.monotonic()
            node.kill_group()
            node.proc.wait(5)
            dead_at = observer.wait_state("h3", "dead", 10, since=killed)
            detections.append(dead_at - killed)
            status_after.append(cluster.status().get("h3", {}).get("state"))
            cluster.start_node(3)
        results["failure_detection_s"] = [round(x, 3) for x in detections]
        results["fleet_status_h3_state_after_detection"] = status_after

        # 3. fleet reload on three hosts, under load.
        reloads = []
        for _ in range(args.rounds):
            wait_all_ready(cluster)
            load = cluster.load(clients=4, timeout=5.0, max_duration=90)
            try:
                load.wait_succeeded(100, timeout=15)
                t = time.monotonic()
                out = cluster.fleet(net.host(1), "reload", "--timeout", "60", timeout=90)
                took = time.monotonic() - t
                time.sleep(1.0)
            finally:
                report = load.stop()
            reloads.append({"reload_s": round(took, 3), "exit": out.returncode, "output": out.stdout.strip(),
                            "failed": report.failed, "hung": report.hung,
                            "failures": {str(k): v for k, v in report.failures.items()},
                            "sent": report.sent, "per_host": dict(load.hosts),
                            "worst_latency_ms": round(report.worst_latency * 1000, 1)})
        results["reloads"] = reloads
    finally:
        problems = cluster.close()
        problems += net.destroy()
        if problems:
            results["teardown_problems"] = problems

    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, "cluster_bench", args, results)
    print(f"\nwritten: {args.out}")
    return 0


def wait_all_ready(cluster: FleetCluster, timeout: float = 20.0) -> None:
    netns.wait_for(lambda: (s := cluster.status()) and len(s) == 3
               and all(h["state"] == "ready" for h in s.values()), timeout, what="three ready hosts")



def print_table(r: dict) -> None:
    imp = r.get("imports_on_h2", {})
    rows = [
        ("node start -> first served request (s)", spread(r.get("node_start_to_first_served_s", []))),
        ("  of which python start + imports (s, wall)", str(imp.get("python_start_and_imports_wall_s"))),
        ("  fleet import / app import (s)", f"{imp.get('fleet_import_s')} / {imp.get('app_import_s')}"),
        ("failure detection, observer (s)", spread(r.get("failure_detection_s", []))),
        ("fleet status right after (h3 state)", str(r.get("fleet_status_h3_state_after_detection"))),
        ("fleet reload, 3 hosts (s)", spread([x["reload_s"] for x in r.get("reloads", [])])),
        ("  exit codes", str([x["exit"] for x in r.get("reloads", [])])),
        ("  failed+hung requests per reload", str([x["failed"] + x["hung"] for x in r.get("reloads", [])])),
        ("  requests sent per run", str([x["sent"] for x in r.get("reloads", [])])),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    raise SystemExit(main())
