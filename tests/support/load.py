"""A bounded HTTP load generator for the end-to-end tests and the reload benchmark.

    load = Load(port, "/t/hello", expect=b"Hello world!", clients=4)
    load.start()
    ...                      # reload, kill a worker, scale...
    report = load.stop()     # every thread joined; nothing keeps running
    assert report.failed == 0 and report.hung == 0, report.summary()

N client threads, each with one keep-alive `http.client` connection (a new
one after the server closes it, or after any error), send GET requests back
to back (or with `pause` seconds between them). Every request is classified:

- succeeded: status 200 and a body the `expect` check accepts;
- failed: another status (counted under the status code in `failures`), a
  200 with an unexpected body (`"body"`), or a connection error (counted under
  the exception's class name, e.g. `"RemoteDisconnected"`);
- hung: no complete answer within `timeout` seconds (the connection is then
  dropped and a new one opened).

A request that fails or hangs is not retried: the next one is a new request.
Each request's start time (`time.monotonic()`), latency and outcome are kept
in `samples`, so a caller can look at what happened around a given moment.

The run is bounded: the threads stop by themselves after `max_duration`
seconds (and after `max_requests` requests in all, if given), and `stop()`
never waits longer than one request timeout plus a margin.

It can also be run by hand:

    .venv/bin/python -m tests.support.load --port 6767 --path /t/hello --duration 10
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

OK = "ok"
FAILED = "failed"
HUNG = "hung"

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_DURATION = 300.0  # no load runs longer than this, whatever the caller forgets
STOP_MARGIN = 5.0

Expect = bytes | Collection[bytes] | Callable[[bytes], bool] | None


def _checker(expect: Expect) -> Callable[[bytes], bool]:
    if expect is None:
        return lambda body: True
    if isinstance(expect, bytes):
        return lambda body: body == expect
    if callable(expect):
        return expect
    allowed = frozenset(expect)
    return lambda body: body in allowed


@dataclass(slots=True)
class Sample:
    start: float  # time.monotonic() when the request was sent
    latency: float  # seconds until the answer (or the error, or the timeout)
    outcome: str  # OK, FAILED or HUNG
    detail: object = None  # for FAILED: the status code, "body" or an exception class name


@dataclass
class Report:
    """What a load run did. Times are `time.monotonic()` values."""

    started: float
    stopped: float
    clients: int
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    hung: int = 0
    unfinished: int = 0  # client threads still stuck in a request when stop() gave up on them
    failures: Counter = field(default_factory=Counter)
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the first few error descriptions, for messages

    @property
    def duration(self) -> float:
        return self.stopped - self.started

    @property
    def latencies(self) -> list[float]:
        """Latencies of the requests that got an answer or an error (not the hung ones)."""
        return [s.latency for s in self.samples if s.outcome != HUNG]

    @property
    def worst_latency(self) -> float:
        """The longest any request took, the hung ones included (they count their timeout)."""
        return max((s.latency for s in self.samples), default=0.0)

    @property
    def clean(self) -> bool:
        return self.failed == 0 and self.hung == 0 and self.unfinished == 0

    def percentile(self, p: float) -> float:
        """The p-th percentile (0..100, nearest rank) of all latencies, the hung ones included."""
        values = sorted(s.latency for s in self.samples)
        if not values:
            return 0.0
        rank = max(1, math.ceil(p / 100.0 * len(values)))
        return values[min(rank, len(values)) - 1]

    def between(self, start: float, end: float) -> list[Sample]:
        """Requests that were in flight at some moment of [start, end]."""
        return [s for s in self.samples if s.start <= end and s.start + s.latency >= start]

    def worst_between(self, start: float, end: float) -> float:
        return max((s.latency for s in self.between(start, end)), default=0.0)

    def succeeded_after(self, moment: float) -> int:
        return sum(1 for s in self.samples if s.outcome == OK and s.start >= moment)

    def summary(self) -> str:
        failures = ", ".join(f"{k}: {v}" for k, v in sorted(self.failures.items(), key=str)) or "none"
        text = (f"{self.sent} sent in {self.duration:.1f} s by {self.clients} clients: "
                f"{self.succeeded} ok, {self.failed} failed ({failures}), {self.hung} hung, "
                f"{self.unfinished} unfinished; worst {self.worst_latency * 1000:.0f} ms, "
                f"p99 {self.percentile(99) * 1000:.1f} ms")
        if self.errors:
            text += "; first errors: " + "; ".join(self.errors[:5])
        return text

    def as_dict(self) -> dict:
        return {
            "clients": self.clients, "duration_s": round(self.duration, 3), "sent": self.sent,
            "succeeded": self.succeeded, "failed": self.failed, "hung": self.hung,
            "unfinished": self.unfinished,
            "failures": {str(k): v for k, v in self.failures.items()},
            "worst_latency_ms": round(self.worst_latency * 1000, 3),
            "p50_ms": round(self.percentile(50) * 1000, 3),
            "p99_ms": round(self.percentile(99) * 1000, 3),
            "errors": self.errors[:10],
        }


class _Client:
    """One client thread's connection and its own tallies (merged by Load.stop)."""

    def __init__(self) -> None:
        self.sent = 0
        self.succeeded = 0
        self.failed = 0
        self.hung = 0
        self.failures: Counter = Counter()
        self.samples: list[Sample] = []
        self.errors: list[str] = []


class Load:
    def __init__(self, port: int, path: str, *, expect: Expect = None, clients: int = 4,
                 timeout: float = DEFAULT_TIMEOUT, pause: float = 0.0,
                 max_duration: float = DEFAULT_MAX_DURATION, max_requests: int | None = None,
                 host: str = "127.0.0.1", headers: dict[str, str] | None = None) -> None:
        if clients < 1:
            raise ValueError("clients must be at least 1")
        if not 0 < max_duration <= 3600:
            raise ValueError("max_duration must be in (0, 3600] seconds")
        self.host = host
        self.port = port
        self.path = path
        self.check = _checker(expect)
        self.clients = clients
        self.timeout = timeout
        self.pause = pause
        self.max_duration = max_duration
        self.max_requests = max_requests
        self.headers = dict(headers or {})
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._state: list[_Client] = []
        self._budget = threading.Semaphore(max_requests) if max_requests else None
        self.started: float | None = None
        self.deadline: float | None = None
        self.report: Report | None = None

    # -- control ---------------------------------------------------------------

    def start(self) -> Load:
        if self.started is not None:
            raise RuntimeError("a Load runs once")
        self.started = time.monotonic()
        self.deadline = self.started + self.max_duration
        for i in range(self.clients):
            state = _Client()
            thread = threading.Thread(target=self._run, args=(state,), name=f"load-{i}", daemon=True)
            self._state.append(state)
            self._threads.append(thread)
            thread.start()
        return self

    def halt(self) -> None:
        """Send no new request from now on (the ones in flight go on); stop() then reports."""
        self._stop.set()

    def stop(self) -> Report:
        """Stop sending, wait for the requests in flight (bounded), and report."""
        if self.report is not None:
            return self.report
        if self.started is None:
            raise RuntimeError("stop() before start()")
        self._stop.set()
        give_up = time.monotonic() + self.timeout + STOP_MARGIN
        for thread in self._threads:
            thread.join(max(0.0, give_up - time.monotonic()))
        stopped = time.monotonic()
        report = Report(started=self.started, stopped=stopped, clients=self.clients)
        for thread, state in zip(self._threads, self._state):
            if thread.is_alive():  # stuck beyond its own timeout: report it, do not wait for it
                report.unfinished += 1
            report.sent += state.sent
            report.succeeded += state.succeeded
            report.failed += state.failed
            report.hung += state.hung
            report.failures.update(state.failures)
            report.samples.extend(list(state.samples))
            report.errors.extend(state.errors[:5])
        report.samples.sort(key=lambda s: s.start)
        self.report = report
        return report

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- progress while running --------------------------------------------------

    def progress(self) -> dict[str, int]:
        """Counts so far (a consistent-enough snapshot while the threads run)."""
        return {
            "sent": sum(s.sent for s in self._state),
            "succeeded": sum(s.succeeded for s in self._state),
            "failed": sum(s.failed for s in self._state),
            "hung": sum(s.hung for s in self._state),
        }

    def wait_succeeded(self, count: int, timeout: float = 30.0) -> None:
        """Block until `count` more requests than now have succeeded (the load is flowing)."""
        target = self.progress()["succeeded"] + count
        deadline = time.monotonic() + timeout
        while self.progress()["succeeded"] < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"load: fewer than {count} requests succeeded in {timeout} s: "
                                     f"{self.progress()} {self._first_errors()}")
            if not any(t.is_alive() for t in self._threads):
                raise AssertionError(f"load: all client threads ended: {self.progress()}")
            time.sleep(0.02)

    def _first_errors(self) -> list[str]:
        return [e for s in self._state for e in s.errors[:2]]

    # -- the client threads --------------------------------------------------------

    def _running(self) -> bool:
        if self._stop.is_set() or time.monotonic() >= self.deadline:  # type: ignore[operator]
            return False
        return self._budget is None or self._budget.acquire(blocking=False)

    def _run(self, state: _Client) -> None:
        conn: http.client.HTTPConnection | None = None
        try:
            while self._running():
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                conn = self._one(conn, state)
                if self.pause:
                    self._stop.wait(self.pause)
        finally:
            if conn is not None:
                conn.close()

    def _one(self, conn: http.client.HTTPConnection, state: _Client) -> http.client.HTTPConnection | None:
        """One request; returns the connection to reuse, or None when it must be replaced."""
        start = time.monotonic()
        state.sent += 1
        outcome, detail = FAILED, None
        keep = True
        try:
            conn.request("GET", self.path, headers=self.headers)
            resp = conn.getresponse()
            body = resp.read()
            if time.monotonic() - start > self.timeout:  # trickled in past the timeout
                outcome, detail, keep = HUNG, "slow", False
            elif resp.status == 200 and self.check(body):
                outcome = OK
            elif resp.status == 200:
                detail = "body"
                state.errors.append(f"unexpected body {body[:60]!r}")
            else:
                detail = resp.status
                state.errors.append(f"status {resp.status} {body[:60]!r}")
            if resp.will_close:
                keep = False
        except TimeoutError:
            outcome, detail, keep = HUNG, "timeout", False
        except (OSError, http.client.HTTPException) as error:
            detail, keep = type(error).__name__, False
            state.errors.append(f"{type(error).__name__}: {error}")
        latency = time.monotonic() - start
        state.samples.append(Sample(start, latency, outcome, detail))
        if outcome == OK:
            state.succeeded += 1
        elif outcome == HUNG:
            state.hung += 1
        else:
            state.failed += 1
            state.failures[detail] += 1
        del state.errors[20:]
        if keep:
            return conn
        conn.close()
        return None


def json_answers(host: str, port: int, path: str, count: int, timeout: float = 10.0) -> list[dict]:
    """`count` GETs on one keep-alive connection, each answered 200 with a JSON body; the bodies."""
    answers = []
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        for _ in range(count):
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (resp.status, body)
            answers.append(json.loads(body))
            if resp.will_close:
                conn.close()  # the next request reconnects
    finally:
        conn.close()
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bounded HTTP GET load against one URL path.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--expect", help="the exact body a success must have")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    args = parser.parse_args(argv)
    load = Load(args.port, args.path, expect=args.expect.encode() if args.expect else None,
                clients=args.clients, timeout=args.timeout, host=args.host,
                max_duration=args.duration + 1)
    load.start()
    try:
        time.sleep(args.duration)
    except KeyboardInterrupt:
        pass
    report = load.stop()
    print(report.summary())
    print(json.dumps(report.as_dict()))
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
