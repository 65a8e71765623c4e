"""The node table the master (and `fleet status`) keeps from heartbeats; pure, `now` passed in.

Hosts are keyed by node id, which is stable per host: a new boot id under a
known node id is a restart and replaces the entry, so restarts never leave
phantom duplicates (uWSGI's ZeroMQ nodes did, with a fresh uuid each time).
Feed it messages that decode() and ReplayGuard accepted; drain what changed
with tick(now), which the loop calls after each datagram and on each timer.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import msgpack

from fleet.cluster.protocol import Announce, Heartbeat, Leave

SUSPECT_AFTER_INTERVALS = 1.5  # one heartbeat late, with room for jitter: shown as "lost"
# Dead: two heartbeats missed, with room for jitter. Heartbeats go out on a fixed grid (a period of
# one interval, up to a tick late), so one lost datagram stays "lost", and a host that dies is
# declared dead within 2.5 intervals of its last heartbeat plus a tick: under 3 s by default.
DEAD_AFTER_INTERVALS = 2.5
FORGET_AFTER_DEAD = 10  # a dead host stays listed for this many dead-timeouts, then goes
MAX_HOSTS = 1024  # table cap: uWSGI stopped at 100; past this the longest-silent host goes
MAX_RETIRED_BOOTS = 8  # earlier boots remembered per host, to drop their late datagrams


class ChangeKind(StrEnum):
    JOINED = "joined"  # a node id not in the table
    RESTARTED = "restarted"  # a known node id with a new boot id
    LOST = "lost"  # silent for SUSPECT_AFTER_INTERVALS intervals
    DEAD = "dead"  # silent for dead_after_intervals intervals
    BACK = "back"  # heard again, same boot, after lost or dead
    STATE = "state"  # the host reported another state (ready -> degraded, ...)
    LEFT = "left"  # said goodbye
    FORGOTTEN = "forgotten"  # dead too long, or evicted by the table cap
    DUPLICATE = "duplicate"  # an earlier boot still talks: two processes share a node id


@dataclass(frozen=True)
class Change:
    """Something the loop should log about one host."""

    kind: ChangeKind
    node_id: str  # hex
    hostname: str
    state: str  # the host's state after the change ("gone" once removed)
    detail: str = ""

    def __str__(self) -> str:
        text = f"{self.hostname} ({self.node_id[:8]}) {self.kind}"
        return f"{text}: {self.detail}" if self.detail else text


@dataclass(frozen=True)
class HostView:
    """One row of `fleet status`."""

    node_id: str  # hex
    boot_id: str  # hex
    hostname: str
    address: tuple[str, int]  # as the host reported it
    source: tuple[str, int]  # where its last heartbeat came from
    role: str
    state: str  # starting | ready | degraded | lost | dead
    reported_state: str  # the state in its last heartbeat
    generation: int
    workers_ready: int
    workers_total: int
    requests_served: int
    requests_per_second: float
    rss: int
    app_version: str | None
    error: str | None
    last_seen_age: float  # seconds since its last heartbeat
    up_for: float  # seconds since this boot was first heard
    websockets_open: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        data = asdict(self)
        data["address"] = list(self.address)
        data["source"] = list(self.source)
        data["workers"] = {"ready": self.workers_ready, "total": self.workers_total}
        return data


@dataclass
class _Host:
    beat: Heartbeat
    source: tuple[str, int]
    first_seen: float  # our clock, this boot
    first_timestamp: float  # its clock, this boot's first heartbeat
    last_seen: float
    liveness: str = "alive"  # alive | lost | dead
    retired: OrderedDict[bytes, bool] = field(default_factory=OrderedDict)  # boot -> duplicate reported

    @property
    def state(self) -> str:
        return self.beat.state if self.liveness == "alive" else self.liveness


def _source(address: Any) -> tuple[str, int]:
    """recvfrom gives (host, port) for IPv4 and (host, port, flow, scope) for IPv6."""
    return (str(address[0]), int(address[1]))


class Membership:
    """Who is in the cluster, and since when; changes come out of tick()."""

    def __init__(self, heartbeat_interval: float, dead_after_intervals: float = DEAD_AFTER_INTERVALS, *,
                 forget_after: float | None = None, max_hosts: int = MAX_HOSTS) -> None:
        if heartbeat_interval <= 0 or dead_after_intervals <= SUSPECT_AFTER_INTERVALS:
            raise ValueError(f"heartbeat_interval must be positive and dead_after_intervals over "
                             f"{SUSPECT_AFTER_INTERVALS}")
        self.heartbeat_interval = heartbeat_interval
        self.suspect_after = SUSPECT_AFTER_INTERVALS * heartbeat_interval
        self.dead_after = dead_after_intervals * heartbeat_interval
        self.forget_after = FORGET_AFTER_DEAD * self.dead_after if forget_after is None else forget_after
        self.max_hosts = max_hosts
        self._hosts: dict[bytes, _Host] = {}
        self._departed: OrderedDict[tuple[bytes, bytes], float] = OrderedDict()  # said goodbye
        self._pending: list[Change] = []
        # Counts every change of the table's hosts, states and generations: what
        # rolling turns depend on, so a waiting node need not look again until it moves.
        self.version = 0

    def __len__(self) -> int:
        return len(self._hosts)

    def observe(self, message: Heartbeat, source_address: Any, now: float) -> None:
        """Take in a heartbeat: add, update or replace (restart) its host."""
        if not isinstance(message, Heartbeat):
            raise TypeError(f"observe() takes a Heartbeat, not {type(message).__name__}")
        if (message.node_id, message.boot_id) in self._departed:
            return  # a datagram overtaken by its own goodbye
        host = self._hosts.get(message.node_id)
        if host is None:
            self._make_room(now)
            self._hosts[message.node_id] = _Host(message, _source(source_address), now,
                                                 message.timestamp, now)
            self._note(ChangeKind.JOINED, message, self._hosts[message.node_id].state,
                       f"{message.role} at {message.address[0]}:{message.address[1]}")
        elif host.beat.boot_id == message.boot_id:
            self._update(host, message, source_address, now)
        elif message.boot_id in host.retired:
            self._retired_speaks(host, message)
        elif message.timestamp < host.first_timestamp and host.liveness != "dead":
            return  # a boot older than the current one, never heard before: late, ignore
        else:
            self._restart(host, message, source_address, now)

    def leave(self, message: Leave, now: float) -> None:
        """A goodbye: remove its host at once, if it is the boot we know."""
        if not isinstance(message, Leave):
            raise TypeError(f"leave() takes a Leave, not {type(message).__name__}")
        self._departed[(message.node_id, message.boot_id)] = now
        while len(self._departed) > self.max_hosts:
            self._departed.popitem(last=False)
        host = self._hosts.get(message.node_id)
        if host is not None and host.beat.boot_id == message.boot_id:
            del self._hosts[message.node_id]
            self._note(ChangeKind.LEFT, host.beat, "gone")

    @property
    def changed(self) -> bool:
        """Whether tick() has changes to report (joins, state changes seen since the last tick)."""
        return bool(self._pending)

    def clear(self) -> None:
        """Forget every host, quietly: a node that stops listening to its peers (no changes to report)."""
        self._hosts.clear()
        self._pending = []
        self.version += 1

    def tick(self, now: float) -> list[Change]:
        """Mark silent hosts lost, dead or forgotten; return every change since the last tick."""
        for node_id, host in list(self._hosts.items()):
            age = now - host.last_seen
            if host.liveness == "dead":
                if age > self.forget_after:
                    del self._hosts[node_id]
                    self._note(ChangeKind.FORGOTTEN, host.beat, "gone", f"dead for {age:.0f} s")
            elif age > self.dead_after:
                host.liveness = "dead"
                self._note(ChangeKind.DEAD, host.beat, "dead", f"no heartbeat for {age:.1f} s")
            elif age > self.suspect_after and host.liveness == "alive":
                host.liveness = "lost"
                self._note(ChangeKind.LOST, host.beat, "lost", f"no heartbeat for {age:.1f} s")
        while self._departed and now - next(iter(self._departed.values())) > self.dead_after:
            self._departed.popitem(last=False)
        changes, self._pending = self._pending, []
        return changes

    def generations(self, role: str, states: tuple[str, ...]) -> list[tuple[str, int]]:
        """(node id hex, generation) of each host of `role` in one of `states`: what rolling
        turns need, on every pass of a waiting node's loop, without building the views."""
        return [(host.beat.node_id.hex(), host.beat.generation) for host in self._hosts.values()
                if host.beat.role == role and host.state in states]

    def hosts(self, now: float) -> list[HostView]:
        """The table, by hostname then node id."""
        views = [self._view(host, now) for host in self._hosts.values()]
        return sorted(views, key=lambda view: (view.hostname, view.node_id))

    def status(self, now: float) -> dict[str, Any]:
        """What `fleet status --json` prints."""
        return {"hosts": [view.to_dict() for view in self.hosts(now)]}

    # --- helpers --------------------------------------------------------------

    def _update(self, host: _Host, message: Heartbeat, source_address: Any, now: float) -> None:
        if message.seq <= host.beat.seq:
            return  # reordered or duplicated: the newer one is already in
        previous_liveness, previous_state = host.liveness, host.beat.state
        if message.generation != host.beat.generation:
            self.version += 1
        silent = now - host.last_seen
        host.beat, host.source, host.last_seen, host.liveness = message, _source(source_address), now, "alive"
        if previous_liveness != "alive":
            self._note(ChangeKind.BACK, message, host.state,
                       f"was {previous_liveness}, silent for {silent:.1f} s")
        elif previous_state != message.state:
            detail = f"{previous_state} -> {message.state}"
            self._note(ChangeKind.STATE, message, host.state,
                       f"{detail}: {message.error}" if message.error else detail)

    def _restart(self, host: _Host, message: Heartbeat, source_address: Any, now: float) -> None:
        old = host.beat.boot_id
        host.retired[old] = False
        while len(host.retired) > MAX_RETIRED_BOOTS:
            host.retired.popitem(last=False)
        was = host.liveness
        host.beat, host.source, host.first_seen = message, _source(source_address), now
        host.first_timestamp, host.last_seen, host.liveness = message.timestamp, now, "alive"
        detail = f"boot {old.hex()[:8]} -> {message.boot_id.hex()[:8]}"
        self._note(ChangeKind.RESTARTED, message, host.state,
                   detail if was == "alive" else f"{detail}, was {was}")

    def _retired_speaks(self, host: _Host, message: Heartbeat) -> None:
        """An earlier boot: a late datagram, unless it was sent after the current boot began."""
        if message.timestamp > host.first_timestamp and not host.retired[message.boot_id]:
            host.retired[message.boot_id] = True
            self._note(
                ChangeKind.DUPLICATE, message, host.state,
                f"boots {message.boot_id.hex()[:8]} ({message.hostname}, {message.address[0]}) and "
                f"{host.beat.boot_id.hex()[:8]} ({host.beat.hostname}, {host.beat.address[0]}) "
                "both run with this node id; give each host its own machine id",
            )

    def _make_room(self, now: float) -> None:
        while len(self._hosts) >= self.max_hosts:
            node_id, host = min(self._hosts.items(),
                                key=lambda item: (item[1].liveness != "dead", item[1].last_seen))
            del self._hosts[node_id]
            self._note(ChangeKind.FORGOTTEN, host.beat, "gone",
                       f"table full ({self.max_hosts} hosts), silent for {now - host.last_seen:.1f} s")

    def _note(self, kind: ChangeKind, beat: Heartbeat, state: str, detail: str = "") -> None:
        self.version += 1
        self._pending.append(Change(kind, beat.node_id.hex(), beat.hostname, state, detail))

    def _view(self, host: _Host, now: float) -> HostView:
        beat = host.beat
        return HostView(
            node_id=beat.node_id.hex(), boot_id=beat.boot_id.hex(), hostname=beat.hostname,
            address=beat.address, source=host.source, role=beat.role, state=host.state,
            reported_state=beat.state, generation=beat.generation,
            workers_ready=beat.workers_ready, workers_total=beat.workers_total,
            requests_served=beat.requests_served, requests_per_second=beat.requests_per_second,
            rss=beat.rss, app_version=beat.app_version, error=beat.error,
            last_seen_age=max(0.0, now - host.last_seen), up_for=max(0.0, now - host.first_seen),
            websockets_open=beat.websockets_open,
        )


# --- Several masters ------------------------------------------------------------


@dataclass(frozen=True)
class MasterView:
    """One master as its ANNOUNCEs describe it."""

    node_id: str  # hex
    address: tuple[str, int]
    generation: int
    digest: str  # of its configuration, order-independent

    def __str__(self) -> str:
        return (f"{self.node_id[:8]} at {self.address[0]}:{self.address[1]} "
                f"(generation {self.generation}, config {self.digest})")


@dataclass(frozen=True)
class ConfigConflict:
    """Two masters of one cluster announce different configurations."""

    cluster: str
    masters: tuple[MasterView, MasterView]
    differing: tuple[str, ...]  # top-level configuration keys whose values differ

    def describe(self) -> str:
        first, second = self.masters
        return (f"cluster {self.cluster!r} has two masters with different configurations: "
                f"{first} and {second}; they differ in {', '.join(self.differing)}. "
                "Nodes will follow whichever they hear last: stop one master")

    __str__ = describe


def config_digest(config: dict[str, Any]) -> str:
    """A short digest of a configuration, the same whatever the order of its keys."""
    packed = msgpack.packb(_canonical(config), use_bin_type=True)
    return hashlib.sha256(packed).hexdigest()[:12]


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return [[key, _canonical(value[key])] for key in sorted(value, key=str)]
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    return value


class ConfigConflicts:
    """Fed every ANNOUNCE; reports masters of one cluster that disagree. Pure: the caller logs."""

    def __init__(self, announce_interval: float, missed_for_gone: int = 3,
                 max_masters: int = MAX_HOSTS) -> None:
        self.forget_after = announce_interval * missed_for_gone
        self.max_masters = max_masters
        self._masters: dict[tuple[str, bytes], tuple[Announce, str, float]] = {}
        self._reported: set[frozenset[tuple[str, str]]] = set()

    def observe(self, announce: Announce, now: float) -> list[ConfigConflict]:
        """Record `announce`; return the conflicts it reveals that were not reported yet."""
        self._forget(now)
        key = (announce.cluster, announce.node_id)
        if key not in self._masters and len(self._masters) >= self.max_masters:
            oldest = min(self._masters, key=lambda k: self._masters[k][2])
            del self._masters[oldest]
        self._masters[key] = (announce, config_digest(announce.config), now)
        current = self.current(now)
        marks = {self._mark(conflict) for conflict in current}
        fresh = [conflict for conflict in current if self._mark(conflict) not in self._reported]
        self._reported = marks  # a conflict that ends and comes back is reported again
        return fresh

    def current(self, now: float) -> list[ConfigConflict]:
        """Every pair of live masters of one cluster whose configurations differ."""
        live = sorted((entry for entry in self._masters.values() if now - entry[2] <= self.forget_after),
                      key=lambda entry: (entry[0].cluster, entry[0].node_id))
        conflicts = []
        for index, (first, first_digest, _) in enumerate(live):
            for second, second_digest, _ in live[index + 1:]:
                if first.cluster == second.cluster and first_digest != second_digest:
                    conflicts.append(ConfigConflict(
                        first.cluster,
                        (self._view(first, first_digest), self._view(second, second_digest)),
                        _differing(first.config, second.config),
                    ))
        return conflicts

    def masters(self, now: float) -> list[MasterView]:
        """Live masters, whatever they announce: more than one per cluster deserves a warning."""
        return [self._view(announce, digest) for announce, digest, seen in self._masters.values()
                if now - seen <= self.forget_after]

    def _forget(self, now: float) -> None:
        for key in [k for k, (_, _, seen) in self._masters.items() if now - seen > self.forget_after]:
            del self._masters[key]

    @staticmethod
    def _mark(conflict: ConfigConflict) -> frozenset[tuple[str, str]]:
        return frozenset((master.node_id, master.digest) for master in conflict.masters)

    @staticmethod
    def _view(announce: Announce, digest: str) -> MasterView:
        return MasterView(announce.node_id.hex(), announce.address, announce.generation, digest)


def _differing(first: dict[str, Any], second: dict[str, Any]) -> tuple[str, ...]:
    keys = set(first) | set(second)
    differing = tuple(sorted(key for key in keys
                             if key not in first or key not in second
                             or _canonical(first[key]) != _canonical(second[key])))
    return differing or ("value types (1 vs 1.0)",)
