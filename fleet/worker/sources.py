"""Where a request thread's next piece of work comes from: one source per dispatch mode.

A request thread has one shape in both modes (fleet.worker.worker):

    while (work := source.next()) is not FINISHED:
        serve work (a Message from Mongrel2, or an Exchange from --http)

``next()`` returns None when nothing came for POLL_INTERVAL_MS, so the
thread looks at its retire flag that often. Once the worker retires, a source
takes no more Mongrel2 work, hands out the --http requests its worker has
already received, then returns FINISHED.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fleet.config import Endpoint
from fleet.dispatch import frames
from fleet.dispatch.link import LinkClosed, ThreadLink, encode
from fleet.http.front import Exchange, HttpFront, Waiter
from fleet.mongrel2.codec import Event, ProtocolError, parse_message, peek_route
from fleet.mongrel2.connection import Puller, PullerSet
from fleet.mongrel2.reply import no_control

log = logging.getLogger("fleet.worker")

# How often a thread blocked on its sockets looks at the retire flag.
POLL_INTERVAL_MS = 250
# While a connection to Mongrel2 is being made, a thread polls this often.
RECONNECT_POLL_MS = 20


@dataclass(slots=True)
class Message:
    """A message from Mongrel2 for this thread."""

    index: int  # which Mongrel2 endpoint it came from
    raw: bytes
    credits: int | None  # the connection's download credits, from the dispatcher (flow control)


class _Finished:
    def __repr__(self) -> str:
        return "FINISHED"


FINISHED = _Finished()  # the source is exhausted: the thread ends


def _nothing() -> None:
    pass

Work = Message | Exchange | None


class HttpShare:
    """A thread's part in its worker's --http hand-off: its own wake-up, polled
    beside the thread's other sockets (the I/O thread wakes one idle thread)."""

    def __init__(self, front: HttpFront) -> None:
        self.front = front
        self.waiter = Waiter()
        self._alone = select.poll()
        self._alone.register(self.waiter.fileno(), select.POLLIN)

    def wait(self, poll: Callable[[int], list]) -> tuple[Exchange | None, list]:
        """An exchange if one is waiting; else ``poll`` (which must include the
        waiter's fd) up to POLL_INTERVAL_MS. Returns (exchange or None, what poll returned)."""
        handoff = self.front.handoff
        exchange = handoff.take_or_wait(self.waiter)
        if exchange is not None:
            return exchange, []
        ready = poll(POLL_INTERVAL_MS)
        return handoff.stop_waiting(self.waiter), ready

    def drain(self) -> Exchange | None | _Finished:
        """After leaving Mongrel2's side: the requests already received, then FINISHED."""
        if self.front.finished.is_set() and not len(self.front.handoff):
            return FINISHED
        return self.wait(self._alone.poll)[0]

    def close(self) -> None:
        self.waiter.close()


class BrokerSource:
    """Broker mode: the requests the dispatcher hands this thread over its link,
    for the credits the thread asked; DONE reports each one finished.

    The dispatcher may give the thread its next request while it serves one
    (fleet.dispatch.broker: cheaper than waking another thread). If the one it
    serves turns out slow, the worker's main thread gives back what the thread
    has not started (give_back_unstarted), so that another thread serves it.
    The lock makes taking work and giving it back exclusive: the thread holds it
    whenever it reads its link or takes from what it has read.
    """

    honours_credits = True  # the dispatcher keeps flow-control balances per connection

    def __init__(self, path: str, ident: bytes, credits: int, http: HttpShare | None,
                 retiring: threading.Event) -> None:
        self.link = ThreadLink(path, ident, POLL_INTERVAL_MS / 1000)
        # Called before RETIRE leaves: DONEs the thread still holds must reach the dispatcher first.
        self.before_retire: Callable[[], None] = _nothing
        self.ident = ident
        self.http = http
        self.retiring = retiring
        self.retire_sent = False
        self.draining = False  # the dispatcher acknowledged the retire: only --http is left
        self.pending: deque[list[bytes]] = deque()  # requests read while looking for control messages
        self.lock = threading.Lock()
        self.busy_since = 0.0  # when the thread began the work it is doing; 0.0 between two
        self.checked_at = 0.0  # (the main thread's) when it last gave back for this thread
        self.link.send([frames.CREDIT, b"%d" % credits])
        if http is not None:
            self._poll = select.poll()
            self._poll.register(self.link.socket, select.POLLIN)
            self._poll.register(http.waiter.fileno(), select.POLLIN)

    def next(self) -> Work | _Finished:
        if self.draining:
            return self.http.drain() if self.http is not None else FINISHED
        if self.retiring.is_set() and not self.retire_sent:
            self.before_retire()
            self.link.send([frames.RETIRE])
            self.retire_sent = True
        try:
            with self.lock:
                received = self._receive()
        except LinkClosed:
            log.warning("the dispatcher closed the link; thread %s stops", self.ident.decode())
            return FINISHED
        if received is None or isinstance(received, Exchange):
            return received
        head = received[0]
        if head == frames.RETIRED:
            self.draining = True
            # Requests finished since RETIRE left may still hold their replies and DONEs in the
            # thread's outbox: they go before the link closes (after, the write failed, EBADF).
            self.before_retire()
            self.link.close()
            return None
        if head[:1] != frames.REQUEST:
            return None  # a control message for a request already finished
        return Message(head[1], received[1], int(received[2]) if len(received) > 2 else None)

    def done(self, index: int, conn_id: bytes, sent: int | None = None, closed: bool = False) -> None:
        """The request of (index, conn_id) is finished: one more credit, unless retiring."""
        self.link.send_encoded(self.done_message(index, conn_id, sent, closed))

    def done_message(self, index: int, conn_id: bytes, sent: int | None = None, closed: bool = False) -> bytes:
        """done()'s message, encoded, for the caller to send later (fleet.worker.outbox)."""
        return encode(frames.done(index, conn_id, sent, closed, credit=not self.retire_sent))

    def has_more(self) -> bool:
        """Whether next() has work in hand, without reading the link."""
        return bool(self.pending or self.link.messages)

    def poll_control(self, timeout: float) -> list[Event]:
        """Read what has arrived (mid-response); keep requests for later, return control events."""
        events: list[Event] = []
        with self.lock:
            if not self.link.poll(timeout):
                return events
            while (received := self.link.take()) is not None:
                if received[0][:1] == frames.CONTROL:
                    try:
                        events.append(parse_message(received[1]))
                    except ProtocolError as error:
                        log.warning("dropped a malformed control message: %s", error)
                else:
                    self.pending.append(received)
        return events

    def give_back_unstarted(self) -> int:
        """The worker's main thread, while this thread is stuck in a request: the requests
        the thread holds and has not started go back to the dispatcher, which gives them to
        other threads. Returns how many. Nothing if the thread is taking work right now."""
        if not self.lock.acquire(blocking=False):
            return 0
        try:
            if not self.busy_since or self.draining:
                return 0
            try:
                self.link.read_arrived()
            except LinkClosed:
                return 0  # the thread meets it on its next read
            given: list[bytes] = []
            for queue in (self.pending, self.link.messages):
                kept: list[list[bytes]] = []
                for message in queue:
                    if message[0][:1] == frames.REQUEST:
                        try:
                            given.append(encode([frames.tagged(frames.GIVE_BACK, message[0][1]),
                                                 peek_route(message[1])[1]]))
                            continue
                        except ProtocolError:
                            pass  # no route to name it by: the thread serves it (and says what is wrong)
                    kept.append(message)
                if len(kept) < len(queue):
                    queue.clear()
                    queue.extend(kept)
            if given:
                self.link.send_encoded(b"".join(given))
            return len(given)
        finally:
            self.lock.release()

    def close(self) -> None:
        self.link.close()
        if self.http is not None:
            self.http.close()

    def _receive(self) -> list[bytes] | Exchange | None:
        if self.pending:
            return self.pending.popleft()
        if self.http is None or self.link.messages:
            return self.link.receive()  # blocks up to POLL_INTERVAL_MS
        exchange, ready = self.http.wait(self._poll.poll)
        if exchange is not None:
            return exchange
        if any(fd != self.http.waiter.fileno() for fd, _ in ready):
            return self.link.receive()
        return None


class DirectSource:
    """Direct mode (uWSGI's way): the thread PULLs from every Mongrel2 itself."""

    honours_credits = False  # Mongrel2 sends credit grants to any handler, not to the one streaming
    poll_control = staticmethod(no_control)  # nobody can send this thread a disconnect

    def __init__(self, endpoints: tuple[Endpoint, ...], http: HttpShare | None,
                 retiring: threading.Event) -> None:
        self.http = http
        self.retiring = retiring
        self.poll = select.poll()
        self.pullers = PullerSet([Puller(endpoint.send_spec) for endpoint in endpoints], self.poll)
        if http is not None:
            self.poll.register(http.waiter.fileno(), select.POLLIN)
        self.queue: deque[Message | Exchange] = deque()
        self._arrived: list[bytes] = []

    def next(self) -> Work | _Finished:
        if self.queue:
            return self.queue.popleft()
        if self.retiring.is_set():
            self.pullers.close()
            return self.http.drain() if self.http is not None else FINISHED
        now = time.monotonic()
        # Not all open: poll briefly, so a reconnect is tried when due.
        timeout = POLL_INTERVAL_MS if self.pullers.refresh(now) else RECONNECT_POLL_MS
        if self.http is None:
            exchange, ready = None, self.poll.poll(timeout)
        else:
            exchange, ready = self.http.wait(self.poll.poll)
        if exchange is not None:
            self.queue.append(exchange)
        arrived = self._arrived
        for fd, _ in ready:
            index = self.pullers.index(fd)
            if index is None:
                continue  # the waiter's fd
            self.pullers.ready(index, arrived, now)
            self.queue.extend(Message(index, raw, None) for raw in arrived)
            arrived.clear()
        return self.queue.popleft() if self.queue else None

    def done(self, index: int, conn_id: bytes, sent: int | None = None, closed: bool = False) -> None:
        """Nobody to tell: Mongrel2 does not track handlers' requests."""

    def done_message(self, index: int, conn_id: bytes, sent: int | None = None, closed: bool = False) -> None:
        return None

    def has_more(self) -> bool:
        """Whether next() has work in hand."""
        return bool(self.queue)

    def close(self) -> None:
        self.pullers.close()
        if self.http is not None:
            self.http.close()
