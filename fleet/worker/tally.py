"""What a worker has served: requests by kind and status class, and their latency.

Each serving thread owns one Tally and is the only one to write it, so the
hot path takes no lock; the worker's main thread adds them up (``snapshot``)
and sends the sum to the master, which serves it on ``--metrics`` and in
``fleet stats``. A reader may see a count one request ahead of the latency
histogram: each figure is a counter that only grows, which is all
Prometheus asks.

Pure: no I/O, no clock (the caller measures).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

KINDS = ("mongrel2", "http")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Upper bounds in seconds (Prometheus' "le"), the client library's defaults with 1 ms added:
# a hello-world request here takes well under 1 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class Tally:
    """One serving thread's counts. ``record`` is on every request's path: it only counts
    the status line as it is (classes are made when the figures are sent)."""

    __slots__ = ("statuses", "buckets", "seconds", "websockets_opened", "websockets_closed")

    def __init__(self) -> None:
        self.statuses: dict[str, dict[str, int]] = {kind: {} for kind in KINDS}  # kind -> status line -> count
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: slower than every bound
        self.seconds = 0.0
        # ASGI WebSockets accepted and ended: counters, so that the master can add them up
        # like the rest; the difference is how many are open.
        self.websockets_opened = 0
        self.websockets_closed = 0

    def record(self, kind: str, status: str | None, seconds: float) -> None:
        """A request of ``kind`` answered with ``status`` (its status line, or None: no answer
        reached the client, which is not counted) in ``seconds``."""
        if status is None:
            return
        statuses = self.statuses[kind]
        statuses[status] = statuses.get(status, 0) + 1
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds


def _by_class(statuses: dict[str, int]) -> list[int]:
    counts = [0] * len(STATUS_CLASSES)
    for status, count in list(statuses.items()):  # a copy: the serving thread may add a status meanwhile
        index = "12345".find(status[0]) if status else -1
        if index >= 0:  # the framer refuses other status lines before they are sent
            counts[index] += count
    return counts


# The figures a worker sends, as one flat list of numbers in this order (the master
# adds them up without knowing what they are): requests by kind and class, the latency
# histogram's buckets, the latency sum, WebSockets opened and closed, then the log
# lines its collector dropped.
VECTOR_SIZE = len(KINDS) * len(STATUS_CLASSES) + len(LATENCY_BUCKETS) + 1 + 2 + 2
_ANSWERED = len(KINDS) * len(STATUS_CLASSES)
_OPENED, _CLOSED = VECTOR_SIZE - 3, VECTOR_SIZE - 2


def snapshot(tallies: Iterable[Tally], log_lines_dropped: int) -> list[float]:
    """The sum of ``tallies``, as the figures message carries it."""
    vector = [0] * VECTOR_SIZE
    for tally in tallies:
        parts = [*_by_class(tally.statuses[KINDS[0]]), *_by_class(tally.statuses[KINDS[1]]), *tally.buckets,
                 tally.seconds, tally.websockets_opened, tally.websockets_closed, 0]
        vector = [a + b for a, b in zip(vector, parts)]
    vector[-1] = log_lines_dropped
    return vector


def figures(vector: list[float]) -> dict:
    """A vector as named figures."""
    width = len(STATUS_CLASSES)
    return {
        "requests": {kind: dict(zip(STATUS_CLASSES, vector[i * width:(i + 1) * width]))
                     for i, kind in enumerate(KINDS)},
        "latency_buckets": vector[_ANSWERED:_ANSWERED + len(LATENCY_BUCKETS) + 1],
        "latency_seconds": vector[_OPENED - 1],
        "websockets_opened": vector[_OPENED],
        "websockets_closed": vector[_CLOSED],
        "log_lines_dropped": vector[-1],
    }


class Totals:
    """The master's sum of every worker's figures, the gone ones' included.

    Workers send cumulative vectors; each update adds what grew since that
    worker's last one. A gone worker's entry is kept a while (its last
    message may arrive after it was reaped), up to ``remember`` of them.
    """

    def __init__(self, remember: int = 256) -> None:
        self.total = [0] * VECTOR_SIZE
        self._last: dict[int, list[float]] = {}
        self._gone: list[int] = []
        self._remember = remember

    def update(self, pid: int, vector: list[float]) -> None:
        last = self._last.get(pid)
        if last is None or any(new < old for new, old in zip(vector, last)):
            last = [0] * VECTOR_SIZE  # a new worker: all of it is new
        self.total = [t + new - old for t, new, old in zip(self.total, vector, last)]
        self._last[pid] = vector

    def requests(self, pid: int | None = None) -> int:
        """Requests answered (every kind and class): by the worker ``pid``, or by all."""
        vector = self.total if pid is None else self._last.get(pid)
        return int(sum(vector[:_ANSWERED])) if vector else 0

    def websockets_open(self) -> int:
        """WebSockets open now: opened less closed, over the live workers (a killed worker's
        sockets died with it, whatever its last figures said)."""
        gone = set(self._gone)
        return int(sum(max(0, v[_OPENED] - v[_CLOSED]) for pid, v in self._last.items() if pid not in gone))

    def started(self, pid: int) -> None:
        """A new worker has this pid (one used before, long ago): its figures start from zero,
        and the old worker's place among the gone ones goes too, or its expiry would drop the new one's."""
        self._last.pop(pid, None)
        if pid in self._gone:
            self._gone.remove(pid)

    def gone(self, pid: int) -> None:
        self._gone.append(pid)
        while len(self._gone) > self._remember:
            self._last.pop(self._gone.pop(0), None)


def valid_vector(value: object) -> bool:
    """A figures message's payload as a worker makes it (anything else is dropped)."""
    return (isinstance(value, list) and len(value) == VECTOR_SIZE
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in value))
