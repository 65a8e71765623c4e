"""The per-host supervisor (gunicorn's arbiter): spawn, watch, respawn and stop workers.

One loop on the main thread. Signal handlers only queue the signal; the loop
acts on it. The dispatcher runs on a thread of its own (fleet.dispatch.dispatcher),
so supervision is never on a request's path; when a worker dies, the pass
that reaps it has the dispatcher answer the requests it held (502).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable

import psutil
import zmq

from fleet import native
from fleet.cluster.agent import ClusterAgent, HostStatus
from fleet.config import ConfigError, HandlerConfig, HttpAddress
from fleet.dispatch.dispatcher import Dispatcher
from fleet.exitcodes import APP_LOAD_FAILED, OK, RESTART
from fleet.http.front import listen
from fleet.logs.local import reopen_log_file, setup_logging
from fleet.mongrel2.uploads import UploadPolicy
from fleet.supervisor.figures import Counters, StatsEndpoint, host_figures, master_figures
from fleet.supervisor.limits import Limits
from fleet.supervisor.metrics import MetricsEndpoint
from fleet.supervisor.process import WorkerProcess, describe_exit
from fleet.supervisor.rollout import Rollout
from fleet.supervisor.signals import SignalQueue
from fleet.supervisor.spawner import Spawner
from fleet.supervisor.systemd import Notifier, activated_socket
from fleet.worker.spec import WorkerSpec

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
# Memory and CPU figures are read this often (psutil costs ~0.1 ms a worker).
SAMPLE_INTERVAL = 1.0

HANDLED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1,
)


def listen_all(config: HandlerConfig) -> list[socket.socket]:
    """The --http sockets, or one clear line saying why one cannot be had."""
    listeners: list[socket.socket] = []
    for address in config.http_addresses:
        activated = activated_socket(address.host, address.port)  # systemd's (socket activation), if any
        if activated is not None:
            listeners.append(activated)
            continue
        try:
            listeners.append(listen(address))
        except OSError as error:
            for listener in listeners:
                listener.close()
            raise ConfigError(f"--http {address}: cannot listen there: {error.strerror or error}") from None
    return listeners


class Supervisor:
    def __init__(
        self,
        config: HandlerConfig,
        *,
        log_level: str = "info",
        stats_endpoint: str | None = None,
        metrics: HttpAddress | None = None,
        log_file: str | None = None,
        cluster: ClusterAgent | None = None,
        cluster_generation: int = 1,
        adapt_config: Callable[[HandlerConfig], HandlerConfig] = lambda config: config,
    ) -> None:
        self.config = config
        # Bound once here and inherited by every worker: a reload never refuses a connection.
        self.http_listeners = listen_all(config)
        self.log_file = log_file
        self.log_level = log_level
        self.cluster = cluster
        self.rollout = Rollout(cluster, self, cluster_generation, adapt_config) if cluster is not None else None
        self.target = config.processes
        self.generation = 1
        self.reloading: int | None = None  # the generation a reload is moving to
        self.workers: dict[int, WorkerProcess] = {}
        self.signals: SignalQueue | None = None  # from run() on
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
            config.endpoints,
            f"{self.runtime_dir}/dispatch",
            pull_from_mongrel2=config.dispatch == "broker",
            upload_policy=UploadPolicy.of(config),
        )
        self.limits = Limits(self.dispatcher, self.counters)
        self.stats_endpoint = StatsEndpoint(self.context, stats_endpoint, self.stats) if stats_endpoint else None
        self.metrics = MetricsEndpoint(metrics) if metrics is not None else None
        self.notifier = Notifier()  # systemd's Type=notify, when it runs us
        self.spec = self.worker_spec(config)
        self.spawner: Spawner | None = None  # from run() on
        self._polled_spawner_fd: int | None = None

    def worker_spec(self, config: HandlerConfig) -> WorkerSpec:
        return WorkerSpec(config, f"{self.runtime_dir}/dispatch", os.getpid(), self.log_level, self.log_file,
                          http_fds=tuple(listener.fileno() for listener in self.http_listeners))

    @property
    def stopping(self) -> bool:
        return self.stopping_since is not None

    # -- the loop ------------------------------------------------------------

    def run(self) -> int:
        poller = self._open()
        try:
            self.manage_workers()
            self._loop(poller)
        finally:
            self._close()
        log.info("master %d stopped", os.getpid())
        return self.exit_code

    def _open(self) -> zmq.Poller:
        """Signals, the dispatcher's thread and every socket the loop polls."""
        self.signals = SignalQueue(HANDLED_SIGNALS)
        self.dispatcher.start()
        # An ASGI worker is its own entry point: a WSGI worker does not import asyncio and the rest.
        entry = "fleet.asgi" if self.config.interface == "asgi" else "fleet.worker"
        self.spawner = Spawner(entry, [listener.fileno() for listener in self.http_listeners])
        poller = zmq.Poller()
        poller.register(self.signals.fileno(), zmq.POLLIN)
        poller.register(self.dispatcher.notify_fd, zmq.POLLIN)
        if self.stats_endpoint is not None:
            poller.register(self.stats_endpoint.socket, zmq.POLLIN)
        if self.cluster is not None:
            poller.register(self.cluster.fileno(), zmq.POLLIN)
        log.info(
            "master %d: %d worker(s) x %d thread(s), %s dispatch, app %s, Mongrel2 %s, HTTP %s, hot path %s",
            os.getpid(), self.config.processes, self.config.threads, self.config.dispatch,
            self.config.app, "; ".join(f"{e.send_spec},{e.recv_spec}" for e in self.config.endpoints) or "none",
            ", ".join(self.config.http) or "none", native.describe(),
        )
        return poller

    def _loop(self, poller: zmq.Poller) -> None:
        next_sample = next_pass = 0.0
        while True:
            wanted = self.wait(poller)
            now = time.monotonic()
            if not wanted and now < next_pass:
                # Only heartbeats came, and they were read: a pass for each one was most of what
                # hearing 1,000 hosts cost (bench/fake_hosts.py). The pass keeps its tick.
                continue
            next_pass = now + TICK
            sample = now >= next_sample
            if sample:
                next_sample = now + SAMPLE_INTERVAL
            if not self.supervise(sample):
                return

    def supervise(self, sample: bool) -> bool:
        """One pass of process management; False once a stop has finished."""
        self.notifier.tick(time.monotonic())  # the watchdog: this loop is alive
        self.handle_signals()
        for pid, version in self.dispatcher.take_ready():
            self._worker_ready(pid, version)
        self.reap_workers()
        if self.stats_endpoint is not None:
            self.stats_endpoint.answer()
        if self.metrics is not None and self.metrics.due(now := time.monotonic()):
            self.metrics.update(self.stats(), now)
        if self.rollout is not None:
            self.rollout.talk(time.time(), self.host_status)
        if self.stopping:
            if not self.workers:
                return False
            self.kill_late_workers()
            return True
        if sample:
            self.limits.recycle(self.workers.values(), self.config)
        self.limits.enforce(self.workers.values(), self.config, time.monotonic())
        self.manage_workers()
        return True

    def _close(self) -> None:
        self.kill_all()
        self.spawner.close()
        if self.cluster is not None and self.cluster.role == "master":
            self.cluster.leave()
        if self.stats_endpoint is not None:
            self.stats_endpoint.close()
        if self.metrics is not None:
            self.metrics.close()
        self.notifier.close()
        self.dispatcher.close()
        self.close_http()
        self.context.term()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self.signals.close()

    def wait(self, poller: zmq.Poller) -> bool:
        """Sleep until something arrives, at most a tick; False if only cluster datagrams
        came that leave the supervisor nothing to do. A cluster datagram is read at once:
        left unread, it keeps the socket readable and poll() returning straight away, a
        busy loop until the next tick (one per heartbeat heard)."""
        if self.spawner is not None:
            self._poll_spawner(poller)
        ready = dict(poller.poll(TICK * 1000))
        if self._polled_spawner_fd is not None and self._polled_spawner_fd in ready:
            self.spawner.pump()  # read at once, for the same reason
        if self.rollout is None or self.cluster.fileno() not in ready:
            return True
        now = time.time()
        return self.rollout.receive(now) or len(ready) > 1 or self.cluster.due(now)

    def _poll_spawner(self, poller: zmq.Poller) -> None:
        """Poll the fork server's socket: it says when it is ready and when a worker exits
        (those are its children, so their SIGCHLD does not wake this loop)."""
        fd = self.spawner.fileno()
        if fd != self._polled_spawner_fd:
            if self._polled_spawner_fd is not None:
                poller.unregister(self._polled_spawner_fd)
            if fd is not None:
                poller.register(fd, zmq.POLLIN)
            self._polled_spawner_fd = fd

    # -- signals ---------------------------------------------------------------

    def handle_signals(self) -> None:
        for signum in self.signals.take():
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
        if self.cluster is not None:
            self.cluster.reload_keyring()  # a key rotation step, with no restart
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
            worker.signal(signal.SIGUSR1)
        log.info("USR1: log files reopened")

    # -- reloads -------------------------------------------------------------

    def reload(self) -> None:
        """Start a new generation; its workers replace the old ones as they get ready."""
        if self.stopping:
            return
        self.generation += 1
        self.reloading = self.generation
        self.counters.reloads += 1
        self.flaps = 0
        self.respawn_at = 0.0
        batch = self.config.reload_batch or self.target
        log.info("reload: starting generation %d (%d worker(s), %d at a time)", self.generation, self.target, batch)
        self.notifier.reloading(f"reloading to generation {self.generation}")

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
        self.notifier.ready(f"reload failed; generation {self.generation} serves")
        if self.rollout is not None:
            self.rollout.reload_failed(why)

    def apply_config(self, config: HandlerConfig) -> bool:
        """Take a new configuration from the cluster for the next generation. False if it
        cannot be applied in place (other Mongrel2 endpoints, dispatch mode or --http):
        the supervisor must then be restarted with it. Another interface also needs a restart:
        the fork server has imported one kind of worker."""
        if (config.endpoints != self.config.endpoints or config.dispatch != self.config.dispatch
                or config.http != self.config.http or config.interface != self.config.interface):
            return False
        if config.logger != self.config.logger:
            setup_logging(self.log_level, self.log_file, config.logger)
        self.config = config
        self.dispatcher.upload_policy = UploadPolicy.of(config)
        self.target = config.processes
        self.spec = self.worker_spec(config)
        return True

    def restart(self) -> None:
        """Stop gracefully so that `fleet node` starts a supervisor with the new configuration."""
        self.exit_code = RESTART
        self.stop(graceful=True)

    def host_status(self) -> HostStatus:
        """What this host's heartbeats say."""
        phase = "stopping" if self.stopping else "running" if self.announced_ready else "starting"
        return host_figures(workers=list(self.workers.values()), target=self.target, phase=phase,
                            generation=self.rollout.generation if self.rollout else self.generation,
                            current_generation=self.generation, dispatcher=self.dispatcher,
                            error=self.rollout.last_error if self.rollout is not None else None)

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
        outgoing = [w for w in outgoing if not w.retiring]  # a reload completes in this pass, not the next
        if len(current) > self.target:  # TTOU: retire the oldest beyond the target
            for worker in sorted(current, key=lambda w: w.started_at)[: len(current) - self.target]:
                self.retire_worker(worker)
        starting = len(current) - len(ready)
        batch = (self.config.reload_batch or self.target) if outgoing else self.target
        wanted = min(self.target - len(current), batch - starting)
        if wanted > 0 and time.monotonic() >= self.respawn_at and self.spawner.can_spawn():
            for _ in range(wanted):
                self.spawn_worker()
        if self.reloading is not None and not outgoing and len(ready) >= self.target:
            log.info("reload complete: generation %d, %d worker(s) ready", self.generation, len(ready))
            self.notifier.ready(f"generation {self.generation}: {len(ready)} worker(s) ready")
            self.reloading = None
            if self.rollout is not None:
                self.rollout.reload_complete()

    def spawn_worker(self) -> None:
        try:
            process = self.spawner.spawn(self.spec)
        except OSError as error:
            self.respawn_at = time.monotonic() + BACKOFF_FIRST
            log.error("cannot start a worker: %s", error)
            return
        limit = 0
        if self.config.max_requests:
            limit = self.config.max_requests + random.randint(0, self.config.max_requests_jitter)
        self.dispatcher.worker_started(process.pid)
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
        worker.signal(signal.SIGTERM)

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
            self.notifier.ready(f"generation {self.generation}: {self.target} worker(s) ready")

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
            if (worker.retiring and not worker.harakiri) or self.stopping:
                log.info("worker %d exited (%s)", pid, describe_exit(code))
                continue
            answered = f"; answered {answered_502} request(s) with 502" if answered_502 else ""
            if answered_504:
                answered += f" and {answered_504} with 504"
            lifetime = time.monotonic() - worker.started_at
            log.error("worker %d died (%s) after %.1f s%s", pid, describe_exit(code), lifetime, answered)
            if not worker.harakiri:
                self._after_death(worker, code, lifetime)
                if self.stopping:
                    return

    def _after_death(self, worker: WorkerProcess, code: int, lifetime: float) -> None:
        """A worker died unasked: count it, fail a reload it was part of, stop if the
        application cannot load at all, and back off if workers keep dying young."""
        self.counters.respawns += 1
        if not worker.ready and self.reloading == worker.generation:
            self.reload_failed(f"new worker {worker.pid} {describe_exit(code)} before it was ready")
            return
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

    # -- stats -------------------------------------------------------------------

    def stats(self) -> dict:
        return master_figures(pid=os.getpid(), generation=self.generation, workers=list(self.workers.values()),
                              dispatcher=self.dispatcher, threads=self.config.threads, counters=self.counters,
                              cluster=self.cluster.counters() if self.cluster is not None else None)

    # -- stopping ----------------------------------------------------------------

    def stop(self, graceful: bool) -> None:
        if self.stopping and graceful:
            return
        now = time.monotonic()
        self.stopping_since = now
        self.notifier.stopping("stopping: the workers finish their requests" if graceful else "stopping")
        self.close_http()  # the workers finish what they accepted; no new connections
        self.spawner.close_fds()
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
                worker.signal(signal.SIGQUIT)

    def close_http(self) -> None:
        for listener in self.http_listeners:
            listener.close()
        self.http_listeners = []

    def retire_all_after_detach(self) -> None:
        now = time.monotonic()
        if self.retire_at is None:
            return
        if now < self.retire_at and (self.dispatcher.backlog or now - self.stopping_since < TICK):
            return
        self.retire_at = None
        self.dispatcher.stop_accepting()
        self.stop_deadline = now + self.config.graceful_timeout
        for worker in self.workers.values():
            if self.config.interface == "asgi":
                # Detached, this host gets no more frames of its WebSockets through Mongrel2:
                # they are closed now (1001), so their clients reconnect to a host that does.
                worker.signal(signal.SIGUSR2)
            self.retire_worker(worker)

    def kill_late_workers(self) -> None:
        self.retire_all_after_detach()
        if self.stop_deadline is not None and time.monotonic() >= self.stop_deadline:
            for worker in self.workers.values():
                log.warning("worker %d did not stop in time: SIGKILL", worker.pid)
                worker.signal(signal.SIGKILL)
            self.stop_deadline = None

    def kill_all(self) -> None:
        """Last resort on the way out: nothing we spawned may outlive us."""
        for worker in self.workers.values():
            worker.signal(signal.SIGKILL)
        for worker in self.workers.values():
            try:
                worker.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self.dispatcher.worker_gone(worker.pid)
        self.workers.clear()
