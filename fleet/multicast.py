"""The UDP multicast channel of a cluster: the only place fleet opens multicast sockets.

One socket per process both sends and receives. The interface is always
explicit (``--cluster-iface``): the kernel's default would be the interface of
the default route, which on a multi-homed box is rarely the one the cluster
lives on (Zyre's and uWSGI's users hit exactly that), and tests must never
let a datagram leave the machine.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
import sys
from dataclasses import dataclass

from fleet.cluster.protocol import HEADER_LEN, MAGIC, MAX_DATAGRAM, PROTOCOL_VERSION, Kind
from fleet.config import ConfigError, parse_host_port

# Read one byte more than the protocol allows, so an oversized datagram is
# seen as oversized (recvfrom truncates silently) and dropped before parsing.
RECEIVE_SIZE = MAX_DATAGRAM + 1
DEFAULT_TTL = 1  # never routed off the local segment unless asked
# Room for a burst of datagrams while the loop is busy (the kernel caps it at
# net.core.rmem_max; the default 208 KB holds only three 64 KB datagrams).
RECEIVE_BUFFER = 4 * 1024 * 1024
UDP_HEADER = 8
# Classic BPF, "drop any UDP datagram longer than the protocol allows": the kernel
# frees it before it takes room in the receive buffer. Without it a few oversized
# datagrams a second (up to 64 KB each) filled the buffer and genuine heartbeats
# were dropped with them (found by the hostile-network bench).
#
# A node that leaves its peers' heartbeats unread (fleet.cluster.agent) has the kernel drop
# them too: they never wake it, at 1,000 hosts a thousand a second. The filter looks at the
# header's magic and kind only (unauthenticated, so it can only make a host hear less).
_BPF_LD_LEN = 0x80  # BPF_LD | BPF_W | BPF_LEN: A = datagram length (UDP header included)
_BPF_LD_B_ABS = 0x30  # BPF_LD | BPF_B | BPF_ABS: A = the byte at k
_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = the big-endian word at k
_BPF_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
_BPF_JGT_K = 0x25  # BPF_JMP | BPF_JGT | BPF_K
_BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: keep that many bytes (0: drop)
_MAGIC_WORD = int.from_bytes(MAGIC + bytes([PROTOCOL_VERSION]), "big") & 0xFFFFFF00
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)


class ChannelError(ValueError):
    """A cluster address or interface the kernel will not accept; one line."""


@dataclass(frozen=True)
class Group:
    address: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Group:
        try:
            host, port = parse_host_port(text, f"--cluster {text!r}", example="225.1.1.1:1717", form="GROUP:PORT",
                                         host_required=True)
        except ConfigError as error:
            raise ChannelError(str(error)) from None
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise ChannelError(f"--cluster {text!r}: {host!r} is not an IPv4 address") from None
        if not address.is_multicast:
            raise ChannelError(f"--cluster {text!r}: {host} is not a multicast address (224.0.0.0/4)")
        return cls(str(address), port)

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


class Channel:
    """Send to and receive from one multicast group on one interface."""

    def __init__(self, group: Group, interface: str, *, ttl: int = DEFAULT_TTL, loop: bool = True) -> None:
        try:
            iface = socket.inet_aton(interface)
        except OSError:
            raise ChannelError(f"--cluster-iface {interface!r} is not an IPv4 address") from None
        self.group = group
        self.interface = interface
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # Bound to the group address: only this group's datagrams arrive,
            # not every datagram to the port.
            sock.bind((group.address, group.port))
            membership = struct.pack("4s4s", socket.inet_aton(group.address), iface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1 if loop else 0)
        except OSError as error:
            sock.close()
            raise ChannelError(
                f"cannot join {group} on interface {interface}: {error.strerror}; "
                "is --cluster-iface an address of this host, with a multicast route?"
            ) from None
        _harden(sock)
        sock.setblocking(False)
        self.socket = sock
        self.hears_heartbeats = True

    def hear_heartbeats(self, wanted: bool) -> None:
        """Have the kernel keep (or drop) fleet heartbeats on this socket; nothing else changes."""
        if wanted != self.hears_heartbeats:
            _attach_filter(self.socket, drop_heartbeats=not wanted)
            self.hears_heartbeats = wanted

    def fileno(self) -> int:
        return self.socket.fileno()

    def send(self, datagram: bytes) -> None:
        try:
            self.socket.sendto(datagram, (self.group.address, self.group.port))
        except (BlockingIOError, InterruptedError):
            pass  # a full send buffer: the protocol repeats itself, drop this one

    def receive(self) -> tuple[bytes, tuple[str, int]] | None:
        """One datagram and the (host, port) it came from, or None if none is waiting."""
        try:
            data, source = self.socket.recvfrom(RECEIVE_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        return data, (source[0], source[1])

    def close(self) -> None:
        self.socket.close()


def _socket_filter(drop_heartbeats: bool) -> bytes:
    """The classic BPF program of `_harden`, as struct sock_filter entries: drop what is longer
    than the protocol allows, and, if asked, fleet heartbeats. A datagram too short for a
    header goes up, to be refused (and counted) by the receive loop."""
    drop, keep = (_BPF_RET_K, 0, 0, 0), (_BPF_RET_K, 0, 0, 0xFFFFFFFF)
    insns = [(_BPF_LD_LEN, 0, 0, 0),
             (_BPF_JGT_K, 0, 1, UDP_HEADER + MAX_DATAGRAM),  # longer: next insn (drop), else skip it
             drop]
    if drop_heartbeats:
        insns += [(_BPF_JGE_K, 0, 6, UDP_HEADER + HEADER_LEN),  # A is still the length; short: keep
                  (_BPF_LD_B_ABS, 0, 0, UDP_HEADER + 4),  # the kind byte
                  (_BPF_JEQ_K, 0, 4, Kind.HEARTBEAT),
                  (_BPF_LD_W_ABS, 0, 0, UDP_HEADER),  # magic and version
                  (_BPF_AND_K, 0, 0, 0xFFFFFF00),
                  (_BPF_JEQ_K, 0, 1, _MAGIC_WORD),
                  drop]
    insns.append(keep)
    return b"".join(struct.pack("HBBI", *insn) for insn in insns)


def _harden(sock: socket.socket) -> None:
    """A bigger receive buffer, and oversized datagrams dropped in the kernel (Linux only;
    elsewhere the receive loop still drops them, only later)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    except OSError:
        pass
    _attach_filter(sock, drop_heartbeats=False)


def _attach_filter(sock: socket.socket, drop_heartbeats: bool) -> None:
    if sys.platform != "linux":
        return
    program = ctypes.create_string_buffer(_socket_filter(drop_heartbeats))
    fprog = struct.pack("HL", len(program.raw) // 8, ctypes.addressof(program))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError:
        pass  # no socket filters here: the receive loop drops these datagrams itself
