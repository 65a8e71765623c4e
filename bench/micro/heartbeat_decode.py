"""What one heartbeat costs the host that hears it: decode (MAC, msgpack, checks), and the
agent's whole take() (dedupe digest, decode, replay guard, membership table).

    .venv/bin/python -m bench.micro.heartbeat_decode [--count 20000]

Every host hears every other host's heartbeat each interval, so at N hosts this
runs N times a second on each of them (docs/scale.md).
"""

from __future__ import annotations

import argparse
import time

from fleet.cluster import protocol as proto
from fleet.cluster.agent import ClusterAgent, ClusterOptions
from fleet.multicast import Group

BODY = dict(role="node", state="ready", generation=1, workers_ready=4, workers_total=4, requests_served=123456,
            requests_per_second=812.5, rss=200 << 20, hostname="web-0042.example.net",
            address=("10.0.3.42", 1717), app_version="1.4.2", error=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    keyring = proto.Keyring([b"k" * 32])
    origin = proto.Origin("bench", proto.derive_node_id("h1"), proto.new_boot_id())
    now = time.time()
    datagrams = [proto.encode(origin.make(proto.Heartbeat, now, **BODY), keyring) for _ in range(args.count)]
    options = ClusterOptions(Group("239.255.91.9", 17171), "127.0.0.1", keyring, name="bench", node_name="m")
    agent = ClusterAgent(options, "master", config={"endpoints": [], "app": "a", "processes": 1, "threads": 1})
    try:
        start = time.perf_counter()
        for datagram in datagrams:
            proto.decode(datagram, keyring, now, cluster="bench")
        decode = (time.perf_counter() - start) / args.count
        start = time.perf_counter()
        for datagram in datagrams:
            agent.take(datagram, ("10.0.3.42", 1717), False, now)
        take = (time.perf_counter() - start) / args.count
    finally:
        agent.close()
    print(f"heartbeat of {len(datagrams[0])} bytes: decode {decode * 1e6:.1f} µs, take() {take * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
