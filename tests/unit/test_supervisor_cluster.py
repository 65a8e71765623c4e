"""The supervisor's wait step and the cluster channel (loopback multicast, 127.0.0.1, TTL 1)."""

from __future__ import annotations

import shutil
import time

import pytest
import zmq

from fleet.cluster import protocol as proto
from fleet.cluster.agent import ClusterAgent, ClusterOptions, HostStatus
from fleet.config import Endpoint, HandlerConfig
from fleet.multicast import Group
from fleet.supervisor.supervisor import Supervisor
from tests.support.udp import free_udp_port

CONFIG = {"endpoints": [["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]], "app": "app", "processes": 1, "threads": 1}
STATUS = HostStatus(state="ready", generation=1, workers_ready=1, workers_total=1, requests_served=0, rss=1 << 20)


@pytest.fixture
def agents():
    group = Group("239.255.91.8", free_udp_port())
    keyring = proto.Keyring([b"k" * 32])
    made: list[ClusterAgent] = []

    def make(name: str) -> ClusterAgent:
        # With a configuration already, a node sends heartbeats only (no config requests).
        agent = ClusterAgent(ClusterOptions(group, "127.0.0.1", keyring, name="unit", node_name=name), "node",
                             config=CONFIG)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.close()


@pytest.fixture
def supervisor(agents):
    config = HandlerConfig(endpoints=(Endpoint("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),), app="app")
    sup = Supervisor(config, cluster=agents("here"))
    yield sup
    sup.dispatcher.close()
    sup.context.term()
    shutil.rmtree(sup.runtime_dir, ignore_errors=True)


def test_a_heartbeat_heard_is_read_at_once_so_the_next_wait_sleeps(agents, supervisor) -> None:
    supervisor.cluster.hears_peers = True  # as a master, or a node awaiting its turn
    peer = agents("peer")
    poller = zmq.Poller()
    poller.register(supervisor.cluster.fileno(), zmq.POLLIN)
    peer.tick(time.time(), STATUS)
    assert poller.poll(5000), "the peer's heartbeat never arrived"
    supervisor.wait(poller)
    # Unread, the datagram would keep the socket readable: poll() would return at
    # once, every pass, until the next tick (a busy loop per heartbeat heard).
    assert poller.poll(0) == []
    assert [h.hostname for h in supervisor.cluster.members.hosts(time.time())] == ["peer"]


def test_a_heartbeat_that_changes_nothing_runs_no_pass_but_a_change_a_due_tick_or_a_timeout_do(
        agents, supervisor) -> None:
    """A supervisor pass for every datagram heard was most of what hearing 1,000 hosts cost a
    master (bench/fake_hosts.py); a pass still runs when the table changed (the master logs a
    join or a host ready at once), when the agent has something to send, and on the tick."""
    supervisor.cluster.hears_peers = True  # as a master does
    peer = agents("peer")
    poller = zmq.Poller()
    poller.register(supervisor.cluster.fileno(), zmq.POLLIN)

    def heartbeat_from_peer() -> None:
        peer._next_heartbeat = 0.0
        peer.tick(time.time(), STATUS)
        assert poller.poll(5000), "the peer's heartbeat never arrived"

    supervisor.cluster.tick(time.time(), STATUS)  # our heartbeat went out: the next is a second away
    heartbeat_from_peer()
    assert supervisor.wait(poller) is True  # "peer joined" is to be logged
    supervisor.cluster.tick(time.time(), STATUS)
    heartbeat_from_peer()
    assert supervisor.wait(poller) is False  # the same again: nothing to log or do
    supervisor.cluster._next_heartbeat = 0.0  # our heartbeat is due: the next datagram brings a pass
    heartbeat_from_peer()
    assert supervisor.wait(poller) is True
    supervisor.cluster.tick(time.time(), STATUS)  # sent: nothing is due any more
    assert poller.poll(5000) and supervisor.wait(poller) is False  # our own heartbeat, looped back
    assert supervisor.wait(poller) is True  # nothing came: the tick's pass
