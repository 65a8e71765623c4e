"""Cluster agents over unicast seeds on loopback (127.0.0.1), alone and mixed with multicast (TTL 1)."""

from __future__ import annotations

import logging
import time

import pytest

from fleet.cluster import protocol as proto
from fleet.cluster.agent import ApplyConfig, ClusterAgent, ClusterOptions, HostStatus, ReloadRequested
from fleet.multicast import Group
from tests.support.udp import free_udp_port

CONFIG = {"endpoints": [["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]], "app": "app", "processes": 2, "threads": 4}
STATUS = HostStatus(state="ready", generation=1, workers_ready=2, workers_total=2, requests_served=10, rss=1 << 20)
KEYRING = proto.Keyring([b"k" * 32])
ANY_PORT = ("127.0.0.1", 0)


@pytest.fixture
def agents():
    made: list[ClusterAgent] = []

    def make(name: str, role: str, *, seeds=(), group: Group | None = None, unicast: bool = True,
             keyring: proto.Keyring = KEYRING, **kwargs) -> ClusterAgent:
        options = ClusterOptions(group, "127.0.0.1", keyring, name="unit", node_name=name,
                                 unicast_bind=ANY_PORT if unicast else None, peers=tuple(seeds))
        agent = ClusterAgent(options, role, **kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.close()


def run(*agents: ClusterAgent, seconds: float = 0.6, status: HostStatus | None = STATUS) -> list:
    """Every agent ticks (heartbeats on) and receives, like the supervisor's loop."""
    events = []
    deadline = time.time() + seconds
    while time.time() < deadline:
        now = time.time()
        for agent in agents:
            events.extend((agent.options.node_name, event) for event in agent.receive(now))
            agent.tick(now, None if agent.role == "observer" else status)
        time.sleep(0.01)
    return events


def heard(agent: ClusterAgent) -> set[str]:
    return {h["hostname"] for h in agent.members.status(time.time())["hosts"]}


def test_seed_only_nodes_get_the_configuration_and_learn_each_other(agents) -> None:
    master = agents("m", "master", config=CONFIG, generation=4)
    n1 = agents("n1", "node", seeds=[master.address])
    n2 = agents("n2", "node", seeds=[master.address])
    events = run(master, n1, n2, seconds=1.5)
    assert ("n1", ApplyConfig(CONFIG, 4)) in events and ("n2", ApplyConfig(CONFIG, 4)) in events
    assert heard(master) == {"n1", "n2"}
    # Neither seeded the other: they learned each other from the master's announces.
    assert n2.address in n1.peers.learned() and n1.address in n2.peers.learned()
    assert heard(n1) == {"m", "n2"} and heard(n2) == {"m", "n1"}
    assert master.rejected == n1.rejected == n2.rejected == 0


def test_announces_carry_the_unicast_peers() -> None:
    origin = proto.Origin("unit", bytes(16), bytes(16))
    message = origin.make(proto.Announce, time.time(), generation=1, config=CONFIG, address=("10.0.0.1", 1717),
                          peers=[("10.0.0.2", 1717), ["10.0.0.3", 40000]])
    decoded = proto.decode(proto.encode(message, KEYRING), KEYRING, time.time(), cluster="unit")
    assert decoded.peers == [("10.0.0.2", 1717), ("10.0.0.3", 40000)]
    older = origin.make(proto.Announce, time.time(), generation=1, config=CONFIG, address=("10.0.0.1", 1))
    assert proto.decode(proto.encode(older, KEYRING), KEYRING, time.time(), cluster="unit").peers == []
    with pytest.raises(ValueError, match="peers item"):
        origin.make(proto.Announce, time.time(), generation=1, config=CONFIG, address=("h", 1),
                    peers=[("10.0.0.2", "x")])


def test_an_observer_with_one_seed_hears_every_host_and_its_reload_reaches_the_master(agents) -> None:
    master = agents("m", "master", config=CONFIG)
    n1 = agents("n1", "node", seeds=[master.address])
    run(master, n1, seconds=1.0)
    cli = agents("cli", "observer", seeds=[master.address])
    run(master, n1, cli, seconds=2.5)
    assert heard(cli) == {"m", "n1"}  # n1's heartbeats reach the observer directly
    cli.send_reload(2)
    events = run(master, n1, cli, seconds=0.3)
    assert ("m", ReloadRequested(2, None)) in events
    assert [name for name, event in events if isinstance(event, ReloadRequested)] == ["m"]


def test_forged_unicast_datagrams_are_dropped_and_teach_no_peer(agents, caplog) -> None:
    master = agents("m", "master", config=CONFIG)
    forger = agents("evil", "observer", seeds=[master.address], keyring=proto.Keyring([b"x" * 32]))
    caplog.set_level(logging.WARNING, "fleet.cluster")
    forger.send_reload(99)
    forger.channel.send(b"garbage")
    events = run(master, seconds=0.3)
    assert events == [] and master.rejected == 2 and master.generation == 1
    assert forger.address not in master.peers
    assert "dropped a datagram from 127.0.0.1" in caplog.text


def test_learned_peers_expire_when_they_fall_silent(agents) -> None:
    master = agents("m", "master", config=CONFIG)
    node = agents("n", "node", seeds=[master.address])
    run(master, node, seconds=0.5)
    assert node.address in master.peers.learned()
    later = time.time() + master.peers.expire_after + 1
    master.tick(later, None)
    assert master.peers.learned() == []
    assert node.peers.addresses() == [master.address]  # a seed stays


def test_the_peer_table_is_bounded_and_says_so_once(agents, caplog) -> None:
    master = agents("m", "master", config=CONFIG)
    master.peers.max_peers = 2
    nodes = [agents(f"n{i}", "node", seeds=[master.address]) for i in range(4)]
    caplog.set_level(logging.WARNING, "fleet.cluster")
    run(master, *nodes, seconds=0.5)
    assert len(master.peers) == 2 and master.peers.refused >= 2
    assert caplog.text.count("unicast peer table full") == 1


def test_mixed_a_multicast_node_and_a_seed_node_through_a_master_on_both(agents, caplog) -> None:
    group = Group("239.255.91.8", free_udp_port())
    master = agents("m", "master", config=CONFIG, group=group)
    by_multicast = agents("mc", "node", group=group, unicast=False)
    by_seed = agents("uc", "node", seeds=[master.address])
    on_both = agents("both", "node", group=group, seeds=[master.address])
    caplog.set_level(logging.WARNING, "fleet.cluster")
    events = run(master, by_multicast, by_seed, on_both, seconds=1.5)
    for name in ("mc", "uc", "both"):
        assert (name, ApplyConfig(CONFIG, 1)) in events, name
    assert heard(master) == {"mc", "uc", "both"}
    # Only hosts that spoke unicast are unicast peers: the multicast-only node is not sent to.
    assert set(master.peers.learned()) == {by_seed.address, on_both.address}
    # "both" reaches the master twice per datagram (group and unicast): the copy is dropped quietly.
    assert master.rejected == 0 and "dropped a datagram" not in caplog.text
    # The seed-only node sees the multicast-only one in the master's table, not by its heartbeats.
    assert "mc" in {row["hostname"] for row in by_seed.master_members} and "mc" not in heard(by_seed)


def test_a_host_on_both_is_learned_even_when_its_multicast_copy_comes_first(agents) -> None:
    master = agents("m", "master", config=CONFIG)
    on_both = agents("both", "node", seeds=[master.address])
    origin = proto.Origin("unit", bytes(16), bytes(16))
    beat = proto.encode(origin.make(proto.Heartbeat, time.time(), **dict(
        role="node", state="ready", generation=1, workers_ready=1, workers_total=1, requests_served=0,
        requests_per_second=0.0, rss=0, hostname="both", address=on_both.address)), KEYRING)
    host, port = on_both.address
    assert master.take(beat, (host, 1717), False, time.time()) is None  # the multicast copy
    assert on_both.address not in master.peers
    master.take(beat, ("127.0.0.9", port), True, time.time())  # a copy replayed from elsewhere
    assert ("127.0.0.9", port) not in master.peers
    master.take(beat, on_both.address, True, time.time())  # the unicast copy from the host itself
    assert on_both.address in master.peers.learned()
    assert master.rejected == 0 and {h["hostname"] for h in master.members.status(time.time())["hosts"]} == {"both"}


def test_a_restarted_master_at_the_seed_address_relearns_its_nodes(agents) -> None:
    first = agents("m", "master", config=CONFIG)
    seed = first.address
    n1 = agents("n1", "node", seeds=[seed])
    n2 = agents("n2", "node", seeds=[seed])
    run(first, n1, n2, seconds=1.0)
    first.close()  # the master's process ends: a new one binds the same address
    options = ClusterOptions(None, "127.0.0.1", KEYRING, name="unit", node_name="m", unicast_bind=seed)
    second = ClusterAgent(options, "master", config=CONFIG)
    try:
        run(second, n1, n2, seconds=1.5)
        assert heard(second) == {"n1", "n2"}
        assert set(second.peers.learned()) == {n1.address, n2.address}
    finally:
        second.close()
