"""A host's side of cluster reloads: follow the master's configuration and
generation, one turn at a time, and say in heartbeats where this host stands.

Nodes take turns (rolling): a change waits here until ``may_roll`` says it is
this node's turn (fleet.cluster.turns: paced by the nodes ahead, a stuck one
passed over after ROLL_TIMEOUT in its turn). The generation the
heartbeats report is the one the workers run: it moves only when the reload
to it has completed, so ``fleet reload`` sees a host on the new generation
only once it really is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from fleet.cluster.agent import ApplyConfig, ClusterAgent, HostStatus, ReloadRequested
from fleet.cluster.policy import PolicyRefused
from fleet.config import ConfigError, HandlerConfig

log = logging.getLogger("fleet.supervisor")

# The longest error text a heartbeat carries.
MAX_ERROR = 500


@contextmanager
def cluster_errors_contained() -> Iterator[None]:
    """The cluster must never take serving down with it: log an internal error and go on."""
    try:
        yield
    except Exception:
        log.exception("cluster: internal error; serving goes on")


class Host(Protocol):
    """What a rollout asks of the supervisor it serves."""

    config: HandlerConfig

    @property
    def stopping(self) -> bool: ...

    def reload(self) -> None: ...

    def apply_config(self, config: HandlerConfig) -> bool: ...

    def restart(self) -> None: ...


class Rollout:
    def __init__(self, agent: ClusterAgent, host: Host, generation: int,
                 adapt_config: Callable[[HandlerConfig], HandlerConfig]) -> None:
        self.agent = agent
        self.host = host
        self.adapt_config = adapt_config
        self.generation = generation  # what the workers run
        self.pending: int | None = None  # what a reload is moving them to
        self.waiting: tuple[ApplyConfig, float] | None = None  # a change waiting for our turn
        self.last_error: str | None = None

    def receive(self, now: float) -> bool:
        """Act on what the channel brought: reload commands, new configurations, and the
        heartbeat of the node ahead that makes it our turn. True if the supervisor has work
        from it now (most datagrams, heartbeats, leave it none)."""
        before = (self.pending, self.waiting)
        with cluster_errors_contained():
            if self._receive(now):
                return True
            self.roll_when_our_turn()
        return (self.pending, self.waiting) != before or self.host.stopping

    def talk(self, now: float, status: Callable[[], HostStatus]) -> None:
        """Once a tick: receive, roll if it is our turn, heartbeat (and announce, on the master)."""
        with cluster_errors_contained():
            self._receive(now)
            self.roll_when_our_turn()
            if self.agent.role == "master" and self.pending is None and self.agent.generation > self.generation:
                # Restarted with the configuration the fleet already runs: take its generation.
                self.generation = self.agent.generation
            self.agent.tick(now, status())

    def _receive(self, now: float) -> int:
        events = self.agent.receive(now)
        for event in events:
            if self.host.stopping:
                continue
            if isinstance(event, ReloadRequested):
                log.info("cluster: reload to generation %d requested", event.generation)
                self._reload(event.generation)
                self.agent.set_generation(event.generation)
            elif isinstance(event, ApplyConfig):
                self.waiting = (event, time.monotonic())
                self.roll_when_our_turn()
        return len(events)

    def reload_complete(self) -> None:
        if self.pending is not None:
            self.generation = self.pending
            self.pending = None
            self.last_error = None

    def reload_failed(self, why: str) -> None:
        self.last_error = f"reload failed: {why}"[:MAX_ERROR]
        self.pending = None

    def roll_when_our_turn(self) -> None:
        if self.waiting is None or self.host.stopping:
            return
        event, since = self.waiting
        if not self.agent.may_roll(event.generation):
            return
        self.waiting = None
        self.agent.turn_taken()
        waited = time.monotonic() - since
        if waited >= 1.0:
            log.info("cluster: our turn for generation %d came after %.1f s", event.generation, waited)
        try:
            config = self.adapt_config(HandlerConfig.from_dict(event.config))
        except PolicyRefused as refused:  # outside this node's policy: keep what runs, say why
            log.error("cluster: generation %d %s; this node keeps generation %d", event.generation,
                      refused, self.generation)
            self.last_error = str(refused)[:MAX_ERROR]
            return
        except (ConfigError, TypeError, KeyError) as error:
            log.error("cluster: refused a configuration: %s", error)
            self.last_error = f"bad configuration: {error}"[:MAX_ERROR]
            return
        if config == self.host.config:
            if event.generation != self.generation:
                log.info("cluster: generation %d: reloading", event.generation)
                self._reload(event.generation)
            return
        log.info("cluster: new configuration (generation %d)", event.generation)
        if self.host.apply_config(config):
            self._reload(event.generation)
        else:
            log.info("cluster: the Mongrel2 endpoints or dispatch mode changed: restarting the supervisor")
            self.host.restart()

    def _reload(self, generation: int) -> None:
        self.host.reload()
        self.pending = generation
