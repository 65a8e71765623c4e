"""``fleet node``: a bare host that asks the cluster for its configuration, serves it,
and follows every change the master announces."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
from collections.abc import Callable

from fleet.appload import preflight_app
from fleet.cluster.agent import ApplyConfig, ClusterAgent, HostStatus
from fleet.cluster.options import make_agent
from fleet.cluster.policy import NodePolicy, PolicyRefused, load_policy
from fleet.config import (
    DEFAULT_CONTENT_LENGTH,
    DEFAULT_UPLOAD_STORE,
    WILDCARD_HOSTS,
    ConfigError,
    HandlerConfig,
    HttpAddress,
)
from fleet.exitcodes import RESTART
from fleet.logs.local import setup_logging
from fleet.mongrel2.server_config import merge, read_server_config
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
    try:
        adapt = local_overrides(args, agent.options.interface, policy)
    except ConfigError:
        agent.close()
        raise
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
    waiting = WaitingSignals(agent)
    try:
        while True:
            waiting.install()  # no supervisor (any more): HUP and TERM are ours until one runs
            try:
                config = _wait_for_config(agent, adapt, waiting)
            except PolicyRefused as refused:  # on the first join: run nothing, say why
                _cannot_serve(agent, str(refused), said, waiting)
                continue
            setup_logging(args.log_level, args.log_file, config.logger)  # the master's collector, or ours
            problem = preflight_app(config)
            if problem is not None:
                _cannot_serve(agent, problem, said, waiting)
                continue
            try:
                supervisor = Supervisor(config, log_level=args.log_level, stats_endpoint=args.stats,
                                        metrics=metrics_address(args.metrics),
                                        log_file=args.log_file, cluster=agent,
                                        cluster_generation=agent.generation, adapt_config=adapt)
            except ConfigError as error:  # e.g. an --http port taken on this host
                _cannot_serve(agent, str(error), said, waiting)
                continue
            waiting.check_stop()  # a TERM during the app check: the supervisor would never see it
            said.clear()
            code = supervisor.run()
            if code != RESTART:
                return code
    except StopWaiting as stop:
        log.info("node %s: %s while waiting for a configuration; stopped", args.node_name, stop)
        return 0
    finally:
        agent.leave()
        agent.close()


class StopWaiting(Exception):
    """TERM or INT while the node runs no supervisor."""


class WaitingSignals:
    """The node's signals while it has no supervisor (waiting for its first configuration,
    or reporting one it cannot serve), as a supervisor would take them: HUP reads the
    key file again and asks for the configuration at once (a node that joined with a
    stale key recovers without a restart); TERM and INT stop, saying goodbye.

    The handlers only set flags, which the waiting loops check (an exception raised
    from a handler could land inside logging, which swallows it). They stay installed
    until a supervisor installs its own, so no HUP finds the default action (death)."""

    SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)

    def __init__(self, agent: ClusterAgent) -> None:
        self.agent = agent
        self.hup = False
        self.stop: str | None = None

    def install(self) -> None:
        for signum in self.SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.hup = True
        else:
            self.stop = signal.Signals(signum).name

    @property
    def pending(self) -> bool:
        return self.hup or self.stop is not None

    def check_stop(self) -> None:
        if self.stop is not None:
            raise StopWaiting(self.stop)

    def take(self) -> bool:
        """After a wait: stop if told to; after a HUP, read the keys again and ask again
        (True if there was one)."""
        self.check_stop()
        if not self.hup:
            return False
        self.hup = False
        log.info("HUP: reading the key file again and asking the cluster for the configuration")
        self.agent.reload_keyring()
        self.agent.ask_config_now()
        return True


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
    changes.update(own_mongrel2(args))
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


def own_mongrel2(args: argparse.Namespace) -> dict[str, object]:
    """With --mongrel2-config: this host's Mongrel2 settings, which replace the master's
    (ConfigError, one line, for a file that cannot be used)."""
    path = getattr(args, "mongrel2_config", None)
    if not path:
        if getattr(args, "mongrel2_server", None) or getattr(args, "mongrel2_route", None):
            raise ConfigError("--mongrel2-server and --mongrel2-route need --mongrel2-config PATH")
        return {}
    server = read_server_config(path, args.mongrel2_server)
    settings, notes = merge(server, endpoints=(), chroot=args.mongrel2_chroot and os.path.abspath(args.mongrel2_chroot),
                            upload_store=None, content_length=None, routes=tuple(args.mongrel2_route),
                            default_upload_store=DEFAULT_UPLOAD_STORE, default_content_length=DEFAULT_CONTENT_LENGTH)
    for note in notes:
        log.warning("%s", note)
    changes: dict[str, object] = {"mongrel2_chroot": settings.chroot, "upload_store": settings.upload_store,
                                  "content_length_limit": settings.content_length}
    if settings.endpoints:
        changes["endpoints"] = settings.endpoints
    log.info("this host's Mongrel2 (server %s): %d handler(s), chroot %s, upload store %s, content-length limit %d",
             server.uuid, len(settings.endpoints), settings.chroot, settings.upload_store, settings.content_length)
    return changes


def _wait_for_config(agent: ClusterAgent, adapt: Adapt, signals: WaitingSignals) -> HandlerConfig:
    while True:
        while agent.config is None:
            for event in agent.converse(math.inf, until=lambda: agent.config is not None or signals.pending,
                                        pause=0.05):
                if isinstance(event, ApplyConfig):
                    log.info("cluster: configuration of generation %d received", event.generation)
            signals.take()
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


def _cannot_serve(agent: ClusterAgent, problem: str, said: list[str], signals: WaitingSignals) -> None:
    """Heartbeat the error for a while instead of crash-looping, then ask again (at once
    after a HUP). The same problem as last time (``said``) is not logged again."""
    if said != [problem]:
        log.error("cannot serve generation %d: %s", agent.generation, problem)
        said[:] = [problem]
    agent.config = None
    status = HostStatus(state="degraded", generation=agent.generation, workers_ready=0, workers_total=0,
                        requests_served=0, rss=0, error=problem[:500])
    agent.converse(ERROR_REPORT, status, until=lambda: signals.pending, pause=0.1)
    if signals.take():
        said.clear()  # asked to try again: say what happens this time
