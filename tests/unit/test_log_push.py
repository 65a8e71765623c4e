"""The ZeroMQ log handler and collector, with real ZeroMQ sockets on ipc:// paths.

No Mongrel2 and no fleet processes here (tests/integration/test_e2e_logger.py
has those): a PULL socket in the test plays the collector.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from fleet.config import ConfigError
from fleet.logs.collector import Collector, clean_line
from fleet.logs.local import setup_logging
from fleet.logs.push import MAX_LINE_BYTES, PushHandler, parse_logger

LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\S+) \[(\d+)\] (\w+) (\S+): (.*)$", re.S)
WAIT_MS = 10_000  # generous: a missing line fails the test, it never just slows it


class Recorder(logging.Handler):
    """Stands in for the host's own log: keeps the records it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


class Failing(PushHandler):
    """A PushHandler that remembers every error logging would otherwise print and ignore."""

    errors: list[BaseException]

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        import sys

        self.errors.append(sys.exc_info()[1])


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/logs"


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


def pull(context: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    return sock


def receive(sock: zmq.Socket) -> str:
    assert sock.poll(WAIT_MS), "no line arrived"
    return sock.recv().decode()


def record(message: str, *args: object, level: int = logging.INFO, name: str = "app.views",
           exc_info: object = None) -> logging.LogRecord:
    return logging.getLogger(name).makeRecord(name, level, __file__, 1, message, args, exc_info)


# -- --logger ------------------------------------------------------------------------


@pytest.mark.parametrize("text, endpoint", [
    ("zeromq:tcp://10.0.0.5:5140", "tcp://10.0.0.5:5140"),
    ("zeromq:tcp://logs.example:1", "tcp://logs.example:1"),
    ("zeromq:ipc:///run/fleet/logs", "ipc:///run/fleet/logs"),
])
def test_logger_spec_gives_the_endpoint(text: str, endpoint: str) -> None:
    assert parse_logger(text) == endpoint


@pytest.mark.parametrize("text, fragment", [
    ("tcp://10.0.0.5:5140", "expected zeromq:"),
    ("syslog:udp://x:514", "expected zeromq:"),
    ("zeromq:", "expected zeromq:"),
    ("zeromq:udp://x:1", "not a ZeroMQ endpoint"),
    ("zeromq:tcp://x:99999", "out of range"),
    ("zeromq:tcp://*:5140", "not '*'"),
])
def test_logger_spec_mistakes(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_logger(text)
    assert fragment in str(error.value) and "\n" not in str(error.value)


# -- the handler -----------------------------------------------------------------------


def test_a_line_has_time_host_pid_level_name_and_message(context: zmq.Context, endpoint: str) -> None:
    collector = pull(context, endpoint)
    handler = PushHandler(endpoint, host="web-3")
    try:
        handler.handle(record("served %s in %d ms", "/a", 12, level=logging.WARNING))
        when, host, pid, level, name, message = LINE.match(receive(collector)).groups()
        assert (host, int(pid), level, name, message) == ("web-3", os.getpid(), "WARNING", "app.views",
                                                          "served /a in 12 ms")
        try:
            raise ValueError("bad thing")
        except ValueError:
            import sys

            handler.handle(record("request failed", level=logging.ERROR, exc_info=sys.exc_info()))
        failed = LINE.match(receive(collector)).group(6)
        assert failed.startswith("request failed\nTraceback") and "ValueError: bad thing" in failed
        handler.handle(record("x" * (2 * MAX_LINE_BYTES)))
        assert len(receive(collector).encode()) == MAX_LINE_BYTES
    finally:
        handler.close()


def _emit_in_thread(handler: logging.Handler, count: int, prefix: str) -> None:
    """Log `count` lines from another thread; fail if that does not return (it must never block)."""
    worker = threading.Thread(target=lambda: [handler.handle(record(f"{prefix} {i}")) for i in range(count)])
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "logging blocked on a dead collector"


def test_a_dead_collector_costs_dropped_lines_that_are_reported_when_it_is_back(
        context: zmq.Context, endpoint: str) -> None:
    local = Recorder()
    handler = PushHandler(endpoint, local=local, hwm=10)
    try:
        _emit_in_thread(handler, 500, "early")  # nobody listens yet
        assert 0 < handler.dropped < 500
        assert [m for m in local.messages() if "dropping log lines" in m] == [
            f"log collector {endpoint} is unreachable or too slow: dropping log lines until it takes them "
            "again (this log keeps them)"]

        collector = pull(context, endpoint)
        emitted, reported, received = 500, 0, []
        while not reported:
            handler.handle(record(f"later {emitted}"))
            emitted += 1
            while collector.poll(10 if emitted < 10_000 else WAIT_MS):
                message = LINE.match(collector.recv().decode()).group(6)
                found = re.match(r"dropped (\d+) log line\(s\) while the collector", message)
                if found:
                    reported += int(found.group(1))
                else:
                    received.append(message)
        handler.handle(record("end"))
        assert handler.dropped == 0  # "end" was queued, so everything before it is accounted for
        while (message := LINE.match(receive(collector)).group(6)) != "end":
            received.append(message)
        # Every line is either delivered or counted in the report: none vanish silently.
        assert len(received) + reported == emitted
        assert len(set(received)) == len(received)
        assert f"dropped {reported} log line(s) while the collector {endpoint} was unreachable" in local.messages()
    finally:
        handler.close()


def test_closing_with_a_dead_collector_returns_and_says_what_was_lost(endpoint: str) -> None:
    local = Recorder()
    handler = PushHandler(endpoint, local=local, hwm=5)
    _emit_in_thread(handler, 20, "lost")
    closing = threading.Thread(target=handler.close)
    closing.start()
    closing.join(60)
    assert not closing.is_alive(), "close() hung on a dead collector"
    assert local.messages()[-1] == (f"dropped 15 log line(s): the collector {endpoint} did not take them "
                                    "before exit")


def test_many_threads_share_one_handler_safely(context: zmq.Context, endpoint: str) -> None:
    collector = pull(context, endpoint)
    handler = Failing(endpoint, hwm=100_000)  # room for every line: this test is about threads, not drops
    handler.errors = []
    threads, per_thread = 16, 400
    received: list[str] = []

    def collect() -> None:
        while True:
            message = LINE.match(receive(collector)).group(6)
            if message == "end":
                return
            received.append(message)

    reader = threading.Thread(target=collect)
    reader.start()
    try:
        writers = [threading.Thread(target=lambda t=t: [handler.handle(record(f"t{t} n{i}"))
                                                        for i in range(per_thread)]) for t in range(threads)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        handler.handle(record("end"))
        reader.join(60)
        assert not reader.is_alive()
        assert handler.errors == []
        assert all(re.fullmatch(r"t\d+ n\d+", m) for m in received)  # no line torn or mixed with another
        assert len(set(received)) == len(received)
        assert handler.dropped == 0 and len(received) == threads * per_thread
    finally:
        handler.close()


def test_an_unusable_announced_logger_is_logged_and_local_logging_goes_on(
        capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        setup_logging("info", None, "zeromq:udp://nowhere:1")
        logging.getLogger("fleet.test").info("still logging")
        err = capsys.readouterr().err
        assert "not logging to 'zeromq:udp://nowhere:1': --logger 'udp://nowhere:1': not a ZeroMQ endpoint" in err
        assert "still logging" in err
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


# -- the collector -------------------------------------------------------------------


def test_clean_line_ends_in_one_newline_and_is_valid_utf8() -> None:
    assert clean_line(b"a b\n\n") == b"a b\n"
    assert clean_line(b"caf\xe9") == "caf\ufffd\n".encode()


def test_collector_writes_lines_and_refuses_multipart_messages(context: zmq.Context, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    endpoint = f"ipc://{tmp_path}/collect"
    out = tmp_path / "collected.log"
    collector = Collector(endpoint, str(out))
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoint)
    try:
        push.send(b"first")
        push.send_multipart([b"two", b"frames"])
        push.send_multipart([b"three", b"frames", b"!"])
        push.send(b"last\n")
        while collector.lines < 2:
            assert collector.socket.poll(WAIT_MS)
            collector.drain()
    finally:
        collector.close()
    assert out.read_bytes() == b"first\nlast\n"
    assert collector.refused == 2
    assert capsys.readouterr().err.count("dropped a message of") == 1


def test_collector_refuses_an_endpoint_in_use_in_one_line() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        endpoint = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(ConfigError) as error:
            Collector(endpoint, None)
    assert str(error.value) == f"--bind {endpoint!r}: Address already in use"


# -- the cluster's configuration -------------------------------------------------------


def test_the_logger_travels_in_the_configuration_and_a_nodes_own_wins() -> None:
    import argparse

    from fleet.config import Endpoint, HandlerConfig
    from fleet.node import local_overrides

    announced = HandlerConfig.from_dict(HandlerConfig(
        endpoints=(Endpoint("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),), app="app",
        logger="zeromq:tcp://10.0.0.5:5140").to_dict())
    assert announced.logger == "zeromq:tcp://10.0.0.5:5140"
    bare = argparse.Namespace(processes=None, threads=None, mongrel2_chroot=None, logger=None)
    assert local_overrides(bare, "127.0.0.1")(announced).logger == "zeromq:tcp://10.0.0.5:5140"
    own = argparse.Namespace(processes=None, threads=None, mongrel2_chroot=None, logger="zeromq:ipc:///run/l")
    assert local_overrides(own, "127.0.0.1")(announced).logger == "zeromq:ipc:///run/l"
