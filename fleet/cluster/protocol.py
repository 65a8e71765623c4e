"""The cluster channel's messages: frozen dataclasses in, datagrams out, and back.

Sans-I/O like h11: no sockets, no clock reads. ``encode`` turns a message into
one UDP datagram; ``decode`` turns any bytes into a message or raises one
``ClusterProtocolError`` subclass naming the reason, so the receive loop can
log it and carry on (python-zeroconf's habit). ``ReplayGuard`` is the stateful
half of replay protection, with the time passed in as ``now``.

Datagram layout (integers big-endian)::

    offset size field
    0      3    magic b"FLT"
    3      1    protocol version (PROTOCOL_VERSION)
    4      1    kind (Kind: 1 ANNOUNCE, 2 CONFIG_REQUEST, 3 HEARTBEAT,
                4 RELOAD, 5 LOG, 6 LEAVE)
    5      4    cluster tag: SHA-256(cluster name)[:4], so neighbouring
                clusters are told apart before any crypto or parsing
    9      4    key id: SHA-256(signing key)[:4]; all zeros = unsigned
    13     32   MAC: HMAC-SHA256(key, bytes 0..12 + payload); zeros if unsigned
    45     ...  payload: msgpack array
                [cluster, node_id, boot_id, seq, timestamp, body]
                body: a map from field name to value, per kind

The MAC covers every byte but itself (the kind and version included), and is
checked before the payload is unpacked: with a keyring, an attacker's bytes
reach no parser but the fixed-width header. Decoding checks, in this order:
size, magic, version, header length, cluster tag, signature, kind, payload,
fields, cluster name, timestamp window. Unknown body keys are ignored (a newer peer may
add optional fields); missing optional ones take their defaults.

Timestamps are the sender's wall clock: hosts need roughly synchronised clocks
(NTP), as TIMESTAMP_WINDOW is the replay window.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import math
import re
import secrets
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

import msgpack

# --- Framing -------------------------------------------------------------------

MAGIC = b"FLT"
PROTOCOL_VERSION = 1
_HEAD = struct.Struct(">3sBB4s4s")  # magic, version, kind, cluster tag, key id
KEY_ID_LEN = 4
MAC_LEN = 32  # HMAC-SHA256, untruncated
HEADER_LEN = _HEAD.size + MAC_LEN  # 45
UNSIGNED_KEY_ID = bytes(KEY_ID_LEN)
_ZERO_MAC = bytes(MAC_LEN)

# --- Limits on network input, each with its reason -------------------------------

# 8 KiB: heartbeats, commands and logs stay well under one Ethernet frame
# (SAFE_DATAGRAM), so they are never fragmented; an ANNOUNCE carries a whole
# configuration and needs more room than uWSGI's 4 KB ceiling. UDP allows
# 65507, but losing any one fragment loses the datagram and every receive
# buffer must hold the largest; a LAN reassembles a few fragments reliably and
# announces are repeated anyway. encode() refuses more with TooLarge, so a
# master refuses an oversized configuration when it starts, not on the wire.
MAX_DATAGRAM = 8192
# UDP payload of one 1500-byte frame over IPv6 (1500 - 40 - 8): every message
# but ANNOUNCE should fit, even with its strings at their limits (tested).
SAFE_DATAGRAM = 1452
MAX_CLUSTER_NAME = 64  # a name a person types; also keeps every header small
MAX_HOST_LEN = 253  # the DNS limit for a host name; IPv6 literals need 45
MAX_APP_VERSION_LEN = 128  # a version string or a git describe
MAX_ERROR_LEN = 512  # one line of a traceback; a heartbeat must stay unfragmented
MAX_LOG_LINE = 2048  # one log line; longer lines are the sender's to cut
# Lists and maps inside a configuration: HandlerConfig allows 255 endpoints.
# Also stops msgpack preallocating for a forged 4-billion-element header.
MAX_CONTAINER_LEN = 256
# Envelope, body, config, endpoints, one endpoint pair: 5; 'extra' gets a few more.
# msgpack's own stack limit (1024) is far deeper than anything fleet sends.
MAX_DEPTH = 8
# Rows of the node table a master repeats in its announces: enough for the
# fleets one multicast segment holds while a signed announce stays under
# MAX_DATAGRAM; past it the table is cut (the master logs the full one).
MAX_ANNOUNCED_MEMBERS = 48
ANNOUNCED_MEMBER_FIELDS = ("node_id", "hostname", "address", "role", "state", "generation",
                           "workers_ready", "workers_total", "last_seen_age")
# Unicast addresses a master repeats in its announces (``peers``), so hosts that
# only know a seed list learn each other; cut like the node table when an
# announce would not fit.
MAX_ANNOUNCED_PEERS = 128
# Pages of the node table: enough for membership.MAX_HOSTS hosts at one row a page.
MAX_ANNOUNCE_PAGES = 1024
MAX_COUNTER = 2**63 - 1  # sequence numbers, generations, counters: msgpack int64
MAX_WORKERS = 65535  # more than any host runs; catches sign and unit mistakes
TIMESTAMP_WINDOW = 30.0  # seconds either side of `now`: replay window, and clock skew tolerated
NODE_ID_LEN = 16  # stable per host (derive_node_id)
BOOT_ID_LEN = 16  # random per process start: 128 bits never repeat
COMMAND_ID_LEN = 16  # random per command, so a node acts on each command once
MAX_RELOAD_MASTERS = 16  # boots one Reload names: one master, or a few in a conflict
MAX_ANNOUNCE_ANSWERS = 32  # config requests one announce answers; more wait for the next
KEY_LEN = 32  # key-file keys: 256 bits, HMAC-SHA256's block-friendly size
MIN_KEY_LEN = 16  # anything shorter is guessable; Keyring refuses it

_UNPACK_LIMITS = dict(
    max_str_len=MAX_DATAGRAM,
    max_bin_len=MAX_DATAGRAM,
    max_array_len=MAX_CONTAINER_LEN,
    max_map_len=MAX_CONTAINER_LEN,
    max_ext_len=0,  # fleet sends no ext types; zero-length ones are refused below
)

ROLES = ("master", "node")
HEARTBEAT_STATES = ("starting", "ready", "degraded", "lost")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# C0/C1 controls, DEL and Unicode line breaks: a peer's text must not forge
# log lines or drive a terminal. Tab is allowed.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --- Errors -----------------------------------------------------------------------


class ClusterProtocolError(Exception):
    """Any datagram fleet will not act on; str(error) is one line for the log."""


class Malformed(ClusterProtocolError):
    """Not a well-formed fleet message: bad framing, msgpack or fields."""


class BadSignature(ClusterProtocolError):
    """Signed, but with an unknown key or a MAC that does not check out."""


class Unsigned(ClusterProtocolError):
    """Unsigned, while this node has a keyring and so requires signatures."""


class Replayed(ClusterProtocolError):
    """A sequence number not above the last one accepted from that boot."""


class Stale(ClusterProtocolError):
    """A timestamp outside TIMESTAMP_WINDOW of our clock: old, or a skewed clock."""


class WrongCluster(ClusterProtocolError):
    """Another cluster's traffic on the same group: not an attack, just not ours."""


class UnsupportedVersion(ClusterProtocolError):
    """A fleet datagram of another protocol version."""


class TooLarge(ClusterProtocolError):
    """Bigger than MAX_DATAGRAM, on the way out or in."""


# --- Field checks (raise ValueError; decode turns it into Malformed) ------------


def _check_int(name: str, value: Any, low: int = 0, high: int = MAX_COUNTER) -> None:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, not {value!r:.40}")


def _check_float(name: str, value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r:.40}")
    return float(value)


def _check_text(name: str, value: Any, max_len: int, *, optional: bool = False,
                empty: bool = True) -> None:
    if value is None and optional:
        return
    if type(value) is not str:
        raise ValueError(f"{name} must be a str{' or None' if optional else ''}, not {type(value).__name__}")
    if len(value) > max_len:
        raise ValueError(f"{name} is {len(value)} characters, more than {max_len}")
    if not value and not empty:
        raise ValueError(f"{name} must not be empty")
    if _CONTROL.search(value):
        raise ValueError(f"{name} must be one line without control characters")


def _check_bytes(name: str, value: Any, length: int) -> None:
    if type(value) is not bytes or len(value) != length:
        raise ValueError(f"{name} must be {length} bytes, not {value!r:.60}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if type(value) is not str or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r:.40}")


def _check_address(name: str, value: Any) -> tuple[str, int]:
    """(host, port); msgpack gives a list back, so a list is accepted too."""
    if type(value) not in (tuple, list) or len(value) != 2:
        raise ValueError(f"{name} must be (host, port), not {value!r:.60}")
    host, port = value
    _check_text(f"{name} host", host, MAX_HOST_LEN)
    _check_int(f"{name} port", port, 0, 65535)
    return (host, port)


def _check_boot_ids(name: str, value: Any, most: int) -> list[bytes]:
    """A list of at most `most` boot ids, as a list."""
    if type(value) not in (list, tuple) or len(value) > most:
        raise ValueError(f"{name} must be a list of at most {most} boot ids")
    for boot in value:
        _check_bytes(f"{name} item", boot, BOOT_ID_LEN)
    return list(value)


def _check_plain(name: str, value: Any, depth: int) -> None:
    """Only msgpack's plain types, within the container and depth limits.

    Iterative over siblings, recursive over depth, which MAX_DEPTH bounds.
    """
    if depth > MAX_DEPTH:
        raise ValueError(f"{name} is nested deeper than {MAX_DEPTH} levels")
    if value is None or type(value) in (bool, float, str, bytes):
        return
    if type(value) is int:
        if not -(2**63) <= value < 2**64:
            raise ValueError(f"{name}: {value} does not fit in 64 bits")
        return
    if type(value) in (list, tuple):
        if len(value) > MAX_CONTAINER_LEN:
            raise ValueError(f"{name} has {len(value)} items, more than {MAX_CONTAINER_LEN}")
        for index, item in enumerate(value):
            _check_plain(f"{name}[{index}]", item, depth + 1)
        return
    if type(value) is dict:
        if len(value) > MAX_CONTAINER_LEN:
            raise ValueError(f"{name} has {len(value)} keys, more than {MAX_CONTAINER_LEN}")
        for key, item in value.items():
            if type(key) is not str:
                raise ValueError(f"{name} keys must be str, not {key!r:.40}")
            _check_plain(f"{name}[{key!r:.40}]", item, depth + 1)
        return
    raise ValueError(f"{name}: {type(value).__name__} cannot travel; use plain data")


# --- Messages ------------------------------------------------------------------


class Kind(IntEnum):
    """The kind byte of the header."""

    ANNOUNCE = 1
    CONFIG_REQUEST = 2
    HEARTBEAT = 3
    RELOAD = 4
    LOG = 5
    LEAVE = 6
    STATUS_REQUEST = 7


_ENVELOPE = ("cluster", "node_id", "boot_id", "seq", "timestamp")


@dataclass(frozen=True, kw_only=True)
class Message:
    """The envelope every kind shares: who sent it, from which boot, in what order, when."""

    KIND: ClassVar[Kind]

    cluster: str
    node_id: bytes  # stable per host
    boot_id: bytes  # random per process start; a new one means a restart
    seq: int  # strictly increasing per boot
    timestamp: float  # sender's wall clock, seconds since the epoch

    def __post_init__(self) -> None:
        _check_text("cluster", self.cluster, MAX_CLUSTER_NAME, empty=False)
        if not _CLUSTER_NAME.match(self.cluster):
            raise ValueError(f"cluster {self.cluster!r}: use letters, digits, '.', '_' and '-'")
        _check_bytes("node_id", self.node_id, NODE_ID_LEN)
        _check_bytes("boot_id", self.boot_id, BOOT_ID_LEN)
        _check_int("seq", self.seq)
        object.__setattr__(self, "timestamp", _check_float("timestamp", self.timestamp))

    def body(self) -> dict[str, Any]:
        """The kind-specific fields, as they travel."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _ENVELOPE}


@dataclass(frozen=True, kw_only=True)
class Announce(Message):
    """The master's configuration (HandlerConfig.to_dict()), for nodes to configure from."""

    KIND: ClassVar[Kind] = Kind.ANNOUNCE

    generation: int
    config: dict[str, Any] = field(hash=False)  # plain data; treat as read-only
    address: tuple[str, int]  # where the master listens for unicast replies
    # The master's node table, one row per host (see ANNOUNCED_MEMBER_FIELDS), so
    # a short-lived `fleet status` also sees hosts that died before it started.
    members: list = field(default_factory=list, hash=False)
    # The (host, port) of every host the master hears by unicast (seed lists,
    # --cluster-peers): hosts where multicast is dropped send to these too.
    # Optional: an older master sends none, an older node ignores it.
    peers: list = field(default_factory=list, hash=False)
    # The node table comes in pages of at most MAX_ANNOUNCED_MEMBERS rows: this is
    # page `page` of `pages`. Optional: an older master sends the only page.
    page: int = 0
    pages: int = 1
    # The boot ids of the hosts whose config requests this announce answers: a
    # joining node takes its first configuration only from an answer naming its
    # boot (new at each start), so no replay can be one. None: an older master.
    answers: list | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("generation", self.generation)
        if self.answers is not None:
            object.__setattr__(self, "answers", _check_boot_ids("answers", self.answers, MAX_ANNOUNCE_ANSWERS))
        if type(self.config) is not dict:
            raise ValueError(f"config must be a dict, not {type(self.config).__name__}")
        _check_plain("config", self.config, 3)  # envelope, body, config: depth 3
        object.__setattr__(self, "address", _check_address("address", self.address))
        if type(self.members) not in (list, tuple) or len(self.members) > MAX_ANNOUNCED_MEMBERS:
            raise ValueError(f"members must be a list of at most {MAX_ANNOUNCED_MEMBERS} rows")
        for row in self.members:
            if type(row) not in (list, tuple) or len(row) != len(ANNOUNCED_MEMBER_FIELDS):
                raise ValueError(f"a members row must have {len(ANNOUNCED_MEMBER_FIELDS)} fields")
        _check_plain("members", list(self.members), 3)
        if type(self.peers) not in (list, tuple) or len(self.peers) > MAX_ANNOUNCED_PEERS:
            raise ValueError(f"peers must be a list of at most {MAX_ANNOUNCED_PEERS} addresses")
        object.__setattr__(self, "peers", [_check_address("peers item", peer) for peer in self.peers])
        _check_int("pages", self.pages, 1, MAX_ANNOUNCE_PAGES)
        _check_int("page", self.page, 0, self.pages - 1)


@dataclass(frozen=True, kw_only=True)
class ConfigRequest(Message):
    """A joining node asks for the configuration; only the master answers."""

    KIND: ClassVar[Kind] = Kind.CONFIG_REQUEST


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """A host's state, every heartbeat interval: what `fleet status` shows."""

    KIND: ClassVar[Kind] = Kind.HEARTBEAT

    role: str  # master | node
    state: str  # starting | ready | degraded | lost
    generation: int
    workers_ready: int
    workers_total: int
    requests_served: int
    requests_per_second: float
    rss: int  # bytes, all of the host's fleet processes
    hostname: str
    address: tuple[str, int]
    app_version: str | None = None
    error: str | None = None  # the last error worth a look, one line
    websockets_open: int = 0  # ASGI WebSockets open on the host (optional: older peers send none)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("role", self.role, ROLES)
        _check_choice("state", self.state, HEARTBEAT_STATES)
        _check_int("generation", self.generation)
        _check_int("workers_total", self.workers_total, 0, MAX_WORKERS)
        _check_int("workers_ready", self.workers_ready, 0, self.workers_total)
        _check_int("requests_served", self.requests_served)
        _check_int("websockets_open", self.websockets_open)
        object.__setattr__(self, "requests_per_second",
                           _check_float("requests_per_second", self.requests_per_second))
        _check_int("rss", self.rss)
        _check_text("hostname", self.hostname, MAX_HOST_LEN, empty=False)
        object.__setattr__(self, "address", _check_address("address", self.address))
        _check_text("app_version", self.app_version, MAX_APP_VERSION_LEN, optional=True)
        _check_text("error", self.error, MAX_ERROR_LEN, optional=True)


@dataclass(frozen=True, kw_only=True)
class Reload(Message):
    """A command: move to `generation`, replacing `batch` workers at a time (None: the host's default)."""

    KIND: ClassVar[Kind] = Kind.RELOAD

    command_id: bytes  # random; lets a node act on a command once however often it hears it
    generation: int
    batch: int | None = None
    # The boot ids of the masters the sender heard: a master restarted since acts
    # on no replay of it. Optional: empty (an older `fleet reload`) means any master.
    masters: list = field(default_factory=list, hash=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bytes("command_id", self.command_id, COMMAND_ID_LEN)
        _check_int("generation", self.generation, 1)
        if self.batch is not None:
            _check_int("batch", self.batch, 1, MAX_WORKERS)
        object.__setattr__(self, "masters", _check_boot_ids("masters", self.masters, MAX_RELOAD_MASTERS))


@dataclass(frozen=True, kw_only=True)
class Log(Message):
    """One line for every host's log (uWSGI's --cluster-log, authenticated)."""

    KIND: ClassVar[Kind] = Kind.LOG

    level: str
    text: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("level", self.level, LOG_LEVELS)
        _check_text("text", self.text, MAX_LOG_LINE)


@dataclass(frozen=True, kw_only=True)
class Leave(Message):
    """Goodbye: drop this boot from the table now rather than after the timeout."""

    KIND: ClassVar[Kind] = Kind.LEAVE


@dataclass(frozen=True, kw_only=True)
class StatusRequest(Message):
    """`fleet status` asks: every host heartbeats now, and the master announces,
    instead of at their next interval (each at most once per STATUS_ANSWER_INTERVAL)."""

    KIND: ClassVar[Kind] = Kind.STATUS_REQUEST


MESSAGE_TYPES: dict[Kind, type[Message]] = {
    cls.KIND: cls for cls in (Announce, ConfigRequest, Heartbeat, Reload, Log, Leave, StatusRequest)
}

# What decode() needs per kind, computed once: the class by kind byte, and its
# body fields as (name, required) (dataclasses.fields() builds a tuple per call).
_TYPE_BY_CODE: dict[int, type[Message]] = {int(kind): cls for kind, cls in MESSAGE_TYPES.items()}
_BODY_FIELDS: dict[type[Message], tuple[tuple[str, bool], ...]] = {
    cls: tuple((f.name, f.default is MISSING and f.default_factory is MISSING)
               for f in fields(cls) if f.name not in _ENVELOPE)
    for cls in MESSAGE_TYPES.values()
}

M = TypeVar("M", bound=Message)


class Origin:
    """One sender's envelope: stamps each message with the next sequence number.

    Pure: the caller passes the time and owns the ids (derive_node_id, new_boot_id).
    """

    def __init__(self, cluster: str, node_id: bytes, boot_id: bytes, last_seq: int = 0) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.boot_id = boot_id
        self.last_seq = last_seq

    def make(self, kind: type[M], now: float, **body: Any) -> M:
        message = kind(cluster=self.cluster, node_id=self.node_id, boot_id=self.boot_id,
                       seq=self.last_seq + 1, timestamp=now, **body)
        self.last_seq += 1
        return message


def derive_node_id(machine_id: str | bytes) -> bytes:
    """A stable node id from /etc/machine-id or the like, without revealing it."""
    if isinstance(machine_id, str):
        machine_id = machine_id.strip().encode()
    return hashlib.sha256(b"fleet node id\0" + machine_id).digest()[:NODE_ID_LEN]


def new_boot_id() -> bytes:
    """Random per process start: a new one tells peers this is a restart."""
    return secrets.token_bytes(BOOT_ID_LEN)


def new_command_id() -> bytes:
    return secrets.token_bytes(COMMAND_ID_LEN)


@functools.lru_cache(maxsize=64)
def cluster_tag(cluster: str) -> bytes:
    return hashlib.sha256(cluster.encode()).digest()[:4]


# --- Keys ---------------------------------------------------------------------


def key_id(key: bytes) -> bytes:
    """Names a key in the datagram without revealing it, so the verifier picks the right one."""
    return hashlib.sha256(key).digest()[:KEY_ID_LEN]


class Keyring:
    """The cluster keys: the first signs, every one verifies (Serf's rotation).

    Rotate: add the new key second everywhere; then put it first everywhere;
    then remove the old one. Empty: send unsigned and accept unsigned only.
    """

    __slots__ = ("_keys", "_by_id")

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        unique: list[bytes] = []
        by_id: dict[bytes, bytes] = {}
        for number, key in enumerate(keys, 1):
            if type(key) is not bytes or len(key) < MIN_KEY_LEN:
                raise ValueError(f"key {number}: must be at least {MIN_KEY_LEN} random bytes")
            ident = key_id(key)
            if ident == UNSIGNED_KEY_ID:
                raise ValueError(f"key {number}: its id is all zeros, which means unsigned; make another")
            if ident in by_id:
                if by_id[ident] != key:
                    raise ValueError(f"key {number}: its id collides with another key's; make another")
                continue  # the same key twice: harmless during a rotation
            by_id[ident] = key
            unique.append(key)
        self._keys = tuple(unique)
        self._by_id = by_id

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:  # key ids only: a keyring must never reach a log
        return f"Keyring([{', '.join(k.hex() for k in self.key_ids)}])"

    @property
    def key_ids(self) -> tuple[bytes, ...]:
        return tuple(key_id(key) for key in self._keys)

    @property
    def signing_key_id(self) -> bytes:
        """The first key's id; zeros (unsigned) when empty."""
        return key_id(self._keys[0]) if self._keys else UNSIGNED_KEY_ID

    def sign(self, data: bytes) -> bytes:
        """The MAC of `data` with the first key; zeros when empty."""
        return hmac.digest(self._keys[0], data, "sha256") if self._keys else _ZERO_MAC

    def verify(self, ident: bytes, data: bytes, mac: bytes) -> None:
        """Raise BadSignature unless `mac` is the MAC of `data` under the key named `ident`."""
        key = self._by_id.get(ident)
        if key is None:
            raise BadSignature(f"signed with unknown key {ident.hex()} (not in this host's key file)")
        if not hmac.compare_digest(hmac.digest(key, data, "sha256"), mac):
            raise BadSignature(f"MAC does not match for key {ident.hex()}: forged or corrupted")


def keygen() -> str:
    """A new random key, as one line of a key file."""
    return base64.b64encode(secrets.token_bytes(KEY_LEN)).decode("ascii") + "\n"


def parse_key_file(text: str) -> Keyring:
    """One base64 key of KEY_LEN bytes per line, '#' starts a comment, the first key signs.

    Errors are one line and never quote the line: it may hold a secret.
    """
    keys: list[bytes] = []
    for number, line in enumerate(text.splitlines(), 1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        try:
            key = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                f"key file line {number}: not base64; expected one key of {KEY_LEN} random bytes in base64"
            ) from None
        if len(key) != KEY_LEN:
            raise ValueError(f"key file line {number}: the key is {len(key)} bytes, expected {KEY_LEN}")
        keys.append(key)
    if not keys:
        raise ValueError("key file holds no key; add a line of 32 random bytes in base64")
    return Keyring(keys)


# --- Codec ------------------------------------------------------------------------


def encode(message: Message, keyring: Keyring) -> bytes:
    """One datagram, signed with the keyring's first key (unsigned if it is empty).

    Raises TooLarge past MAX_DATAGRAM, so a master can refuse its configuration at start.
    """
    payload = msgpack.packb(
        [message.cluster, message.node_id, message.boot_id, message.seq, message.timestamp,
         message.body()],
        use_bin_type=True,
    )
    size = HEADER_LEN + len(payload)
    if size > MAX_DATAGRAM:
        raise TooLarge(
            f"{message.KIND.name} would be {size} bytes, over the {MAX_DATAGRAM}-byte cluster limit"
            + ("; shrink the configuration (endpoints, paths, extra)" if message.KIND is Kind.ANNOUNCE else "")
        )
    head = _HEAD.pack(MAGIC, PROTOCOL_VERSION, message.KIND, cluster_tag(message.cluster),
                      keyring.signing_key_id)
    return head + keyring.sign(head + payload) + payload


def claims_kind(datagram: bytes, kind: Kind) -> bool:
    """Whether `datagram`'s header says `kind`: unauthenticated, so only for dropping what a
    host does not need before it spends a MAC and a parse on it, never for acting on."""
    return len(datagram) >= HEADER_LEN and datagram[:3] == MAGIC and datagram[4] == kind


def decode(datagram: bytes, keyring: Keyring, now: float, *, cluster: str) -> Message:
    """The message in `datagram`, authenticated and fresh, for `cluster`; or a ClusterProtocolError.

    Stateless: sequence numbers are ReplayGuard's job. A non-finite `now` is
    the caller's bug and raises ValueError; the bytes only ever raise ClusterProtocolError.
    """
    if not math.isfinite(now):
        raise ValueError(f"now must be finite, not {now!r}")
    if not isinstance(datagram, (bytes, bytearray, memoryview)):
        raise Malformed(f"expected bytes, not {type(datagram).__name__}")
    datagram = bytes(datagram)
    if len(datagram) > MAX_DATAGRAM:
        raise TooLarge(f"{len(datagram)}-byte datagram, over the {MAX_DATAGRAM}-byte limit")
    if datagram[:3] != MAGIC or len(datagram) < 4:
        raise Malformed("not a fleet datagram (bad magic)")
    if datagram[3] != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {datagram[3]}, this fleet speaks {PROTOCOL_VERSION}: upgrade the older side"
        )
    if len(datagram) < HEADER_LEN:
        raise Malformed(f"truncated: {len(datagram)} bytes, the header alone is {HEADER_LEN}")
    _, _, kind_code, tag, ident = _HEAD.unpack_from(datagram)
    if tag != cluster_tag(cluster):
        raise WrongCluster(f"datagram for another cluster (tag {tag.hex()}), not {cluster!r}")
    mac = datagram[_HEAD.size:HEADER_LEN]
    payload = datagram[HEADER_LEN:]
    _authenticate(keyring, ident, datagram[:_HEAD.size] + payload, mac)
    cls = _TYPE_BY_CODE.get(kind_code)
    if cls is None:
        raise Malformed(f"unknown message kind {kind_code} (from a newer fleet?)")
    message = _build(cls, _unpack(payload))
    if message.cluster != cluster:
        raise WrongCluster(f"datagram for cluster {message.cluster!r}, not {cluster!r}")
    _check_fresh(message, now, TIMESTAMP_WINDOW)
    return message


def _authenticate(keyring: Keyring, ident: bytes, signed: bytes, mac: bytes) -> None:
    if ident == UNSIGNED_KEY_ID:
        if mac != _ZERO_MAC:
            raise Malformed("unsigned datagram with a non-zero MAC field")
        if len(keyring):
            raise Unsigned("unsigned datagram, but this host requires the cluster key")
        return
    if not len(keyring):
        raise BadSignature(f"signed with key {ident.hex()}, but this host has no cluster key to check it")
    keyring.verify(ident, signed, mac)


def _unpack(payload: bytes) -> list[Any]:
    try:
        envelope = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True,
                                   **_UNPACK_LIMITS)
    except (ValueError, msgpack.UnpackException) as error:  # all of msgpack's errors on bad input
        raise Malformed(f"bad msgpack payload: {type(error).__name__}: {error}"[:200]) from None
    if type(envelope) is not list or len(envelope) != len(_ENVELOPE) + 1:
        raise Malformed(f"payload must be an array of {len(_ENVELOPE) + 1} items")
    return envelope


def _build(cls: type[Message], envelope: list[Any]) -> Message:
    *head, body = envelope
    if type(body) is not dict:
        raise Malformed(f"{cls.KIND.name} body must be a map")
    values = dict(zip(_ENVELOPE, head))
    for name, required in _BODY_FIELDS[cls]:
        if name in body:
            values[name] = body[name]
        elif required:
            raise Malformed(f"{cls.KIND.name} lacks field {name!r}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:
        raise Malformed(f"{cls.KIND.name}: {error}"[:300]) from None


def _check_fresh(message: Message, now: float, window: float) -> None:
    skew = message.timestamp - now
    if abs(skew) > window:
        raise Stale(
            f"{message.KIND.name} timestamp is {skew:+.1f} s from our clock (window ±{window:g} s): "
            "an old datagram, or the clocks disagree (NTP?)"
        )


# --- Replay protection -------------------------------------------------------------

MAX_TRACKED_BOOTS = 4096  # far more boots than a LAN cluster restarts within BOOT_MEMORY


class ReplayGuard:
    """Per (node id, boot id), the highest sequence number accepted; pure, `now` passed in.

    A boot not heard from for `memory` seconds is forgotten: safe once
    memory >= 2 * window, since any datagram it sent is then Stale anyway
    (sent at most `window` after our last acceptance, fresh for `window` more).
    Past `max_boots`, the least recently heard boot is forgotten; only
    authenticated messages are recorded, so only key holders can fill it.
    """

    def __init__(self, window: float = TIMESTAMP_WINDOW, max_boots: int = MAX_TRACKED_BOOTS,
                 memory: float | None = None) -> None:
        self.window = window
        self.memory = 3 * window if memory is None else memory
        if self.memory < 2 * window:
            raise ValueError("memory must be at least twice the window, or forgotten boots become replayable")
        if max_boots < 1:
            raise ValueError("max_boots must be at least 1")
        self.max_boots = max_boots
        self._seen: OrderedDict[tuple[bytes, bytes], tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, message: Message, now: float) -> None:
        """Raise Stale or Replayed; change nothing."""
        _check_fresh(message, now, self.window)
        last = self._seen.get((message.node_id, message.boot_id))
        if last is not None and message.seq <= last[0]:
            raise Replayed(
                f"{message.KIND.name} seq {message.seq} from node {message.node_id.hex()[:8]} "
                f"boot {message.boot_id.hex()[:8]}, already at {last[0]}"
            )

    def accept(self, message: Message, now: float) -> None:
        """Record `message` as seen; call only once its MAC checked out and check() passed."""
        self._forget(now)
        key = (message.node_id, message.boot_id)
        last = self._seen.pop(key, None)
        self._seen[key] = (max(message.seq, last[0]) if last else message.seq, now)
        while len(self._seen) > self.max_boots:
            self._seen.popitem(last=False)

    def admit(self, message: Message, now: float) -> None:
        """check() then accept(): the usual call after decode()."""
        self.check(message, now)
        self.accept(message, now)

    def _forget(self, now: float) -> None:
        while self._seen:
            key, (_, heard) = next(iter(self._seen.items()))
            if now - heard <= self.memory:
                break
            del self._seen[key]
