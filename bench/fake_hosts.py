"""A real master and a real node hearing the heartbeats of up to 1,000 fake hosts: the cluster's cost per host.

The 50-host bench (bench/scale_bench.py) runs real hosts, each in its own
namespace; 1,000 do not fit on this machine. Here a generator in this
process sends valid, signed heartbeats for N made-up hosts (each once a
second, spread evenly, sequence numbers and timestamps as a real host's)
to the group on loopback (interface 127.0.0.1, TTL 1). A real `fleet
master` and a real `fleet node`, both serving through a real Mongrel2,
hear them. For each N: the CPU of the master's and the node's supervisor
over --seconds, the UDP receive-buffer drops on the machine, and, at the
largest N, how many hosts `fleet status` lists (every page of the master's
table).

    .venv/bin/python -m bench.fake_hosts                         # N = 0, 200, 1000
    .venv/bin/python -m bench.fake_hosts --python OTHER/.venv/bin/python   # another checkout's fleet

Prints a table; writes bench/results/fake_hosts.json.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import BENCH, RESULTS, Contender, cpu_seconds, make_rig, write_results
from fleet.cluster import protocol as proto
from fleet.cluster.agent import DEFAULT_CLUSTER_NAME
from tests.support.udp import free_udp_port

OUT = RESULTS / "fake_hosts.json"
IFACE = "127.0.0.1"


class FakeHosts:
    """Heartbeats of `count` made-up hosts, each once a second, until stopped."""

    def __init__(self, group: tuple[str, int], keyring: proto.Keyring, count: int) -> None:
        self.group, self.keyring, self.count = group, keyring, count
        self.origins = [proto.Origin(DEFAULT_CLUSTER_NAME, proto.derive_node_id(f"fake-{i}"), proto.new_boot_id())
                        for i in range(count)]
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(IFACE))
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        self.stopping = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, name="fake-hosts", daemon=True)

    def _beat(self, i: int, now: float) -> bytes:
        return proto.encode(self.origins[i].make(
            proto.Heartbeat, now, role="node", state="ready", generation=1, workers_ready=2, workers_total=2,
            requests_served=int(now), requests_per_second=10.0, rss=50_000_000,
            hostname=f"fake-{i:04d}.example.internal", address=(f"10.9.{i // 250}.{i % 250}", 1717),
            app_version="1.2.3"), self.keyring)

    def _run(self) -> None:
        slice_s = 0.01  # 1 % of the hosts every 10 ms
        per_slice = self.count * slice_s
        due, sent_by_now, start = 0.0, 0, time.monotonic()
        while not self.stopping.is_set() and self.count:
            due += per_slice
            now = time.time()
            while sent_by_now < int(due):
                self.sock.sendto(self._beat(sent_by_now % self.count, now), self.group)
                sent_by_now += 1
            self.sent = sent_by_now
            time.sleep(max(0.0, start + (due / per_slice) * slice_s - time.monotonic()))

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


def rcvbuf_errors() -> int:
    lines = Path("/proc/net/snmp").read_text().splitlines()
    udp = [line.split() for line in lines if line.startswith("Udp:")]
    return int(dict(zip(udp[0][1:], udp[1][1:]))["RcvbufErrors"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, nargs="+", default=[0, 200, 1000], help="fake hosts, per step")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per step")
    parser.add_argument("--python", default=sys.executable, help="the interpreter (and so the fleet) under test")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if any(not 0 <= n <= 1000 for n in args.hosts) or not 1 <= args.seconds <= 120:
        parser.error("--hosts must be 0..1000 and --seconds 1..120")

    rig = make_rig("fleet-fake-hosts-")
    key_file = rig.workdir / "cluster.key"
    key_file.write_text(proto.keygen())
    keyring = proto.parse_key_file(key_file.read_text())
    group = (f"239.255.{random.randint(1, 254)}.{random.randint(1, 254)}", free_udp_port())
    cluster = ["--cluster", f"{group[0]}:{group[1]}", "--cluster-iface", IFACE, "--cluster-key-file", str(key_file)]
    route = rig.route
    master = Contender("master", [args.python, "-m", "fleet", "master", "--zeromq",
                                  f"{route.send_spec},{route.recv_spec}", "--module", "hello_app",
                                  "--pythonpath", str(BENCH), "-p", "1", *cluster, "--node-name", "real-master"],
                       "master ready", rig.workdir)
    node = Contender("node", [args.python, "-m", "fleet", "node", *cluster, "--node-name", "real-node"],
                     "node ready", rig.workdir)
    results: list[dict] = []
    rig.server.start()
    try:
        master.start()
        node.start()
        pids = {"master": master.proc.pid, "node": node.proc.pid}
        for count in args.hosts:
            fakes = FakeHosts(group, keyring, count)
            fakes.start()
            time.sleep(3.0)  # every fake host heard at least twice: the tables are full
            cpu0 = {name: cpu_seconds([pid]) for name, pid in pids.items()}
            drops0, sent0, t0 = rcvbuf_errors(), fakes.sent, time.monotonic()
            time.sleep(args.seconds)
            took = time.monotonic() - t0
            row = {"fake_hosts": count, "heartbeats_per_s": round((fakes.sent - sent0) / took, 1),
                   "udp_rcvbuf_drops": rcvbuf_errors() - drops0}
            for name, pid in pids.items():
                row[f"{name}_cpu_pct"] = round(100 * (cpu_seconds([pid]) - cpu0[name]) / took, 2)
            if count == max(args.hosts):
                status = subprocess.run([args.python, "-m", "fleet", "status", "--json", *cluster],
                                        capture_output=True, text=True, timeout=60)
                hosts = json.loads(status.stdout)["hosts"] if status.returncode == 0 else []
                row["status_lists_hosts"] = len(hosts)
            fakes.stop()
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        node.stop()
        master.stop()
        rig.server.stop()
    print(f"{'fake hosts':>10} {'beats/s':>8} {'master %':>9} {'node %':>7} {'drops':>6} {'status lists':>13}")
    for row in results:
        print(f"{row['fake_hosts']:>10} {row['heartbeats_per_s']:>8} {row['master_cpu_pct']:>9} "
              f"{row['node_cpu_pct']:>7} {row['udp_rcvbuf_drops']:>6} {row.get('status_lists_hosts', ''):>13}")
    write_results(args.out, "fake_hosts", args, results, python=args.python)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
