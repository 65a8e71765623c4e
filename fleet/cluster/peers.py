"""Unicast peers of a cluster: the seed list a host starts from, and the peers it learns.

Pure: `now` and the resolver of host names are passed in. Where multicast is
dropped (clouds, most VPNs), a host sends each cluster datagram to every peer
in this table instead of (or as well as) the group. Seeds come from ``--cluster-peers`` and never expire.
Learned peers come from two places, both authenticated: the source of an
admitted datagram that arrived by unicast, and the ``peers`` list of the
master's announces (so seed-only nodes learn each other). A learned peer not
refreshed for ``expire_after`` seconds is dropped: it stopped talking, and the
master stopped listing it. The table refuses to grow past ``max_peers``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from fleet.config import ConfigError, parse_host_port

Address = tuple[str, int]

MAX_PEERS = 256  # seeds included; a unicast fleet sends every datagram to each of them
DEFAULT_EXPIRE_INTERVALS = 5  # heartbeats: past "dead" (3), with room for a late announce


class PeerError(ValueError):
    """A peer address or peer file that cannot be used; one line saying what to fix."""


def parse_address(text: str, option: str = "--cluster-peers",
                  resolve: Callable[[str], str] | None = None) -> Address:
    """HOST:PORT, HOST an IPv4 address, or a name that ``resolve`` turns into one
    (the caller's resolver: this module does no I/O)."""
    try:
        host, port = parse_host_port(text.strip(), f"{option} {text!r}", example="10.0.0.2:1717", host_required=True)
    except ConfigError as error:
        raise PeerError(str(error)) from None
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        address = None
    if address is None:
        try:
            if resolve is None:
                raise OSError("no resolver given")
            host = resolve(host)
        except OSError as error:
            raise PeerError(f"{option} {text!r}: cannot resolve {host!r} to an IPv4 address: "
                            f"{getattr(error, 'strerror', None) or error}") from None
        address = ipaddress.IPv4Address(host)
    if address.is_multicast or address.is_unspecified or int(address) == 0xFFFFFFFF:
        raise PeerError(f"{option} {text!r}: {address} is not a host's address (for a multicast group "
                        "use --cluster)")
    return (str(address), port)


def parse_peer_list(text: str, resolve: Callable[[str], str] | None = None) -> list[Address]:
    """``HOST:PORT,HOST:PORT`` or ``@FILE`` (read by the caller: see parse_peer_file)."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise PeerError(f"--cluster-peers {text!r}: no address; expected HOST:PORT,... or @FILE")
    return _unique([parse_address(item, resolve=resolve) for item in items])


def parse_peer_file(text: str, path: str, resolve: Callable[[str], str] | None = None) -> list[Address]:
    """One HOST:PORT per line; '#' starts a comment; blank lines are skipped."""
    peers = []
    for number, line in enumerate(text.splitlines(), 1):
        content = line.split("#", 1)[0].strip()
        if content:
            peers.append(parse_address(content, f"--cluster-peers @{path} line {number}:", resolve))
    if not peers:
        raise PeerError(f"--cluster-peers @{path}: the file holds no address; one HOST:PORT per line")
    return _unique(peers)


def _unique(peers: Iterable[Address]) -> list[Address]:
    return list(dict.fromkeys(peers))


class PeerTable:
    """Seeds (kept) and learned peers (expire); never more than max_peers in all."""

    def __init__(self, seeds: Iterable[Address], own: Address | None, expire_after: float,
                 max_peers: int = MAX_PEERS) -> None:
        if expire_after <= 0 or max_peers < 1:
            raise ValueError("expire_after must be positive and max_peers at least 1")
        self.own = own
        self.seeds = [seed for seed in _unique(seeds) if seed != own]
        if len(self.seeds) > max_peers:
            raise PeerError(f"--cluster-peers lists {len(self.seeds)} addresses, more than {max_peers}")
        self.expire_after = expire_after
        self.max_peers = max_peers
        self._learned: dict[Address, float] = {}  # address -> last refreshed
        self.refused = 0  # learned peers turned away because the table was full

    def __len__(self) -> int:
        return len(self.seeds) + len(self._learned)

    def set_own(self, address: Address) -> None:
        """This host's own unicast address, once bound: never a peer (a shared seed list names it too)."""
        self.own = address
        self.seeds = [seed for seed in self.seeds if seed != address]
        self._learned.pop(address, None)

    def __contains__(self, address: object) -> bool:
        return address in self._learned or address in self.seeds

    def addresses(self) -> list[Address]:
        """Where to send: seeds first, then learned peers in the order they came."""
        return self.seeds + [address for address in self._learned if address not in self.seeds]

    def learned(self) -> list[Address]:
        return list(self._learned)

    def learn(self, address: Address, now: float) -> bool:
        """Add or refresh a peer; False if the table is full and it is new (the caller logs once)."""
        address = (str(address[0]), int(address[1]))
        if address == self.own:
            return True
        if address in self._learned:
            self._learned[address] = now
            return True
        if address in self.seeds:
            return True
        if len(self) >= self.max_peers:
            self.refused += 1
            return False
        self._learned[address] = now
        return True

    def expire(self, now: float) -> list[Address]:
        """Forget learned peers silent for expire_after; returns them."""
        gone = [address for address, seen in self._learned.items() if now - seen > self.expire_after]
        for address in gone:
            del self._learned[address]
        return gone
