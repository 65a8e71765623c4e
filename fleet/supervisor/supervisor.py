"""The per-host supervisor (gunicorn's arbiter): spawn, watch, respawn and stop workers.

One process, one loop. Signal handlers only queue the signal; the loop acts on
it. The dispatcher's sockets live in the same loop, so when a worker dies the
requests it held are answered (502) in the same pass that reaps it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import psutil
import zmq

from fleet.cluster.agent import ROLL_TIMEOUT, ApplyConfig, ClusterAgent, HostStatus, ReloadRequested
from fleet.config import ConfigError, HandlerConfig
from fleet.dispatch.dispatcher import Dispatcher
from fleet.http.front import listen
from fleet.exitcodes import APP_LOAD_FAILED, OK, RESTART
from fleet.logs.local import reopen_log_file, setup_logging
from fleet.supervisor.figures import worker_row
from fleet.mongrel2.uploads import UploadPolicy
from fleet.worker.worker import WorkerSpec

log = logging.getLogger("fleet.supervisor")

# A worker that dies sooner than this after its start counts as flapping.
FLAP_WINDOW = 5.0
# Respawn delay after consecutive flaps: doubles from the first to the cap.
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 30.0
# How long the loop sleeps when nothing happens (timers are checked this often).
TICK = 0.2
# Quick stop (INT/QUIT): how long workers get before SIGKILL.
QUICK_STOP_TIMEOUT = 2.0
# A graceful stop detaches from Mongrel2, serves what already arrived for at
# most this long, then retires the workers.
DETACH_DRAIN = 1.0
# Harakiri: the stuck worker gets no new request and its other threads finish
# what they hold, for at most this long, before SIGKILL...
HARAKIRI_GRACE = 3.0
# ...and once they have, their last replies get this long to leave the worker:
# a reply still queued in its ZeroMQ socket dies with the process, and that
# client would wait forever (its request was reported done).
REPLY_FLUSH = 0.3
# Memory and CPU figures are read this often (psutil costs ~0.1 ms a worker).
SAMPLE_INTERVAL = 1.0

def listen_all(config: HandlerConfig) -> list[socket.socket]:
    """The --http sockets, or one clear line saying why one cannot be had."""
    listeners: list[socket.socket] = []
    for address in config.http_addresses:
        try:
            listeners.append(listen(address))
        except OSError as error:
            for listener in listeners:
                listener.close()
            raise ConfigError(f"--http {address}: cannot listen there: {error.strerror or error}") from None
    return listeners


HANDLED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1,
)


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    generation: int
    started_at: float
    max_requests: int = 0  # this worker's recycle point, jitter included; 0: never
    ready: bool = False
    retiring: bool = False
    retire_deadline: float | None = None
    replace_reason: str | None = None  # set: start a successor, then retire this one
    harakiri: bool = False  # killed, or being killed, for holding a request too long
    harakiri_at: float = 0.0
    quiet_since: float | None = None  # since when only its stuck threads hold requests
    killed: bool = False
    psutil: psutil.Process | None = None
    app_version: str | None = None  # the application's __version__, as the worker loaded it

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Counters:
    """What the master has done since it started, for `fleet stats`."""

    reloads: int = 0
    failed_reloads: int = 0
    respawns: int = 0
    harakiri_kills: int = 0
    recycled_max_requests: int = 0
    recycled_rss: int = 0
    answered_502: int = 0
    answered_504: int = 0


class Supervisor:
    def __init__(
        self,
        config: HandlerConfig,
        *,
        log_level: str = "info",
        stats_endpoint: str | None = None,
        log_file: str | None = None,
        cluster: ClusterAgent | None = None,
        cluster_generation: int = 1,
        adapt_config: Callable[[HandlerConfig], HandlerConfig] = lambda config: config,
    ) -> None:
        self.adapt_config = adapt_config
        self.config = config
        # Bound once here and inherited by every worker: a reload never refuses a connection.
        self.http_listeners = listen_all(config)
        self.log_file = log_file
        self.cluster = cluster
        # The cluster generation this host's workers run, and the one a reload
        # is moving them to: heartbeats report the first, so `fleet reload`
        # sees a host on the new generation only once it really is.
        self.cluster_generation = cluster_generation
        self.pending_cluster_generation: int | None = None
        self.rollout: tuple[ApplyConfig, float] | None = None  # a change waiting for our turn
        self.last_error: str | None = None
        self.log_level = log_level
        self.target = config.processes
        self.generation = 1
        self.reloading: int | None = None  # the generation a reload is moving to
        self.workers: dict[int, WorkerProcess] = {}
        self.signals: list[int] = []
        self.stopping_since: float | None = None
        self.retire_at: float | None = None  # graceful stop: when to retire the workers
        self.stop_deadline: float | None = None
        self.flaps = 0
        self.respawn_at = 0.0
        self.announced_ready = False
        self.exit_code = OK
        self.counters = Counters()
        self.runtime_dir = tempfile.mkdtemp(prefix="fleet-")
        self.context = zmq.Context()
        self.dispatcher = Dispatcher(
            self.context,
            config.endpoints,
            f"{self.runtime_dir}/dispatch",
            pull_from_mongrel2=config.dispatch == "broker",
            on_ready=self._worker_ready,
            upload_policy=UploadPolicy.of(config),
        )
        self.stats_socket: zmq.Socket | None = None
        if stats_endpoint:
            self.stats_socket = self.context.socket(zmq.REP)
            self.stats_socket.setsockopt(zmq.LINGER, 0)
            self.stats_socket.bind(stats_endpoint)
        self.spec_json = self.worker_spec(config).to_json()

    def worker_spec(self, config: HandlerConfig) -> WorkerSpec:
        return WorkerSpec(config, f"{self.runtime_dir}/dispatch", os.getpid(), self.log_level, self.log_file,
                          http_fds=tuple(listener.fileno() for listener in self.http_listeners))

    # -- the loop ------------------------------------------------------------

    def run(self) -> int:
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._queue_signal)
        poller = zmq.Poller()
        poller.register(wake_read, zmq.POLLIN)
        self.dispatcher.register(poller)
        if self.stats_socket is not None:
            poller.register(self.stats_socket, zmq.POLLIN)
        if self.cluster is not None:
            poller.register(self.cluster.fileno(), zmq.POLLIN)
        for responder in self.dispatcher.responders:
            responder.wait_subscribed(1.0)
        log.info(
            "master %d: %d worker(s) x %d thread(s), %s dispatch, app %s, Mongrel2 %s, HTTP %s",
            os.getpid(), self.config.processes, self.config.threads, self.config.dispatch,
            self.config.app, "; ".join(f"{e.send_spec},{e.recv_spec}" for e in self.config.endpoints) or "none",
            ", ".join(self.config.http) or "none",
        )
        next_tick = next_sample = 0.0
        try:
            self.manage_workers()
            busy = False
            while True:
                if not busy:  # nothing came last pass: sleep until something does
                    self.wait(poller)
                busy = self.dispatcher.pump() > 0
                # Process management runs on a signal or once a tick, not on
                # every message: this loop is also the dispatcher's hot path.
                now = time.monotonic()
                if not self.signals and now < next_tick:
                    continue
                next_tick = now + TICK
                try:
                    wake_read.recv(4096)
                except BlockingIOError:
                    pass
                self.handle_signals()
                self.reap_workers()
                self.answer_stats()
                self.dispatcher.watch_connections()
                if self.cluster is not None:
                    try:
                        self.talk_to_cluster()
                    except Exception:  # the cluster must never take serving down with it
                        log.exception("cluster: internal error; serving goes on")
                if self.stopping_since is not None:
                    if not self.workers:
                        break
                    self.kill_late_workers()
                    continue
                if now >= next_sample:
                    next_sample = now + SAMPLE_INTERVAL
                    self.check_limits()
                self.murder_workers()
                self.manage_workers()
        finally:
            self.kill_all()
            if self.cluster is not None and self.cluster.role == "master":
                self.cluster.leave()
            if self.stats_socket is not None:
                self.stats_socket.close()
            self.dispatcher.close()
            self.close_http()
            self.context.term()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            signal.set_wakeup_fd(-1)
            wake_read.close()
            wake_write.close()
        log.info("master %d stopped", os.getpid())
        return self.exit_code

    def _queue_signal(self, signum: int, frame) -> None:
        self.signals.append(signum)  # no logging here: just queue the signal

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGCHLD:
                continue  # reap_workers runs every pass
            name = signal.Signals(signum).name
            handler = getattr(self, f"handle_{name[3:].lower()}", None)
            if handler is not None:
                handler()

    def handle_term(self) -> None:
        self.stop(graceful=True)

    def handle_int(self) -> None:
        self.stop(graceful=False)

    handle_quit = handle_int

    def handle_hup(self) -> None:
        self.reload()

    def handle_ttin(self) -> None:
        self.target += 1
        log.info("TTIN: now %d worker(s)", self.target)

    def handle_ttou(self) -> None:
        if self.target > 1:
            self.target -= 1
        log.info("TTOU: now %d worker(s)", self.target)

    def handle_usr1(self) -> None:
        reopen_log_file()
        for worker in self.workers.values():
            _signal(worker.process, signal.SIGUSR1)
        log.info("USR1: log files reopened")

    # -- reloads -------------------------------------------------------------

    def reload(self) -> None:
        """Start a new generation; its workers replace the old ones as they get ready."""
        if self.stopping_since is not None:
            return
        self.generation += 1
        self.reloading = self.generation
        self.counters.reloads += 1
        self.flaps = 0
        self.respawn_at = 0.0
        batch = self.config.reload_batch or self.target
        log.info("reload: starting generation %d (%d worker(s), %d at a time)", self.generation, self.target, batch)

    def reload_failed(self, why: str) -> None:
        """The new generation cannot start: keep the old workers serving."""
        failed = self.generation
        self.generation -= 1
        self.reloading = None
        self.counters.failed_reloads += 1
        for worker in self.workers.values():
            if worker.generation == failed and not worker.retiring:
                self.retire_worker(worker)
        log.error("reload failed: %s; generation %d keeps serving", why, self.generation)
        self.last_error = f"reload failed: {why}"[:500]
        self.pending_cluster_generation = None

    def apply_config(self, config: HandlerConfig, cluster_generation: int) -> bool:
        """A new configuration from the cluster. Returns False if it cannot be
        applied in place (other Mongrel2 endpoints or dispatch mode): the
        caller then stops this supervisor and starts one with the new config."""
        if (config.endpoints != self.config.endpoints or config.dispatch != self.config.dispatch
                or config.http != self.config.http):
            return False
        if config.logger != self.config.logger:
            setup_logging(self.log_level, self.log_file, config.logger)
        self.config = config
        self.dispatcher.upload_policy = UploadPolicy.of(config)
        self.target = config.processes
        self.spec_json = self.worker_spec(config).to_json()
        self.reload()
        self.pending_cluster_generation = cluster_generation
        return True

    def wait(self, poller: zmq.Poller) -> None:
        """Sleep until something arrives, at most a tick. A cluster datagram is read
        at once: left unread, it keeps the socket readable and poll() returning
        straight away, a busy loop until the next tick (one per heartbeat heard)."""
        ready = dict(poller.poll(TICK * 1000))
        if self.cluster is not None and self.cluster.fileno() in ready:
            try:
                self.receive_from_cluster(time.time())
            except Exception:  # the cluster must never take serving down with it
                log.exception("cluster: internal error; serving goes on")

    # -- the cluster -----------------------------------------------------------

    def talk_to_cluster(self) -> None:
        now = time.time()
        self.receive_from_cluster(now)
        self.roll_when_our_turn()
        if (self.cluster.role == "master" and self.pending_cluster_generation is None
                and self.cluster.generation > self.cluster_generation):
            # Restarted with the configuration the fleet already runs: take its generation.
            self.cluster_generation = self.cluster.generation
        self.cluster.tick(now, self.host_status())

    def receive_from_cluster(self, now: float) -> None:
        for event in self.cluster.receive(now):
            if isinstance(event, ReloadRequested) and self.stopping_since is None:
                log.info("cluster: reload to generation %d requested", event.generation)
                self.reload()
                self.pending_cluster_generation = event.generation
                self.cluster.set_generation(event.generation)
            elif isinstance(event, ApplyConfig) and self.stopping_since is None:
                self.on_cluster_config(event)

    def on_cluster_config(self, event: ApplyConfig) -> None:
        """Nodes take turns (rolling); the change waits in `self.rollout` until ours."""
        self.rollout = (event, time.monotonic())
        self.roll_when_our_turn()

    def roll_when_our_turn(self) -> None:
        if self.rollout is None or self.stopping_since is not None:
            return
        event, since = self.rollout
        waited = time.monotonic() - since
        if not self.cluster.may_roll(event.generation, time.time()) and waited < ROLL_TIMEOUT:
            return
        self.rollout = None
        if waited >= ROLL_TIMEOUT:
            log.warning("cluster: nodes ahead have not finished their reload in %.0f s; going anyway", waited)
        try:
            config = self.adapt_config(HandlerConfig.from_dict(event.config))
        except (ConfigError, TypeError, KeyError) as error:
            log.error("cluster: refused a configuration: %s", error)
            self.last_error = f"bad configuration: {error}"[:500]
            return
        if config == self.config and event.generation != self.cluster_generation:
            log.info("cluster: generation %d: reloading", event.generation)
            self.reload()
            self.pending_cluster_generation = event.generation
        elif config != self.config:
            log.info("cluster: new configuration (generation %d)", event.generation)
            if not self.apply_config(config, event.generation):
                log.info("cluster: the Mongrel2 endpoints or dispatch mode changed: restarting the supervisor")
                self.exit_code = RESTART
                self.stop(graceful=True)

    def host_status(self) -> HostStatus:
        live = [w for w in self.workers.values() if not w.retiring]
        ready = sum(w.ready for w in live)
        if self.stopping_since is not None:
            state = "degraded"
        elif not self.announced_ready:
            state = "starting"
        else:
            state = "ready" if ready >= self.target and self.last_error is None else "degraded"
        rss = 0
        for worker in self.workers.values():
            if worker.psutil is not None:
                try:
                    rss += worker.psutil.memory_info().rss
                except psutil.Error:
                    pass
        served = sum(c.served for c in self.dispatcher.broker.counters.values())
        # During a reload old and new workers are both ready for a moment.
        ready = min(ready, self.target)
        versions = Counter(w.app_version for w in live if w.ready and w.generation == self.generation)
        version = versions.most_common(1)[0][0] if versions else None
        return HostStatus(state=state, generation=self.cluster_generation, workers_ready=ready,
                          workers_total=self.target, requests_served=served, rss=rss, error=self.last_error,
                          app_version=version)

    # -- workers -------------------------------------------------------------

    def manage_workers(self) -> None:
        """Converge on `target` ready workers of the current generation.

        Successors start first; an old worker (older generation, or marked for
        replacement) retires only once a successor is ready, so capacity never
        drops during a reload or a recycle.
        """
        live = [w for w in self.workers.values() if not w.retiring]
        current = [w for w in live if w.generation == self.generation and w.replace_reason is None]
        outgoing = sorted((w for w in live if w not in current), key=lambda w: w.started_at)
        ready = [w for w in current if w.ready]
        excess = len(ready) + len(outgoing) - self.target
        for worker in outgoing[: max(0, excess)]:
            self.retire_worker(worker)
        if len(current) > self.target:  # TTOU: retire the oldest beyond the target
            for worker in sorted(current, key=lambda w: w.started_at)[: len(current) - self.target]:
                self.retire_worker(worker)
        starting = len(current) - len(ready)
        batch = (self.config.reload_batch or self.target) if outgoing else self.target
        wanted = min(self.target - len(current), batch - starting)
        if wanted > 0 and time.monotonic() >= self.respawn_at:
            for _ in range(wanted):
                self.spawn_worker()
        if self.reloading is not None and not outgoing and len(ready) >= self.target:
            log.info("reload complete: generation %d, %d worker(s) ready", self.generation, len(ready))
            self.reloading = None
            if self.pending_cluster_generation is not None:
                self.cluster_generation = self.pending_cluster_generation
                self.pending_cluster_generation = None
                self.last_error = None

    def spawn_worker(self) -> None:
        process = subprocess.Popen([sys.executable, "-m", "fleet.worker", self.spec_json],
                                   pass_fds=[listener.fileno() for listener in self.http_listeners])
        limit = 0
        if self.config.max_requests:
            limit = self.config.max_requests + random.randint(0, self.config.max_requests_jitter)
        self.dispatcher.broker.worker_started(process.pid)
        worker = WorkerProcess(process, self.generation, time.monotonic(), limit)
        try:
            worker.psutil = psutil.Process(process.pid)
        except psutil.Error:
            pass
        self.workers[process.pid] = worker
        log.info("spawned worker %d (generation %d)", process.pid, self.generation)

    def retire_worker(self, worker: WorkerProcess) -> None:
        """Graceful: it asks for nothing more, finishes what it holds, exits."""
        if worker.retiring:
            return
        worker.retiring = True
        worker.retire_deadline = time.monotonic() + self.config.graceful_timeout
        _signal(worker.process, signal.SIGTERM)

    def _worker_ready(self, pid: int, app_version: str | None = None) -> None:
        worker = self.workers.get(pid)
        if worker is None:
            return
        worker.ready = True
        worker.app_version = app_version
        self.flaps = 0
        log.info("worker %d ready", pid)
        if not self.announced_ready and sum(w.ready for w in self.workers.values()) >= self.target:
            self.announced_ready = True
            role = "node" if self.cluster is not None and self.cluster.role == "node" else "master"
            log.info("%s ready: %d worker(s) x %d thread(s)", role, self.target, self.config.threads)

    def reap_workers(self) -> None:
        for pid, worker in list(self.workers.items()):
            code = worker.process.poll()
            if code is None:
                continue
            del self.workers[pid]
            answered_502, answered_504 = self.dispatcher.worker_gone(
                pid, self.config.harakiri if worker.harakiri else 0.0)
            self.counters.answered_502 += answered_502
            self.counters.answered_504 += answered_504
            lifetime = time.monotonic() - worker.started_at
            if (worker.retiring and not worker.harakiri) or self.stopping_since is not None:
                log.info("worker %d exited (%s)", pid, _describe(code))
                continue
            answered = f"; answered {answered_502} request(s) with 502" if answered_502 else ""
            if answered_504:
                answered += f" and {answered_504} with 504"
            log.error("worker %d died (%s) after %.1f s%s", pid, _describe(code), lifetime, answered)
            if worker.harakiri:
                continue
            self.counters.respawns += 1
            if not worker.ready and self.reloading == worker.generation:
                self.reload_failed(f"new worker {pid} {_describe(code)} before it was ready")
                continue
            if code == APP_LOAD_FAILED and not self.announced_ready:
                log.error("the application cannot be loaded; stopping")
                self.exit_code = APP_LOAD_FAILED
                self.stop(graceful=False)
                return
            if lifetime < FLAP_WINDOW and not worker.ready:
                self.flaps += 1
                delay = min(BACKOFF_FIRST * 2 ** (self.flaps - 1), BACKOFF_CAP)
                self.respawn_at = time.monotonic() + delay
                log.warning("worker flapping (%d quick deaths in a row): next spawn in %.1f s", self.flaps, delay)

    # -- limits ----------------------------------------------------------------

    def murder_workers(self) -> None:
        """Harakiri for stuck workers, SIGKILL for retirements that overran."""
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.retire_deadline is not None and now >= worker.retire_deadline and not worker.harakiri:
                log.warning("worker %d still busy %.0f s after it was asked to retire: SIGKILL",
                            worker.pid, self.config.graceful_timeout)
                worker.harakiri = worker.killed = True  # its clients get 504: they waited past the grace period
                _signal(worker.process, signal.SIGKILL)
            if worker.harakiri:
                if not worker.killed:
                    self._finish_harakiri(worker, now)
                continue
            if not self.config.harakiri:
                continue
            age = self.dispatcher.broker.oldest_request_age(worker.pid)
            if age is not None and age >= self.config.harakiri:
                log.error("harakiri: worker %d held a request for %.1f s (limit %.0f s): "
                          "its other requests finish, then SIGKILL", worker.pid, age, self.config.harakiri)
                worker.harakiri = True
                worker.harakiri_at = now
                self.counters.harakiri_kills += 1
                self.dispatcher.broker.retire_worker(worker.pid)
                self._finish_harakiri(worker, now)

    def _finish_harakiri(self, worker: WorkerProcess, now: float) -> None:
        """SIGKILL once only the stuck threads hold requests (and their
        neighbours' replies had time to leave), or when the grace is over."""
        if self.dispatcher.broker.busy_threads(worker.pid, stuck_after=self.config.harakiri):
            worker.quiet_since = None
        elif worker.quiet_since is None:
            worker.quiet_since = now
        flushed = worker.quiet_since is not None and now - worker.quiet_since >= REPLY_FLUSH
        if flushed or now - worker.harakiri_at >= HARAKIRI_GRACE:
            worker.killed = True
            _signal(worker.process, signal.SIGKILL)

    def check_limits(self) -> None:
        """Recycle workers past --max-requests or --reload-on-rss, gracefully."""
        for worker in self.workers.values():
            if worker.retiring or worker.replace_reason is not None or not worker.ready:
                continue
            served = self.dispatcher.broker.counters.get(worker.pid)
            if worker.max_requests and served is not None and served.served >= worker.max_requests:
                worker.replace_reason = f"served {served.served} requests (--max-requests)"
                self.counters.recycled_max_requests += 1
            elif self.config.reload_on_rss and worker.psutil is not None:
                try:
                    rss = worker.psutil.memory_info().rss
                except psutil.Error:
                    continue
                if rss > self.config.reload_on_rss * 1024 * 1024:
                    worker.replace_reason = f"RSS {rss / 1048576:.0f} MB over --reload-on-rss"
                    self.counters.recycled_rss += 1
            if worker.replace_reason is not None:
                log.info("recycling worker %d: %s", worker.pid, worker.replace_reason)

    # -- stats -------------------------------------------------------------------

    def answer_stats(self) -> None:
        if self.stats_socket is None:
            return
        while True:
            try:
                self.stats_socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.stats_socket.send(json.dumps(self.stats()).encode())

    def stats(self) -> dict:
        rows = [worker_row(w, self.dispatcher.broker, self.config.threads) for w in self.workers.values()]
        counters = asdict(self.counters)
        return {
            "pid": os.getpid(),
            "generation": self.generation,
            "workers": sorted(rows, key=lambda row: row["pid"]),
            "totals": {
                "workers": len(rows),
                "ready": sum(row["state"] in ("ready", "busy") for row in rows),
                "busy": sum(row["state"] == "busy" for row in rows),
                "requests": sum(row["requests"] for row in rows),
                "rss": sum(row["rss"] or 0 for row in rows),
                "backlog": self.dispatcher.broker.backlog,
            },
            "reloads": counters.pop("reloads"),
            "failed_reloads": counters.pop("failed_reloads"),
            "respawns": counters.pop("respawns"),
            "harakiri_kills": counters.pop("harakiri_kills"),
            "recycles": {"max_requests": counters.pop("recycled_max_requests"),
                         "rss": counters.pop("recycled_rss")},
            **counters,
            **({"cluster": self.cluster.counters()} if self.cluster is not None else {}),
        }

    # -- stopping ----------------------------------------------------------------

    def stop(self, graceful: bool) -> None:
        if self.stopping_since is not None and graceful:
            return
        now = time.monotonic()
        self.stopping_since = now
        self.close_http()  # the workers finish what they accepted; no new connections
        if graceful:
            # Detach from Mongrel2 first and serve what already came, then
            # retire: Mongrel2 gives new requests to the other hosts meanwhile,
            # where answering them 503 here would fail them.
            self.dispatcher.detach()
            self.retire_at = now + DETACH_DRAIN
            log.info("graceful stop: detached from Mongrel2; workers finish their requests (up to %.0f s)",
                     self.config.graceful_timeout)
        else:
            self.dispatcher.stop_accepting()
            self.stop_deadline = now + QUICK_STOP_TIMEOUT
            log.info("quick stop")
            for worker in self.workers.values():
                worker.retiring = True
                _signal(worker.process, signal.SIGQUIT)

    def close_http(self) -> None:
        for listener in self.http_listeners:
            listener.close()
        self.http_listeners = []

    def retire_all_after_detach(self) -> None:
        now = time.monotonic()
        if self.retire_at is None:
            return
        broker = self.dispatcher.broker
        if now < self.retire_at and (broker.backlog or now - self.stopping_since < TICK):
            return
        self.retire_at = None
        self.dispatcher.stop_accepting()
        self.stop_deadline = now + self.config.graceful_timeout
        for worker in self.workers.values():
            self.retire_worker(worker)

    def kill_late_workers(self) -> None:
        self.retire_all_after_detach()
        if self.stop_deadline is not None and time.monotonic() >= self.stop_deadline:
            for worker in self.workers.values():
                log.warning("worker %d did not stop in time: SIGKILL", worker.pid)
                _signal(worker.process, signal.SIGKILL)
            self.stop_deadline = None

    def kill_all(self) -> None:
        """Last resort on the way out: nothing we spawned may outlive us."""
        for worker in self.workers.values():
            _signal(worker.process, signal.SIGKILL)
        for worker in self.workers.values():
            try:
                worker.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self.dispatcher.worker_gone(worker.pid)
        self.workers.clear()


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
