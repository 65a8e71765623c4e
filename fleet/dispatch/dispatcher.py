"""The per-host dispatcher: Mongrel2 in, worker threads out, on a thread of its own.

It alone PULLs from each Mongrel2 and hands each request to a worker thread
that asked for one (see fleet.dispatch.broker for why). Replies do not come
back through it: workers send them straight to Mongrel2. It keeps its own
reply connection per Mongrel2 to answer, itself, the clients of a worker that
crashed (502) or requests it has to shed (503).

It runs on its own thread, so supervision never sits between a request and
its worker. What every request crosses is the core's (fleet.dispatch.core, or
its compiled twin): the open Mongrel2 connections, the worker links, the
broker. This module is the rest, the core's glue: connecting to Mongrel2,
detaching from it, answering clients ourselves, logging, parsing the rare
message that needs it, and the supervisor's questions. A worker's READY
comes back to the supervisor as an event it collects with ``take_ready``
when ``notify_fd`` is readable.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter, deque

import msgpack

from fleet.config import Endpoint
from fleet.dispatch import core as pure_core
from fleet.dispatch.broker import Orphan
from fleet.mongrel2.codec import Credits, Disconnect, ProtocolError, encode_close, encode_response, parse_message
from fleet.mongrel2.connection import Publisher, Puller
from fleet.mongrel2.uploads import DONE_HEADER, UploadPolicy, discard_upload
from fleet.native import twin
from fleet.worker.tally import Totals, valid_vector
from fleet.wsgi.response import error_response

# The dispatcher's hot loop: compiled when built (fleet/dispatch/_core.c), else the reference.
Core = twin("fleet.dispatch._core", "Core", pure_core.Core)

log = logging.getLogger("fleet.dispatcher")

# Mongrel2 lower-cases header names, so this is how every upload-done message spells it.
_UPLOAD_DONE = DONE_HEADER.encode()
# A graceful detach waits at most this long for Mongrel2 to drop its connections to us.
DETACH_WAIT = 1.0
# How long start() waits for the reply connections to Mongrel2.
CONNECT_WAIT = 1.0


class Dispatcher:
    def __init__(
        self,
        endpoints: tuple[Endpoint, ...],
        bind: str,
        *,
        pull_from_mongrel2: bool,
        upload_policy: UploadPolicy | None = None,
    ) -> None:
        # Where this host's Mongrel2 writes uploads: the files of requests we
        # answer ourselves are ours to delete. The supervisor keeps it current.
        self.upload_policy = upload_policy
        self.core = Core(bind, len(endpoints), self)
        self.pullers = [Puller(e.send_spec, hand_over=True) for e in endpoints] if pull_from_mongrel2 else []
        self.watched: dict[int, int] = {}  # fd of a connecting puller -> its index
        self.publishers = [Publisher(e.recv_spec) for e in endpoints]
        self.ready_workers: deque[tuple[int, str | None]] = deque()
        self.served_figures = Totals()  # what the workers say they served (their FIGURES)
        self.answered_by_us: Counter[int] = Counter()  # error answers we gave ourselves, by status
        self.notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._detach_until: float | None = None
        self.detached = threading.Event()
        self._thread = threading.Thread(target=self.core.run, name="dispatcher", daemon=True)

    # -- the supervisor's side -------------------------------------------------

    def start(self) -> None:
        """Connect the reply connections (up to CONNECT_WAIT), then run the loop."""
        for publisher in self.publishers:
            publisher.wait_connected(CONNECT_WAIT)
        self._thread.start()

    def take_ready(self) -> list[tuple[int, str | None]]:
        """(pid, app version) of the workers that said READY since the last call."""
        try:
            os.eventfd_read(self.notify_fd)
        except BlockingIOError:
            pass
        with self.core.lock:
            ready = list(self.ready_workers)
            self.ready_workers.clear()
        return ready

    def worker_started(self, pid: int) -> None:
        self.core.worker_started(pid)
        with self.core.lock:
            self.served_figures.started(pid)

    def worker_gone(self, pid: int, timed_out_after: float = 0.0) -> tuple[int, int]:
        """Answer what a dead worker held: 504 for a request it was running for
        longer than ``timed_out_after`` (harakiri), 502 for the rest (those that
        waited behind it did not time out). Returns (502s, 504s)."""
        with self.core.lock:
            orphans = [Orphan(*fields) for fields in self.core.worker_gone(pid)]
            late = [o for o in orphans if timed_out_after and o.running and o.age >= timed_out_after]
            rest = [o for o in orphans if o not in late and not o.behind]
            self._answer(late, 504)
            self._answer(rest, 502)
            self._discard_uploads([o for o in orphans if o.behind])
            self.served_figures.gone(pid)
        return len(rest), len(late)

    def retire_worker(self, pid: int) -> None:
        self.core.retire_worker(pid)

    def served(self, pid: int) -> int | None:
        """Requests the worker has finished, or None if none of its threads has asked for work yet."""
        return self.core.served(pid)

    def total_served(self) -> int:
        return self.core.total_served()

    def worker_figures(self) -> tuple[list[float], dict[int, int]]:
        """The sum of what every worker has said it served (fleet.worker.tally's vector),
        and the error answers the dispatcher gave itself, by status."""
        with self.core.lock:
            return list(self.served_figures.total), dict(self.answered_by_us)

    def websockets_open(self) -> int:
        """ASGI WebSockets open in the live workers, as they last said (up to a second late)."""
        with self.core.lock:
            return self.served_figures.websockets_open()

    def answered(self, pid: int | None = None) -> int:
        """Requests answered by the worker ``pid`` (or by all, the gone included), in any mode:
        the dispatcher's own count (broker mode, at once) or the workers' (every mode, up to a
        second late), whichever is ahead."""
        with self.core.lock:
            reported = self.served_figures.requests(pid)
        return max(reported, (self.core.total_served() if pid is None else self.core.served(pid)) or 0)

    def busy_threads(self, pid: int, stuck_after: float = math.inf) -> int:
        return self.core.busy_threads(pid, stuck_after)

    def oldest_request_age(self, pid: int) -> float | None:
        return self.core.oldest_request_age(pid)

    @property
    def backlog(self) -> int:
        return self.core.backlog

    def detach(self) -> None:
        """Stop taking work from Mongrel2, so it sends new requests to other
        handlers (or holds them for the next one to connect) instead of to a
        host that is going away; what is already on its way to us is served.

        We shut down our sending side of each connection: Mongrel2 reads EOF
        and drops us from its round-robin, while what it already wrote still
        reaches us; we read until its own EOF (at most DETACH_WAIT). What
        Mongrel2 queued for us but had not written yet is still lost:
        bench/experiments/detach.py measured about a fifth of the loss of
        disconnecting at once. Returns when done."""
        with self.core.lock:
            if self._detach_until is None:
                self._detach_until = time.monotonic() + DETACH_WAIT
                for index, puller in enumerate(self.pullers):
                    puller.letting_go = True
                    self.core.shut_down_sending(index)
                    self._forget_connecting(index)
                    puller.close()
        self.detached.wait(DETACH_WAIT + 1.0)

    def stop_accepting(self) -> None:
        """Shutting down: what waits and whatever arrives now gets a 503."""
        with self.core.lock:
            self.core.accepting = False
            self._answer([Orphan(*fields) for fields in self.core.take_waiting()], 503)

    def close(self) -> None:
        self.core.stop()
        if self._thread.is_alive():
            self._thread.join(5)
        for index, puller in enumerate(self.pullers):
            self._forget_connecting(index)
            puller.close()
        self.core.close()
        for publisher in self.publishers:
            publisher.close()
        os.close(self.notify_fd)

    # -- the core's callbacks (its thread, its lock held) --------------------------

    def on_tick(self, now: float) -> None:
        """Connect to Mongrel2 where due; finish a detach."""
        if self._detach_until is not None:
            if not self.detached.is_set() and (
                    now >= self._detach_until or not any(map(self.core.endpoint_open, range(len(self.pullers))))):
                for index in range(len(self.pullers)):
                    self.core.close_endpoint(index)
                self.detached.set()
            return
        for index, puller in enumerate(self.pullers):
            if self.core.endpoint_open(index):
                continue
            if puller.sock is not None and not puller.check_timeout(now):
                self._forget_connecting(index)
            if puller.sock is None and puller.connect(now):
                self._watch(index)

    def on_fd(self, fd: int) -> None:
        """A connecting puller's socket is ready: advance its handshake."""
        index = self.watched.get(fd)
        if index is None:
            return
        puller = self.pullers[index]
        if not puller.ready([], time.monotonic()):
            self._forget_connecting(index, fd)
            return
        if puller.state == Puller.OPEN:
            self._forget_connecting(index, fd)
            self.core.attach(index, *puller.take_socket())
        else:
            self._watch(index)  # from writable (connecting) to readable (handshake)

    def on_lost(self, index: int) -> None:
        if index < len(self.pullers) and self._detach_until is None:
            self.pullers[index].lost()

    def on_ready(self, pid: int, version: str | None) -> None:
        self.ready_workers.append((pid, version))
        os.eventfd_write(self.notify_fd, 1)

    def on_figures(self, pid: int, payload: bytes) -> None:
        try:
            vector = msgpack.unpackb(payload)
        except Exception as error:  # msgpack raises several kinds; a worker is ours, so this is a bug
            vector = error
        if not valid_vector(vector):
            log.warning("dropped worker %d's figures: not what a worker sends (%.80r)", pid, vector)
            return
        self.served_figures.update(pid, vector)

    def on_rejected(self, index: int, raw: bytes, reason: str) -> None:
        log.warning("dropped a malformed message from Mongrel2 %d: %s", index, reason)

    def on_unknown(self, ident: bytes, kind: bytes) -> None:
        log.warning("unknown frame %r from worker thread %r", kind, ident)

    def request_credits(self, index: int, raw: bytes) -> int | None:
        """The download credits a flow-controlled connection opens with (its first request)."""
        try:
            request = parse_message(raw)
        except ProtocolError:
            return None  # the worker logs it
        return getattr(request, "download_credits", None)

    def control_event(self, index: int, raw: bytes) -> tuple | None:
        try:
            event = parse_message(raw)
        except ProtocolError as error:
            log.warning("dropped a malformed control message from Mongrel2 %d: %s", index, error)
            return None
        if isinstance(event, Credits):
            return ("credits", event.credits)
        if isinstance(event, Disconnect):
            return ("disconnect",)
        return ("other",)

    def answer(self, orphans: list[tuple], status: int) -> None:
        if status == 503 and self.core.accepting:
            log.warning("all workers busy and %d requests waiting: answering 503", self.core.backlog)
        self._answer([Orphan(*fields) for fields in orphans], status)

    def _watch(self, index: int) -> None:
        puller = self.pullers[index]
        fd = puller.fileno()
        self.watched[fd] = index
        self.core.watch(fd, puller.writable_wanted)

    def _forget_connecting(self, index: int, fd: int | None = None) -> None:
        for watched_fd in [f for f, i in self.watched.items() if i == index and (fd is None or f == fd)]:
            del self.watched[watched_fd]
            self.core.unwatch(watched_fd)

    # -- answering clients ourselves ----------------------------------------

    def _answer(self, orphans: list[Orphan], status: int) -> None:
        """Send a complete error response and close, for requests no worker will answer."""
        body = error_response(status)
        self.answered_by_us[status] += len(orphans)
        for orphan in orphans:
            publisher = self.publishers[orphan.index]
            publisher.send(encode_response(orphan.sender, [orphan.conn_id], body))
            publisher.send(encode_close(orphan.sender, [orphan.conn_id]))
        self._discard_uploads(orphans)

    def dropped(self, orphans: list[tuple]) -> None:
        """The core dropped messages for connections their worker had closed (such as
        the done message of an upload whose start was refused): delete their uploads."""
        dropped = [Orphan(*fields) for fields in orphans]
        for orphan in dropped:
            log.debug("dropped a message for connection %s, which its worker had closed", orphan.conn_id.decode())
        self._discard_uploads(dropped)

    def _discard_uploads(self, orphans: list[Orphan]) -> None:
        """Delete the upload files of requests no worker will serve: the worker
        that would have deleted one is gone, and Mongrel2 never does."""
        if self.upload_policy is None or self.upload_policy.chroot is None:
            return
        for orphan in orphans:
            if _UPLOAD_DONE not in orphan.raw:
                continue  # most orphans: no need to parse them (shedding 503s must stay cheap)
            try:
                request = parse_message(orphan.raw)
                path = discard_upload(request, self.upload_policy)
            except ProtocolError:
                continue  # not a request we could have served: there is no upload to it
            except OSError as error:
                log.warning("could not delete the upload of connection %s: %s", orphan.conn_id.decode(), error)
                continue
            if path is not None:
                log.info("deleted upload %s of connection %s, which no worker will serve",
                         path, orphan.conn_id.decode())
