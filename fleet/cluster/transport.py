"""Where a cluster agent's datagrams go and come from: the multicast group, unicast peers, or both.

Same datagrams either way (signed, replay-checked by the agent). Sending
copies each datagram to the group (if any) and to every address of the peer
table (if unicast is on). Receiving reads whichever socket is ready and says
whether the datagram came by unicast: only those teach the agent a peer (a
multicast-only host does not listen on its unicast address).

The unicast socket is bound to one address of this host (``--cluster-bind``)
without SO_REUSEPORT: with it, the kernel would hand each unicast datagram to
just one of the processes sharing the port, silently. Short-lived commands
(`fleet status`, ...) bind port 0 and are learned from the source of what
they send. With both sockets, ``fileno()`` is an epoll descriptor that is
readable when either is, so the supervisor's loop still polls one descriptor.
"""

from __future__ import annotations

import select
import socket

from fleet.cluster.peers import Address, PeerTable
from fleet.multicast import RECEIVE_SIZE, Channel, ChannelError, Group


class UnicastSocket:
    """One UDP socket bound to (host, port) of this host; port 0 picks a free one."""

    def __init__(self, bind: Address) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.bind(bind)
        except OSError as error:
            sock.close()
            hint = ("another fleet on this host uses that port: give this one another --cluster-bind"
                    if error.errno == 98 else "is it an address of this host?")
            raise ChannelError(f"--cluster-bind {bind[0]}:{bind[1]}: {error.strerror}; {hint}") from None
        sock.setblocking(False)
        self.socket = sock
        host, port = sock.getsockname()[:2]
        self.address: Address = (host, port)

    def fileno(self) -> int:
        return self.socket.fileno()

    def send(self, datagram: bytes, address: Address) -> None:
        try:
            self.socket.sendto(datagram, address)
        except (BlockingIOError, InterruptedError):
            pass  # a full send buffer: the protocol repeats itself
        except OSError:
            pass  # ICMP unreachable from an earlier send, a peer with no route: it expires or comes back

    def receive(self) -> tuple[bytes, Address] | None:
        while True:
            try:
                data, source = self.socket.recvfrom(RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                return None
            except ConnectionRefusedError:
                continue  # an earlier send hit a closed port: Linux reports it on the next call
            return data, (source[0], source[1])

    def close(self) -> None:
        self.socket.close()


class Transport:
    """The group (optional) plus unicast peers (optional); at least one of them."""

    def __init__(self, *, group: Group | None, interface: str, ttl: int,
                 unicast_bind: Address | None, peers: PeerTable | None) -> None:
        if group is None and unicast_bind is None:
            raise ChannelError("the cluster needs --cluster GROUP:PORT, --cluster-peers, or both")
        self.channel: Channel | None = None
        self.unicast: UnicastSocket | None = None
        self._epoll = None
        try:
            if group is not None:
                self.channel = Channel(group, interface, ttl=ttl)
            if unicast_bind is not None:
                self.unicast = UnicastSocket(unicast_bind)
                self.peers = peers if peers is not None else PeerTable((), None, 1.0)
                self.peers.set_own(self.unicast.address)
            if self.channel is not None and self.unicast is not None:
                self._epoll = select.epoll()
                self._epoll.register(self.channel.fileno(), select.EPOLLIN)
                self._epoll.register(self.unicast.fileno(), select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    @property
    def unicast_address(self) -> Address | None:
        return self.unicast.address if self.unicast is not None else None

    def fileno(self) -> int:
        if self._epoll is not None:
            return self._epoll.fileno()
        return (self.channel or self.unicast).fileno()

    def send(self, datagram: bytes) -> None:
        if self.channel is not None:
            self.channel.send(datagram)
        if self.unicast is not None:
            for address in self.peers.addresses():
                self.unicast.send(datagram, address)

    def hear_heartbeats(self, wanted: bool) -> None:
        """Multicast heartbeats kept or dropped in the kernel (unicast ones always arrive)."""
        if self.channel is not None:
            self.channel.hear_heartbeats(wanted)

    def receive(self) -> tuple[bytes, Address, bool] | None:
        """(datagram, source, came by unicast), or None when neither socket has one waiting."""
        if self.unicast is not None:
            received = self.unicast.receive()
            if received is not None:
                return received[0], received[1], True
        if self.channel is not None:
            received = self.channel.receive()
            if received is not None:
                return received[0], received[1], False
        return None

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
        for sock in (self.channel, self.unicast):
            if sock is not None:
                sock.close()
