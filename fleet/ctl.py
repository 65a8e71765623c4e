"""The cluster commands: ``fleet node``, ``status``, ``reload``, ``log``, ``keygen``,
and the cluster options that ``fleet master`` shares with them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time

from fleet.cluster import protocol as proto
from fleet.cluster.agent import DEFAULT_CLUSTER_NAME, HEARTBEAT_INTERVAL, ClusterAgent, ClusterOptions
from fleet.config import WILDCARD_HOSTS, ConfigError, HandlerConfig, HttpAddress
from fleet.multicast import ChannelError, Group
from fleet.cluster.peers import Address, PeerError, parse_address, parse_peer_file, parse_peer_list

KEY_FILE_ENV = "FLEET_CLUSTER_KEY_FILE"
# fleet status listens this many heartbeat intervals before it prints.
STATUS_LISTEN = 2.5


def add_cluster_options(parser: argparse.ArgumentParser, required: bool) -> None:
    # --cluster is not argparse-required even where a cluster is (`required`): --cluster-peers
    # alone is a cluster too; cluster_options() says what is missing.
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
                        help="heartbeat interval; a host silent for 3 of them is dead (default 1); "
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
        bind = parse_address(args.cluster_bind, "--cluster-bind") if args.cluster_bind else None
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
    path = args.cluster_key_file or os.environ.get(KEY_FILE_ENV)
    keyring = proto.Keyring()
    if path:
        try:
            with open(path) as file:
                keyring = proto.parse_key_file(file.read())
        except OSError as error:
            raise ConfigError(f"--cluster-key-file {path!r}: {error.strerror}") from None
        except ValueError as error:
            raise ConfigError(f"--cluster-key-file {path!r}: {error}") from None
    if not 0.05 <= args.cluster_heartbeat <= 60:
        raise ConfigError(f"--cluster-heartbeat {args.cluster_heartbeat}: must be 0.05-60 seconds")
    return ClusterOptions(group, interface, keyring, ttl=args.cluster_ttl, name=args.cluster_name,
                          node_name=args.node_name, heartbeat_interval=args.cluster_heartbeat,
                          unicast_bind=unicast_bind, peers=tuple(peers))


def _peers(text: str) -> list[Address]:
    if not text.startswith("@"):
        return parse_peer_list(text)
    path = text[1:]
    try:
        with open(path) as file:
            content = file.read()
    except OSError as error:
        raise PeerError(f"--cluster-peers @{path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise PeerError(f"--cluster-peers @{path}: not a text file of HOST:PORT lines") from None
    return parse_peer_file(content, path)


def make_agent(args: argparse.Namespace, role: str, **kwargs) -> ClusterAgent:
    try:
        return ClusterAgent(cluster_options(args, role), role, **kwargs)
    except (ChannelError, PeerError) as error:
        raise ConfigError(str(error)) from None
    except proto.TooLarge as error:
        raise ConfigError(f"the configuration cannot be announced: {error}") from None


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


# -- fleet node ------------------------------------------------------------------


def run_node(args: argparse.Namespace) -> int:
    """Wait for the master's configuration, then serve it; follow every change."""
    from fleet.exitcodes import RESTART
    from fleet.logs.local import setup_logging
    from fleet.master import preflight_app
    from fleet.supervisor.supervisor import Supervisor

    setup_logging(args.log_level, args.log_file)
    agent = make_agent(args, "node")
    adapt = local_overrides(args, agent.options.interface)
    import logging

    log = logging.getLogger("fleet.node")
    log.info("node %s: asking cluster %s on %s for its configuration", args.node_name, agent.options.describe(),
             agent.options.interface)
    try:
        while True:
            config = _wait_for_config(agent, log, adapt)
            if config is None:
                return 0
            setup_logging(args.log_level, args.log_file, config.logger)  # the master's collector, or our own
            problem = preflight_app(config)
            if problem is not None:
                log.error("cannot serve generation %d: %s", agent.generation, problem)
                agent.config = None  # ask again; report the error meanwhile
                _report_error(agent, problem, args)
                continue
            try:
                supervisor = Supervisor(config, log_level=args.log_level, stats_endpoint=args.stats,
                                        log_file=args.log_file, cluster=agent,
                                        cluster_generation=agent.generation, adapt_config=adapt)
            except ConfigError as error:  # e.g. an --http port taken on this host
                log.error("cannot serve generation %d: %s", agent.generation, error)
                agent.config = None
                _report_error(agent, str(error), args)
                continue
            code = supervisor.run()
            if code != RESTART:
                return code
    finally:
        agent.leave()
        agent.close()


def local_overrides(args: argparse.Namespace, own_address: str):
    """This host's own flags win over the announced configuration.

    The master's --http addresses are its own: a node serves the same ports on
    ``own_address`` (its cluster interface), except wildcard hosts, which
    mean every address anywhere; a node's own --http replaces them all."""
    changes = {name: getattr(args, name) for name in ("processes", "threads", "mongrel2_chroot", "logger")
               if getattr(args, name, None) is not None}
    own_http = getattr(args, "http", None)
    if own_http:
        changes["http"] = tuple(str(HttpAddress.parse(text)) for text in own_http)

    def adapt(config: HandlerConfig) -> HandlerConfig:
        if config.http and "http" not in changes:
            config = dataclasses.replace(config, http=tuple(
                str(address if address.host in WILDCARD_HOSTS else HttpAddress(own_address, address.port))
                for address in config.http_addresses))
        return dataclasses.replace(config, **changes) if changes else config

    return adapt


def _wait_for_config(agent: ClusterAgent, log, adapt) -> HandlerConfig | None:
    from fleet.cluster.agent import ApplyConfig

    while True:
        if agent.config is not None:
            unknown = HandlerConfig.unknown_settings(agent.config)
            if unknown:
                log.warning("cluster: this fleet version ignores the master's %s; upgrade this node",
                            ", ".join(unknown))
            try:
                return adapt(HandlerConfig.from_dict(agent.config))
            except (ConfigError, TypeError, KeyError) as error:
                log.error("cluster: refused a configuration: %s", error)
                agent.config = None
        now = time.time()
        agent.tick(now, None)
        for event in agent.receive(now):
            if isinstance(event, ApplyConfig):
                log.info("cluster: configuration of generation %d received", event.generation)
        time.sleep(0.05)


def _report_error(agent: ClusterAgent, problem: str, args: argparse.Namespace) -> None:
    """Heartbeat the error for a while instead of crash-looping, then ask again."""
    from fleet.cluster.agent import HostStatus

    status = HostStatus(state="degraded", generation=agent.generation, workers_ready=0, workers_total=0,
                        requests_served=0, rss=0, error=problem[:500])
    deadline = time.time() + 10.0
    while time.time() < deadline:
        now = time.time()
        agent.tick(now, status)
        agent.receive(now)
        time.sleep(0.1)


# -- fleet status / reload / log / keygen ------------------------------------------------


def listen(agent: ClusterAgent, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        now = time.time()
        agent.receive(now)
        agent.tick(now, None)
        time.sleep(0.02)


def run_status(args: argparse.Namespace) -> int:
    agent = make_agent(args, "observer")
    try:
        listen(agent, STATUS_LISTEN * agent.options.heartbeat_interval)
        status = merged_status(agent)
    finally:
        agent.close()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0


def merged_status(agent: ClusterAgent) -> dict:
    """What we heard ourselves, plus the hosts only the master knows of
    (a host that died before we started listening is in its table, as dead)."""
    status = agent.members.status(time.time())
    heard = {h["node_id"] for h in status["hosts"]}
    for row in agent.master_members:
        if row["node_id"] in heard:
            continue
        status["hosts"].append({
            **row, "address": list(row["address"]),
            "workers": {"ready": row["workers_ready"], "total": row["workers_total"]},
            "requests_per_second": 0.0, "rss": 0, "error": None, "app_version": None,
            "reported_by": "master",
        })
    status["hosts"].sort(key=lambda h: (h["role"] != "master", h["hostname"]))
    return status


def render_status(status: dict) -> str:
    hosts = status["hosts"]
    newest = max((h["generation"] for h in hosts), default=0)
    masters = [h for h in hosts if h["role"] == "master" and h.get("app_version")]
    expected_version = masters[0]["app_version"] if masters else None
    lines = [f"{'host':<20} {'address':<16} {'role':<7} {'gen':>4} {'workers':>8} {'req/s':>8} "
             f"{'rss MB':>7} {'seen':>6}  state"]
    for h in hosts:
        flags = []
        if h["generation"] < newest:
            flags.append("OLD GENERATION")
        if expected_version and h.get("app_version") and h["app_version"] != expected_version:
            flags.append(f"APP VERSION {h['app_version']} (master: {expected_version})")
        if h.get("error"):
            flags.append(h["error"])
        lines.append(f"{h['hostname'][:20]:<20} {h['address'][0]:<16} {h['role']:<7} {h['generation']:>4} "
                     f"{h['workers_ready']:>3}/{h['workers_total']:<4} {h['requests_per_second']:>8.1f} "
                     f"{h['rss'] / 1048576:>7.1f} {h['last_seen_age']:>5.1f}s  {h['state']}"
                     + (f"  ({'; '.join(flags)})" if flags else ""))
    if not hosts:
        lines.append("(no host heard)")
    return "\n".join(lines)


def run_reload(args: argparse.Namespace) -> int:
    """Ask the master for a new generation, then wait until every live host runs it."""
    agent = make_agent(args, "observer")
    try:
        listen(agent, STATUS_LISTEN * agent.options.heartbeat_interval)
        hosts = [h for h in merged_status(agent)["hosts"] if h["state"] != "dead"]
        masters = [h for h in hosts if h["role"] == "master"]
        if not masters:
            print("fleet: error: no master heard on the cluster; nothing reloaded", file=sys.stderr)
            return 1
        target = max(h["generation"] for h in hosts) + 1
        agent.send_reload(target, args.batch)
        print(f"reload to generation {target} sent; waiting for {len(hosts)} host(s)")
        deadline = time.time() + args.timeout
        pending = {h["node_id"] for h in hosts}
        views: dict[str, dict] = {}
        while pending and time.time() < deadline:
            listen(agent, 0.2)
            # Hosts heard directly, else the master's word (a host on the other side of a mixed fleet).
            for h in [*agent.master_members, *agent.members.status(time.time())["hosts"]]:
                views[h["node_id"]] = h
                if h["node_id"] in pending and h["generation"] >= target and h["state"] in ("ready", "lost"):
                    pending.discard(h["node_id"])
    finally:
        agent.close()
    failed = 0
    for node_id in sorted({h["node_id"] for h in hosts}):
        view = views.get(node_id, {})
        ok = node_id not in pending
        failed += not ok
        detail = "ok" if ok else f"FAILED: at generation {view.get('generation')}, {view.get('state')}" + (
            f", {view['error']}" if view.get("error") else "")
        print(f"  {view.get('hostname', node_id)} {view.get('role', '')}: {detail}")
    return 1 if failed else 0


def run_log(args: argparse.Namespace) -> int:
    agent = make_agent(args, "observer")
    try:
        if agent.unicast:
            # Unicast reaches only known peers: learn them from the master's announce first.
            deadline = time.time() + STATUS_LISTEN * agent.options.heartbeat_interval
            while not agent.master_members and time.time() < deadline:
                listen(agent, 0.05)
        agent.send_log(args.level, args.message)
    finally:
        agent.close()
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    sys.stdout.write(proto.keygen())
    return 0
