"""A worker process: T threads running the WSGI app on requests from Mongrel2.

Started by the supervisor as ``python -m fleet.worker SPEC_JSON``. Everything
process-wide (signals, sockets, the app import) happens here, after the spawn.

In broker mode (the default) each thread has a Unix socket link
(fleet.dispatch.link) to the host's dispatcher and asks for requests with
credits; in direct mode each thread PULLs straight from every Mongrel2
(uWSGI's way: faster to set up, but what Mongrel2 queued to a retiring worker
is lost); fleet.worker.sources has both. Replies always go straight to
Mongrel2, through one ZMTP connection per thread and endpoint
(fleet.mongrel2.connection.Publisher), written by the thread itself.
"""

from __future__ import annotations

import io
import logging
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable
from functools import partial

import msgpack

from fleet import native
from fleet.appload import AppLoadError, WSGIApp, app_version, load_app
from fleet.dispatch import frames
from fleet.dispatch.broker import thread_credits
from fleet.dispatch.link import ThreadLink
from fleet.exitcodes import APP_LOAD_FAILED, BOOT_FAILED, CRASHED
from fleet.http.front import Exchange, HttpFront, HttpLimits
from fleet.http.reply import SocketReply
from fleet.logs.local import reopen_log_file, setup_logging
from fleet.logs.push import lines_dropped
from fleet.mongrel2 import codec
from fleet.mongrel2.codec import ProtocolError, Request, encode_close, peek_route
from fleet.mongrel2.connection import Publisher
from fleet.mongrel2.reply import Reply
from fleet.mongrel2.uploads import (
    UploadGone,
    UploadPolicy,
    UploadRejected,
    UploadStarted,
    check_upload,
    open_upload,
    remove_upload,
)
from fleet.worker.outbox import STALL, Outbox
from fleet.worker.sources import FINISHED, POLL_INTERVAL_MS, BrokerSource, DirectSource, HttpShare, Message
from fleet.worker.spec import WorkerSpec
from fleet.worker.start import adopt
from fleet.worker.tally import Tally, snapshot
from fleet.wsgi.response import error_response
from fleet.wsgi.serve import ClientGone, ReplyChannel, respond, serve

log = logging.getLogger("fleet.worker")

# Every request is decoded here: in C when built (fleet/mongrel2/_codec.c), else by the reference.
parse_message = native.twin("fleet.mongrel2._codec", "parse_message", codec.parse_message)
# The common request from its bytes to its reply, in C (fleet/worker/_lane.c); None: handle() does it all.
lane = native.compiled("fleet.worker._lane")

# How often (seconds) at most the worker tells the master what it has served.
FIGURES_INTERVAL = 1.0
# A thread in the same request this long gives back the requests it holds behind it
# (the main thread does it for it): a request waits that long, plus a GIL switch
# interval, behind a slow one, where a thread could have been woken for it at once.
GIVE_BACK_AFTER = 0.005
# The worker's main thread never looks more often than this; every GIVE_BACK_AFTER
# while a thread started a request in the last WATCH_CLOSELY seconds, else every STALL.
MIN_NAP = 0.001
WATCH_CLOSELY = 1.0
# How long a new worker waits for Mongrel2's subscription before it declares
# itself ready anyway (Mongrel2 may simply not be running yet).
SUBSCRIBE_WAIT = 5.0


class Worker:
    def __init__(self, spec: WorkerSpec, app: WSGIApp) -> None:
        self.spec = spec
        self.config = spec.config
        self.app = app
        self.retiring = threading.Event()
        self.policy = UploadPolicy.of(self.config)
        # One connection per thread and endpoint: a thread sends its replies
        # itself, with no lock and no hand-over to another thread.
        self.responders: list[list[Publisher]] = []
        self.threads: list[threading.Thread] = []
        self.outboxes: list[Outbox] = []  # one per request thread, when the lane is built
        self.broker_sources: list[tuple[BrokerSource, Outbox | None]] = []  # each thread's, in broker mode
        self.last_started = 0.0  # when a thread last started a request (the main thread watches closely after)
        self.tallies: list[Tally] = []  # one per serving thread: what it served (fleet.worker.tally)
        self.warned_flow_control = False
        self.multithread = self.config.threads > 1
        self.multiprocess = self.config.processes > 1
        self.http: HttpFront | None = None
        if spec.http_fds:
            # One thread and no Mongrel2: the I/O thread serves each request itself,
            # with no hand-off (two thread wake-ups a request) to a request thread.
            alone = self.config.threads == 1 and not self.config.endpoints
            self.http = HttpFront(
                [socket.socket(fileno=fd) for fd in spec.http_fds],
                HttpLimits(self.config.http_keepalive, self.config.http_timeout, self.config.http_max_body),
                self.config.threads,
                inline=partial(self.answer_http, tally=self._new_tally()) if alone else None,
            )

    def _new_tally(self) -> Tally:
        tally = Tally()
        self.tallies.append(tally)
        return tally

    def retire(self) -> None:
        """Finish what was received, take nothing new, then exit (SIGTERM, SIGHUP)."""
        self.retiring.set()
        if self.http is not None:
            self.http.retire()

    # -- start-up ----------------------------------------------------------

    def connect_responders(self) -> None:
        for _ in range(self.config.threads):
            self.responders.append([Publisher(e.recv_spec) for e in self.config.endpoints])
        deadline = time.monotonic() + SUBSCRIBE_WAIT
        missing = set()
        for responders in self.responders:
            for responder in responders:
                if responder.spec not in missing and not responder.wait_connected(
                        max(0.0, deadline - time.monotonic())):
                    missing.add(responder.spec)
        for spec in sorted(missing):
            log.warning("Mongrel2 at %s does not answer yet; is it running? "
                        "replies sent before it does are lost", spec)

    def start_threads(self) -> None:
        if self.http is not None and self.http.inline is not None:
            _raise_fd_limit()
            self.http.start()
            self.threads.append(self.http.thread)  # the only serving thread: wait() watches it
            return
        for number in range(self.config.threads):
            thread = threading.Thread(target=self._guard, args=(number,), name=f"request-{number}", daemon=True)
            thread.start()
            self.threads.append(thread)
        if self.http is not None:
            _raise_fd_limit()  # every HTTP connection is a descriptor
            self.http.start()

    def _guard(self, number: int) -> None:
        try:
            self.run_thread(number)
        except Exception:
            log.exception("request thread %d crashed; the worker exits so it is replaced", number)
            os._exit(CRASHED)

    # -- request threads ----------------------------------------------------

    def run_thread(self, number: int) -> None:
        """One request thread, either dispatch mode: serve what the source gives until it is finished."""
        responders = self.responders[number]
        source = self.work_source(number)
        tally = self._new_tally()
        outbox = None
        if lane is not None:  # the lane's finished replies wait for the next ones (fleet.worker.outbox)
            outbox = Outbox(responders, getattr(getattr(source, "link", None), "send_encoded", None))
            if isinstance(source, BrokerSource):
                source.before_retire = outbox.flush
            self.outboxes.append(outbox)
        if isinstance(source, BrokerSource):
            self.broker_sources.append((source, outbox))
        try:
            while (work := source.next()) is not FINISHED:
                if work is None:
                    pass
                elif isinstance(work, Message):
                    self._busy(source)
                    self.handle(work, source, responders, tally, outbox)
                    source.busy_since = 0.0
                else:
                    if outbox is not None:
                        outbox.flush()
                    self._busy(source)
                    self.serve_http(work, tally)
                    source.busy_since = 0.0
                if outbox is not None and (not source.has_more() or outbox.due()):
                    outbox.flush()  # before next() blocks, or when replies have waited long enough
        finally:
            if outbox is not None:
                try:
                    outbox.flush()
                except OSError as error:  # the dispatcher is gone: its DONEs with it
                    log.info("thread %d could not report its last requests: %s", number, error)
            source.close()

    def _busy(self, source: BrokerSource | DirectSource) -> None:
        """The thread starts a request: what it holds behind it may have to be given back."""
        source.busy_since = self.last_started = time.monotonic()

    def work_source(self, number: int) -> BrokerSource | DirectSource:
        http = HttpShare(self.http) if self.http is not None else None
        if self.config.dispatch == "broker":
            ident = frames.thread_ident(os.getpid(), number)
            return BrokerSource(self.spec.dispatch_endpoint, ident, thread_credits(self.config.threads), http,
                                self.retiring)
        return DirectSource(self.config.endpoints, http, self.retiring)

    def handle(self, message: Message, source: BrokerSource | DirectSource, responders: list[Publisher],
               tally: Tally, outbox: Outbox | None = None) -> None:
        """Serve one message from Mongrel2, count it in ``tally`` and tell the source it is done. With
        an outbox, the lane's complete replies and their DONEs wait in it; the rest is sent at once."""
        started = time.monotonic()
        if (lane is not None and message.credits is None
                and self._take_lane(message, source, responders, tally, started, outbox)):
            return
        if outbox is not None:
            outbox.flush()
        try:
            event = parse_message(message.raw)
        except ProtocolError as error:
            log.warning("dropped a malformed Mongrel2 message: %s", error)
            try:
                source.done(message.index, peek_route(message.raw)[1])
            except ProtocolError:
                pass  # not even a route: no request to report
            return
        if not isinstance(event, Request):
            source.done(message.index, event.conn_id)  # control for a finished request: nothing to do
            return
        credits = message.credits
        if not source.honours_credits and event.download_credits is not None and not self.warned_flow_control:
            self.warned_flow_control = True
            log.error("Mongrel2 has download.flow_control on, which --dispatch direct cannot honour "
                      "(it sends credit grants to any handler): large responses will be cut; "
                      "use --dispatch broker")
        reply = Reply(responders[message.index], event.sender, event.conn_id, credits=credits,
                      poll_control=source.poll_control)
        closed = self._guarded(reply, "connection", lambda: self._serve(event, reply))
        tally.record("mongrel2", reply.status, time.monotonic() - started)
        source.done(message.index, event.conn_id, reply.bytes_sent if credits is not None else None, closed)

    def _take_lane(self, message: Message, source: BrokerSource | DirectSource, responders: list[Publisher],
                   tally: Tally, started: float, outbox: Outbox | None) -> bool:
        """The common request through the compiled lane (fleet/worker/_lane.c); False if it
        is not one (nothing was done, handle() goes on). What the lane does not finish
        after calling the app goes on in fleet.wsgi.serve.respond, as in serve()."""
        if self.http is not None:
            self.http.thread_busy()
        responder = responders[message.index]
        try:
            outcome = lane.serve(self.app, message.raw, responder, source.poll_control,
                                 self.multithread, self.multiprocess)
            if outcome is None:
                return False
            if len(outcome) == 4:  # finished: its reply, framed, is for the outbox
                conn_id, closed, status, wire = outcome
                if outbox is None:
                    responder.send_framed(wire)
                    source.done(message.index, conn_id, None, closed)
                else:
                    outbox.hold(message.index, wire, source.done_message(message.index, conn_id, None, closed))
            else:
                if outbox is not None:
                    outbox.flush()  # the rest of this response is sent as it comes, after what waits
                request, response, framer, result, error = outcome
                conn_id, reply = request.conn_id, response.reply
                closed = self._guarded(reply, "connection",
                                       lambda: respond(request, reply, response, framer, result, error))
                status = response.status if response.head_sent else reply.status
                source.done(message.index, conn_id, None, closed)
        except Exception:
            # A fault of fleet's own: the client may have had part of a response; end its connection.
            if outbox is not None:
                outbox.flush()
            sender, conn_id, _ = peek_route(message.raw)
            log.exception("internal error serving connection %s", conn_id.decode())
            responder.send(encode_close(sender, [conn_id]))
            source.done(message.index, conn_id, None, True)
            status = None
        finally:
            if self.http is not None:
                self.http.thread_idle()
        tally.record("mongrel2", status, time.monotonic() - started)
        return True

    def serve_http(self, exchange: Exchange, tally: Tally) -> None:
        """A request thread's --http request: answered, then its connection goes back to the I/O thread."""
        self.http.give_back(exchange.client, keep=self.answer_http(exchange, tally))

    def answer_http(self, exchange: Exchange, tally: Tally) -> bool:
        """Serve one --http request, counted in ``tally``; True if its connection stays open for the
        next one. When it is the worker's only serving thread, the I/O thread calls this itself."""
        started = time.monotonic()
        client, ready = exchange.client, exchange.ready
        request = ready.request
        if self.http.retiring.is_set() or self.config.http_keepalive <= 0:
            request.headers["connection"] = "close"  # the framer then says so to the client
        reply = SocketReply(client.sock, request.conn_id, self.config.http_timeout)
        try:
            closed = self._guarded(reply, "HTTP connection", lambda: serve(
                self.app, request, reply, body=ready.body, content_length=ready.length,
                multithread=self.multithread, multiprocess=self.multiprocess, now=time.time()))
        finally:
            ready.body.close()
            reply.release()
        tally.record("http", reply.status, time.monotonic() - started)
        return not (closed or reply.gone or reply.close_requested)

    def _guarded(self, reply: ReplyChannel, what: str, job: Callable[[], bool]) -> bool:
        """Run one request (True if it closed the connection). A fault of fleet's own,
        not the app's (serve() contains those), fails this request; the worker goes on."""
        counted = self.http is not None and self.http.inline is None  # the I/O thread's hand-offs
        if counted:
            self.http.thread_busy()
        try:
            return job()
        except Exception:
            log.exception("internal error serving %s %s", what, reply.conn_id.decode())
            return self._fail(reply)
        finally:
            if counted:
                self.http.thread_idle()

    def _fail(self, reply: ReplyChannel) -> bool:
        try:
            if not reply.messages_sent:
                reply.status = "500"
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
            remove_upload(upload)

    def _refuse(self, request: Request, reply: Reply, error: UploadRejected) -> bool:
        # In direct mode the done message of a refused start reaches a worker too (in
        # broker mode the dispatcher drops it): answered again, but the event is logged once.
        log.log(logging.DEBUG if error.repeats_start else logging.WARNING,
                "refused upload on connection %s: %s", request.conn_id.decode(), error)
        reply.status = "400"
        try:
            reply.finish(error_response(400), close=True)
        except ClientGone:
            pass
        return True

    # -- life ---------------------------------------------------------------

    def wait(self, report: Callable[[list[float]], None]) -> None:
        """Run until every thread has drained after a retire, or the parent is gone; meanwhile
        send the finished replies of threads held up in a slow request, and ``report`` what
        the threads have served when it changed (at most every FIGURES_INTERVAL, and at the end)."""
        reported, reported_at = None, time.monotonic()
        nap = STALL
        while any(t.is_alive() for t in self.threads):
            time.sleep(nap)
            now = time.monotonic()
            for outbox in self.outboxes:
                outbox.flush_if_stale(now)
            nap = self._give_back_for_stuck_threads(now)
            if self.broker_sources and now - self.last_started < WATCH_CLOSELY:
                nap = min(nap, GIVE_BACK_AFTER)  # a request may start, and stick, at any moment
            if os.getppid() != self.spec.parent_pid:
                log.error("supervisor %d is gone; exiting", self.spec.parent_pid)
                os._exit(BOOT_FAILED)
            if now - reported_at >= FIGURES_INTERVAL:
                reported, reported_at = self._report(report, reported), now
        self._report(report, reported)

    def _give_back_for_stuck_threads(self, now: float) -> float:
        """For each thread in the same request for GIVE_BACK_AFTER: the replies it finished
        before that one leave, and the requests it holds and has not started go back to the
        dispatcher (fleet.dispatch.broker packs a request behind one just given, which may turn
        out slow). Then every STALL while it stays in that request. Returns how long to wait
        before the next look (STALL at most)."""
        wait = STALL
        for source, outbox in self.broker_sources:
            since = source.busy_since
            if not since:
                continue
            # First GIVE_BACK_AFTER into a request, then every STALL while it lasts.
            due = since + GIVE_BACK_AFTER if source.checked_at < since else source.checked_at + STALL
            if now >= due:
                source.checked_at = now
                if outbox is not None:
                    outbox.flush_if_stale(now, stall=0.0)
                given = source.give_back_unstarted()
                if given:
                    log.debug("gave back %d request(s) waiting behind a slow one", given)
                due = now + STALL
            wait = min(wait, due - now)
        return max(wait, MIN_NAP)

    def _report(self, report: Callable[[list[float]], None], last: list[float] | None) -> list[float]:
        figures = snapshot(self.tallies, lines_dropped())
        if figures != last:
            report(figures)
        return figures

    def close(self) -> None:
        for responders in self.responders:
            for responder in responders:
                responder.close()


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-files limit from %d: %s", soft, error)


def main(argv: list[str]) -> int:
    spec = adopt(argv)
    if spec is None:
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
    control = ThreadLink(spec.dispatch_endpoint, frames.control_ident(os.getpid()), POLL_INTERVAL_MS / 1000)
    control.send([frames.READY, (app_version(spec.config.app) or "").encode()])
    log.info(
        "worker ready: %d thread(s), %s dispatch, replying to %s, HTTP %s",
        spec.config.threads, spec.config.dispatch, ", ".join(r.spec for r in worker.responders[0]) or "none",
        ", ".join(spec.config.http) or "none",
    )

    def report(figures: list[float]) -> None:
        try:
            control.send([frames.FIGURES, msgpack.packb(figures)])
        except OSError:
            pass  # the master is going away: nobody to count them

    worker.wait(report)
    control.close()
    worker.close()
    return 0

