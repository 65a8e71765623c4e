"""A host's part in the cluster: what it sends on the channel, and what it makes of what it hears.

The supervisor's loop drives it: ``receive(now)`` when the channel is
readable, ``tick(now, status)`` every pass. It returns events for the
supervisor to act on (apply a configuration, reload, log a line); it never
touches workers itself.

- A master announces its configuration every ANNOUNCE_INTERVAL and at once
  when asked (a config request) or when it changes; keeps the node table.
- A node asks for the configuration until it has one, follows announces of a
  new configuration or generation, and reports "lost" when the master has
  been silent for MASTER_LOST_AFTER intervals (it keeps serving). It needs
  its peers' heartbeats only to find its turn in a rolling reload: outside
  one the kernel drops them (the channel's socket filter, on the header's
  kind byte), or the agent does before the MAC and the parse where there is
  no filter (every node decoding every heartbeat is N² work across a fleet);
  when a turn is awaited it listens TURN_LISTEN_INTERVALS before it judges.
- Both send heartbeats, log the lines of `fleet log`, and drop (and count)
  every datagram that is not authentic, logging at most once a minute per
  source.

Datagrams travel by multicast, by unicast to a peer list (``--cluster-peers``,
where multicast is dropped), or both (fleet.cluster.transport). With unicast, every
authenticated datagram that came by unicast teaches its source as a peer, the
master lists those peers in its announces so seed-only hosts learn each
other, and a short-lived observer (`fleet status`) says hello once per
heartbeat so the hosts send it their heartbeats too. A datagram heard twice
(by multicast and by unicast) is dropped quietly the second time.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import math
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fleet.cluster import protocol as proto
from fleet.cluster.membership import ConfigConflicts, Membership
from fleet.cluster.peers import DEFAULT_EXPIRE_INTERVALS, Address, PeerTable
from fleet.cluster.transport import Transport
from fleet.cluster.turns import Turns
from fleet.multicast import Group

log = logging.getLogger("fleet.cluster")

HEARTBEAT_INTERVAL = 1.0
ANNOUNCE_INTERVAL = 1.0
CONFIG_REQUEST_INTERVAL = 1.0
# The master answers config requests with an announce at most this often: one
# multicast announce answers every node that asked meanwhile, so a fleet that
# starts at once (a cold start, a power cut) gets a few announces, not one per node.
CONFIG_ANSWER_INTERVAL = 0.2
# A host answers fleet status's requests at most this often (a key holder cannot make it flood).
STATUS_ANSWER_INTERVAL = 0.2
# fleet status asks again this often until every host answered (a datagram may be lost).
ASK_AGAIN = 0.25
MASTER_LOST_AFTER = 3  # announce intervals
# A node awaiting its rolling-reload turn listens this many heartbeat intervals first: every live
# peer has heartbeated by then (they send every interval, on a 0.2 s tick), so the queue is whole.
TURN_LISTEN_INTERVALS = 1.5
# Rejected datagrams are logged at most once per source address in this
# interval, and for at most REJECT_LOG_SOURCES sources in it: UDP source
# addresses are spoofable, so neither the memory nor the log may grow with them.
REJECT_LOG_INTERVAL = 60.0
REJECT_LOG_SOURCES = 32
DEFAULT_CLUSTER_NAME = "fleet"
# Boots whose config requests the master remembers until an announce answers them.
MAX_ASKERS = 1024
# Masters whose latest boot a node remembers (one, or a few in a conflict).
MAX_MASTERS_FOLLOWED = 64
# Datagrams remembered to drop the second copy of one heard both by multicast
# and by unicast: a few seconds of a busy fleet's traffic.
RECENT_DATAGRAMS = 2048


@dataclass(frozen=True)
class ClusterOptions:
    group: Group | None  # None: unicast only
    interface: str
    keyring: proto.Keyring
    ttl: int = 1
    name: str = DEFAULT_CLUSTER_NAME
    node_name: str = field(default_factory=socket.gethostname)
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    # Unicast: where this host listens (None: multicast only; port 0: any free
    # port, for short-lived commands) and the seed peers it starts from.
    unicast_bind: Address | None = None
    peers: tuple[Address, ...] = ()
    key_file: str | None = None  # where the keyring came from: HUP reads it again

    def describe(self) -> str:
        """The channels, for log lines: '225.1.1.1:1717', 'peers 10.0.0.2:1717,...', or both."""
        parts = [str(self.group)] if self.group is not None else []
        if self.unicast_bind is not None:
            seeds = ",".join(f"{host}:{port}" for host, port in self.peers[:4]) or "none"
            parts.append(f"unicast seeds {seeds}{',...' if len(self.peers) > 4 else ''}")
        return " + ".join(parts)


@dataclass(frozen=True)
class HostStatus:
    """What the supervisor reports in each heartbeat."""

    state: str  # starting | ready | degraded | lost
    generation: int
    workers_ready: int
    workers_total: int
    requests_served: int
    rss: int
    error: str | None = None
    app_version: str | None = None
    websockets_open: int = 0


@dataclass(frozen=True)
class ApplyConfig:
    config: dict[str, Any]
    generation: int


@dataclass(frozen=True)
class ReloadRequested:
    generation: int
    batch: int | None


def node_id_for(name: str) -> bytes:
    """Stable per host and node name: machine id (or hostname) plus the name."""
    try:
        with open("/etc/machine-id") as file:
            machine = file.read().strip()
    except OSError:
        machine = socket.gethostname()
    return proto.derive_node_id(f"{machine}\0{name}")


class ClusterAgent:
    def __init__(self, options: ClusterOptions, role: str, *, config: dict[str, Any] | None = None,
                 generation: int = 1, clock=time.time) -> None:
        self.options = options
        self.role = role
        self.clock = clock
        self.origin = proto.Origin(options.name, node_id_for(options.node_name), proto.new_boot_id())
        if config is not None:
            # Refuse at start a configuration that cannot travel in one datagram.
            self._encode(self.origin.make(proto.Announce, clock(), generation=generation,
                                          config=config, address=(options.interface, 65535),
                                          answers=[bytes(proto.BOOT_ID_LEN)]))
        self.peers = PeerTable(options.peers, None, DEFAULT_EXPIRE_INTERVALS * options.heartbeat_interval)
        self.channel = Transport(group=options.group, interface=options.interface, ttl=options.ttl,
                                 unicast_bind=options.unicast_bind, peers=self.peers)
        # Where this host listens for unicast; with multicast only, the group's port on the interface.
        self.address = self.channel.unicast_address or (options.interface, options.group.port)
        self._recent: OrderedDict[bytes, str] = OrderedDict()  # datagram digest -> the host it came from
        self._peer_table_full_logged = False
        self._next_hello = 0.0
        self.guard = proto.ReplayGuard()
        self.members = Membership(options.heartbeat_interval)
        self.conflicts = ConfigConflicts(ANNOUNCE_INTERVAL)
        self.config = config
        self.generation = generation
        # Datagrams from other processes, for `fleet stats` ("cluster"): authentic ones per
        # source address (only key holders can add a source), dropped ones per reason.
        self.accepted = 0
        self.accepted_from: dict[str, int] = {}
        self.rejected = 0
        self.rejected_by_reason: dict[str, int] = {}
        self.other_cluster = 0
        self._reject_log = RejectLog()
        self._next_heartbeat = self._next_announce = self._next_request = 0.0
        self._beaten: tuple[str, int] | None = None  # state and generation of our last heartbeat
        self._last_served: tuple[float, int] | None = None
        self._master_seen: float | None = None
        self._seen_commands: set[bytes] = set()
        self.turns = Turns()
        # Nodes drop peers' multicast heartbeats unread until they await a turn (see the docstring).
        self.hears_peers = role != "node"
        self._listening_since: float | None = None
        self.heartbeats_skipped = 0
        self._roll_key: tuple[int, int] | None = None  # may_roll's last answer, and what it was for
        self._roll_checked, self._roll_go = 0.0, False
        self.master_members: list[dict[str, Any]] = []  # the master's node table, from its announced pages
        self.master_node_id: str | None = None  # hex, of the master whose announce we last heard
        self._announced_pages: dict[int, tuple[list, float]] = {}  # page -> (rows, when heard)
        self._rows_per_page = proto.MAX_ANNOUNCED_MEMBERS  # the master's: halved while a page does not fit
        self._page = 0  # the master's next page to announce
        self._status: HostStatus | None = None  # as of the last tick: what a status request is answered with
        self._answered_at = 0.0
        self._config_answered_at = -math.inf  # when the master last answered a config request
        self._askers: OrderedDict[bytes, None] = OrderedDict()  # boots whose config requests await an answer
        self._configured = False  # a node: took a configuration in this boot (before: answers to us only)
        # Per master node id: the boot we follow and its latest announce timestamp (its own clock).
        self._master_boots: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._asking_since: float | None = None  # an observer waiting for answers (fleet status)
        self._next_ask = 0.0
        if not len(options.keyring):
            log.warning("cluster %s on %s has no key: anyone on that network can read its configuration "
                        "and control it; give --cluster-key-file (fleet keygen makes one)",
                        options.name, options.describe())

    def fileno(self) -> int:
        return self.channel.fileno()

    @property
    def hears_peers(self) -> bool:
        """Whether this host reads its peers' heartbeats (a master and an observer always do)."""
        return self._hears_peers

    @hears_peers.setter
    def hears_peers(self, wanted: bool) -> None:
        # The kernel drops them as well where it can (a socket filter): they do not even wake us.
        self._hears_peers = wanted
        self.channel.hear_heartbeats(wanted)

    @property
    def master_lost(self) -> bool:
        if self.role == "master" or self._master_seen is None:
            return False
        return self.clock() - self._master_seen > MASTER_LOST_AFTER * ANNOUNCE_INTERVAL

    # -- sending -------------------------------------------------------------

    def tick(self, now: float, status: HostStatus | None) -> None:
        self._status = status
        if self._asking_since is not None and now >= self._next_ask:
            self._ask(now)
        if status is not None and (now >= self._next_heartbeat or self._changed(status)):
            # A change of state or generation is told at once: the node behind in a rolling
            # reload, and the master's view of a join, wait for it. Otherwise on a fixed grid,
            # not an interval after whichever tick came: peers declare a host dead after
            # membership.DEAD_AFTER_INTERVALS, which a period of interval + tick would eat into.
            interval = self.options.heartbeat_interval
            on_grid = self._next_heartbeat + interval
            self._next_heartbeat = on_grid if now >= self._next_heartbeat and on_grid > now else now + interval
            self._beaten = (status.state, status.generation)
            self._send(proto.Heartbeat, now, **self._heartbeat_body(now, status))
        if self.role == "master" and now >= self._next_announce:
            self.announce(now)
        if self.role == "node" and self.config is None and now >= self._next_request:
            # Jittered, so nodes started together do not keep asking together.
            self._next_request = now + CONFIG_REQUEST_INTERVAL * random.uniform(0.75, 1.25)
            self._send(proto.ConfigRequest, now)
        if self.role == "observer" and self.unicast and now >= self._next_hello:
            # Hosts send only to peers they know: a request makes them learn this
            # command's address (and the master announce to it at once).
            self._next_hello = now + self.options.heartbeat_interval
            self._send(proto.ConfigRequest, now)
        # The master's log has the fleet's joins and deaths; a node sees peers only during a roll.
        level = logging.DEBUG if self.role == "node" else logging.INFO
        for change in self.members.tick(now):
            log.log(level, "cluster: %s", change)
        for gone in self.peers.expire(now):
            log.debug("cluster: unicast peer %s:%d silent, forgotten", *gone)

    def due(self, now: float) -> bool:
        """Whether tick() has something to do now: send a heartbeat, an announce or a request,
        or log a change of the table (a join, a host now ready)."""
        return (now >= self._next_heartbeat or self.members.changed
                or (self.role == "master" and now >= self._next_announce)
                or (self.role == "node" and self.config is None and now >= self._next_request)
                or (self._asking_since is not None and now >= self._next_ask))

    def _changed(self, status: HostStatus) -> bool:
        return self._beaten is not None and self._beaten != (status.state, status.generation)

    def announce(self, now: float, every_page: bool = False) -> None:
        """The configuration and one page of the node table (the next, in turn), or every page.

        Every host is in some page (listeners hear the live ones themselves: the
        table is there for the silent ones); a page holds what fits one datagram."""
        self._next_announce = now + ANNOUNCE_INTERVAL
        self._config_answered_at = now  # any announce answers the config requests before it
        hosts = sorted(self.members.hosts(now), key=lambda h: h.state not in ("dead", "lost"))
        rows = [[h.node_id, h.hostname, list(h.address), h.role, h.state, h.generation, h.workers_ready,
                 h.workers_total, round(h.last_seen_age, 1)] for h in hosts]
        peers = [list(address) for address in self.peers.addresses()][: proto.MAX_ANNOUNCED_PEERS]
        answers = list(self._askers)[: proto.MAX_ANNOUNCE_ANSWERS]
        while True:
            size = self._rows_per_page
            pages = [rows[i:i + size] for i in range(0, len(rows), size)] or [[]]
            chosen = range(len(pages)) if every_page else [self._page % len(pages)]
            try:
                messages = [self.origin.make(proto.Announce, now, generation=self.generation, config=self.config,
                                             address=self.address, members=pages[n], peers=peers, page=n,
                                             pages=len(pages), answers=answers) for n in chosen]
                datagrams = [self._encode(message) for message in messages]
            except proto.TooLarge:
                # Many askers, long host names, many peers: fewer answers (the rest wait for
                # the next announce), fewer rows a page, fewer peers; the last asker last.
                if len(answers) > 1:
                    answers = answers[: len(answers) // 2]
                elif size > 1:
                    self._rows_per_page = size // 2
                elif peers:
                    peers = peers[: len(peers) // 2]
                elif answers:
                    answers = []
                else:
                    raise
                continue
            for datagram in datagrams:
                self.channel.send(datagram)
            for boot in answers:
                del self._askers[boot]
            if not every_page:
                self._page = (self._page + 1) % len(pages)
            # Our own announce takes part too: another master that disagrees with it is a conflict.
            self._report_conflicts(messages[0], now)
            return

    def set_generation(self, generation: int) -> None:
        self.generation = generation
        self.announce(self.clock())

    def may_roll(self, generation: int) -> bool:
        """Whether this node may move to `generation` now: its turn (fleet.cluster.turns),
        judged from the heartbeats every node hears (no coordinator needed)."""
        # Asked on every pass of a waiting node's loop (one per datagram heard): look again
        # only when the table moved, or a second on (a node ahead may have overstayed its turn).
        key, moment = (self.members.version, generation), time.monotonic()
        if not self.hears_peers:
            self.hears_peers, self._listening_since = True, moment
        if (self._listening_since is not None
                and moment - self._listening_since < TURN_LISTEN_INTERVALS * self.options.heartbeat_interval):
            return False
        if key == self._roll_key and moment - self._roll_checked < 1.0:
            return self._roll_go
        others = self.members.generations("node", ("starting", "ready", "lost"))
        go = self.turns.may_roll(self.origin.node_id.hex(), generation, others, moment)
        self._roll_key, self._roll_checked, self._roll_go = key, moment, go
        for node_id in self.turns.newly_passed_over:
            log.warning("cluster: node %s has been in its reload turn for %.0f s without reaching generation %d; "
                        "the next node takes its turn", node_id[:8], self.turns.timeout, generation)
        return go

    def turn_taken(self) -> None:
        """The awaited turn came: a node stops listening to its peers and forgets them."""
        if self.role == "node" and self._listening_since is not None:
            self.hears_peers, self._listening_since = False, None
            self.members.clear()

    @property
    def unicast(self) -> bool:
        return self.channel.unicast is not None

    def ask_status(self, now: float) -> None:
        """fleet status: ask every host to heartbeat now (asked again each ASK_AGAIN until answered)."""
        self._asking_since = now
        self._ask(now)

    def answered_since(self, since: float, now: float) -> bool:
        """Whether, since ``since``, the master announced every page of its table and it and
        every host the table has as alive heartbeated: what fleet status waits for."""
        pages = self._announced_pages
        if not pages or any(when < since for _, when in pages.values()):
            return False
        fresh = {h.node_id for h in self.members.hosts(now) if now - h.last_seen_age >= since}
        expected = {row["node_id"] for row in self.master_members if row["state"] not in ("dead", "lost")}
        return self.master_node_id in fresh and expected <= fresh

    def _ask(self, now: float) -> None:
        self._next_ask = now + ASK_AGAIN
        self._send(proto.StatusRequest, now)

    def _answer_config_request(self, asker: bytes, now: float) -> None:
        """An announce naming `asker`'s boot now, or, if one went out less than
        CONFIG_ANSWER_INTERVAL ago, as soon as that has passed (one answers many)."""
        self._askers[asker] = None
        while len(self._askers) > MAX_ASKERS:
            self._askers.popitem(last=False)
        due = self._config_answered_at + CONFIG_ANSWER_INTERVAL
        if now >= due:
            self.announce(now)
        else:
            self._next_announce = min(self._next_announce, due)

    def _answer_status(self, now: float) -> None:
        """A heartbeat now (and the announce, on the master); at most once per STATUS_ANSWER_INTERVAL."""
        if self.role == "observer" or now - self._answered_at < STATUS_ANSWER_INTERVAL:
            return
        self._answered_at = now
        if self.role == "master":
            self.announce(now, every_page=True)
        if self._status is not None:
            self._next_heartbeat = now + self.options.heartbeat_interval
            self._beaten = (self._status.state, self._status.generation)
            self._send(proto.Heartbeat, now, **self._heartbeat_body(now, self._status))

    def reload_keyring(self) -> None:
        """Read the key file again (HUP): a key rotation needs no restart. Its first key
        signs from now on, all of them verify; a file that cannot be read keeps the old keyring."""
        path = self.options.key_file
        if path is None:
            return
        try:
            with open(path) as file:
                keyring = proto.parse_key_file(file.read())
        except (OSError, ValueError) as error:
            log.error("cluster: could not read the key file %s again (%s); keeping the keys in use",
                      path, getattr(error, "strerror", None) or error)
            return
        self.options = dataclasses.replace(self.options, keyring=keyring)
        log.info("cluster: key file read again: %r", keyring)

    def ask_config_now(self) -> None:
        """A node without a configuration asks at its next tick, not after the interval."""
        self._next_request = 0.0

    def leave(self) -> None:
        self._send(proto.Leave, self.clock())

    def send_log(self, level: str, text: str) -> None:
        self._send(proto.Log, self.clock(), level=level, text=text)

    def send_reload(self, generation: int, batch: int | None = None,
                    masters: Iterable[bytes] = ()) -> bytes:
        """Ask the masters whose boot ids are `masters` (all, if none) for `generation`."""
        command_id = proto.new_command_id()
        self._send(proto.Reload, self.clock(), command_id=command_id, generation=generation, batch=batch,
                   masters=list(masters))
        return command_id

    def _heartbeat_body(self, now: float, status: HostStatus) -> dict[str, Any]:
        rate = 0.0
        if self._last_served is not None and now > self._last_served[0]:
            rate = max(0.0, (status.requests_served - self._last_served[1]) / (now - self._last_served[0]))
        self._last_served = (now, status.requests_served)
        state = "lost" if self.master_lost and status.state == "ready" else status.state
        return dict(role=self.role, state=state, generation=status.generation,
                    workers_ready=status.workers_ready, workers_total=status.workers_total,
                    requests_served=status.requests_served, requests_per_second=rate, rss=status.rss,
                    hostname=self.options.node_name, address=self.address,
                    app_version=status.app_version, error=status.error, websockets_open=status.websockets_open)

    def _send(self, kind: type[proto.Message], now: float, **body: Any) -> proto.Message:
        message = self.origin.make(kind, now, **body)
        self.channel.send(self._encode(message))
        return message

    def _report_conflicts(self, announce: proto.Announce, now: float) -> None:
        for conflict in self.conflicts.observe(announce, now):
            log.error("cluster: CONFLICT: %s", conflict.describe())

    def _encode(self, message: proto.Message) -> bytes:
        return proto.encode(message, self.options.keyring)

    # -- receiving -------------------------------------------------------------

    def receive(self, now: float) -> list[ApplyConfig | ReloadRequested]:
        events: list[ApplyConfig | ReloadRequested] = []
        while True:
            received = self.channel.receive()
            if received is None:
                return events
            event = self.take(*received, now)
            if event is not None:
                events.append(event)

    def converse(self, seconds: float, status: HostStatus | None = None, *,
                 until: Callable[[], bool] | None = None,
                 pause: float = 0.02) -> list[ApplyConfig | ReloadRequested]:
        """Receive and tick for `seconds`, or until `until()` holds: for a command,
        or a node between supervisors, outside the supervisor's loop. Returns the events."""
        deadline = time.monotonic() + seconds
        events: list[ApplyConfig | ReloadRequested] = []
        while True:
            now = time.time()
            events += self.receive(now)
            self.tick(now, status)
            if (until is not None and until()) or time.monotonic() >= deadline:
                return events
            time.sleep(pause)

    def take(self, datagram: bytes, source: Address, by_unicast: bool,
             now: float) -> ApplyConfig | ReloadRequested | None:
        """One datagram as the transport gave it: from `source`, by unicast or by multicast."""
        if not self.hears_peers and not by_unicast and proto.claims_kind(datagram, proto.Kind.HEARTBEAT):
            # Unread: a forged one costs as little. By unicast they are still read: they teach peers.
            self.heartbeats_skipped += 1
            return None
        digest = hashlib.blake2b(datagram, digest_size=16).digest()
        first_from = self._recent.get(digest)
        if first_from is not None:
            # The same datagram by the other path (multicast and unicast). If the multicast
            # copy came first, this copy still shows the sender listens for unicast; only
            # from the same host, so a replay from elsewhere teaches no peer.
            if by_unicast and source[0] == first_from:
                self._learn_peer(source, now)
            # Counted (not logged): a replay of a recent datagram ends here, before the replay guard.
            self.rejected_by_reason["Duplicate"] = self.rejected_by_reason.get("Duplicate", 0) + 1
            return None
        message = self._authentic(datagram, source[0], now)
        if message is None or message.node_id == self.origin.node_id and message.boot_id == self.origin.boot_id:
            return None  # rejected, or our own datagram looped back
        self.accepted += 1
        self.accepted_from[source[0]] = self.accepted_from.get(source[0], 0) + 1
        self._remember(digest, source[0])
        if by_unicast:
            self._learn_peer(source, now)
        return self._handle(message, source, now)

    def _remember(self, digest: bytes, source_host: str) -> None:
        self._recent[digest] = source_host
        while len(self._recent) > RECENT_DATAGRAMS:
            self._recent.popitem(last=False)

    def _learn_peer(self, address: Address, now: float) -> None:
        if not self.unicast or address[1] == 0:
            return
        if not self.peers.learn(address, now) and not self._peer_table_full_logged:
            self._peer_table_full_logged = True
            log.warning("cluster: unicast peer table full (%d peers): not adding %s:%d or any further "
                        "peer (logged once)", self.peers.max_peers, *address)

    def _authentic(self, datagram: bytes, source: str, now: float) -> proto.Message | None:
        try:
            message = proto.decode(datagram, self.options.keyring, now, cluster=self.options.name)
            if message.node_id != self.origin.node_id or message.boot_id != self.origin.boot_id:
                self.guard.admit(message, now)
        except proto.WrongCluster:
            self.other_cluster += 1
            return None  # another cluster sharing the group: not an attack, not our business
        except proto.ClusterProtocolError as error:
            self.rejected += 1
            reason = type(error).__name__
            self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1
            verdict = self._reject_log.verdict(source, now)
            if verdict is Verdict.LOG:
                log.warning("cluster: dropped a datagram from %s: %s: %s (%d dropped so far; "
                            "logged once a minute per source)", source, type(error).__name__, error, self.rejected)
            elif verdict is Verdict.LOG_TOO_MANY:
                log.warning("cluster: dropping datagrams from more than %d sources this minute; "
                            "not logging further sources until the next (%d dropped so far)",
                            REJECT_LOG_SOURCES, self.rejected)
            return None
        return message

    def counters(self) -> dict[str, Any]:
        """What this host made of the datagrams it received (for `fleet stats`)."""
        return {"accepted": self.accepted, "accepted_from": dict(self.accepted_from),
                "heartbeats_skipped": self.heartbeats_skipped,
                "rejected": self.rejected, "rejected_by_reason": dict(self.rejected_by_reason),
                "other_cluster": self.other_cluster}

    def _handle(self, message: proto.Message, source: Address, now: float) -> ApplyConfig | ReloadRequested | None:
        if isinstance(message, proto.Heartbeat):
            self.members.observe(message, source, now)
            if self.role == "master" and message.generation > self.generation and self.config is not None:
                # A master restarted with the same configuration: adopt the fleet's
                # generation instead of making every node reload.
                self.generation = message.generation
            return None
        if isinstance(message, proto.Leave):
            self.members.leave(message, now)
            return None
        if isinstance(message, proto.Log):
            logging.getLogger("fleet.cluster.log").log(
                logging.getLevelName(message.level.upper()), "%s (from %s)", message.text, source[0])
            return None
        if isinstance(message, proto.Reload):
            if self.role != "master" or message.command_id in self._seen_commands:
                return None
            if message.masters and self.origin.boot_id not in message.masters:
                # Meant for an earlier boot of this master: a replay, or sent just before we restarted.
                self._not_acted_on("NotThisBoot")
                log.warning("cluster: ignored a reload command from %s meant for another master boot "
                            "(a replay, or sent before this master started)", source[0])
                return None
            self._seen_commands.add(message.command_id)
            return ReloadRequested(max(message.generation, self.generation + 1), message.batch)
        if isinstance(message, proto.ConfigRequest):
            if self.role == "master":
                self._answer_config_request(message.boot_id, now)
            return None
        if isinstance(message, proto.StatusRequest):
            self._answer_status(now)
            return None
        if isinstance(message, proto.Announce):
            return self._announced(message, now)
        return None

    def _announced(self, message: proto.Announce, now: float) -> ApplyConfig | None:
        self._report_conflicts(message, now)
        if self.role == "master" or self._from_an_earlier_master_boot(message):
            return None
        self._take_page(message, now)
        self.master_node_id = message.node_id.hex()
        for peer in message.peers:  # the master's unicast peers: seed-only hosts learn each other here
            self._learn_peer(peer, now)
        if self.master_lost:
            log.info("cluster: master is back")
        self._master_seen = now
        if (self.role == "node" and not self._configured and message.answers is not None
                and self.origin.boot_id not in message.answers):
            return None  # before our first configuration, only an answer to our own request: no replay is one
        if self.config == message.config and message.generation <= self.generation:
            return None
        self.config = message.config
        self.generation = message.generation
        self._configured = True
        return ApplyConfig(message.config, message.generation)

    def _not_acted_on(self, reason: str) -> None:
        """An authentic datagram refused after take() counted it accepted: counted once, as dropped."""
        self.accepted -= 1
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1

    def _from_an_earlier_master_boot(self, message: proto.Announce) -> bool:
        """An announce of a boot of our master before the one we follow (its timestamps, on
        the master's own clock, are older): a late datagram or a replay, never acted on."""
        known = self._master_boots.pop(message.node_id, None)
        if known is not None and known[0] != message.boot_id and message.timestamp <= known[1]:
            self._master_boots[message.node_id] = known
            self._not_acted_on("EarlierBoot")
            return True
        self._master_boots[message.node_id] = (message.boot_id, message.timestamp)
        while len(self._master_boots) > MAX_MASTERS_FOLLOWED:
            self._master_boots.popitem(last=False)
        return False

    def _take_page(self, message: proto.Announce, now: float) -> None:
        """One page of the master's node table; the table is every page heard lately."""
        pages = self._announced_pages
        for page in [page for page in pages if page >= message.pages]:
            del pages[page]  # the table shrank
        pages[message.page] = ([dict(zip(proto.ANNOUNCED_MEMBER_FIELDS, row)) for row in message.members], now)
        # A page is announced every `pages` intervals: one older than a few rounds belongs to a bigger past.
        fresh_after = now - (message.pages + 3) * ANNOUNCE_INTERVAL
        for page in [page for page, (_, when) in pages.items() if when < fresh_after]:
            del pages[page]
        self.master_members = [row for page in sorted(pages) for row in pages[page][0]]

    def close(self) -> None:
        self.channel.close()


class Verdict(enum.Enum):
    LOG = "log this one"
    LOG_TOO_MANY = "say that further sources go unlogged"
    QUIET = "log nothing"


class RejectLog:
    """Which dropped datagrams to log: the first from each source in an
    interval, for at most ``max_sources`` sources, then one line saying the
    rest go unlogged until the next interval. Remembers at most
    ``max_sources`` addresses."""

    def __init__(self, interval: float = REJECT_LOG_INTERVAL, max_sources: int = REJECT_LOG_SOURCES) -> None:
        self.interval = interval
        self.max_sources = max_sources
        self._since = -math.inf
        self._logged: set[str] = set()
        self._told_too_many = False

    def verdict(self, source: str, now: float) -> Verdict:
        if now - self._since >= self.interval:
            self._since = now
            self._logged.clear()
            self._told_too_many = False
        if source in self._logged:
            return Verdict.QUIET
        if len(self._logged) < self.max_sources:
            self._logged.add(source)
            return Verdict.LOG
        if not self._told_too_many:
            self._told_too_many = True
            return Verdict.LOG_TOO_MANY
        return Verdict.QUIET
