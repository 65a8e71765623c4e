"""Two cluster agents talking over loopback multicast (127.0.0.1, TTL 1)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from fleet.cluster import agent as agent_module
from fleet.cluster import protocol as proto
from fleet.cluster.agent import (
    ApplyConfig,
    ClusterAgent,
    ClusterOptions,
    HostStatus,
    RejectLog,
    ReloadRequested,
    Verdict,
)
from fleet.multicast import Group
from tests.support.udp import free_udp_port

CONFIG = {"endpoints": [["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]], "app": "app", "processes": 2, "threads": 4}
STATUS = HostStatus(state="ready", generation=1, workers_ready=2, workers_total=2, requests_served=10, rss=1 << 20)


@pytest.fixture
def options():
    group = Group("239.255.91.7", free_udp_port())
    keyring = proto.Keyring([b"k" * 32])

    def make(name: str, keyring: proto.Keyring = keyring) -> ClusterOptions:
        return ClusterOptions(group, "127.0.0.1", keyring, name="unit", node_name=name)

    return make


def pump(*agents: ClusterAgent, rounds: int = 20) -> list:
    events = []
    for _ in range(rounds):
        now = time.time()
        for agent in agents:
            events.extend((agent.role, event) for event in agent.receive(now))
        time.sleep(0.01)
    return events


def test_a_bare_node_gets_the_configuration_on_request(options) -> None:
    master = ClusterAgent(options("m"), "master", config=CONFIG, generation=3)
    node = ClusterAgent(options("n"), "node")
    try:
        node.tick(time.time(), None)  # no configuration yet: it asks
        pump(master, rounds=5)  # the master answers a request at once
        events = pump(node)
        assert ("node", ApplyConfig(CONFIG, 3)) in events
        assert node.config == CONFIG and node.generation == 3
    finally:
        master.close()
        node.close()


def test_heartbeats_fill_the_table_and_reloads_reach_the_master(options) -> None:
    master = ClusterAgent(options("m"), "master", config=CONFIG)
    node = ClusterAgent(options("n"), "node")
    observer = ClusterAgent(options("cli"), "observer")
    try:
        node.tick(time.time(), STATUS)
        master.tick(time.time(), STATUS)
        pump(master, node, observer)
        hosts = {h["hostname"]: h for h in observer.members.status(time.time())["hosts"]}
        assert set(hosts) == {"m", "n"} and hosts["n"]["workers_ready"] == 2
        observer.send_reload(2)
        events = pump(master, node)
        assert ("master", ReloadRequested(2, None)) in events
        assert all(role == "master" for role, event in events if isinstance(event, ReloadRequested))
    finally:
        for agent in (master, node, observer):
            agent.close()


def test_a_reload_replayed_to_a_restarted_master_is_refused(options) -> None:
    """The replay gap a fresh ReplayGuard leaves: `fleet reload` names the master boots it heard."""
    observer = ClusterAgent(options("cli"), "observer")
    master = ClusterAgent(options("m"), "master", config=CONFIG)
    restarted = None
    try:
        command = observer.origin.make(proto.Reload, time.time(), command_id=proto.new_command_id(),
                                       generation=2, masters=[master.origin.boot_id])
        datagram = observer._encode(command)
        observer.channel.send(datagram)
        assert ("master", ReloadRequested(2, None)) in pump(master)
        master.close()
        restarted = ClusterAgent(options("m"), "master", config=CONFIG)  # same host, new boot
        observer.channel.send(datagram)  # the captured datagram, well within the window
        assert pump(restarted) == []
        assert restarted.counters()["rejected_by_reason"] == {"NotThisBoot": 1}
        # Unaddressed (an older `fleet reload`) still reaches any master.
        observer.send_reload(3)
        assert ("master", ReloadRequested(3, None)) in pump(restarted)
    finally:
        for agent in (observer, master, restarted):
            if agent is not None:
                agent.close()


def test_forged_and_garbled_datagrams_are_dropped_and_counted(options) -> None:
    master = ClusterAgent(options("m"), "master", config=CONFIG)
    forger = ClusterAgent(options("evil", proto.Keyring([b"x" * 32])), "observer")
    try:
        forger.send_reload(99)
        forger.channel.send(b"garbage")
        forger.channel.send(b"FLT" + bytes(100))
        events = pump(master)
        assert events == []
        assert master.rejected == 3
        assert master.generation == 1
        # What `fleet stats` shows: nothing accepted from anyone, the drops by reason.
        counters = master.counters()
        assert counters["accepted"] == 0 and counters["accepted_from"] == {}, counters
        assert sum(counters["rejected_by_reason"].values()) == 3, counters
    finally:
        master.close()
        forger.close()


def test_a_configuration_too_large_for_one_datagram_is_refused_at_start(options) -> None:
    huge = dict(CONFIG, pythonpath=["/x" * 200] * 30)
    with pytest.raises(proto.TooLarge):
        ClusterAgent(options("m"), "master", config=huge)


def test_nodes_take_turns_in_a_rolling_reload(options) -> None:
    quick = [dataclasses.replace(options(f"n{i}"), heartbeat_interval=0.1) for i in range(4)]
    agents = [ClusterAgent(o, "node") for o in quick]
    try:
        ranked = sorted(agents, key=lambda a: a.origin.node_id)
        # Awaiting a turn, a node first listens to its peers' heartbeats for a while: no answer yet.
        assert [a.may_roll(2) for a in ranked] == [False] * 4
        now = time.time()
        for agent in agents:
            agent.tick(now, STATUS)  # everybody on generation 1, ready
        pump(*agents)
        time.sleep(agent_module.TURN_LISTEN_INTERVALS * 0.1)
        # The first ROLL_HOSTS in node-id order may go; the others wait for them.
        assert [a.may_roll(2) for a in ranked] == [True, True, False, False]
        moved = HostStatus(**{**STATUS.__dict__, "generation": 2})
        for agent in ranked[:2]:
            agent._next_heartbeat = 0.0
            agent.tick(time.time(), moved)
            agent.turn_taken()
        pump(*agents)
        assert all(a.may_roll(2) for a in ranked[2:])
    finally:
        for agent in agents:
            agent.close()


def test_a_node_leaves_its_peers_heartbeats_unread_unless_it_awaits_a_turn(options) -> None:
    """Every node decoding every heartbeat is N² work across a fleet; a node needs them only
    to find its turn in a rolling reload. The kernel drops them (a socket filter on the kind
    byte), the agent too where that filter is missing; the master still reads them all, and
    the node every other kind of datagram."""
    master = ClusterAgent(options("m"), "master", config=CONFIG)
    node = ClusterAgent(options("n"), "node")
    peers = [ClusterAgent(options(f"p{i}"), "node") for i in range(3)]
    everyone = [master, node, *peers]

    def beat() -> list:
        for agent in peers:
            agent._next_heartbeat = 0.0
            agent.tick(time.time(), STATUS)
        return pump(*everyone)

    try:
        node.tick(time.time(), None)  # asks for the configuration
        assert ("node", ApplyConfig(CONFIG, 1)) in beat()  # the master's answer still arrives
        assert len(node.members) == 0 and node.heartbeats_skipped == 0  # not even read: the kernel dropped them
        assert {h.hostname for h in master.members.hosts(time.time())} == {"p0", "p1", "p2"}
        # A forged heartbeat goes the same way; a garbled datagram too short for a header still
        # reaches the node, to be refused and counted.
        peers[0].channel.send(b"FLT\x01\x03" + bytes(100))
        peers[0].channel.send(b"FLT\x01\x03")
        pump(node)
        assert node.heartbeats_skipped == 0 and node.rejected == 1

        node.may_roll(2)  # awaiting a turn: it listens
        beat()
        assert {h.hostname for h in node.members.hosts(time.time())} == {"p0", "p1", "p2"}
        node.turn_taken()  # and after its turn, forgets them and stops reading
        assert len(node.members) == 0
        beat()
        assert len(node.members) == 0 and node.heartbeats_skipped == 0

        # Without the kernel's filter (not Linux, or refused), the agent drops them unparsed.
        node.channel.channel.hear_heartbeats(True)
        beat()
        assert len(node.members) == 0 and node.heartbeats_skipped == 3
        assert node.counters()["heartbeats_skipped"] == 3
    finally:
        for agent in everyone:
            agent.close()


def _fill(master: ClusterAgent, count: int, silent: str | None = None) -> list[str]:
    """``count`` hosts in the master's table, all alive but ``silent``, which is dead."""
    names = [f"h{i:04d}" for i in range(count)]
    origins = {name: proto.Origin("unit", proto.derive_node_id(name), proto.new_boot_id()) for name in names}
    start = time.time() - 5 * master.members.dead_after
    body = dict(role="node", state="ready", generation=1, workers_ready=1, workers_total=1,
                requests_served=0, requests_per_second=0.0, rss=0, address=("127.0.0.1", 1))
    for name in names:
        master.members.observe(origins[name].make(proto.Heartbeat, start, hostname=name, **body), ("127.0.0.1", 1),
                               start)
    now = time.time()
    for name in (n for n in names if n != silent):
        master.members.observe(origins[name].make(proto.Heartbeat, now, hostname=name, **body), ("127.0.0.1", 1),
                               now)
    master.members.tick(now)
    return names


def test_the_node_table_is_announced_whole_in_pages(options, monkeypatch) -> None:
    """Four times MAX_ANNOUNCED_MEMBERS hosts (the table used to be cut at 48 rows): every
    page fits a datagram, the announces take turns through them, and a status request
    brings them all at once; the dead host is in it."""
    master = ClusterAgent(options("m"), "master", config=CONFIG)
    observer = ClusterAgent(options("cli"), "observer")
    sizes = []
    real_send = master.channel.send
    monkeypatch.setattr(master.channel, "send", lambda data: sizes.append(len(data)) or real_send(data))
    try:
        names = _fill(master, 4 * proto.MAX_ANNOUNCED_MEMBERS, silent="h0100")
        master.announce(time.time())
        pump(observer)
        assert 0 < len(observer.master_members) <= proto.MAX_ANNOUNCED_MEMBERS  # one page
        for _ in range(5):
            master.announce(time.time())
        pump(observer)
        announced = {row["hostname"]: row["state"] for row in observer.master_members}
        assert sorted(announced) == names and announced["h0100"] == "dead"
        assert max(sizes) <= proto.MAX_DATAGRAM

        late = ClusterAgent(options("cli2"), "observer")  # a fleet status that just started
        try:
            asked = time.time()
            late.ask_status(asked)
            pump(master, rounds=3)
            pump(late)
            assert sorted(row["hostname"] for row in late.master_members) == names
        finally:
            late.close()
    finally:
        master.close()
        observer.close()


def test_reject_log_is_bounded_however_many_sources_are_spoofed() -> None:
    """UDP sources are spoofable: 10,000 of them in a minute give 32 lines and one summary."""
    reject_log = RejectLog(interval=60.0, max_sources=32)
    verdicts = [reject_log.verdict(f"10.0.{i // 256}.{i % 256}", 1000.0 + i / 1000) for i in range(10_000)]
    assert verdicts[:32] == [Verdict.LOG] * 32
    assert verdicts[32] is Verdict.LOG_TOO_MANY
    assert set(verdicts[33:]) == {Verdict.QUIET}
    assert len(reject_log._logged) == 32


def test_reject_log_logs_a_source_once_an_interval() -> None:
    reject_log = RejectLog(interval=60.0, max_sources=32)
    assert reject_log.verdict("10.0.0.1", 0.0) is Verdict.LOG
    assert reject_log.verdict("10.0.0.1", 59.0) is Verdict.QUIET
    assert reject_log.verdict("10.0.0.2", 59.0) is Verdict.LOG
    assert reject_log.verdict("10.0.0.1", 60.0) is Verdict.LOG  # a new interval


def test_fleet_status_is_answered_at_once_not_at_the_next_heartbeat(options) -> None:
    """Heartbeats a minute apart: the hosts' first ones happen before the observer
    listens; only the status request makes them speak again within the test."""
    slow = lambda name: dataclasses.replace(options(name), heartbeat_interval=60.0)  # noqa: E731
    master = ClusterAgent(slow("m"), "master", config=CONFIG)
    node = ClusterAgent(slow("n"), "node")
    for agent in (master, node):
        agent.tick(time.time(), STATUS)  # first heartbeat now, the next in 60 s
    pump(master, node)
    observer = ClusterAgent(slow("cli"), "observer")
    try:
        asked = time.time()
        assert not observer.answered_since(asked, asked)
        observer.ask_status(asked)
        for _ in range(50):
            pump(master, node, rounds=1)
            pump(observer, rounds=1)
            if observer.answered_since(asked, time.time()):
                break
        assert observer.answered_since(asked, time.time())
        assert {h["hostname"] for h in observer.members.status(time.time())["hosts"]} == {"m", "n"}
    finally:
        for agent in (master, node, observer):
            agent.close()


def test_status_requests_are_answered_at_most_once_an_interval(options, monkeypatch) -> None:
    node = ClusterAgent(options("n"), "node")
    observer = ClusterAgent(options("cli"), "observer")
    sent = []
    real_send = node._send
    monkeypatch.setattr(node, "_send", lambda kind, now, **body: sent.append(kind) or real_send(kind, now, **body))
    try:
        node.tick(time.time(), STATUS)
        sent.clear()
        for _ in range(5):
            observer.ask_status(time.time())
            pump(node, rounds=2)
        assert sent.count(proto.Heartbeat) == 1
        time.sleep(agent_module.STATUS_ANSWER_INTERVAL)
        observer.ask_status(time.time())
        pump(node, rounds=5)
        assert sent.count(proto.Heartbeat) == 2
    finally:
        node.close()
        observer.close()


def test_a_cold_start_of_many_nodes_gets_a_few_announces_not_one_each(options, monkeypatch) -> None:
    master = ClusterAgent(options("m"), "master", config=CONFIG)
    kinds = []
    real_send = master.channel.send
    monkeypatch.setattr(master.channel, "send", lambda data: kinds.append(data[4]) or real_send(data))
    try:
        master.tick(time.time(), STATUS)  # its first heartbeat and announce
        kinds.clear()
        now = time.time()
        for number in range(50):  # fifty nodes booted together, each asking
            origin = proto.Origin("unit", proto.derive_node_id(f"n{number}"), proto.new_boot_id())
            request = proto.encode(origin.make(proto.ConfigRequest, now), master.options.keyring)
            master.take(request, ("127.0.0.1", 1), False, now)
        assert kinds.count(proto.Kind.ANNOUNCE) == 0  # the announce of a moment ago answers them...
        master.tick(now + agent_module.CONFIG_ANSWER_INTERVAL, STATUS)
        assert kinds.count(proto.Kind.ANNOUNCE) == 1  # ...and one more, a moment later
    finally:
        master.close()


def test_nodes_ask_for_the_configuration_at_jittered_times(options) -> None:
    nodes = [ClusterAgent(options(f"n{i}"), "node") for i in range(8)]
    try:
        now = time.time()
        for node in nodes:
            node.tick(now, None)
        assert len({node._next_request for node in nodes}) == len(nodes)
        assert all(now + 0.75 * agent_module.CONFIG_REQUEST_INTERVAL <= node._next_request
                   <= now + 1.25 * agent_module.CONFIG_REQUEST_INTERVAL for node in nodes)
    finally:
        for node in nodes:
            node.close()


def test_a_key_rotation_is_read_again_without_a_restart(options, tmp_path, caplog) -> None:
    """The three steps of a rotation, each a HUP (reload_keyring): add the new key
    second, sign with it (first), drop the old; an unreadable file keeps the keys in use."""
    old, new = proto.keygen(), proto.keygen()
    files = {name: tmp_path / f"{name}.key" for name in ("m", "cli")}
    for path in files.values():
        path.write_text(old)

    def agent(name: str, role: str, **kwargs) -> ClusterAgent:
        keyring = proto.parse_key_file(files[name].read_text())
        return ClusterAgent(dataclasses.replace(options(name, keyring), key_file=str(files[name])), role, **kwargs)

    master, observer = agent("m", "master", config=CONFIG), agent("cli", "observer")

    def heard() -> bool:
        observer.members = type(observer.members)(observer.options.heartbeat_interval)
        master._next_heartbeat = 0.0
        master.tick(time.time(), STATUS)
        pump(observer, rounds=5)
        return bool(observer.members.status(time.time())["hosts"])

    try:
        assert heard()
        files["m"].write_text(new + old)  # the master signs with the new key; the observer knows only the old
        master.reload_keyring()
        assert not heard() and observer.rejected_by_reason.get("BadSignature")
        files["cli"].write_text(old + new)  # step 1 on the observer: it verifies the new key too
        observer.reload_keyring()
        assert heard()
        files["m"].write_text("not a key\n")
        with caplog.at_level("ERROR", logger="fleet.cluster"):
            master.reload_keyring()
        assert "keeping the keys in use" in caplog.text
        assert heard()  # still signing with the new key
    finally:
        master.close()
        observer.close()


def test_a_joining_node_takes_its_first_configuration_only_from_an_answer_to_it(options) -> None:
    """A replayed announce (here: one made for the purpose, as a capture would be) reaches a node
    that has never heard this master boot; it names no request of this node's boot, so it is not
    taken. The answer to the node's own request is."""
    master = ClusterAgent(options("m"), "master", config=CONFIG)
    node = ClusterAgent(options("n"), "node")
    try:
        old = dict(CONFIG, app="old_app")
        replay = master.origin.make(proto.Announce, time.time() - 5, generation=1, config=old,
                                    address=master.address, answers=[])
        master.channel.send(master._encode(replay))
        assert pump(node, rounds=5) == []
        node.tick(time.time(), None)  # asks
        pump(master, rounds=5)
        assert ("node", ApplyConfig(CONFIG, 1)) in pump(node)
    finally:
        master.close()
        node.close()


@pytest.mark.parametrize("another_master", [False, True], ids=["one-master", "another-master-in-between"])
def test_an_announce_of_an_earlier_master_boot_is_not_acted_on(options, another_master: bool) -> None:
    """The boot a node follows is remembered per master: an announce of a second master in
    between must not let a late one of the first master's earlier boot through either."""
    first = ClusterAgent(options("m"), "master", config=dict(CONFIG, app="v1"))
    other = ClusterAgent(options("m2"), "master", config=CONFIG) if another_master else None
    node = ClusterAgent(options("n"), "node")
    second = None
    try:
        # Captured from the first boot (but never heard by this node) ...
        late = first._encode(first.origin.make(proto.Announce, time.time() - 2, generation=1,
                                               config=dict(CONFIG, app="v1"), address=first.address, answers=[]))
        first.close()
        second = ClusterAgent(options("m"), "master", config=CONFIG)  # ... then the master restarted
        node.tick(time.time(), None)
        pump(*[agent for agent in (second, other) if agent is not None], rounds=5)
        assert ("node", ApplyConfig(CONFIG, 1)) in pump(node)
        if other is not None:
            other.announce(time.time())
            pump(node, rounds=5)
        second.channel.send(late)
        assert pump(node, rounds=5) == []
        assert node.counters()["rejected_by_reason"].get("EarlierBoot") == 1
        assert node.config == CONFIG
    finally:
        for agent in (first, other, node, second):
            if agent is not None:
                agent.close()


def test_a_new_generation_is_heartbeaten_at_once(options) -> None:
    node = ClusterAgent(options("n"), "node")
    observer = ClusterAgent(options("cli"), "observer")
    try:
        node.tick(time.time(), STATUS)
        pump(observer, rounds=5)
        node.tick(time.time(), HostStatus(**{**STATUS.__dict__, "generation": 2}))  # well within the interval
        pump(observer, rounds=5)
        assert [h["generation"] for h in observer.members.status(time.time())["hosts"]] == [2]
    finally:
        node.close()
        observer.close()


def test_many_askers_never_stop_the_announces(options, monkeypatch) -> None:
    """A configuration near the datagram limit leaves little room for answers: the announce
    answers fewer askers (the rest in the next ones) instead of failing for good."""
    big = dict(CONFIG, extra={"pad": "x" * 7600})  # fits with one answer, not with 32
    master = ClusterAgent(options("m"), "master", config=big)
    sent = []
    monkeypatch.setattr(master.channel, "send", sent.append)
    try:
        for _ in range(proto.MAX_ANNOUNCE_ANSWERS):
            master._answer_config_request(proto.new_boot_id(), time.time())
        for _ in range(proto.MAX_ANNOUNCE_ANSWERS):
            master.announce(time.time())
            if not master._askers:
                break
        assert not master._askers and sent
        assert all(len(datagram) <= proto.MAX_DATAGRAM for datagram in sent)
    finally:
        master.close()


def test_heartbeats_keep_a_fixed_grid_whichever_tick_sends_them(options) -> None:
    """Peers call a host dead after 2.5 silent intervals: a period of interval + tick lateness
    (1.0 to 1.2 s) would eat into that margin, so the next heartbeat is due on the grid."""
    node = ClusterAgent(options("n"), "node")
    sent: list[float] = []
    node._send = lambda kind, now, **body: sent.append(now) if kind is proto.Heartbeat else None
    try:
        for moment in (100.0, 100.5, 101.15, 101.9, 102.0, 102.3, 103.19, 104.0):
            node.tick(moment, STATUS)
        assert sent == [100.0, 101.15, 102.0, 103.19, 104.0]
        # Far behind (a stalled loop): no burst to catch up, the grid starts again from now.
        node.tick(110.0, STATUS)
        node.tick(110.9, STATUS)
        node.tick(111.0, STATUS)
        assert sent[-2:] == [110.0, 111.0]
    finally:
        node.close()
