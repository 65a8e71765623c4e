"""The control commands: ``fleet status``, ``reload``, ``log`` and ``keygen`` (they talk to
the cluster as a short-lived observer) and ``fleet stats`` (asks one master)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import zmq

from fleet.cluster import protocol as proto
from fleet.cluster.agent import ClusterAgent
from fleet.cluster.options import make_agent
from fleet.supervisor.figures import render_table

# fleet status asks every host to heartbeat at once and prints when the master and every
# host it knows alive have answered; at most this many heartbeat intervals (hosts that do not
# answer requests, and fleets with no master, are heard at their own pace).
STATUS_LISTEN = 2.5


def run_status(args: argparse.Namespace) -> int:
    agent = make_agent(args, "observer")
    try:
        survey(agent)
        status = merged_status(agent)
    finally:
        agent.close()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0


def survey(agent: ClusterAgent) -> None:
    """Ask every host for its state and listen until the answers are in (at most STATUS_LISTEN intervals)."""
    asked = time.time()
    agent.ask_status(asked)
    agent.converse(STATUS_LISTEN * agent.options.heartbeat_interval,
                   until=lambda: agent.answered_since(asked, time.time()))


def merged_status(agent: ClusterAgent) -> dict:
    """What we heard ourselves, plus the hosts only the master knows of
    (a host that died before we started listening is in its table, as dead)."""
    status = agent.members.status(time.time())
    heard = {h["node_id"] for h in status["hosts"]}
    for row in agent.master_members:
        if row["node_id"] in heard:
            continue
        status["hosts"].append({
            **row, "address": list(row["address"]),
            "workers": {"ready": row["workers_ready"], "total": row["workers_total"]},
            "requests_per_second": 0.0, "rss": 0, "error": None, "app_version": None, "websockets_open": 0,
            "reported_by": "master",
        })
    status["hosts"].sort(key=lambda h: (h["role"] != "master", h["hostname"]))
    return status


def render_status(status: dict) -> str:
    hosts = status["hosts"]
    newest = max((h["generation"] for h in hosts), default=0)
    masters = [h for h in hosts if h["role"] == "master" and h.get("app_version")]
    expected_version = masters[0]["app_version"] if masters else None
    lines = [f"{'host':<20} {'address':<16} {'role':<7} {'gen':>4} {'workers':>8} {'req/s':>8} "
             f"{'rss MB':>7} {'seen':>6}  state"]
    for h in hosts:
        flags = []
        if h["generation"] < newest:
            flags.append("OLD GENERATION")
        if expected_version and h.get("app_version") and h["app_version"] != expected_version:
            flags.append(f"APP VERSION {h['app_version']} (master: {expected_version})")
        if h.get("error"):
            flags.append(h["error"])
        lines.append(f"{h['hostname'][:20]:<20} {h['address'][0]:<16} {h['role']:<7} {h['generation']:>4} "
                     f"{h['workers_ready']:>3}/{h['workers_total']:<4} {h['requests_per_second']:>8.1f} "
                     f"{h['rss'] / 1048576:>7.1f} {h['last_seen_age']:>5.1f}s  {h['state']}"
                     + (f"  ({'; '.join(flags)})" if flags else ""))
    if not hosts:
        lines.append("(no host heard)")
    return "\n".join(lines)


def run_reload(args: argparse.Namespace) -> int:
    """Ask the master for a new generation, then wait until every live host runs it."""
    agent = make_agent(args, "observer")
    try:
        survey(agent)
        hosts = [h for h in merged_status(agent)["hosts"] if h["state"] != "dead"]
        masters = [h for h in hosts if h["role"] == "master"]
        if not masters:
            print("fleet: error: no master heard on the cluster; nothing reloaded", file=sys.stderr)
            return 1
        target = max(h["generation"] for h in hosts) + 1
        # Addressed to the master boots we heard, so a replay reaches no restarted master.
        boots = [bytes.fromhex(h["boot_id"]) for h in masters if h.get("boot_id")]
        agent.send_reload(target, args.batch, boots if len(boots) == len(masters) else ())
        print(f"reload to generation {target} sent; waiting for {len(hosts)} host(s)")
        deadline = time.monotonic() + args.timeout
        pending = {h["node_id"] for h in hosts}
        views: dict[str, dict] = {}
        while pending and time.monotonic() < deadline:
            agent.converse(0.2)
            # Hosts heard directly, else the master's word (a host on the other side of a mixed fleet).
            for h in [*agent.master_members, *agent.members.status(time.time())["hosts"]]:
                views[h["node_id"]] = h
                if h["node_id"] in pending and h["generation"] >= target and h["state"] in ("ready", "lost"):
                    pending.discard(h["node_id"])
    finally:
        agent.close()
    failed = 0
    for node_id in sorted({h["node_id"] for h in hosts}):
        view = views.get(node_id, {})
        ok = node_id not in pending
        failed += not ok
        detail = "ok" if ok else f"FAILED: at generation {view.get('generation')}, {view.get('state')}" + (
            f", {view['error']}" if view.get("error") else "")
        print(f"  {view.get('hostname', node_id)} {view.get('role', '')}: {detail}")
    return 1 if failed else 0


def run_log(args: argparse.Namespace) -> int:
    agent = make_agent(args, "observer")
    try:
        if agent.unicast:
            # Unicast reaches only known peers: learn them from the master's announce first.
            agent.converse(STATUS_LISTEN * agent.options.heartbeat_interval,
                           until=lambda: bool(agent.master_members))
        agent.send_log(args.level, args.message)
    finally:
        agent.close()
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    sys.stdout.write(proto.keygen())
    return 0


def run_stats(args: argparse.Namespace) -> int:
    stats = fetch_stats(args.stats, args.timeout)
    if stats is None:
        print(f"fleet: error: no master answered on {args.stats} within {args.timeout:g} s", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2) if args.json else render_table(stats))
    return 0


def fetch_stats(endpoint: str, timeout: float) -> dict[str, Any] | None:
    """A master's figures from its --stats endpoint, or None if it does not answer in time."""
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
