"""The limits a supervisor holds its workers to: harakiri, overrun retirements, recycling.

Each pass of the supervisor's loop hands the live workers and the current
configuration to `Limits`; it marks and signals workers, counts what it did,
and never spawns or reaps (the supervisor does that when they exit).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable

from fleet.config import HandlerConfig
from fleet.dispatch.dispatcher import Dispatcher
from fleet.supervisor.figures import Counters
from fleet.supervisor.process import WorkerProcess

log = logging.getLogger("fleet.supervisor")

# Harakiri: the stuck worker gets no new request and its other threads finish
# what they hold, for at most this long, before SIGKILL...
HARAKIRI_GRACE = 3.0
# An ASGI worker cancels a request stuck past --harakiri itself and answers 504;
# the master kills it only when its loop could not (blocked in synchronous code),
# this many times --harakiri after the request started.
ASGI_HARAKIRI_BACKSTOP = 2.0
# ...and once they have, their last replies get this long to leave the worker:
# a reply still queued in its ZeroMQ socket dies with the process, and that
# client would wait forever (its request was reported done).
REPLY_FLUSH = 0.3


class Limits:
    def __init__(self, dispatcher: Dispatcher, counters: Counters) -> None:
        self.dispatcher = dispatcher
        self.counters = counters

    def enforce(self, workers: Iterable[WorkerProcess], config: HandlerConfig, now: float) -> None:
        """Harakiri for stuck workers, SIGKILL for retirements that overran."""
        for worker in workers:
            if worker.retire_deadline is not None and now >= worker.retire_deadline and not worker.harakiri:
                log.warning("worker %d still busy %.0f s after it was asked to retire: SIGKILL",
                            worker.pid, config.graceful_timeout)
                worker.harakiri = worker.killed = True  # its clients get 504: they waited past the grace period
                worker.signal(signal.SIGKILL)
            if worker.harakiri:
                if not worker.killed:
                    self._finish_harakiri(worker, config, now)
                continue
            if not config.harakiri:
                continue
            limit = config.harakiri * (ASGI_HARAKIRI_BACKSTOP if config.interface == "asgi" else 1)
            age = self.dispatcher.oldest_request_age(worker.pid)
            if age is not None and age >= limit:
                log.error("harakiri: worker %d held a request for %.1f s (limit %.0f s): "
                          "its other requests finish, then SIGKILL", worker.pid, age, limit)
                worker.harakiri = True
                worker.harakiri_at = now
                self.counters.harakiri_kills += 1
                self.dispatcher.retire_worker(worker.pid)
                self._finish_harakiri(worker, config, now)

    def _finish_harakiri(self, worker: WorkerProcess, config: HandlerConfig, now: float) -> None:
        """SIGKILL once only the stuck threads hold requests (and their
        neighbours' replies had time to leave), or when the grace is over."""
        if self.dispatcher.busy_threads(worker.pid, stuck_after=config.harakiri):
            worker.quiet_since = None
        elif worker.quiet_since is None:
            worker.quiet_since = now
        flushed = worker.quiet_since is not None and now - worker.quiet_since >= REPLY_FLUSH
        if flushed or now - worker.harakiri_at >= HARAKIRI_GRACE:
            worker.killed = True
            worker.signal(signal.SIGKILL)

    def recycle(self, workers: Iterable[WorkerProcess], config: HandlerConfig) -> None:
        """Mark workers past --max-requests or --reload-on-rss for a graceful replacement."""
        for worker in workers:
            if worker.retiring or worker.replace_reason is not None or not worker.ready:
                continue
            # What the worker answered in every mode (--http and direct included), as it or the broker says.
            served = self.dispatcher.answered(worker.pid)
            if worker.max_requests and served >= worker.max_requests:
                worker.replace_reason = f"served {served} requests (--max-requests)"
                self.counters.recycled_max_requests += 1
            elif config.reload_on_rss:
                rss = worker.rss()
                if rss is not None and rss > config.reload_on_rss * 1024 * 1024:
                    worker.replace_reason = f"RSS {rss / 1048576:.0f} MB over --reload-on-rss"
                    self.counters.recycled_rss += 1
            if worker.replace_reason is not None:
                log.info("recycling worker %d: %s", worker.pid, worker.replace_reason)
