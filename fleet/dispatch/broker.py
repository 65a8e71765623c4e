"""Which worker thread gets which request: the dispatcher's state, with no sockets.

Every worker thread asks for work by sending credits; a request only goes to a
thread that asked for it. So a thread that retires simply stops asking and
nothing is ever queued for it (Mongrel2's own round-robin loses what it queued
to a handler that leaves), a stuck thread receives nothing more, and the
broker always knows which connection each thread holds, so the client of a
crashed worker can be answered at once.

Which thread, when several could take it: idle threads first, then threads
with room behind the request they serve. Except that a thread serving a
request it got less than PACK_WITHIN ago takes the next one before an idle
thread of its own worker is woken (unless a worker with nothing to do can
take it on a core of its own): it finds it in hand when it finishes. A
worker's threads share one GIL, and waking one per request cost more than the
wait. If the request ahead turns out slow, the worker gives back what its
thread has not started (give_back), and another thread gets it first; and
when that happens PAUSE_AFTER times in a second, nothing is packed for
PACK_PAUSE: this app blocks.

Requests on a connection that a thread already holds wait here (HTTP
pipelining must be answered in order, and Mongrel2 would hand the second
request to another handler), unless the thread made the connection a stream
(a WebSocket: every frame is a message of its own), whose messages all go
to it at once. Requests for which no thread has a credit wait in a bounded
backlog.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# A thread holds at least this many requests: the one it serves and the next,
# so that it never idles for a round trip to the broker between two requests.
PREFETCH = 2
# A thread serving a request it was given less than this long ago is given the
# next one before an idle thread is woken (see the module docstring).
PACK_WITHIN = 0.002
# ... unless workers gave back requests PAUSE_AFTER times within a second less than
# PACK_PAUSE ago: the app blocks, and a request packed behind a blocking one waits
# for its give-back. (One give-back can be a thread that was only descheduled.)
PACK_PAUSE = 10.0
PAUSE_AFTER = 10
# A worker process holds at least this many, whatever its thread count: with
# one thread, two in hand are not enough to hide the broker's wake-up latency
# on a busy host (measured: 3.7k against 6.4k requests/s with 4).
WORKER_PREFETCH = 4
# Reaped worker pids remembered, so late messages from them are ignored.
MAX_GONE_PIDS = 4096
# Requests waiting for a free thread; past this the broker answers 503, so a
# host whose workers are all stuck sheds load instead of growing without end.
MAX_BACKLOG = 10_000
# Connections a worker closed are remembered this long (at most MAX_CLOSED of
# them): what Mongrel2 still sends for one, such as the done message of an
# upload whose start was refused, is dropped instead of served (and refused,
# and logged) a second time. Mongrel2 never reuses a connection id while it runs.
CLOSED_MEMORY = 60.0
MAX_CLOSED = 4096


def thread_credits(threads: int) -> int:
    """How many requests each of a worker's threads asks for.

    One thread: WORKER_PREFETCH. With several, each asks for PREFETCH per thread of
    its worker, so that while requests are fast the thread that runs can hold what
    the whole worker would (the broker packs them onto it) and the others sleep:
    the threads share one GIL, and waking one per request cost more than it gave
    (bench.load_profile fleet-broker-t8: 16k requests/s and 0.9 context switches a
    request per worker with 2 credits a thread, idle threads first; 26k and 0.14
    with 16 and packing). What a slow request holds up is given back (give_back).
    """
    if threads == 1:
        return WORKER_PREFETCH
    return PREFETCH * threads


ConnKey = tuple[int, bytes]  # (endpoint index, Mongrel2 connection id)


@dataclass(slots=True)
class Held:
    """A request a thread has been given and not yet finished."""

    sender: bytes
    since: float
    raw: bytes  # kept so that the upload file of a request nobody finishes can be deleted


@dataclass(slots=True)
class Thread:
    ident: bytes
    pid: int
    credits: int = 0
    retiring: bool = False
    owed: int = 0  # credits of requests it gave back, returned with its next DONE
    held: dict[ConnKey, Held] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Assignment:
    ident: bytes
    index: int
    conn_id: bytes
    raw: bytes
    forward: bool = False  # a message of a stream for the thread that holds it (sent as CONTROL)


@dataclass(frozen=True, slots=True)
class Orphan:
    """A request whose client must be answered by the broker itself (502, 503 or 504)."""

    index: int
    sender: bytes
    conn_id: bytes
    age: float = 0.0  # seconds since a thread was given it
    running: bool = False  # the thread was serving it (not holding it in reserve)
    # Pipelined behind a request of the same connection: it dies with the
    # connection closed for that one and needs no answer of its own.
    behind: bool = False
    raw: bytes = field(default=b"", compare=False, repr=False)  # the request as Mongrel2 sent it


@dataclass(slots=True)
class WorkerCounters:
    served: int = 0


class Broker:
    def __init__(self, clock: Callable[[], float], pack_within: float = PACK_WITHIN,
                 pack_pause: float = PACK_PAUSE) -> None:
        """``clock``: monotonic seconds (the dispatcher passes time.monotonic); ``pack_within``,
        ``pack_pause``: PACK_WITHIN and PACK_PAUSE unless a test says otherwise."""
        self.clock = clock
        self.pack_within = pack_within
        self.pack_pause = pack_pause
        self._packs_again_at = 0.0
        self._give_backs = 0  # in the second that began at _give_backs_from
        self._give_backs_from = 0.0
        self.threads: dict[bytes, Thread] = {}
        self.holder: dict[ConnKey, bytes] = {}
        self.counters: dict[int, WorkerCounters] = {}
        # Dicts used as ordered sets: threads that hold nothing come first,
        # then threads that could take one more behind the one they serve.
        self._idle: dict[bytes, None] = {}
        self._spare: dict[bytes, None] = {}
        self._parked: dict[ConnKey, deque[tuple[bytes, bytes]]] = {}
        self._streams: set[ConnKey] = set()  # held connections whose messages all go to their holder
        self._backlog: deque[tuple[int, bytes, bytes, bytes]] = deque()
        self._gone: dict[int, None] = {}  # recently reaped worker pids, oldest first
        self._closed: dict[ConnKey, float] = {}  # connections a worker closed -> when, oldest first
        # Messages for closed connections, dropped: the dispatcher takes them (take_dropped)
        # to delete their upload files.
        self._dropped: list[Orphan] = []

    def worker_started(self, pid: int) -> None:
        """A new worker may reuse the pid of a reaped one."""
        self._gone.pop(pid, None)

    # -- worker threads -------------------------------------------------

    def credit(self, ident: bytes, pid: int, count: int = 1) -> list[Assignment]:
        thread = self.threads.get(ident)
        if thread is None:
            if pid in self._gone:
                # A credit still in the socket when its worker was reaped: handing
                # that thread a request would lose it, with nobody left to answer.
                return []
            thread = self.threads[ident] = Thread(ident, pid)
            self.counters.setdefault(pid, WorkerCounters())
        if thread.retiring:
            return []
        thread.credits += count
        self._file(thread)
        return self._drain_backlog()

    def done(self, ident: bytes, index: int, conn_id: bytes, credit: bool, closed: bool = False) -> list[Assignment]:
        """A thread finished the request of (index, conn_id), ``closed`` if it closed the
        connection; maybe it wants another."""
        key = (index, conn_id)
        thread = self.threads.get(ident)
        if thread is None:
            return []
        if thread.held.pop(key, None) is not None:
            counters = self.counters[thread.pid]
            counters.served += 1
        if self.holder.get(key) == ident:
            self._release(key)
        if credit and not thread.retiring:
            thread.credits += 1 + thread.owed
        thread.owed = 0
        self._file(thread)
        assignments: list[Assignment] = []
        if closed:
            self._remember_closed(key)
            for sender, raw in self._parked.pop(key, ()):
                self._dropped.append(Orphan(index, sender, conn_id, behind=True, raw=raw))
        parked = self._parked.get(key)
        if parked:
            sender, raw = parked.popleft()
            if not parked:
                del self._parked[key]
            assignment = self.request(index, sender, conn_id, raw)
            if assignment is not None:
                assignments.append(assignment)
        assignments.extend(self._drain_backlog())
        return assignments

    def give_back(self, ident: bytes, index: int, conn_id: bytes) -> list[Assignment]:
        """The thread never started the request of (index, conn_id): it is stuck in the one
        before. Another thread gets it, before what waits here. The thread gets the credit back
        with the DONE of the request it is stuck in, and until then it is given nothing."""
        key = (index, conn_id)
        thread = self.threads.get(ident)
        if thread is None or key in self._streams or key not in thread.held:
            return []
        held = thread.held.pop(key)
        if self.holder.get(key) == ident:
            self._release(key)
        now = self.clock()
        if now - self._give_backs_from >= 1.0:
            self._give_backs, self._give_backs_from = 0, now
        self._give_backs += 1
        if self._give_backs >= PAUSE_AFTER:
            self._packs_again_at = now + self.pack_pause
        if not thread.retiring:
            thread.owed += 1
        self._file(thread)  # out of the tiers (it owes, or retires): not back to where it was stuck
        self._backlog.appendleft((index, held.sender, conn_id, held.raw))
        return self._drain_backlog()

    def retire(self, ident: bytes) -> None:
        """The thread will ask for nothing more; it still finishes what it holds."""
        thread = self.threads.get(ident)
        if thread is None:
            return
        thread.retiring = True
        thread.credits = 0
        self._idle.pop(ident, None)
        self._spare.pop(ident, None)

    def worker_gone(self, pid: int) -> list[Orphan]:
        """A worker process died: its threads' requests can only be answered by us."""
        self._gone[pid] = None
        if len(self._gone) > MAX_GONE_PIDS:
            del self._gone[next(iter(self._gone))]
        orphans: list[Orphan] = []
        for ident in [i for i, t in self.threads.items() if t.pid == pid]:
            thread = self.threads.pop(ident)
            self._idle.pop(ident, None)
            self._spare.pop(ident, None)
            now = self.clock()
            # A thread serves what it holds in the order it got it: the first
            # is the one it was running, the others were waiting behind it.
            for position, (key, held) in enumerate(thread.held.items()):
                orphans.append(Orphan(key[0], held.sender, key[1], now - held.since, running=position == 0,
                                      raw=held.raw))
                if self.holder.get(key) == ident:
                    self._release(key)
                # Pipelined requests behind it die with the connection we close.
                for sender, raw in self._parked.pop(key, ()):
                    orphans.append(Orphan(key[0], sender, key[1], behind=True, raw=raw))
        return orphans

    def unreachable(self, assignment: Assignment) -> None:
        """Sending to the thread failed (its process is gone): undo and queue again."""
        thread = self.threads.get(assignment.ident)
        sender, conn_id, _ = _route(assignment.raw)
        key = (assignment.index, conn_id)
        if thread is not None:
            thread.held.pop(key, None)
            thread.credits = 0
            thread.retiring = True
            self._idle.pop(thread.ident, None)
            self._spare.pop(thread.ident, None)
        if self.holder.get(key) == assignment.ident:
            self._release(key)
        self._backlog.appendleft((assignment.index, sender, conn_id, assignment.raw))

    # -- requests from Mongrel2 -----------------------------------------

    def request(self, index: int, sender: bytes, conn_id: bytes, raw: bytes) -> Assignment | None:
        """Give the request to a thread, or keep it; None means it waits here."""
        key = (index, conn_id)
        if key in self.holder:
            if self._streams and key in self._streams:
                return Assignment(self.holder[key], index, conn_id, raw, forward=True)
            self._parked.setdefault(key, deque()).append((sender, raw))
            return None
        if self._closed and key in self._closed:
            if self.clock() - self._closed[key] < CLOSED_MEMORY:
                self._dropped.append(Orphan(index, sender, conn_id, behind=True, raw=raw))
                return None
            del self._closed[key]
        ident = self._pick()
        if ident is None:
            if len(self._backlog) >= MAX_BACKLOG:
                raise BacklogFull(Orphan(index, sender, conn_id, raw=raw))
            self._backlog.append((index, sender, conn_id, raw))
            return None
        return self._assign(ident, key, sender, raw)

    def stream(self, ident: bytes, index: int, conn_id: bytes) -> list[Assignment]:
        """The thread holding (index, conn_id) made it a stream: what waits for it goes to it now."""
        key = (index, conn_id)
        if self.holder.get(key) != ident:
            return []  # not (or no longer) its connection
        self._streams.add(key)
        return [Assignment(ident, index, conn_id, raw, forward=True) for _, raw in self._parked.pop(key, ())]

    def _release(self, key: ConnKey) -> None:
        del self.holder[key]
        self._streams.discard(key)

    def take_dropped(self) -> list[Orphan]:
        """The messages dropped since the last call, for closed connections."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def forget_closed(self, index: int) -> None:
        """Mongrel2 ``index`` connected anew (perhaps restarted: its ids start again)."""
        for key in [key for key in self._closed if key[0] == index]:
            del self._closed[key]

    def _remember_closed(self, key: ConnKey) -> None:
        self._closed.pop(key, None)
        self._closed[key] = self.clock()
        if len(self._closed) > MAX_CLOSED:
            del self._closed[next(iter(self._closed))]

    def holder_of(self, index: int, conn_id: bytes) -> bytes | None:
        return self.holder.get((index, conn_id))

    def take_waiting(self) -> list[Orphan]:
        """Empty the backlog and parked requests (shutting down: they get 503)."""
        waiting = [Orphan(i, s, c, raw=raw) for i, s, c, raw in self._backlog]
        self._backlog.clear()
        for (index, conn_id), parked in self._parked.items():
            waiting.extend(Orphan(index, sender, conn_id, raw=raw) for sender, raw in parked)
        self._parked.clear()
        return waiting

    # -- figures ----------------------------------------------------------

    def busy_threads(self, pid: int, stuck_after: float = math.inf) -> int:
        """Threads of the worker that hold a request, not counting those whose
        running request is older than ``stuck_after`` seconds (stuck ones)."""
        now = self.clock()
        return sum(1 for t in self.threads.values()
                   if t.pid == pid and t.held and now - next(iter(t.held.values())).since < stuck_after)

    def retire_worker(self, pid: int) -> None:
        """No new request for any thread of the worker; they finish what they hold."""
        for thread in self.threads.values():
            if thread.pid == pid:
                self.retire(thread.ident)

    def oldest_request_age(self, pid: int) -> float | None:
        """Of the requests the worker holds; a stream (a WebSocket) lasts as long as its client
        wants and is no stuck request."""
        starts = [h.since for t in self.threads.values() if t.pid == pid
                  for key, h in t.held.items() if key not in self._streams]
        return self.clock() - min(starts) if starts else None

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    @property
    def in_flight(self) -> int:
        return sum(len(t.held) for t in self.threads.values())

    # -- internals ----------------------------------------------------------

    def _pick(self) -> bytes | None:
        packer = self._young_spare()
        if packer is not None:
            busy = {t.pid for t in self.threads.values() if t.held}
            ident = next((i for i in self._idle if self.threads[i].pid not in busy), packer)
            (self._idle if ident in self._idle else self._spare).pop(ident)
            return ident
        for tier in (self._idle, self._spare):
            if tier:
                ident = next(iter(tier))
                del tier[ident]
                return ident
        return None

    def _young_spare(self) -> bytes | None:
        """A thread with room, serving a request it got less than pack_within ago, in a worker
        with an idle thread: giving it the next request saves waking that one. The one filed
        last first (it has just finished a request, or just been given one: it is awake)."""
        if not self._spare or not self._idle:
            return None
        now = self.clock()
        if now < self._packs_again_at:
            return None
        idle_workers = {self.threads[ident].pid for ident in self._idle}
        for ident in reversed(self._spare):
            thread = self.threads[ident]
            if thread.pid not in idle_workers:
                continue
            for key, held in thread.held.items():  # the first: the one it serves
                if now - held.since < self.pack_within and key not in self._streams:
                    return ident
                break
        return None

    def _assign(self, ident: bytes, key: ConnKey, sender: bytes, raw: bytes) -> Assignment:
        thread = self.threads[ident]
        thread.credits -= 1
        thread.held[key] = Held(sender, self.clock(), raw)
        self.holder[key] = ident
        self._file(thread)
        return Assignment(ident, key[0], key[1], raw)

    def _file(self, thread: Thread) -> None:
        """Put the thread in the tier its credits and load say, or in none."""
        ident = thread.ident
        self._idle.pop(ident, None)
        self._spare.pop(ident, None)
        if thread.credits <= 0 or thread.retiring or thread.owed:  # owed: stuck, it said so
            return
        (self._spare if thread.held else self._idle)[ident] = None

    def _drain_backlog(self) -> list[Assignment]:
        assignments: list[Assignment] = []
        while self._backlog and (self._idle or self._spare):
            index, sender, conn_id, raw = self._backlog.popleft()
            assignment = self.request(index, sender, conn_id, raw)
            if assignment is not None:
                assignments.append(assignment)
        return assignments


class CreditLedger:
    """Mongrel2's download credits per connection (``download.flow_control=1``).

    Mongrel2 grants the initial credits only with a connection's first request
    and returns credits after each socket write, whichever request they belong
    to. So the balance lives here, where every message passes, and is handed
    to the thread that serves the connection's next request.
    """

    def __init__(self) -> None:
        self.balance: dict[ConnKey, int] = {}

    def opened(self, key: ConnKey, credits: int) -> None:
        self.balance.setdefault(key, credits)

    def granted(self, key: ConnKey, credits: int) -> None:
        if key in self.balance:
            self.balance[key] += credits

    def spent(self, key: ConnKey, sent: int, closed: bool) -> None:
        if closed:
            self.balance.pop(key, None)
        elif key in self.balance:
            self.balance[key] -= sent

    def forget(self, key: ConnKey) -> None:
        self.balance.pop(key, None)

    def get(self, key: ConnKey) -> int | None:
        return self.balance.get(key)


class BacklogFull(Exception):
    def __init__(self, orphan: Orphan) -> None:
        super().__init__("dispatcher backlog full")
        self.orphan = orphan


def _route(raw: bytes) -> tuple[bytes, bytes, bytes]:
    sender, conn_id, path, _ = raw.split(b" ", 3)
    return sender, conn_id, path
