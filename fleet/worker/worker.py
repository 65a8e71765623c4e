"""A worker process: T threads running the WSGI app on requests from Mongrel2.

Started by the supervisor as ``python -m fleet.worker SPEC_JSON``. Everything
process-wide (signals, sockets, the app import) happens here, after the spawn.

In broker mode (the default) each thread has a Unix socket link (fleet.dispatch.link) to the host's
dispatcher and asks for requests with credits; in direct mode each thread
PULLs straight from every Mongrel2 (uWSGI's way: faster to set up, but what
Mongrel2 queued to a retiring worker is lost). Replies always go straight to
Mongrel2 through one XPUB socket per endpoint, shared by the threads.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import zmq

from fleet.dispatch import frames as wire
from fleet.appload import AppLoadError, WSGIApp, app_version, load_app
from fleet.dispatch.broker import thread_credits
from fleet.exitcodes import APP_LOAD_FAILED, BOOT_FAILED
from fleet.worker.spec import WorkerSpec
from fleet.wsgi.serve import serve
from fleet.http.front import Exchange, HttpFront, HttpLimits, SocketReply, Waiter
from fleet.wsgi.response import error_response
from fleet.dispatch.link import LinkClosed, ThreadLink
from fleet.logs.local import reopen_log_file, setup_logging
from fleet.mongrel2.codec import Event, ProtocolError, Request, parse_message, peek_route
from fleet.mongrel2.reply import ClientGone, Reply, Responder, no_control
from fleet.mongrel2.uploads import UploadGone, UploadPolicy, UploadRejected, UploadStarted, check_upload, open_upload

log = logging.getLogger("fleet.worker")

# How often a thread blocked on its socket looks at the retire flag.
POLL_INTERVAL_MS = 250
# How long a new worker waits for Mongrel2's subscription before it declares
# itself ready anyway (Mongrel2 may simply not be running yet).
SUBSCRIBE_WAIT = 5.0
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the dispatcher is told when a request is finished."""

    conn_id: bytes
    sent: int | None = None  # bytes sent, for a flow-controlled connection
    closed: bool = False


# Direct mode: the dispatcher's credit balance is not available.
_FROM_HEADER = object()


class BrokerChannel:
    """A thread's link to the dispatcher; control messages can be read mid-response."""

    def __init__(self, path: str, ident: bytes) -> None:
        self.link = ThreadLink(path, ident, POLL_INTERVAL_MS / 1000)
        self.pending: deque[list[bytes]] = deque()

    def ask(self, count: int) -> None:
        self.link.send([wire.CREDIT, b"%d" % count])

    def retire(self) -> None:
        self.link.send([wire.RETIRE])

    def done(self, index: int, outcome: Outcome, credit: bool) -> None:
        frames = [wire.tagged(wire.DONE if credit else wire.DONE_LAST, index), outcome.conn_id]
        if outcome.sent is not None:
            frames.append(b"%d%s" % (outcome.sent, b"c" if outcome.closed else b""))
        self.link.send(frames)

    def receive(self) -> list[bytes] | None:
        """The next frames for this thread, or None after POLL_INTERVAL_MS of silence."""
        if self.pending:
            return self.pending.popleft()
        return self.link.receive()

    def poll_control(self, timeout: float) -> list[Event]:
        """Read what has arrived; keep requests for later, return control events."""
        events: list[Event] = []
        if not self.link.poll(timeout):
            return events
        while (frames := self.link.take()) is not None:
            if frames[0][:1] == wire.CONTROL:
                try:
                    events.append(parse_message(frames[1]))
                except ProtocolError as error:
                    log.warning("dropped a malformed control message: %s", error)
            else:
                self.pending.append(frames)
        return events

    def close(self) -> None:
        self.link.close()


class Worker:
    def __init__(self, spec: WorkerSpec, app: WSGIApp) -> None:
        self.spec = spec
        self.config = spec.config
        self.app = app
        self.context = zmq.Context()
        self.retiring = threading.Event()
        self.policy = UploadPolicy.of(self.config)
        # One XPUB per thread and endpoint: measured 7.8 against 12.5 us of CPU
        # per reply for one socket shared behind a lock, 8 threads sending.
        self.responders: list[list[Responder]] = []
        self.threads: list[threading.Thread] = []
        self.warned_flow_control = False
        self.multithread = self.config.threads > 1
        self.multiprocess = self.config.processes > 1
        self.http: HttpFront | None = None
        if spec.http_fds:
            self.http = HttpFront(
                [socket.socket(fileno=fd) for fd in spec.http_fds],
                HttpLimits(self.config.http_keepalive, self.config.http_timeout, self.config.http_max_body),
                self.config.threads,
            )

    def retire(self) -> None:
        """Finish what was received, take nothing new, then exit (SIGTERM, SIGHUP)."""
        self.retiring.set()
        if self.http is not None:
            self.http.retire()

    # -- start-up ----------------------------------------------------------

    def connect_responders(self) -> None:
        for _ in range(self.config.threads):
            self.responders.append([Responder(self.context, e.recv_spec) for e in self.config.endpoints])
        deadline = time.monotonic() + SUBSCRIBE_WAIT
        missing = set()
        for responders in self.responders:
            for responder in responders:
                if not responder.wait_subscribed(max(0.0, deadline - time.monotonic())):
                    missing.add(responder.spec)
        for spec in sorted(missing):
            log.warning("no subscription from Mongrel2 at %s yet; is it running? "
                        "replies sent before it connects are lost", spec)

    def start_threads(self) -> None:
        target = self.run_broker_thread if self.config.dispatch == "broker" else self.run_direct_thread
        for number in range(self.config.threads):
            thread = threading.Thread(target=self._guard, args=(target, number), name=f"request-{number}", daemon=True)
            thread.start()
            self.threads.append(thread)
        if self.http is not None:
            _raise_fd_limit()  # every HTTP connection is a descriptor
            self.http.start()

    def _guard(self, target, number: int) -> None:
        try:
            target(number)
        except Exception:
            log.exception("request thread %d crashed; the worker exits so it is replaced", number)
            os._exit(BOOT_FAILED)

    # -- request threads ----------------------------------------------------

    def run_broker_thread(self, number: int) -> None:
        responders = self.responders[number]
        channel = BrokerChannel(self.spec.dispatch_endpoint, wire.thread_ident(os.getpid(), number))
        channel.ask(thread_credits(self.config.threads))
        wait = self._http_wait(channel.link.socket)
        retire_sent = False
        try:
            while True:
                if self.retiring.is_set() and not retire_sent:
                    channel.retire()
                    retire_sent = True
                try:
                    frames = channel.receive() if wait is None else self._next_work(channel, wait)
                except LinkClosed:
                    log.warning("the dispatcher closed the link; thread %d stops", number)
                    return
                if frames is None:
                    continue
                if isinstance(frames, Exchange):
                    self.serve_http(frames, responders)
                    continue
                if frames[0] == wire.RETIRED:
                    break
                head = frames[0]
                if head[:1] != wire.REQUEST:
                    continue  # a control message for a request already finished
                index = head[1]
                credits = int(frames[2]) if len(frames) > 2 else None
                outcome = self.handle(index, frames[1], channel.poll_control, credits, responders)
                if outcome is not None:
                    channel.done(index, outcome, credit=not retire_sent)
        finally:
            channel.close()
        self.drain_http(responders, wait[1] if wait else None)

    def run_direct_thread(self, number: int) -> None:
        responders = self.responders[number]
        pulls = []
        for endpoint in self.config.endpoints:
            pull = self.context.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            pull.setsockopt(zmq.RCVTIMEO, POLL_INTERVAL_MS)
            pull.connect(endpoint.send_spec)
            pulls.append(pull)
        poller = zmq.Poller()
        for pull in pulls:
            poller.register(pull, zmq.POLLIN)
        waiter = None
        if self.http is not None:
            waiter = Waiter()
            poller.register(waiter.fileno(), zmq.POLLIN)
        try:
            while not self.retiring.is_set():
                if waiter is None and len(pulls) == 1:  # the common case: a blocking receive, no poll
                    try:
                        self.handle(0, pulls[0].recv(), no_control, _FROM_HEADER, responders)
                    except zmq.Again:
                        pass
                    continue
                if waiter is not None and (exchange := self.http.handoff.take_or_wait(waiter)) is not None:
                    self.serve_http(exchange, responders)
                    continue
                events = poller.poll(POLL_INTERVAL_MS)
                if waiter is not None and (exchange := self.http.handoff.stop_waiting(waiter)) is not None:
                    self.serve_http(exchange, responders)
                for ready, _ in events:
                    if not isinstance(ready, int):  # an int is the waiter's fd
                        self.handle(pulls.index(ready), ready.recv(), no_control, _FROM_HEADER, responders)
        finally:
            for pull in pulls:
                pull.close()
        self.drain_http(responders, waiter)

    # -- HTTP (--http) ------------------------------------------------------

    def _http_wait(self, link_socket) -> tuple[select.poll, Waiter] | None:
        """A broker thread's poll over its link and its HTTP wake-up, if there is HTTP."""
        if self.http is None:
            return None
        waiter = Waiter()
        poll = select.poll()
        poll.register(link_socket, select.POLLIN)
        poll.register(waiter.fileno(), select.POLLIN)
        return poll, waiter

    def _next_work(self, channel: BrokerChannel, wait: tuple[select.poll, Waiter]) -> list[bytes] | Exchange | None:
        """What this thread serves next: frames from the dispatcher or an HTTP request."""
        if channel.pending or channel.link.messages:
            return channel.receive()
        poll, waiter = wait
        if (exchange := self.http.handoff.take_or_wait(waiter)) is not None:
            return exchange
        ready = poll.poll(POLL_INTERVAL_MS)
        if (exchange := self.http.handoff.stop_waiting(waiter)) is not None:
            return exchange
        if any(fd != waiter.fd for fd, _ in ready):
            return channel.receive()
        return None

    def serve_http(self, exchange: Exchange, responders: list[Responder]) -> None:
        client, ready = exchange.client, exchange.ready
        request = ready.request
        if self.http.retiring.is_set() or self.config.http_keepalive <= 0:
            request.headers["connection"] = "close"  # the framer then says so to the client
        reply = SocketReply(client.sock, request.conn_id, self.config.http_timeout)
        self.http.thread_busy()
        try:
            closed = serve(self.app, request, reply, body=ready.body, content_length=ready.length,
                           multithread=self.multithread, multiprocess=self.multiprocess, now=time.time())
        except Exception:
            log.exception("internal error serving HTTP connection %s", request.conn_id.decode())
            closed = self._fail(reply)
        finally:
            ready.body.close()
            self.http.thread_idle()
        self.http.give_back(client, keep=not (closed or reply.gone or reply.close_requested))

    def drain_http(self, responders: list[Responder], waiter: Waiter | None) -> None:
        """After retiring from Mongrel2's side: serve the HTTP requests already received."""
        if self.http is None or waiter is None:
            return
        poll = select.poll()
        poll.register(waiter.fileno(), select.POLLIN)
        handoff = self.http.handoff
        try:
            while not (self.http.finished.is_set() and not len(handoff)):
                exchange = handoff.take_or_wait(waiter)
                if exchange is None:
                    poll.poll(POLL_INTERVAL_MS)
                    exchange = handoff.stop_waiting(waiter)
                if exchange is not None:
                    self.serve_http(exchange, responders)
        finally:
            waiter.close()

    def handle(self, index: int, raw: bytes, poll_control, credits: int | None | object,
               responders: list[Responder]) -> Outcome | None:
        """Serve one message. ``credits``: the connection's download credits from
        the dispatcher, None without flow control, or _FROM_HEADER (direct mode)."""
        try:
            event = parse_message(raw)
        except ProtocolError as error:
            log.warning("dropped a malformed Mongrel2 message: %s", error)
            try:
                return Outcome(peek_route(raw)[1])
            except ProtocolError:
                return None
        if not isinstance(event, Request):
            return Outcome(event.conn_id)  # control for a finished request: nothing to do
        if credits is _FROM_HEADER:
            credits = None
            if event.download_credits is not None and not self.warned_flow_control:
                self.warned_flow_control = True
                log.error("Mongrel2 has download.flow_control on, which --dispatch direct cannot honour "
                          "(it sends credit grants to any handler): large responses will be cut; "
                          "use --dispatch broker")
        reply = Reply(responders[index], event.sender, event.conn_id, credits=credits, poll_control=poll_control)
        if self.http is not None:
            self.http.thread_busy()
        try:
            closed = self._serve(event, reply)
        except Exception:
            # A fault of fleet's own, not the app's (serve() contains those):
            # this request fails, the worker goes on serving the others.
            log.exception("internal error serving connection %s", event.conn_id.decode())
            closed = self._fail(reply)
        finally:
            if self.http is not None:
                self.http.thread_idle()
        return Outcome(event.conn_id, reply.bytes_sent if credits is not None else None, closed)

    def _fail(self, reply: Reply) -> bool:
        try:
            reply.finish(b"" if reply.messages_sent else error_response(500), close=True)
        except Exception:
            log.exception("could not even close connection %s", reply.conn_id.decode())
        return True

    def _serve(self, request: Request, reply: Reply) -> bool:
        """Returns True if the connection was closed."""
        try:
            upload = check_upload(request, self.policy)
        except UploadGone as error:
            # Its done message was served first (by another worker): answering would
            # send the client a stray 400 and close its connection.
            log.info("ignored a late upload-start on connection %s: %s", request.conn_id.decode(), error)
            return False
        except UploadRejected as error:
            return self._refuse(request, reply, error)
        if isinstance(upload, UploadStarted):
            return False  # Mongrel2 is writing the body; the done message follows
        if upload is None:
            return serve(self.app, request, reply, body=io.BytesIO(request.body), content_length=len(request.body),
                         multithread=self.multithread, multiprocess=self.multiprocess)
        try:
            body = open_upload(upload)
        except UploadRejected as error:
            return self._refuse(request, reply, error)
        try:
            return serve(self.app, request, reply, body=body, content_length=upload.length,
                         multithread=self.multithread, multiprocess=self.multiprocess)
        finally:
            body.close()
            try:
                os.unlink(upload.real_path)
            except OSError as error:
                log.warning("could not delete upload %s: %s", upload.real_path, error)

    def _refuse(self, request: Request, reply: Reply, error: UploadRejected) -> bool:
        log.warning("refused upload on connection %s: %s", request.conn_id.decode(), error)
        try:
            reply.finish(error_response(400), close=True)
        except ClientGone:
            pass
        return True

    # -- life ---------------------------------------------------------------

    def wait(self) -> None:
        """Run until every thread has drained after a retire, or the parent is gone."""
        while any(t.is_alive() for t in self.threads):
            for thread in self.threads:
                thread.join(0.5)
                if os.getppid() != self.spec.parent_pid:
                    log.error("supervisor %d is gone; exiting", self.spec.parent_pid)
                    os._exit(BOOT_FAILED)

    def close(self) -> None:
        for responders in self.responders:
            for responder in responders:
                responder.close()
        self.context.term()


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-files limit from %d: %s", soft, error)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL us if the supervisor dies, so no worker is orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    spec = WorkerSpec.from_json(argv[0])
    _die_with_parent()
    if os.getppid() != spec.parent_pid:
        return BOOT_FAILED
    setup_logging(spec.log_level, spec.log_file, spec.config.logger)
    try:
        app = load_app(spec.config.app, spec.config.pythonpath)
    except AppLoadError as error:
        log.error("%s", error)
        return APP_LOAD_FAILED
    worker = Worker(spec, app)
    signal.signal(signal.SIGTERM, lambda *_: worker.retire())
    signal.signal(signal.SIGHUP, lambda *_: worker.retire())
    signal.signal(signal.SIGUSR1, lambda *_: reopen_log_file())
    for quick in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(quick, lambda *_: os._exit(0))
    worker.connect_responders()
    worker.start_threads()
    control = ThreadLink(spec.dispatch_endpoint, wire.control_ident(os.getpid()), POLL_INTERVAL_MS / 1000)
    control.send([wire.READY, (app_version(spec.config.app) or "").encode()])
    log.info(
        "worker ready: %d thread(s), %s dispatch, replying to %s, HTTP %s",
        spec.config.threads, spec.config.dispatch, ", ".join(r.spec for r in worker.responders[0]) or "none",
        ", ".join(spec.config.http) or "none",
    )
    worker.wait()
    control.close()
    worker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
