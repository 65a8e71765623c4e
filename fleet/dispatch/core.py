"""The dispatcher's hot loop in pure Python: the reference for its C twin (_core.c).

A core owns what every request crosses: the Mongrel2 connections once they
are open (raw ZMTP frames in), the worker threads' links, and the broker's
tables; it runs one epoll loop on the dispatcher's thread. Everything else
is its ``glue`` (fleet.dispatch.dispatcher.Dispatcher): connecting to
Mongrel2, answering clients, logging, parsing the rare message that needs it.

Both cores have this interface and pass the same tests
(tests/unit/test_dispatch_core.py):

    Core(link_path, endpoints, glue, pack_within=PACK_WITHIN, pack_pause=PACK_PAUSE)
    attach(index, fd, rest)     read Mongrel2 ``index`` from this open fd (now the core's)
    shut_down_sending(index)    half-close it: Mongrel2 stops giving us work
    close_endpoint(index), endpoint_open(index)
    watch(fd, writable) / unwatch(fd)    a foreign fd: glue.on_fd(fd) when ready
    run() / stop()              the loop, until stop() (from any thread)
    run_once(timeout) -> int    one pass: wait, handle; events handled (-1: stopped)
    worker_started(pid), worker_gone(pid) -> [orphan], retire_worker(pid),
    served(pid), total_served(), busy_threads(pid, stuck_after),
    oldest_request_age(pid), backlog, take_waiting() -> [orphan], accepting

An orphan is a tuple (index, sender, conn_id, age, running, behind, raw).
The glue's callbacks run on the loop's thread with the core's lock held:
on_rejected(index, raw, reason), on_lost(index), on_ready(pid, version), on_figures(pid, payload),
answer(orphans, status), request_credits(index, raw) -> int | None,
control_event(index, raw) -> ("credits", n) | ("disconnect",) | None,
on_fd(fd), on_tick(now), on_unknown(ident, kind).
Every method takes the lock, which is reentrant: a callback may call them.
"""

from __future__ import annotations

import logging
import math
import os
import select
import socket
import threading
import time

from fleet.dispatch.broker import PACK_PAUSE, PACK_WITHIN, Assignment, BacklogFull, Broker, CreditLedger, Orphan
from fleet.dispatch.frames import (
    CONTROL,
    CREDIT,
    DONE,
    DONE_LAST,
    FIGURES,
    GIVE_BACK,
    READY,
    REQUEST,
    RETIRE,
    RETIRED,
    STREAM,
    ident_pid,
    tagged,
)
from fleet.dispatch.link import LinkServer
from fleet.mongrel2.codec import ProtocolError, peek_route
from fleet.mongrel2.zmtp import FrameReader, ZmtpError

log = logging.getLogger("fleet.dispatcher")

# Only the first request of a flow-controlled connection carries this header.
FLOW_CONTROL = b"DOWNLOAD_CREDITS"
# The loop wakes at least this often (seconds), for the glue's timers...
TICK = 0.05
# ...and calls glue.on_tick at most this often.
GLUE_TICK = 0.01
RECV_SIZE = 1 << 16


def orphan_tuple(orphan: Orphan) -> tuple:
    return (orphan.index, orphan.sender, orphan.conn_id, orphan.age, orphan.running, orphan.behind, orphan.raw)


class _Endpoint:
    __slots__ = ("sock", "fd", "reader")

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.fd = fd
        self.reader = FrameReader()


class Core:
    def __init__(self, link_path: str, endpoints: int, glue, pack_within: float = PACK_WITHIN,
                 pack_pause: float = PACK_PAUSE) -> None:
        self.glue = glue
        self.lock = threading.RLock()
        self.broker = Broker(time.monotonic, pack_within, pack_pause)
        self.credits = CreditLedger()
        self.links = LinkServer(link_path)
        self.epoll = select.epoll()
        self.endpoints: list[_Endpoint | None] = [None] * endpoints
        self.by_fd: dict[int, int] = {}  # Mongrel2 fd -> endpoint index
        self.watched: set[int] = set()
        self.accepting = True
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._ticked_at = 0.0
        self._inbox: list[tuple[bytes, list[bytes] | None]] = []
        self._arrived: list[bytes] = []
        self.epoll.register(self.links.fileno(), select.EPOLLIN)
        self.epoll.register(self._wake, select.EPOLLIN)

    # -- connections -----------------------------------------------------------------

    def attach(self, index: int, fd: int, rest: bytes) -> None:
        with self.lock:
            self.close_endpoint(index)
            self.broker.forget_closed(index)
            self.endpoints[index] = _Endpoint(fd)
            self.by_fd[fd] = index
            self.epoll.register(fd, select.EPOLLIN)
            if rest:
                self._feed(index, rest)

    def shut_down_sending(self, index: int) -> None:
        with self.lock:
            endpoint = self.endpoints[index]
            if endpoint is not None:
                try:
                    endpoint.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def endpoint_open(self, index: int) -> bool:
        return self.endpoints[index] is not None

    def close_endpoint(self, index: int) -> None:
        with self.lock:
            endpoint = self.endpoints[index]
            if endpoint is None:
                return
            self.endpoints[index] = None
            del self.by_fd[endpoint.fd]
            try:
                self.epoll.unregister(endpoint.fd)
            except OSError:
                pass
            endpoint.sock.close()

    def watch(self, fd: int, writable: bool) -> None:
        with self.lock:
            mask = select.EPOLLOUT if writable else select.EPOLLIN
            if fd in self.watched:
                self.epoll.modify(fd, mask)
            else:
                self.epoll.register(fd, mask)
                self.watched.add(fd)

    def unwatch(self, fd: int) -> None:
        with self.lock:
            if fd in self.watched:
                self.watched.discard(fd)
                try:
                    self.epoll.unregister(fd)
                except OSError:
                    pass

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        while self.run_once(TICK) >= 0:
            pass

    def run_once(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds, handle what came; the number of
        events handled, -1 once stop() was called."""
        events = self.epoll.poll(timeout)
        with self.lock:
            if self._stopping:
                return -1
            try:
                self._pump(events)
            except Exception:  # a bug must not stop the loop: every request would hang
                log.exception("dispatcher: internal error; the loop goes on")
            now = time.monotonic()
            if now - self._ticked_at >= GLUE_TICK:
                self._ticked_at = now
                self.glue.on_tick(now)
        return len(events)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        with self.lock:
            for index in range(len(self.endpoints)):
                self.close_endpoint(index)
            self.links.close()
            self.epoll.close()
            os.close(self._wake)

    def _pump(self, events: list[tuple[int, int]]) -> None:
        links_fd = self.links.fileno()
        if any(fd == links_fd for fd, _ in events):  # DONEs first: they free the threads new requests need
            self._from_workers()
        for fd, _ in events:
            if fd == links_fd:
                continue
            if fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
            elif fd in self.by_fd:
                self._read(self.by_fd[fd])
            elif fd in self.watched:
                self.glue.on_fd(fd)
        self.links.flush()
        dropped = self.broker.take_dropped()
        if dropped:
            self.glue.dropped([orphan_tuple(orphan) for orphan in dropped])

    # -- Mongrel2 -> workers -------------------------------------------------------------

    def _read(self, index: int) -> None:
        endpoint = self.endpoints[index]
        try:
            data = endpoint.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close_endpoint(index)
            self.glue.on_lost(index)
            return
        self._feed(index, data)

    def _feed(self, index: int, data: bytes) -> None:
        arrived = self._arrived
        reader = self.endpoints[index].reader
        dropped = reader.multipart_dropped
        try:
            reader.feed(data, arrived)
        except ZmtpError as error:
            self.glue.on_rejected(index, b"", f"broken ZMTP stream ({error})")
            self.close_endpoint(index)
            self.glue.on_lost(index)
        if reader.multipart_dropped != dropped:
            self.glue.on_rejected(index, b"", "a multi-part message (Mongrel2 sends single frames)")
        for raw in arrived:
            self._from_mongrel2(index, raw)
        arrived.clear()

    def _from_mongrel2(self, index: int, raw: bytes) -> None:
        try:
            sender, conn_id, is_control = peek_route(raw)
        except ProtocolError as error:
            self.glue.on_rejected(index, raw, str(error))
            return
        if is_control:
            self._control(index, conn_id, raw)
            return
        if FLOW_CONTROL in raw:
            credits = self.glue.request_credits(index, raw)
            if credits is not None:
                self.credits.opened((index, conn_id), credits)
        if not self.accepting:
            self.glue.answer([(index, sender, conn_id, 0.0, False, False, raw)], 503)
            return
        try:
            assignment = self.broker.request(index, sender, conn_id, raw)
        except BacklogFull as full:
            self.glue.answer([orphan_tuple(full.orphan)], 503)
            return
        if assignment is not None:
            self._send(assignment)

    def _control(self, index: int, conn_id: bytes, raw: bytes) -> None:
        """Account flow-control credits, then pass the message to the thread
        serving that connection, if any (it may be streaming to it)."""
        key = (index, conn_id)
        if key in self.credits.balance:
            event = self.glue.control_event(index, raw)
            if event is None:
                return  # malformed: the glue said why
            if event[0] == "credits":
                self.credits.granted(key, event[1])
            elif event[0] == "disconnect":
                self.credits.forget(key)
        holder = self.broker.holder_of(index, conn_id)
        if holder is not None:
            self._send(Assignment(holder, index, conn_id, raw), CONTROL)

    def _send(self, assignment: Assignment, kind: bytes = REQUEST) -> None:
        if assignment.forward:
            kind = CONTROL  # a stream's message: no credit, no DONE, the holder routes it
        frames = [tagged(kind, assignment.index), assignment.raw]
        if kind == REQUEST:
            balance = self.credits.get((assignment.index, assignment.conn_id))
            if balance is not None:
                frames.append(b"%d" % balance)
        if not self.links.send(assignment.ident, frames) and kind == REQUEST:
            self.broker.unreachable(assignment)

    # -- workers -> dispatcher -------------------------------------------------------------

    def _from_workers(self) -> None:
        broker = self.broker
        inbox = self._inbox
        self.links.receive(inbox)
        for ident, frames in inbox:
            if frames is None:
                # The thread's link closed: it exited, or its process died (whose
                # requests get their 502 when the supervisor reaps it).
                broker.retire(ident)
                continue
            head = frames[0]
            kind = head[:1]
            if kind == DONE or kind == DONE_LAST:
                closed = False
                if len(frames) > 2:  # bytes sent (a flow-controlled response), "c" if it closed the connection
                    report = frames[2]
                    closed = report.endswith(b"c")
                    self.credits.spent((head[1], frames[1]), int(report.rstrip(b"c") or 0), closed)
                assignments = broker.done(ident, head[1], frames[1], credit=kind == DONE, closed=closed)
            elif kind == CREDIT:
                assignments = broker.credit(ident, ident_pid(ident), int(frames[1]))
            elif kind == GIVE_BACK and len(frames) > 1:
                assignments = broker.give_back(ident, head[1], frames[1])
            elif kind == STREAM and len(frames) > 1:
                assignments = broker.stream(ident, head[1], frames[1])
            elif kind == RETIRE:
                broker.retire(ident)
                self.links.send(ident, [RETIRED])
                continue
            elif kind == READY:
                version = frames[1].decode("utf-8", "replace") if len(frames) > 1 and frames[1] else None
                self.glue.on_ready(ident_pid(ident), version)
                continue
            elif kind == FIGURES and len(frames) > 1:
                self.glue.on_figures(ident_pid(ident), frames[1])
                continue
            else:
                self.glue.on_unknown(ident, kind)
                continue
            for assignment in assignments:
                self._send(assignment)
        inbox.clear()

    # -- the supervisor's questions ------------------------------------------------------

    def worker_started(self, pid: int) -> None:
        with self.lock:
            self.broker.worker_started(pid)

    def worker_gone(self, pid: int) -> list[tuple]:
        with self.lock:
            return [orphan_tuple(o) for o in self.broker.worker_gone(pid)]

    def retire_worker(self, pid: int) -> None:
        with self.lock:
            self.broker.retire_worker(pid)

    def served(self, pid: int) -> int | None:
        with self.lock:
            counters = self.broker.counters.get(pid)
            return counters.served if counters is not None else None

    def total_served(self) -> int:
        with self.lock:
            return sum(c.served for c in self.broker.counters.values())

    def busy_threads(self, pid: int, stuck_after: float = math.inf) -> int:
        with self.lock:
            return self.broker.busy_threads(pid, stuck_after)

    def oldest_request_age(self, pid: int) -> float | None:
        with self.lock:
            return self.broker.oldest_request_age(pid)

    @property
    def backlog(self) -> int:
        with self.lock:
            return self.broker.backlog

    def take_waiting(self) -> list[tuple]:
        with self.lock:
            return [orphan_tuple(o) for o in self.broker.take_waiting()]

