"""The UDP multicast channel of a cluster: the only place fleet opens multicast sockets.

One socket per process both sends and receives. The interface is always
explicit (``--cluster-iface``): the kernel's default would be the interface of
the default route, which on a multi-homed box is rarely the one the cluster
lives on (Zyre's and uWSGI's users hit exactly that), and tests must never
let a datagram leave the machine.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from fleet.cluster_protocol import MAX_DATAGRAM

# Read one byte more than the protocol allows, so an oversized datagram is
# seen as oversized (recvfrom truncates silently) and dropped before parsing.
RECEIVE_SIZE = MAX_DATAGRAM + 1
DEFAULT_TTL = 1  # never routed off the local segment unless asked


class ChannelError(ValueError):
    """A cluster address or interface the kernel will not accept; one line."""


@dataclass(frozen=True)
class Group:
    address: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Group:
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ChannelError(f"--cluster {text!r}: expected GROUP:PORT such as 225.1.1.1:1717")
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise ChannelError(f"--cluster {text!r}: {host!r} is not an IPv4 address") from None
        if not address.is_multicast:
            raise ChannelError(f"--cluster {text!r}: {host} is not a multicast address (224.0.0.0/4)")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ChannelError(f"--cluster {text!r}: port {port} is out of range 1-65535")
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
        sock.setblocking(False)
        self.socket = sock

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
