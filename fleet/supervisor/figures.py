"""The master's figures: what ``fleet stats`` shows, built and rendered in one place.

The master answers a request on its ``--stats`` endpoint (``StatsEndpoint``) with
one JSON object (``master_figures``); ``render_table`` is what ``fleet stats``
prints of it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from fleet.cluster.agent import HostStatus
from fleet.dispatch.dispatcher import Dispatcher
from fleet.logs.push import lines_dropped
from fleet.supervisor.process import WorkerProcess
from fleet.worker import tally


@dataclass
class Counters:
    """What the master has done since it started."""

    reloads: int = 0
    failed_reloads: int = 0
    respawns: int = 0
    harakiri_kills: int = 0
    recycled_max_requests: int = 0
    recycled_rss: int = 0
    answered_502: int = 0
    answered_504: int = 0


def worker_state(worker: WorkerProcess, dispatcher: Dispatcher) -> str:
    if worker.retiring:
        return "draining"
    if not worker.ready:
        return "starting"
    return "busy" if dispatcher.busy_threads(worker.pid) else "ready"


def worker_row(worker: WorkerProcess, dispatcher: Dispatcher, threads: int) -> dict[str, Any]:
    rss, cpu = worker.usage()
    age = dispatcher.oldest_request_age(worker.pid)
    return {
        "pid": worker.pid,
        "generation": worker.generation,
        "state": worker_state(worker, dispatcher),
        "requests": dispatcher.answered(worker.pid),
        "busy_threads": dispatcher.busy_threads(worker.pid),
        "threads": threads,
        "request_age": round(age, 3) if age is not None else None,
        "rss": rss,
        "cpu": cpu,
    }


def master_figures(*, pid: int, generation: int, workers: list[WorkerProcess], dispatcher: Dispatcher, threads: int,
                   counters: Counters, cluster: dict[str, Any] | None) -> dict[str, Any]:
    rows = sorted((worker_row(w, dispatcher, threads) for w in workers), key=lambda row: row["pid"])
    vector, answered_by_dispatcher = dispatcher.worker_figures()
    served = tally.figures(vector)  # what the workers answered, by kind, status class and latency
    served["log_lines_dropped"] += lines_dropped()  # the workers' and the master's own
    figures = {
        "pid": pid,
        "generation": generation,
        "workers": rows,
        "totals": {
            "workers": len(rows),
            "ready": sum(row["state"] in ("ready", "busy") for row in rows),
            "busy": sum(row["state"] == "busy" for row in rows),
            "requests": sum(row["requests"] for row in rows),
            "rss": sum(row["rss"] or 0 for row in rows),
            "backlog": dispatcher.backlog,
        },
        "requests_served": dispatcher.answered(),  # every worker's since the master started
        "websockets_open": dispatcher.websockets_open(),
        "reloads": counters.reloads,
        "failed_reloads": counters.failed_reloads,
        "respawns": counters.respawns,
        "harakiri_kills": counters.harakiri_kills,
        "recycles": {"max_requests": counters.recycled_max_requests, "rss": counters.recycled_rss},
        "answered_502": counters.answered_502,
        "answered_503": answered_by_dispatcher.get(503, 0),
        "answered_504": counters.answered_504,
        "served": served,
    }
    if cluster is not None:
        figures["cluster"] = cluster
    return figures


def host_figures(*, workers: list[WorkerProcess], target: int, phase: str, generation: int,
                 current_generation: int, dispatcher: Dispatcher, error: str | None) -> HostStatus:
    """A host's heartbeat figures. `phase` is starting, running or stopping;
    `generation` is the one to report, `current_generation` the one new workers get."""
    live = [w for w in workers if not w.retiring]
    ready = sum(w.ready for w in live)
    if phase == "running":
        state = "ready" if ready >= target and error is None else "degraded"
    else:
        state = "starting" if phase == "starting" else "degraded"
    versions = Counter(w.app_version for w in live if w.ready and w.generation == current_generation)
    return HostStatus(state=state, generation=generation,
                      # during a reload old and new workers are both ready for a moment
                      workers_ready=min(ready, target), workers_total=target,
                      requests_served=dispatcher.answered(), websockets_open=dispatcher.websockets_open(),
                      rss=sum(worker.rss() or 0 for worker in workers), error=error,
                      app_version=versions.most_common(1)[0][0] if versions else None)


def render_table(stats: dict[str, Any]) -> str:
    lines = [f"master {stats['pid']}  generation {stats['generation']}  "
             f"reloads {stats['reloads']} (failed {stats['failed_reloads']})  respawns {stats['respawns']}  "
             f"harakiri {stats['harakiri_kills']}  502s {stats['answered_502']}  503s {stats['answered_503']}  "
             f"504s {stats['answered_504']}"]
    lines.append(f"{'pid':>8} {'gen':>4} {'state':<9} {'requests':>9} {'busy':>6} {'age s':>7} "
                 f"{'rss MB':>8} {'cpu %':>6}")
    for row in stats["workers"]:
        age = f"{row['request_age']:.1f}" if row["request_age"] is not None else "-"
        rss = f"{row['rss'] / 1048576:.1f}" if row["rss"] is not None else "-"
        cpu = f"{row['cpu']:.0f}" if row["cpu"] is not None else "-"
        lines.append(f"{row['pid']:>8} {row['generation']:>4} {row['state']:<9} {row['requests']:>9} "
                     f"{row['busy_threads']:>3}/{row['threads']:<2} {age:>7} {rss:>8} {cpu:>6}")
    totals = stats["totals"]
    lines.append(f"{'total':>8} {'':>4} {totals['ready']:>2} ready  {totals['requests']:>9} "
                 f"{totals['busy']:>6} {'':>7} {totals['rss'] / 1048576:>8.1f}   backlog {totals['backlog']}")
    for kind, classes in stats["served"]["requests"].items():
        if any(classes.values()):
            lines.append(f"{kind} answered: " + "  ".join(f"{name} {count}" for name, count in classes.items()))
    if stats["served"].get("websockets_opened"):
        lines.append(f"websockets open {stats.get('websockets_open', 0)}  "
                     f"(opened {stats['served']['websockets_opened']:.0f}, "
                     f"closed {stats['served']['websockets_closed']:.0f})")
    return "\n".join(lines)


class StatsEndpoint:
    """The master's ``--stats`` ZeroMQ REP socket: every request gets the figures as JSON."""

    def __init__(self, context: zmq.Context, endpoint: str, figures: Callable[[], dict[str, Any]]) -> None:
        self.figures = figures
        self.socket = context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)

    def answer(self) -> None:
        """Answer every request waiting; never block."""
        while True:
            try:
                self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.socket.send(json.dumps(self.figures()).encode())

    def close(self) -> None:
        self.socket.close()
