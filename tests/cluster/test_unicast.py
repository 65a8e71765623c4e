"""fleet over unicast seeds (--cluster-peers) on a bridge that drops multicast, and a mixed fleet.

The bridge namespace gets an nftables rule (bridge family) that drops IPv4
multicast, as cloud networks and VPNs do (Network.drop_multicast). The first
test proves the rule bites: a multicast-only node on that bridge never hears
its master. The others run the same cluster protocol over unicast: every host
is given one seed, the master's address on h1. Figures are printed (-s) and
kept as junit properties; timings are measured, not asserted (bench/unicast_bench.py).
"""

from __future__ import annotations

import time

from tests.support.harness import wait_for
from tests.support.netns import FleetCluster

SEEDS = "seeds"


def figure(record_property, name: str, value) -> None:
    print(f"\n[figure] {name} = {value}")
    record_property(name, value)


def test_a_bridge_that_drops_multicast_keeps_a_multicast_node_out(cluster: FleetCluster, record_property) -> None:
    cluster.net.drop_multicast()
    cluster.start_mongrel2()
    master = cluster.start_master()
    node = cluster.start_node(2, ready=False)
    observer = cluster.observer(cluster.net.host(2))  # multicast, next to the node
    time.sleep(5.0)  # five announce intervals, five config requests
    assert node.running(), node.log_text()[-2000:]
    assert "node ready" not in node.log_text() and not node.descendants(), "the node got a configuration"
    assert "h2" not in cluster.status(), "the master heard the node over a bridge that drops multicast"
    assert "h1" not in observer.views, "the node's host heard the master's heartbeats"
    dropped = cluster.net.multicast_dropped()
    figure(record_property, "multicast_packets_dropped_by_bridge", dropped)
    assert dropped > 0
    assert "joined" not in master.log_text()


def test_a_seeds_only_cluster_serves_reports_and_reloads_without_multicast(
        cluster: FleetCluster, record_property) -> None:
    from fleet.cluster.agent import ClusterAgent

    cluster.net.drop_multicast()
    cluster.transport = SEEDS
    cluster.start_mongrel2()
    master = cluster.start_master()
    observer = cluster.observer()
    started = time.monotonic()
    # Debug: a node logs its peers' joins there (the master's log has the fleet's, at info).
    nodes = [cluster.start_node(i, ready=False, extra=["--log-level", "debug"]) for i in (2, 3)]
    for node in nodes:
        node.wait_ready()
    seen = {name: observer.wait_state(name, "ready", 30) - started for name in ("h2", "h3")}
    figure(record_property, "seeds_node_seen_ready_by_observer_s", {k: round(v, 3) for k, v in seen.items()})

    served = cluster.served_by(60)
    assert set(served) == {"h1", "h2", "h3"}, served
    # Each node was given only h1; they heard each other from the master's announces.
    for me, other in (("h2", "h3"), ("h3", "h2")):
        wait_for(lambda me=me, other=other: f"cluster: {other} (" in cluster.nodes[int(me[1])].log_text(), 10,
                 what=f"{me} hears {other}")
    for host in (cluster.h1, cluster.net.host(3)):
        hosts = wait_for(lambda host=host: (s := cluster.status(host)) and len(s) == 3 and s, 15,
                         what=f"three hosts in fleet status on {host.name}")
        assert {h["state"] for h in hosts.values()} == {"ready"}, hosts
        assert hosts["h1"]["role"] == "master"
        # Heard directly (heartbeats), not only in the master's table.
        assert not any(h.get("reported_by") for h in hosts.values()), hosts
    assert cluster.net.multicast_dropped() == 0  # nothing here even tried multicast

    # `fleet log` from h3 knows only the seed, yet its line reaches every host.
    out = cluster.fleet(cluster.net.host(3), "log", "hello over seeds")
    assert out.returncode == 0, out.stdout + out.stderr
    for proc in (master, *nodes):
        wait_for(lambda proc=proc: "hello over seeds (from 198.18.0.3)" in proc.log_text(), 10,
                 what=f"the line in {proc.host.name}'s log")

    # `fleet reload` from a node's host, over seeds: every host moves to the next generation.
    before = {p.host.name: p.worker_pids() for p in (master, *nodes)}
    generation = cluster.status()["h1"]["generation"]
    began = time.monotonic()
    out = cluster.fleet(cluster.net.host(2), "reload", "--timeout", "60")
    figure(record_property, "seeds_reload_cli_s", round(time.monotonic() - began, 3))
    assert out.returncode == 0, out.stdout + out.stderr
    hosts = cluster.status()
    assert {h["generation"] for h in hosts.values()} == {generation + 1}, hosts
    after = {p.host.name: p.worker_pids() for p in (master, *nodes)}
    assert all(not (before[name] & after[name]) for name in before), (before, after)
    assert set(cluster.served_by(60)) == {"h1", "h2", "h3"}

    # A Reload signed with the wrong key, sent by unicast straight to the master's address.
    h3 = cluster.net.host(3)
    forger = h3.call(ClusterAgent, cluster.options(h3, "observer", "forger", key=cluster.wrong_key), "observer")
    try:
        for _ in range(3):
            forger.send_reload(generation + 10)
            time.sleep(0.2)
    finally:
        forger.close()
    wait_for(lambda: "dropped a datagram from 198.18.0.3" in master.log_text(), 10, what="the master drops it")
    time.sleep(1.0)
    assert {h["generation"] for h in cluster.status().values()} == {generation + 1}
    assert master.log_text().count("reload to generation") == 1


def test_a_mixed_fleet_multicast_node_and_seeds_node_behind_a_master_on_both(
        cluster: FleetCluster, record_property) -> None:
    net = cluster.net
    h2, h3 = net.host(2), net.host(3)
    net.drop_multicast([h3])  # h3 sits behind a network that drops multicast; h1 and h2 do not
    cluster.start_mongrel2()
    master = cluster.start_master(transport="both")
    multicast_node = cluster.start_node(2, transport="multicast", extra=["--log-level", "debug"])
    seeds_node = cluster.start_node(3, transport=SEEDS, extra=["--log-level", "debug"])
    assert set(cluster.served_by(60)) == {"h1", "h2", "h3"}
    # The seeds node hears the master's heartbeats by unicast (logged, at debug, at its next tick);
    # the multicast node leaves them unread outside a rolling reload, and follows the master's announces.
    wait_for(lambda: "cluster: h1 (" in seeds_node.log_text(), 10, what="the seeds node lists the master")
    assert "cluster: h1 (" not in multicast_node.log_text()

    # Each side's `fleet status` shows all three: its own side heard, the other side from the master.
    for host, transport in ((h2, "multicast"), (h3, SEEDS)):
        hosts = wait_for(lambda host=host, transport=transport: (s := cluster.status(host, transport))
                         and len(s) == 3 and s, 15, what=f"three hosts in status on {host.name}")
        assert {h["state"] for h in hosts.values()} == {"ready"}, hosts
        other = "h3" if host is h2 else "h2"
        assert hosts[other].get("reported_by") == "master", hosts
    assert net.multicast_dropped() > 0  # the master's multicast towards h3 was dropped

    generation = cluster.status()["h1"]["generation"]
    out = cluster.fleet(h3, "reload", "--timeout", "60", transport=SEEDS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert {h["generation"] for h in cluster.status().values()} == {generation + 1}
    assert "dropped a datagram" not in master.log_text()  # datagrams heard both ways are not "replays"
