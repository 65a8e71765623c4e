"""The per-host dispatcher's sockets: Mongrel2 in, worker threads out.

It alone PULLs from each Mongrel2 and hands each request to a worker thread
that asked for one (see fleet.dispatch.broker for why). Replies do not come back
through it: workers publish them straight to Mongrel2. It keeps its own XPUB
per Mongrel2 to answer, itself, the clients of a worker that crashed (502) or
requests it has to shed (503).

The loop is thin on purpose: drain each ready socket in a batch, let the
broker decide, send.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from fleet.config import Endpoint, tcp_host_port
from fleet.dispatch.broker import Assignment, BacklogFull, Broker, CreditLedger, Orphan
from fleet.dispatch.frames import CONTROL, CREDIT, DONE, DONE_LAST, READY, REQUEST, RETIRE, RETIRED, ident_pid, tagged
from fleet.dispatch.link import LinkServer
from fleet.mongrel2.codec import (
    Credits,
    Disconnect,
    ProtocolError,
    encode_close,
    encode_response,
    parse_message,
    peek_route,
)
from fleet.mongrel2.reply import Responder
from fleet.mongrel2.uploads import DONE_HEADER, UploadPolicy, discard_upload
from fleet.wsgi.response import error_response

log = logging.getLogger("fleet.dispatcher")

# Only the first request of a flow-controlled connection carries this header.
_FLOW_CONTROL = b"DOWNLOAD_CREDITS"
# Mongrel2 lower-cases header names, so this is how every upload-done message spells it.
_UPLOAD_DONE = DONE_HEADER.encode()
# Messages taken from one socket before looking at the others, so neither
# Mongrel2 nor the workers can starve each other.
BATCH = 256
# A graceful detach waits at most this long for Mongrel2 to drop its connections to us.
DETACH_WAIT = 1.0


class Dispatcher:
    def __init__(
        self,
        context: zmq.Context,
        endpoints: tuple[Endpoint, ...],
        bind: str,
        *,
        pull_from_mongrel2: bool,
        on_ready: Callable[[int, str | None], None],
        upload_policy: UploadPolicy | None = None,
    ) -> None:
        self.broker = Broker(time.monotonic)
        # Where this host's Mongrel2 writes uploads: the files of requests we
        # answer ourselves are ours to delete. The supervisor keeps it current.
        self.upload_policy = upload_policy
        self.credits = CreditLedger()
        self.on_ready = on_ready
        self.links = LinkServer(bind)  # a Unix socket path
        self._inbox: list[tuple[bytes, list[bytes] | None]] = []
        self.pulls: list[zmq.Socket] = []
        self.pull_specs: list[str] = []
        # Per PULL: a monitor telling the fds of its connections to Mongrel2, for detach().
        self.monitors: list[zmq.Socket] = []
        self.connections: list[set[int]] = []
        if pull_from_mongrel2:
            for endpoint in endpoints:
                pull = context.socket(zmq.PULL)
                pull.setsockopt(zmq.LINGER, 0)
                self.monitors.append(pull.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED))
                self.connections.append(set())
                pull.connect(endpoint.send_spec)
                self.pulls.append(pull)
                self.pull_specs.append(endpoint.send_spec)
        self.responders = [Responder(context, e.recv_spec) for e in endpoints]
        self.accepting = True

    def register(self, poller: zmq.Poller) -> None:
        poller.register(self.links.fileno(), zmq.POLLIN)
        for pull in self.pulls:
            poller.register(pull, zmq.POLLIN)

    def pump(self) -> int:
        """Take what is waiting on every socket, a batch each; returns how many.

        Called without polling first while traffic flows: a poll per message
        cost a quarter of the dispatcher's time."""
        handled = self._from_workers()
        for index, pull in enumerate(self.pulls):
            handled += self._from_mongrel2(index, pull)
        self.links.flush()
        return handled

    # -- Mongrel2 -> workers ----------------------------------------------

    def _from_mongrel2(self, index: int, pull: zmq.Socket) -> int:
        broker = self.broker
        for count in range(BATCH):
            try:
                raw = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return count
            try:
                sender, conn_id, is_control = peek_route(raw)
            except ProtocolError as error:
                log.warning("dropped a malformed message from Mongrel2 %d: %s", index, error)
                continue
            if is_control:
                self._control(index, conn_id, raw)
                continue
            if _FLOW_CONTROL in raw:
                self._open_credits(index, raw)
            if not self.accepting:
                self.answer([Orphan(index, sender, conn_id, raw=raw)], 503)
                continue
            try:
                assignment = broker.request(index, sender, conn_id, raw)
            except BacklogFull as full:
                log.warning("all workers busy and %d requests waiting: answering 503", broker.backlog)
                self.answer([full.orphan], 503)
                continue
            if assignment is not None:
                self._send(assignment)
        return BATCH

    def _control(self, index: int, conn_id: bytes, raw: bytes) -> None:
        """Account flow-control credits, then pass the message to the thread
        serving that connection, if any (it may be streaming to it)."""
        key = (index, conn_id)
        if key in self.credits.balance:
            try:
                event = parse_message(raw)
            except ProtocolError as error:
                log.warning("dropped a malformed control message from Mongrel2 %d: %s", index, error)
                return
            if isinstance(event, Credits):
                self.credits.granted(key, event.credits)
            elif isinstance(event, Disconnect):
                self.credits.forget(key)
        holder = self.broker.holder_of(index, conn_id)
        if holder is not None:
            self._send(Assignment(holder, index, conn_id, raw), CONTROL)

    def _open_credits(self, index: int, raw: bytes) -> None:
        try:
            request = parse_message(raw)
        except ProtocolError:
            return  # the worker logs it
        credits = getattr(request, "download_credits", None)
        if credits is not None:
            self.credits.opened((index, request.conn_id), credits)

    def _send(self, assignment: Assignment, kind: bytes = REQUEST) -> None:
        frames = [tagged(kind, assignment.index), assignment.raw]
        if kind == REQUEST:
            balance = self.credits.get((assignment.index, assignment.conn_id))
            if balance is not None:
                frames.append(b"%d" % balance)
        if not self.links.send(assignment.ident, frames) and kind == REQUEST:
            self.broker.unreachable(assignment)

    # -- workers -> dispatcher ---------------------------------------------

    def _from_workers(self) -> int:
        broker = self.broker
        inbox = self._inbox
        self.links.receive(inbox)
        count = len(inbox)
        for ident, frames in inbox:
            if frames is None:
                # The thread's link closed: it exited, or its process died (whose
                # requests get their 502 when the supervisor reaps it).
                broker.retire(ident)
                continue
            head = frames[0]
            kind = head[:1]
            if kind == DONE or kind == DONE_LAST:
                if len(frames) > 2:  # a flow-controlled response: bytes sent, "c" if closed
                    report = frames[2]
                    self.credits.spent((head[1], frames[1]), int(report.rstrip(b"c")), report.endswith(b"c"))
                assignments = broker.done(ident, head[1], frames[1], credit=kind == DONE)
            elif kind == CREDIT:
                assignments = broker.credit(ident, ident_pid(ident), int(frames[1]))
            elif kind == RETIRE:
                broker.retire(ident)
                self._reply(ident, RETIRED)
                continue
            elif kind == READY:
                version = frames[1].decode("utf-8", "replace") if len(frames) > 1 and frames[1] else None
                self.on_ready(ident_pid(ident), version)
                continue
            else:
                log.warning("unknown frame %r from worker thread %r", kind, ident)
                continue
            for assignment in assignments:
                self._send(assignment)
        inbox.clear()
        return count

    def _reply(self, ident: bytes, kind: bytes) -> None:
        self.links.send(ident, [kind])

    # -- answering clients ourselves ----------------------------------------

    def answer(self, orphans: list[Orphan], status: int) -> None:
        """Send a complete error response and close, for requests no worker will answer."""
        body = error_response(status)
        for orphan in orphans:
            responder = self.responders[orphan.index]
            responder.send(encode_response(orphan.sender, [orphan.conn_id], body))
            responder.send(encode_close(orphan.sender, [orphan.conn_id]))
        self.discard_uploads(orphans)

    def discard_uploads(self, orphans: list[Orphan]) -> None:
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

    def worker_gone(self, pid: int, timed_out_after: float = 0.0) -> tuple[int, int]:
        """Answer what a dead worker held: 504 for a request it was running for
        longer than ``timed_out_after`` (harakiri), 502 for the rest (those that
        waited behind it did not time out). Returns (502s, 504s)."""
        orphans = self.broker.worker_gone(pid)
        late = [o for o in orphans if timed_out_after and o.running and o.age >= timed_out_after]
        rest = [o for o in orphans if o not in late and not o.behind]
        self.answer(late, 504)
        self.answer(rest, 502)
        self.discard_uploads([o for o in orphans if o.behind])
        return len(rest), len(late)

    def watch_connections(self) -> None:
        """Follow the monitors' events; called once a tick, so their queues stay
        short (libzmq's I/O thread would block on a full one)."""
        for monitor, fds in zip(self.monitors, self.connections):
            while True:
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if event["event"] == zmq.EVENT_CONNECTED:
                    fds.add(event["value"])
                else:
                    fds.discard(event["value"])

    def detach(self) -> None:
        """Stop taking work from Mongrel2, so it sends new requests to other
        handlers (or holds them for the next one to connect) instead of to a
        host that is going away; what is already on its way to us is served.

        A disconnect() drops what is still on the way (in Mongrel2's queue for
        us, in the TCP buffers, in our own pipe), and Mongrel2 goes on sending
        us our round-robin share until it sees us gone. So first we shut down
        our sending side of each connection: Mongrel2 reads EOF and drops us
        from its round-robin, while what it already wrote still reaches us.
        Once libzmq reports the connection closed it has handed us all of it;
        then we disconnect, before it reconnects (100 ms later at the soonest).
        What Mongrel2 queued for us but had not written yet is still lost:
        bench/experiments/detach.py measured about a fifth of the loss of
        taking what is there and disconnecting at once."""
        self.watch_connections()
        closing = [set(fds) for fds in self.connections]
        for fds, spec in zip(closing, self.pull_specs):
            for fd in fds:
                _shut_down_sending(fd, spec)
        poller = zmq.Poller()
        self.register(poller)
        for monitor in self.monitors:
            poller.register(monitor, zmq.POLLIN)
        deadline = time.monotonic() + DETACH_WAIT
        while any(c & fds for c, fds in zip(closing, self.connections)) and time.monotonic() < deadline:
            if not self.pump():
                poller.poll(10)
            self.watch_connections()
        while self.pump():
            pass
        for pull, spec in zip(self.pulls, self.pull_specs):
            try:
                pull.disconnect(spec)
            except zmq.ZMQError:
                pass

    def stop_accepting(self) -> None:
        """Shutting down: what waits and whatever arrives now gets a 503."""
        self.accepting = False
        waiting = self.broker.take_waiting()
        if waiting:
            self.answer(waiting, 503)

    def close(self) -> None:
        for pull in self.pulls:
            pull.close()
        for monitor in self.monitors:
            monitor.close()
        self.links.close()
        for responder in self.responders:
            responder.close()


def _shut_down_sending(fd: int, spec: str) -> None:
    """shutdown(SHUT_WR) on a connection libzmq owns (through a duplicate of its fd),
    if the fd still is that connection: libzmq may have closed it and the
    number been reused since the monitor told us."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.type != socket.SOCK_STREAM or _tcp_address(spec) not in (None, sock.getpeername()[:2]):
                return
            sock.shutdown(socket.SHUT_WR)
    except OSError as error:
        log.warning("could not shut down the connection to Mongrel2 at %s: %s", spec, error)


def _tcp_address(spec: str) -> tuple[str, int] | None:
    """(host, port) of a tcp://HOST:PORT spec with a numeric IPv4 host, else None (not checked)."""
    address = tcp_host_port(spec)
    if address is None:
        return None
    try:
        socket.inet_aton(address[0])
    except OSError:
        return None
    return address
