"""``fleet node``: a bare host that asks the cluster for its configuration, serves it,
and follows every change the master announces."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from collections.abc import Callable

from fleet.appload import preflight_app
from fleet.cluster.agent import ApplyConfig, ClusterAgent, HostStatus
from fleet.cluster.options import make_agent
from fleet.cluster.policy import NodePolicy, PolicyRefused, load_policy
from fleet.config import WILDCARD_HOSTS, ConfigError, HandlerConfig, HttpAddress
from fleet.exitcodes import RESTART
from fleet.logs.local import setup_logging
from fleet.supervisor.metrics import metrics_address
from fleet.supervisor.supervisor import Supervisor
from fleet.supervisor.systemd import Notifier

log = logging.getLogger("fleet.node")

# A node that cannot serve what it was sent heartbeats the error this long
# (instead of crash-looping), then asks for the configuration again.
ERROR_REPORT = 10.0

Adapt = Callable[[HandlerConfig], HandlerConfig]


def run_node(args: argparse.Namespace) -> int:
    """Wait for the master's configuration, then serve it; follow every change."""
    policy = node_policy(args)
    setup_logging(args.log_level, args.log_file)
    agent = make_agent(args, "node")
    adapt = local_overrides(args, agent.options.interface, policy)
    log.info("node %s: asking cluster %s on %s for its configuration", args.node_name, agent.options.describe(),
             agent.options.interface)
    # Under systemd (Type=notify) the node is up now; it serves once the cluster says what.
    started = Notifier()
    started.ready("waiting for the cluster's configuration")
    started.close()
    if policy.empty:
        log.warning("node %s has no policy: any holder of the cluster key decides what it imports and where it "
                    "reads uploads (give --allow-module and the other --allow-*/--max-* options, or "
                    "--policy-file)", args.node_name)
    else:
        log.info("node policy: %s", policy.describe())
    said: list[str] = []  # the problem last reported, so a refusal repeated every announce is logged once
    try:
        while True:
            try:
                config = _wait_for_config(agent, adapt)
            except PolicyRefused as refused:  # on the first join: run nothing, say why
                _cannot_serve(agent, str(refused), said)
                continue
            setup_logging(args.log_level, args.log_file, config.logger)  # the master's collector, or our own
            problem = preflight_app(config)
            if problem is not None:
                _cannot_serve(agent, problem, said)
                continue
            try:
                supervisor = Supervisor(config, log_level=args.log_level, stats_endpoint=args.stats,
                                        metrics=metrics_address(args.metrics),
                                        log_file=args.log_file, cluster=agent,
                                        cluster_generation=agent.generation, adapt_config=adapt)
            except ConfigError as error:  # e.g. an --http port taken on this host
                _cannot_serve(agent, str(error), said)
                continue
            said.clear()
            code = supervisor.run()
            if code != RESTART:
                return code
    finally:
        agent.leave()
        agent.close()


def node_policy(args: argparse.Namespace) -> NodePolicy:
    return load_policy(getattr(args, "policy_file", None), modules=getattr(args, "allow_module", None),
                       pythonpath=getattr(args, "allow_pythonpath", None),
                       chroots=getattr(args, "allow_chroot", None),
                       upload_stores=getattr(args, "allow_upload_store", None),
                       endpoints=getattr(args, "allow_endpoint", None),
                       max_processes=getattr(args, "max_processes", None),
                       max_threads=getattr(args, "max_threads", None))


def local_overrides(args: argparse.Namespace, own_address: str, policy: NodePolicy | None = None) -> Adapt:
    """This host's own flags win over the announced configuration, and its policy
    refuses what it does not allow (PolicyRefused).

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
        if changes:
            config = dataclasses.replace(config, **changes)
        if policy is not None:
            policy.check(config)
        return config

    return adapt


def _wait_for_config(agent: ClusterAgent, adapt: Adapt) -> HandlerConfig:
    while True:
        if agent.config is None:
            for event in agent.converse(math.inf, until=lambda: agent.config is not None, pause=0.05):
                if isinstance(event, ApplyConfig):
                    log.info("cluster: configuration of generation %d received", event.generation)
        unknown = HandlerConfig.unknown_settings(agent.config)
        if unknown:
            log.warning("cluster: this fleet version ignores the master's %s; upgrade this node", ", ".join(unknown))
        try:
            return adapt(HandlerConfig.from_dict(agent.config))
        except PolicyRefused:
            raise
        except (ConfigError, TypeError, KeyError) as error:
            log.error("cluster: refused a configuration: %s", error)
            agent.config = None


def _cannot_serve(agent: ClusterAgent, problem: str, said: list[str]) -> None:
    """Heartbeat the error for a while instead of crash-looping, then ask again.
    The same problem as last time (``said``) is not logged again."""
    if said != [problem]:
        log.error("cannot serve generation %d: %s", agent.generation, problem)
        said[:] = [problem]
    agent.config = None
    status = HostStatus(state="degraded", generation=agent.generation, workers_ready=0, workers_total=0,
                        requests_served=0, rss=0, error=problem[:500])
    agent.converse(ERROR_REPORT, status, pause=0.1)
