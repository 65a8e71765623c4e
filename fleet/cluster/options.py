"""The cluster options every cluster command shares (``--cluster``, ``--cluster-peers``,
keys, interface...), checked into a ClusterOptions and an agent, with one line per mistake."""

from __future__ import annotations

import argparse
import os
import socket

from fleet.cluster import protocol as proto
from fleet.cluster.agent import DEFAULT_CLUSTER_NAME, HEARTBEAT_INTERVAL, ClusterAgent, ClusterOptions
from fleet.cluster.peers import Address, PeerError, parse_address, parse_peer_file, parse_peer_list
from fleet.config import ConfigError
from fleet.multicast import ChannelError, Group

KEY_FILE_ENV = "FLEET_CLUSTER_KEY_FILE"


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    # --cluster is never argparse-required: --cluster-peers alone is a cluster
    # too; cluster_options() says what is missing.
    parser.add_argument("--cluster", metavar="GROUP:PORT",
                        help="the cluster's multicast group and port, e.g. 225.1.1.1:1717")
    parser.add_argument("--cluster-peers", metavar="HOST:PORT,...|@FILE",
                        help="unicast seeds, for networks that drop multicast: send to these hosts "
                             "(and to the ones the master announces); @FILE reads one HOST:PORT per "
                             "line, # comments. Alone or with --cluster (hosts on both bridge the two)")
    parser.add_argument("--cluster-bind", metavar="HOST:PORT",
                        help="where this host listens for unicast cluster datagrams (default: the "
                             "--cluster-iface address and the port of --cluster, else of the first "
                             "peer; status, reload and log always take a free port)")
    parser.add_argument("--cluster-iface", metavar="IP",
                        help="the address of the interface to send and join on "
                             "(default: the one the kernel would route the group through)")
    parser.add_argument("--cluster-ttl", type=int, default=1, metavar="N",
                        help="multicast TTL (default 1: the local network only)")
    parser.add_argument("--cluster-key-file", metavar="PATH",
                        help=f"keys that sign and verify cluster messages (or ${KEY_FILE_ENV}); "
                             "make one with `fleet keygen`")
    parser.add_argument("--cluster-name", default=DEFAULT_CLUSTER_NAME, metavar="NAME",
                        help="several clusters can share a group under different names")
    parser.add_argument("--node-name", default=socket.gethostname(), metavar="NAME",
                        help="this host's name in the cluster (default: the hostname)")
    parser.add_argument("--cluster-heartbeat", type=float, default=HEARTBEAT_INTERVAL, metavar="SECONDS",
                        help="heartbeat interval; a host silent for 2.5 of them is dead (default 1); "
                             "use the same value on every host")


def cluster_requested(args: argparse.Namespace) -> bool:
    """Whether the command line asks for a cluster at all (multicast, unicast or both)."""
    return bool(args.cluster or args.cluster_peers or args.cluster_bind)


def cluster_options(args: argparse.Namespace, role: str = "node") -> ClusterOptions:
    if not cluster_requested(args):
        raise ConfigError("give --cluster GROUP:PORT (multicast), --cluster-peers HOST:PORT,... "
                          "(unicast), or both")
    group = None
    if args.cluster:
        try:
            group = Group.parse(args.cluster)
        except ChannelError as error:
            raise ConfigError(str(error)) from None
    try:
        peers = _peers(args.cluster_peers) if args.cluster_peers else []
        bind = parse_address(args.cluster_bind, "--cluster-bind", resolve_ipv4) if args.cluster_bind else None
    except PeerError as error:
        raise ConfigError(str(error)) from None
    if not 0 < args.cluster_ttl < 256:
        raise ConfigError(f"--cluster-ttl {args.cluster_ttl}: must be 1-255")
    if args.cluster_iface:
        interface = args.cluster_iface
    else:
        interface = _route_interface(group.address if group else (bind or peers[0])[0])
    unicast_bind = None
    if peers or bind:
        port = bind[1] if bind else group.port if group else peers[0][1]
        # A command (status, reload, log) runs next to a daemon that holds the port.
        unicast_bind = ((bind[0] if bind else interface), 0 if role == "observer" else port)
    if not 0.05 <= args.cluster_heartbeat <= 60:
        raise ConfigError(f"--cluster-heartbeat {args.cluster_heartbeat}: must be 0.05-60 seconds")
    return ClusterOptions(group, interface, _keyring(args), ttl=args.cluster_ttl, name=args.cluster_name,
                          node_name=args.node_name, heartbeat_interval=args.cluster_heartbeat,
                          unicast_bind=unicast_bind, peers=tuple(peers),
                          key_file=args.cluster_key_file or os.environ.get(KEY_FILE_ENV) or None)


def make_agent(args: argparse.Namespace, role: str, **kwargs) -> ClusterAgent:
    try:
        return ClusterAgent(cluster_options(args, role), role, **kwargs)
    except (ChannelError, PeerError) as error:
        raise ConfigError(str(error)) from None
    except proto.TooLarge as error:
        raise ConfigError(f"the configuration cannot be announced: {error}") from None


def resolve_ipv4(name: str) -> str:
    """A host name of --cluster-peers or --cluster-bind, resolved once, at start."""
    infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"no IPv4 address for {name}")
    return infos[0][4][0]


def _keyring(args: argparse.Namespace) -> proto.Keyring:
    path = args.cluster_key_file or os.environ.get(KEY_FILE_ENV)
    if not path:
        return proto.Keyring()
    try:
        with open(path) as file:
            return proto.parse_key_file(file.read())
    except OSError as error:
        raise ConfigError(f"--cluster-key-file {path!r}: {error.strerror}") from None
    except ValueError as error:
        raise ConfigError(f"--cluster-key-file {path!r}: {error}") from None


def _peers(text: str) -> list[Address]:
    if not text.startswith("@"):
        return parse_peer_list(text, resolve_ipv4)
    path = text[1:]
    try:
        with open(path) as file:
            content = file.read()
    except OSError as error:
        raise PeerError(f"--cluster-peers @{path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise PeerError(f"--cluster-peers @{path}: not a text file of HOST:PORT lines") from None
    return parse_peer_file(content, path, resolve_ipv4)


def _route_interface(address: str) -> str:
    """The address the kernel would send traffic to `address` from (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((address, 9))
        return probe.getsockname()[0]
    except OSError:
        raise ConfigError(f"no interface routes to {address} here: give --cluster-iface") from None
    finally:
        probe.close()
