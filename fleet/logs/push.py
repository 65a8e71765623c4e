"""``--logger zeromq:ENDPOINT``: every log line also goes to a ZeroMQ PULL socket
(``fleet logs --bind``), one line per message, without ever blocking the caller.

A collector that is down or slow costs at most SEND_HWM queued lines; beyond
that lines are dropped and counted, the host's own log says so when dropping
starts, and the count is sent (and logged locally) once the collector takes
lines again.
"""

from __future__ import annotations

import logging
import socket
import time

import zmq

from fleet.config import ConfigError, check_endpoint

SCHEME = "zeromq:"
# Lines queued for a collector that is down or slow; beyond this they are dropped.
# Small: a log line is worth less than a request's latency or the worker's memory.
SEND_HWM = 1000
# How long closing may wait to hand queued lines over: exit never hangs on a dead collector.
LINGER_MS = 250
# The largest line sent; the collector refuses bigger messages (a limit on its network input).
MAX_LINE_BYTES = 64 * 1024
DROP_LOGGER = "fleet.logger"


def parse_logger(text: str) -> str:
    """'zeromq:tcp://HOST:PORT' or 'zeromq:ipc://PATH' -> the endpoint; ConfigError otherwise."""
    scheme, sep, endpoint = text.partition(":")
    if not sep or f"{scheme}:" != SCHEME or not endpoint:
        raise ConfigError(f"--logger {text!r}: expected zeromq:tcp://HOST:PORT or zeromq:ipc://PATH "
                          "(the endpoint `fleet logs --bind` listens on)")
    check_endpoint(endpoint, "--logger")
    if endpoint.startswith("tcp://*:"):
        raise ConfigError(f"--logger {text!r}: give the collector's address, not '*'")
    return endpoint


class LineFormatter(logging.Formatter):
    """UTC timestamp, host, [pid], level, logger name, message: one line a record
    (a traceback stays inside its record's message, as in the local log).

    Built by hand, with the date part cached for the current second: the
    default Formatter spends most of its time on strftime, on every line.
    Not thread-safe by itself; the handler's lock covers it."""

    def __init__(self, host: str | None = None) -> None:
        super().__init__()
        self.host = host or socket.gethostname()
        self._second = -1
        self._date = ""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return (f"{self._timestamp(record.created)} {self.host} [{record.process}] {record.levelname} "
                f"{record.name}: {text}")

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._date = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._date}.{int((created - second) * 1000):03d}Z"


class PushHandler(logging.Handler):
    """Sends each record on a PUSH socket with NOBLOCK; counts what it must drop.

    logging calls emit() under the handler's lock, so the socket (not
    thread-safe) is only ever used by one thread at a time. `local` is the
    host's own log handler: it hears about drops too.
    """

    dropped_total = 0  # every handler's in this process, for the metrics (emit() holds a handler's lock)

    def __init__(self, endpoint: str, local: logging.Handler | None = None, hwm: int = SEND_HWM,
                 host: str | None = None) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.local = local
        self.dropped = 0
        self.setFormatter(LineFormatter(host))
        self.context = zmq.Context(io_threads=1)
        self.socket: zmq.Socket | None = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        self.socket.connect(endpoint)

    def emit(self, record: logging.LogRecord) -> None:
        if self.dropped and not self._room():
            self._drop()  # still full: do not even format the line
            return
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if self._send(line) and self.dropped:
            self._report_drops()

    def _room(self) -> bool:
        try:
            return self.socket is not None and bool(self.socket.getsockopt(zmq.EVENTS) & zmq.POLLOUT)
        except zmq.ZMQError:
            return False

    def _send(self, line: str) -> bool:
        data = line.encode("utf-8", "replace")[:MAX_LINE_BYTES]
        try:
            if self.socket is None:
                raise zmq.ZMQError(zmq.ENOTSOCK)
            self.socket.send(data, zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # zmq.Again: the queue is full; anything else: closing
            self._drop()
            return False

    def _drop(self) -> None:
        self.dropped += 1
        PushHandler.dropped_total += 1
        if self.dropped == 1:
            self._tell_local(logging.WARNING,
                             f"log collector {self.endpoint} is unreachable or too slow: dropping log lines "
                             "until it takes them again (this log keeps them)")

    def _report_drops(self) -> None:
        count, self.dropped = self.dropped, 0
        record = self._tell_local(logging.WARNING,
                                  f"dropped {count} log line(s) while the collector {self.endpoint} was unreachable")
        self._send(self.format(record))

    def _tell_local(self, level: int, message: str) -> logging.LogRecord:
        record = logging.getLogger(DROP_LOGGER).makeRecord(DROP_LOGGER, level, __file__, 0, message, (), None)
        if self.local is not None:
            self.local.handle(record)
        return record

    def close(self) -> None:
        self.acquire()
        try:
            if self.socket is not None:
                self.socket.close(linger=LINGER_MS)
                self.socket = None
                self.context.term()
                if self.dropped:
                    self._tell_local(logging.WARNING, f"dropped {self.dropped} log line(s): the collector "
                                                      f"{self.endpoint} did not take them before exit")
        finally:
            self.release()
        super().close()


def lines_dropped() -> int:
    """Log lines this process could not hand to its collector, since it started."""
    return PushHandler.dropped_total
