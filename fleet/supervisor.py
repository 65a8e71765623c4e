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
import time
from dataclasses import dataclass, field

import zmq

from fleet.config import HandlerConfig
from fleet.dispatcher import Dispatcher
from fleet.exitcodes import APP_LOAD_FAILED, OK
from fleet.worker import WorkerSpec

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

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGTTIN, signal.SIGTTOU)


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    started_at: float
    ready: bool = False
    retiring: bool = False
    retired_threads: set[bytes] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.process.pid


class Supervisor:
    def __init__(self, config: HandlerConfig, *, log_level: str = "info") -> None:
        self.config = config
        self.log_level = log_level
        self.target = config.processes
        self.workers: dict[int, WorkerProcess] = {}
        self.signals: list[int] = []
        self.stopping_since: float | None = None
        self.stop_deadline: float | None = None
        self.flaps = 0
        self.respawn_at = 0.0
        self.announced_ready = False
        self.exit_code = OK
        self.runtime_dir = tempfile.mkdtemp(prefix="fleet-")
        self.context = zmq.Context()
        self.dispatcher = Dispatcher(
            self.context,
            config.endpoints,
            f"{self.runtime_dir}/dispatch",
            pull_from_mongrel2=config.dispatch == "broker",
            on_ready=self._worker_ready,
        )
        self.spec_json = WorkerSpec(config, f"{self.runtime_dir}/dispatch", os.getpid(), log_level).to_json()

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
        for responder in self.dispatcher.responders:
            responder.wait_subscribed(1.0)
        log.info(
            "master %d: %d worker(s) x %d thread(s), %s dispatch, app %s, Mongrel2 %s",
            os.getpid(), self.config.processes, self.config.threads, self.config.dispatch,
            self.config.app, "; ".join(f"{e.send_spec},{e.recv_spec}" for e in self.config.endpoints),
        )
        next_tick = 0.0
        try:
            self.manage_workers()
            busy = False
            while True:
                if not busy:  # nothing came last pass: sleep until something does
                    poller.poll(TICK * 1000)
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
                if self.stopping_since is not None:
                    if not self.workers:
                        break
                    self.kill_late_workers()
                else:
                    self.manage_workers()
        finally:
            self.kill_all()
            self.dispatcher.close()
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

    def handle_ttin(self) -> None:
        self.target += 1
        log.info("TTIN: now %d worker(s)", self.target)

    def handle_ttou(self) -> None:
        if self.target > 1:
            self.target -= 1
        log.info("TTOU: now %d worker(s)", self.target)

    # -- workers -------------------------------------------------------------

    def manage_workers(self) -> None:
        """Spawn or retire workers until the live count is the target."""
        live = [w for w in self.workers.values() if not w.retiring]
        if len(live) > self.target:
            oldest = sorted(live, key=lambda w: w.started_at)[: len(live) - self.target]
            for worker in oldest:
                self.retire_worker(worker)
        missing = self.target - len(live)
        if missing > 0 and time.monotonic() >= self.respawn_at:
            for _ in range(missing):
                self.spawn_worker()

    def spawn_worker(self) -> None:
        process = subprocess.Popen([sys.executable, "-m", "fleet.worker", self.spec_json])
        self.workers[process.pid] = WorkerProcess(process, time.monotonic())
        log.info("spawned worker %d", process.pid)

    def retire_worker(self, worker: WorkerProcess) -> None:
        worker.retiring = True
        try:
            worker.process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _worker_ready(self, pid: int) -> None:
        worker = self.workers.get(pid)
        if worker is None:
            return
        worker.ready = True
        self.flaps = 0
        log.info("worker %d ready", pid)
        if not self.announced_ready and sum(w.ready for w in self.workers.values()) >= self.target:
            self.announced_ready = True
            log.info("master ready: %d worker(s) x %d thread(s)", self.target, self.config.threads)

    def reap_workers(self) -> None:
        for pid, worker in list(self.workers.items()):
            code = worker.process.poll()
            if code is None:
                continue
            del self.workers[pid]
            orphans = self.dispatcher.worker_gone(pid)
            lifetime = time.monotonic() - worker.started_at
            if worker.retiring or self.stopping_since is not None:
                log.info("worker %d exited (%s)", pid, _describe(code))
                continue
            log.error(
                "worker %d died (%s) after %.1f s%s", pid, _describe(code), lifetime,
                f"; answered {orphans} request(s) it held with 502" if orphans else "",
            )
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

    # -- stopping ----------------------------------------------------------------

    def stop(self, graceful: bool) -> None:
        if self.stopping_since is not None and graceful:
            return
        now = time.monotonic()
        self.stopping_since = now
        self.dispatcher.stop_accepting()
        if graceful:
            self.stop_deadline = now + self.config.graceful_timeout
            log.info("graceful stop: workers finish their requests (up to %.0f s)", self.config.graceful_timeout)
            for worker in self.workers.values():
                self.retire_worker(worker)
        else:
            self.stop_deadline = now + QUICK_STOP_TIMEOUT
            log.info("quick stop")
            for worker in self.workers.values():
                worker.retiring = True
                _signal(worker.process, signal.SIGQUIT)

    def kill_late_workers(self) -> None:
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
