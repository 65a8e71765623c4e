"""The node table and the config-conflict detector, driven by a fake clock."""

from __future__ import annotations

import json

import pytest

from fleet.cluster.membership import ChangeKind, ConfigConflicts, Membership, config_digest
from fleet.cluster.protocol import Announce, Heartbeat, Leave

CLUSTER = "prod"
START = 1_700_000_000.0
INTERVAL = 1.0


class Clock:
    """Fake time: the same value serves as our clock and the senders' wall clocks."""

    def __init__(self) -> None:
        self.now = START

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class Host:
    """One fleet process on one host: stable node id, one boot id per start."""

    def __init__(self, clock: Clock, number: int, boot: int = 1, hostname: str | None = None) -> None:
        self.clock, self.node_id, self.seq = clock, bytes([number]) * 16, 0
        self.boot_id = bytes([number, boot]) * 8
        self.hostname = hostname or f"web-{number}"

    def restart(self, boot: int) -> None:
        self.boot_id, self.seq = bytes([self.node_id[0], boot]) * 8, 0

    def _envelope(self) -> dict:
        self.seq += 1
        return dict(cluster=CLUSTER, node_id=self.node_id, boot_id=self.boot_id, seq=self.seq,
                    timestamp=self.clock.now)

    def beat(self, state: str = "ready", **changes: object) -> Heartbeat:
        body = dict(role="node", state=state, generation=1, workers_ready=4, workers_total=4,
                    requests_served=10, requests_per_second=2.5, rss=50_000_000,
                    hostname=self.hostname, address=("10.0.0.1", 7000), app_version="1.0", error=None)
        return Heartbeat(**self._envelope(), **{**body, **changes})

    def leave(self) -> Leave:
        return Leave(**self._envelope())


SOURCE = ("10.0.0.1", 40000)


def kinds(changes: list) -> list[ChangeKind]:
    return [change.kind for change in changes]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table() -> Membership:
    return Membership(INTERVAL)


def test_join_then_listed(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    table.observe(host.beat(), SOURCE, clock.now)
    changes = table.tick(clock.now)
    assert kinds(changes) == [ChangeKind.JOINED]
    assert "web-1" in str(changes[0]) and changes[0].node_id == host.node_id.hex()
    [view] = table.hosts(clock.advance(0.25))
    assert (view.node_id, view.hostname, view.state, view.role) == (host.node_id.hex(), "web-1", "ready", "node")
    assert (view.workers_ready, view.workers_total, view.generation, view.rss) == (4, 4, 1, 50_000_000)
    assert view.last_seen_age == pytest.approx(0.25) and view.source == SOURCE
    assert table.tick(clock.now) == []


def test_steady_heartbeats_change_nothing(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    table.observe(host.beat(), SOURCE, clock.now)
    table.tick(clock.now)
    for _ in range(20):
        table.observe(host.beat(), SOURCE, clock.advance(INTERVAL))
        assert table.tick(clock.advance(0.4)) == []


def test_lost_then_dead_after_two_and_a_half_intervals(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    table.observe(host.beat(), SOURCE, clock.now)
    table.tick(clock.now)
    assert table.tick(clock.advance(1.5)) == []
    assert kinds(table.tick(clock.advance(0.01))) == [ChangeKind.LOST]
    assert table.hosts(clock.now)[0].state == "lost"
    assert table.tick(clock.advance(0.99)) == []  # 2.5 s: two heartbeats missed, the third not yet due
    assert kinds(table.tick(clock.advance(0.01))) == [ChangeKind.DEAD]
    assert table.hosts(clock.now)[0].state == "dead"
    assert table.tick(clock.advance(5)) == []  # reported once


def test_back_after_dead(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    table.observe(host.beat(), SOURCE, clock.now)
    table.tick(clock.advance(10))
    table.observe(host.beat(), SOURCE, clock.now)
    changes = table.tick(clock.now)
    assert kinds(changes) == [ChangeKind.BACK] and "was dead" in changes[0].detail
    assert [view.state for view in table.hosts(clock.now)] == ["ready"]


def test_back_after_lost(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    table.observe(host.beat(), SOURCE, clock.now)
    assert kinds(table.tick(clock.advance(2))) == [ChangeKind.JOINED, ChangeKind.LOST]
    table.observe(host.beat(), SOURCE, clock.now)
    assert kinds(table.tick(clock.now)) == [ChangeKind.BACK]


def test_restart_replaces_the_entry(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    table.observe(host.beat(), SOURCE, clock.now)
    table.tick(clock.now)
    for boot in range(2, 52):  # fifty restarts: still one host, as uWSGI could not manage
        host.restart(boot)
        table.observe(host.beat(), SOURCE, clock.advance(INTERVAL))
        assert kinds(table.tick(clock.now)) == [ChangeKind.RESTARTED]
    [view] = table.hosts(clock.now)
    assert view.boot_id == host.boot_id.hex() and view.up_for == 0.0


def test_rejoin_after_restart_while_dead(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    table.observe(host.beat(), SOURCE, clock.now)
    table.tick(clock.advance(10))
    host.restart(2)
    table.observe(host.beat(state="starting", workers_ready=0), SOURCE, clock.now)
    changes = table.tick(clock.now)
    assert kinds(changes) == [ChangeKind.RESTARTED] and "was dead" in changes[0].detail
    [view] = table.hosts(clock.now)
    assert (view.state, view.workers_ready) == ("starting", 0)


def test_late_heartbeat_from_the_previous_boot_is_ignored(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    late = host.beat()
    table.observe(host.beat(), SOURCE, clock.now)
    host.restart(2)
    table.observe(host.beat(), SOURCE, clock.advance(INTERVAL))
    table.tick(clock.now)
    table.observe(late, SOURCE, clock.advance(0.1))  # the old boot's datagram, delayed
    assert table.tick(clock.now) == []
    assert [view.boot_id for view in table.hosts(clock.now)] == [host.boot_id.hex()]


def test_never_seen_older_boot_does_not_replace_the_current_one(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    old = host.beat()
    host.restart(2)
    clock.advance(5)
    table.observe(host.beat(), SOURCE, clock.now)
    table.tick(clock.now)
    table.observe(old, SOURCE, clock.now)
    assert table.tick(clock.now) == [] and table.hosts(clock.now)[0].boot_id == host.boot_id.hex()


def test_two_processes_sharing_a_node_id_are_reported_once(clock: Clock, table: Membership) -> None:
    first, clone = Host(clock, 1), Host(clock, 1, boot=9, hostname="cloned-vm")
    table.observe(first.beat(), SOURCE, clock.now)
    table.observe(clone.beat(), ("10.0.0.2", 40000), clock.advance(0.5))
    for _ in range(3):
        table.observe(first.beat(), SOURCE, clock.advance(0.5))
        table.observe(clone.beat(), ("10.0.0.2", 40000), clock.now)
    changes = table.tick(clock.now)
    assert kinds(changes) == [ChangeKind.JOINED, ChangeKind.RESTARTED, ChangeKind.DUPLICATE]
    assert "cloned-vm" in changes[2].detail and "machine id" in changes[2].detail
    assert len(table) == 1


def test_leave_removes_at_once(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    table.observe(host.beat(), SOURCE, clock.now)
    table.tick(clock.now)
    table.leave(host.leave(), clock.advance(0.1))
    changes = table.tick(clock.now)
    assert kinds(changes) == [ChangeKind.LEFT] and changes[0].state == "gone"
    assert table.hosts(clock.now) == []


def test_heartbeat_overtaken_by_its_goodbye_adds_no_phantom(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    table.observe(host.beat(), SOURCE, clock.now)
    late = host.beat()
    table.leave(host.leave(), clock.advance(0.1))
    table.observe(late, SOURCE, clock.now)
    assert kinds(table.tick(clock.now)) == [ChangeKind.JOINED, ChangeKind.LEFT]
    assert table.hosts(clock.now) == []
    host.restart(2)  # the next start is welcome again
    table.observe(host.beat(), SOURCE, clock.advance(1))
    assert kinds(table.tick(clock.now)) == [ChangeKind.JOINED]


def test_goodbye_of_the_previous_boot_keeps_the_new_one(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    table.observe(host.beat(), SOURCE, clock.now)
    goodbye = host.leave()
    host.restart(2)
    table.observe(host.beat(), SOURCE, clock.advance(1))
    table.leave(goodbye, clock.now)
    assert kinds(table.tick(clock.now)) == [ChangeKind.JOINED, ChangeKind.RESTARTED]
    assert len(table) == 1


def test_dead_hosts_are_forgotten(clock: Clock) -> None:
    table = Membership(INTERVAL, forget_after=60)
    table.observe(Host(clock, 1).beat(), SOURCE, clock.now)
    table.tick(clock.advance(5))
    assert table.tick(clock.advance(55)) == []
    assert kinds(table.tick(clock.advance(1))) == [ChangeKind.FORGOTTEN]
    assert len(table) == 0


def test_table_is_capped(clock: Clock) -> None:
    table = Membership(INTERVAL, max_hosts=2)
    for number in (1, 2, 3):
        table.observe(Host(clock, number).beat(), SOURCE, clock.advance(0.1))
    assert kinds(table.tick(clock.now)) == [ChangeKind.JOINED] * 2 + [ChangeKind.FORGOTTEN, ChangeKind.JOINED]
    assert [view.hostname for view in table.hosts(clock.now)] == ["web-2", "web-3"]


def test_reported_state_changes(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    table.observe(host.beat(), SOURCE, clock.now)
    table.observe(host.beat(state="degraded", workers_ready=1, error="MemoryError"), SOURCE, clock.advance(1))
    changes = table.tick(clock.now)
    assert kinds(changes) == [ChangeKind.JOINED, ChangeKind.STATE]
    assert changes[1].detail == "ready -> degraded: MemoryError" and changes[1].state == "degraded"


def test_reordered_heartbeats_do_not_roll_back(clock: Clock, table: Membership) -> None:
    host = Host(clock, 1)
    older = host.beat(generation=1)
    newer = host.beat(generation=2)
    table.observe(newer, SOURCE, clock.now)
    table.observe(older, SOURCE, clock.now)
    assert table.hosts(clock.now)[0].generation == 2


def test_status_is_json_and_names_every_field(clock: Clock, table: Membership) -> None:
    table.observe(Host(clock, 2).beat(), ("fe80::1", 40000, 0, 2), clock.now)
    table.observe(Host(clock, 1).beat(), SOURCE, clock.now)
    status = json.loads(json.dumps(table.status(clock.advance(0.5))))
    assert [host["hostname"] for host in status["hosts"]] == ["web-1", "web-2"]
    assert status["hosts"][1]["source"] == ["fe80::1", 40000]
    assert {"node_id", "hostname", "address", "role", "state", "generation", "workers_ready",
            "workers_total", "requests_per_second", "rss", "last_seen_age", "app_version",
            "error"} <= set(status["hosts"][0])


def test_observe_takes_only_heartbeats(clock: Clock, table: Membership) -> None:
    with pytest.raises(TypeError):
        table.observe(Host(clock, 1).leave(), SOURCE, clock.now)  # type: ignore[arg-type]


# --- Conflicting masters ------------------------------------------------------------


def announce(clock: Clock, number: int, config: dict, *, cluster: str = CLUSTER, seq: int = 1) -> Announce:
    return Announce(cluster=cluster, node_id=bytes([number]) * 16, boot_id=bytes([number]) * 16, seq=seq,
                    timestamp=clock.now, generation=1, config=config, address=(f"10.0.0.{number}", 7000))


CONFIG = {"app": "app:application", "processes": 4, "threads": 8, "endpoints": [["tcp://a:1", "tcp://a:2"]]}


def test_same_configuration_from_two_masters_is_no_conflict(clock: Clock) -> None:
    conflicts = ConfigConflicts(announce_interval=5)
    reordered = dict(reversed(list(CONFIG.items())))
    assert config_digest(reordered) == config_digest(CONFIG)
    assert conflicts.observe(announce(clock, 1, CONFIG), clock.now) == []
    assert conflicts.observe(announce(clock, 2, reordered), clock.now) == []
    assert len(conflicts.masters(clock.now)) == 2


def test_different_configurations_are_reported_once(clock: Clock) -> None:
    conflicts = ConfigConflicts(announce_interval=5)
    conflicts.observe(announce(clock, 1, CONFIG), clock.now)
    [conflict] = conflicts.observe(announce(clock, 2, {**CONFIG, "processes": 2, "threads": 1}), clock.now)
    assert conflict.differing == ("processes", "threads")
    text = conflict.describe()
    assert "'prod'" in text and "10.0.0.1" in text and "10.0.0.2" in text and "processes, threads" in text
    assert conflicts.observe(announce(clock, 1, CONFIG, seq=2), clock.advance(5)) == []
    assert len(conflicts.current(clock.now)) == 1


def test_conflict_ends_when_a_master_goes_quiet(clock: Clock) -> None:
    conflicts = ConfigConflicts(announce_interval=5)
    conflicts.observe(announce(clock, 1, CONFIG), clock.now)
    assert conflicts.observe(announce(clock, 2, {**CONFIG, "processes": 2}), clock.now)
    for seq in range(2, 6):
        conflicts.observe(announce(clock, 1, CONFIG, seq=seq), clock.advance(5))
    assert conflicts.current(clock.now) == [] and len(conflicts.masters(clock.now)) == 1


def test_a_master_changing_its_own_configuration_is_no_conflict(clock: Clock) -> None:
    conflicts = ConfigConflicts(announce_interval=5)
    conflicts.observe(announce(clock, 1, CONFIG), clock.now)
    assert conflicts.observe(announce(clock, 1, {**CONFIG, "processes": 9}, seq=2), clock.advance(1)) == []


def test_other_clusters_are_not_compared(clock: Clock) -> None:
    conflicts = ConfigConflicts(announce_interval=5)
    conflicts.observe(announce(clock, 1, CONFIG), clock.now)
    assert conflicts.observe(announce(clock, 2, {"app": "other"}, cluster="staging"), clock.now) == []
