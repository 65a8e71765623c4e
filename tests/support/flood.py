"""A hostile host on the cluster's multicast group: captures genuine datagrams, then floods.

    python tests/cluster/flood.py --group G:P --iface 198.18.0.4 --cluster NAME \\
        --real-key-file K --capture 4 --count 30000 --seconds 25

Run it inside a namespace host (netns.Host.popen/exec): it only ever sends to
the group, with TTL 1, on --iface. Prints one JSON line: datagrams sent per mix.

The mixes (`forge(kind, ...)` is pure: random generator and captures in, bytes out):

- garbage: random bytes, 1..1400 long, a third starting with the fleet magic and version;
- other_cluster: a well-formed header for another cluster tag, random rest;
- bad_mac: this cluster's tag and the real key id (both public: in every datagram), random MAC;
- truncated: a captured genuine datagram cut short;
- bitflip: a captured genuine datagram with one payload bit flipped;
- oversized: 8 KB..64 KB (UDP's maximum), a captured header in front;
- replay: captured genuine datagrams sent again, unchanged;
- wrong_key: genuine structure (heartbeats claiming a real host name, reload commands,
  announces of a hostile configuration) signed with a key the cluster does not have,
  under its own key id or under the real key's id;
- unsigned: the same, unsigned;
- bad_timestamp: signed with the REAL key (an insider, or a datagram held back), timestamps
  outside the ±30 s window; the MAC passes, so this is what exercises the freshness check.

With --spoof-sources N every datagram leaves through a raw socket with a source
address forged from N addresses of the test bridge's own /24 (.100 up), as an
attacker spoofing UDP sources would send it; still only to the group, TTL 1, on --iface.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import sys
import time
from collections import Counter
from pathlib import Path

from fleet.cluster import protocol as proto  # noqa: E402
from fleet.multicast import Channel, Group  # noqa: E402

UDP_MAX = 65507
MIXES = {  # weights
    "garbage": 3, "other_cluster": 1, "bad_mac": 2, "truncated": 2, "bitflip": 2, "oversized": 1,
    "replay": 3, "wrong_key": 3, "unsigned": 1, "bad_timestamp": 2,
}
HOSTILE_CONFIG = {"module": "os:system", "processes": 64, "pythonpath": ["/tmp/evil"]}


class Forger:
    """Makes hostile datagrams; pure apart from the random generator it is given."""

    def __init__(self, rng: random.Random, cluster: str, captured: list[bytes], real_key: proto.Keyring,
                 hostnames: list[str]) -> None:
        self.rng = rng
        self.cluster = cluster
        self.captured = captured
        self.real_key = real_key
        self.wrong_key = proto.Keyring([rng.randbytes(proto.KEY_LEN)])
        self.hostnames = hostnames or ["h1", "h2", "h3"]
        self.origin = proto.Origin(cluster, rng.randbytes(proto.NODE_ID_LEN), rng.randbytes(proto.BOOT_ID_LEN))

    def _genuine(self) -> bytes | None:
        return self.rng.choice(self.captured) if self.captured else None

    def _message(self, now: float) -> proto.Message:
        """A structurally valid message an attacker would like accepted."""
        choice = self.rng.randrange(3)
        if choice == 0:
            return self.origin.make(
                proto.Heartbeat, now, role="master", state="ready", generation=10**6, workers_ready=0,
                workers_total=0, requests_served=0, requests_per_second=0.0, rss=0,
                hostname=self.rng.choice(self.hostnames), address=("198.18.0.4", 1), app_version=None,
                error=None)
        if choice == 1:
            return self.origin.make(proto.Reload, now, command_id=proto.new_command_id(),
                                    generation=10**6, batch=None)
        return self.origin.make(proto.Announce, now, generation=10**6, config=HOSTILE_CONFIG,
                                address=("198.18.0.4", 1), members=[])

    def forge(self, kind: str, now: float) -> bytes:
        rng = self.rng
        genuine = self._genuine()
        if kind in ("truncated", "bitflip", "oversized", "replay") and genuine is None:
            kind = "garbage"  # nothing captured (yet): still send something
        if kind == "garbage":
            body = rng.randbytes(rng.randint(1, 1400))
            return proto.MAGIC + bytes([proto.PROTOCOL_VERSION]) + body if rng.random() < 0.33 else body
        if kind == "other_cluster":
            head = proto.MAGIC + bytes([proto.PROTOCOL_VERSION, rng.randint(1, 6)]) + rng.randbytes(4)
            return head + rng.randbytes(rng.randint(40, 600))
        if kind == "bad_mac":
            head = proto.MAGIC + bytes([proto.PROTOCOL_VERSION, rng.randint(1, 6)]) + proto.cluster_tag(self.cluster)
            return head + self.real_key.signing_key_id + rng.randbytes(proto.MAC_LEN) + rng.randbytes(
                rng.randint(0, 600))
        if kind == "truncated":
            return genuine[: rng.randint(0, len(genuine) - 1)]
        if kind == "bitflip":
            flipped = bytearray(genuine)
            at = rng.randrange(proto.HEADER_LEN, len(flipped)) if len(flipped) > proto.HEADER_LEN else 0
            flipped[at] ^= 1 << rng.randrange(8)
            return bytes(flipped)
        if kind == "oversized":
            return genuine[: proto.HEADER_LEN] + rng.randbytes(rng.randint(proto.MAX_DATAGRAM, UDP_MAX)
                                                               - proto.HEADER_LEN)
        if kind == "replay":
            return genuine
        message = self._message(now)
        if kind == "wrong_key":
            data = bytearray(proto.encode(message, self.wrong_key))
            if rng.random() < 0.5:  # claim the real key's id: the MAC must still fail
                data[9:13] = self.real_key.signing_key_id
            return bytes(data)
        if kind == "unsigned":
            return proto.encode(message, proto.Keyring())
        if kind == "bad_timestamp":
            skew = rng.choice([-1, 1]) * rng.uniform(proto.TIMESTAMP_WINDOW + 1, 10**7)
            return proto.encode(self.origin.make(type(message), now + skew, **message.body()), self.real_key)
        raise ValueError(f"unknown mix {kind!r}")


def capture(channel: Channel, seconds: float, limit: int = 200) -> list[bytes]:
    """Genuine datagrams heard on the group for `seconds` (at most `limit`)."""
    got: list[bytes] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(got) < limit:
        received = channel.receive()
        if received is None:
            time.sleep(0.005)
            continue
        got.append(received[0])
    return got


class SpoofingSender:
    """Sends UDP datagrams to the group from forged source addresses (raw IPv4, IP_HDRINCL)."""

    FIRST_HOST = 100  # the forged sources: .100, .101, ... of --iface's /24

    def __init__(self, group: Group, iface: str, sources: int) -> None:
        if not 0 < sources <= 150:
            raise ValueError("--spoof-sources must be 1..150")
        prefix = iface.rsplit(".", 1)[0]
        self.sources = [socket.inet_aton(f"{prefix}.{self.FIRST_HOST + i}") for i in range(sources)]
        self.group = group
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.socket.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface))
        self.socket.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        self.socket.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        self.next = 0

    def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        source = self.sources[self.next % len(self.sources)]
        self.next += 1
        udp = struct.pack("!HHHH", 40000 + self.next % 1000, address[1], 8 + len(data), 0)  # no checksum
        # The kernel fills in the total length, id and header checksum (raw(7), IP_HDRINCL).
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 1, socket.IPPROTO_UDP, 0,
                         source, socket.inet_aton(address[0]))
        self.socket.sendto(ip + udp + data, (address[0], 0))

    def close(self) -> None:
        self.socket.close()


def send(channel: Channel, data: bytes, errors: Counter, kind: str, through=None) -> bool:
    """Send one datagram; a full send buffer is waited out briefly (we count what really left)."""
    sock = through or channel.socket
    for _ in range(200):
        try:
            sock.sendto(data, (channel.group.address, channel.group.port))
            return True
        except BlockingIOError:
            time.sleep(0.001)
        except OSError as error:
            errors[f"{kind}: {error.strerror}"] += 1
            return False
    errors[f"{kind}: send buffer full"] += 1
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", required=True)
    parser.add_argument("--iface", required=True)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--real-key-file", required=True, help="for bad_timestamp only (see above)")
    parser.add_argument("--hostnames", default="h1,h2,h3")
    parser.add_argument("--capture", type=float, default=4.0, help="seconds of listening first")
    parser.add_argument("--count", type=int, default=30000)
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--mixes", default=",".join(MIXES), help="comma-separated subset of the mixes")
    parser.add_argument("--spoof-sources", type=int, default=0, help="forge the source from N addresses")
    args = parser.parse_args(argv)
    if not 0 < args.count <= 200_000 or not 0 < args.seconds <= 120:
        print("flood: error: --count must be 1..200000 and --seconds 0..120", file=sys.stderr)
        return 2
    rng = random.Random(args.seed if args.seed is not None else os.urandom(8))
    channel = Channel(Group.parse(args.group), args.iface, ttl=1, loop=False)
    channel.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    spoofer = SpoofingSender(channel.group, args.iface, args.spoof_sources) if args.spoof_sources else None
    captured = capture(channel, args.capture)
    forger = Forger(rng, args.cluster, captured, proto.parse_key_file(Path(args.real_key_file).read_text()),
                    args.hostnames.split(","))
    print(json.dumps({"flooding": time.monotonic(), "captured_first": len(captured)}), flush=True)
    kinds = [k for k in args.mixes.split(",") if k]
    if not kinds or set(kinds) - set(MIXES):
        print(f"flood: error: --mixes must name some of {', '.join(MIXES)}", file=sys.stderr)
        return 2
    weights = [MIXES[k] for k in kinds]
    sent: Counter = Counter()
    errors: Counter = Counter()
    bytes_sent = 0
    start = time.monotonic()
    interval = args.seconds / args.count
    for i in range(args.count):
        due = start + i * interval
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        kind = rng.choices(kinds, weights)[0]
        data = forger.forge(kind, time.time())
        if not send(channel, data, errors, kind, spoofer):
            continue
        sent[kind] += 1
        bytes_sent += len(data)
        if i % 500 == 0:  # keep the replays fresh: a few more genuine datagrams
            while (received := channel.receive()) is not None:
                captured.append(received[0])
            del captured[:-400]
    took = time.monotonic() - start
    channel.close()
    if spoofer is not None:
        spoofer.close()
    print(json.dumps({"captured": len(captured), "sent": sum(sent.values()), "by_mix": dict(sent),
                      "send_errors": dict(errors), "bytes": bytes_sent, "seconds": round(took, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
