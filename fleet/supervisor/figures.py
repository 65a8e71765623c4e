"""Worker figures: collected in the master, shown by ``fleet stats``.

The master answers a request on its ``--stats`` endpoint with one JSON object;
the same figures are what cluster heartbeats carry.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

import psutil
import zmq

if TYPE_CHECKING:
    from fleet.dispatch.broker import Broker
    from fleet.supervisor.supervisor import WorkerProcess


def worker_state(worker: WorkerProcess, broker: Broker) -> str:
    if worker.retiring:
        return "draining"
    if not worker.ready:
        return "starting"
    return "busy" if broker.busy_threads(worker.pid) else "ready"


def worker_row(worker: WorkerProcess, broker: Broker, threads: int) -> dict[str, Any]:
    rss = cpu = None
    if worker.psutil is not None:
        try:
            with worker.psutil.oneshot():
                rss = worker.psutil.memory_info().rss
                cpu = worker.psutil.cpu_percent(None)
        except psutil.Error:
            pass
    counters = broker.counters.get(worker.pid)
    age = broker.oldest_request_age(worker.pid)
    return {
        "pid": worker.pid,
        "generation": worker.generation,
        "state": worker_state(worker, broker),
        "requests": counters.served if counters else 0,
        "busy_threads": broker.busy_threads(worker.pid),
        "threads": threads,
        "request_age": round(age, 3) if age is not None else None,
        "rss": rss,
        "cpu": cpu,
    }


def fetch(endpoint: str, timeout: float) -> dict[str, Any] | None:
    context = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(endpoint)
        socket.send(b"stats")
        if not socket.poll(int(timeout * 1000)):
            return None
        return json.loads(socket.recv())
    finally:
        socket.close()


def render_table(stats: dict[str, Any]) -> str:
    lines = [f"master {stats['pid']}  generation {stats['generation']}  "
             f"reloads {stats['reloads']} (failed {stats['failed_reloads']})  respawns {stats['respawns']}  "
             f"harakiri {stats['harakiri_kills']}  502s {stats['answered_502']}  504s {stats['answered_504']}"]
    lines.append(f"{'pid':>8} {'gen':>4} {'state':<9} {'requests':>9} {'busy':>6} {'age s':>7} {'rss MB':>8} {'cpu %':>6}")
    for row in stats["workers"]:
        age = f"{row['request_age']:.1f}" if row["request_age"] is not None else "-"
        rss = f"{row['rss'] / 1048576:.1f}" if row["rss"] is not None else "-"
        cpu = f"{row['cpu']:.0f}" if row["cpu"] is not None else "-"
        lines.append(f"{row['pid']:>8} {row['generation']:>4} {row['state']:<9} {row['requests']:>9} "
                     f"{row['busy_threads']:>3}/{row['threads']:<2} {age:>7} {rss:>8} {cpu:>6}")
    totals = stats["totals"]
    lines.append(f"{'total':>8} {'':>4} {totals['ready']:>2} ready  {totals['requests']:>9} "
                 f"{totals['busy']:>6} {'':>7} {totals['rss'] / 1048576:>8.1f}   backlog {totals['backlog']}")
    return "\n".join(lines)


def run_stats(args: argparse.Namespace) -> int:
    stats = fetch(args.stats, args.timeout)
    if stats is None:
        print(f"fleet: error: no master answered on {args.stats} within {args.timeout:g} s", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2) if args.json else render_table(stats))
    return 0
