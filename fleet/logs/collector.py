"""``fleet logs --bind ENDPOINT``: collect the lines that ``--logger zeromq:`` pushes
and print them (or append them to ``--output FILE``), until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import BinaryIO

import zmq

from fleet.config import ConfigError, check_endpoint
from fleet.logs.push import MAX_LINE_BYTES

# How often the loop looks at the signals it recorded.
POLL_MS = 200


def clean_line(message: bytes) -> bytes:
    """One output line from one message: valid UTF-8, ending in exactly one newline."""
    return message.decode("utf-8", "replace").rstrip("\n").encode() + b"\n"


class Collector:
    """A PULL socket bound on `endpoint`; writes every single-frame message as a line."""

    def __init__(self, endpoint: str, output_path: str | None) -> None:
        check_endpoint(endpoint, "--bind")
        self.output_path = output_path
        self.output = self._open()
        self.lines = 0
        self.refused = 0
        self.signals: list[int] = []
        self.context = zmq.Context(io_threads=1)
        self.socket = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        # A peer sending more than this is disconnected by ZeroMQ before we read anything.
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_LINE_BYTES)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as error:
            self.close()
            raise ConfigError(f"--bind {endpoint!r}: {zmq.strerror(error.errno)}") from None

    def _open(self) -> BinaryIO:
        if self.output_path is None:
            return sys.stdout.buffer
        try:
            return open(self.output_path, "ab")
        except OSError as error:
            raise ConfigError(f"--output {self.output_path!r}: {error.strerror}") from None

    def run(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, lambda signum, _frame: self.signals.append(signum))
        print(f"fleet logs: collecting on {self.socket.getsockopt_string(zmq.LAST_ENDPOINT)}",
              file=sys.stderr, flush=True)
        while True:
            while self.signals:
                signum = self.signals.pop(0)
                if signum != signal.SIGUSR1:
                    return 0
                self.reopen()
            if self.socket.poll(POLL_MS):
                self.drain()

    def drain(self) -> None:
        """Write every message waiting now, then flush once."""
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 1:
                self.refuse(f"a message of {len(frames)} frames (fleet sends one line per message)")
                continue
            self.output.write(clean_line(frames[0]))
            self.lines += 1
        self.output.flush()

    def refuse(self, what: str) -> None:
        """Bad input: said once, then only counted."""
        self.refused += 1
        if self.refused == 1:
            print(f"fleet logs: dropped {what}; further bad messages are only counted", file=sys.stderr,
                  flush=True)

    def reopen(self) -> None:
        """After logrotate moved the file: a new one at the same path (the old one stays if that fails)."""
        if self.output_path is None:
            return
        try:
            fresh = self._open()
        except ConfigError as error:
            print(f"fleet logs: cannot reopen: {error}", file=sys.stderr, flush=True)
            return
        self.output.close()
        self.output = fresh

    def close(self) -> None:
        self.socket.close()
        self.context.term()
        if self.output_path is not None:
            self.output.close()


def run_logs(args: argparse.Namespace) -> int:
    collector = Collector(args.bind, args.output)
    try:
        return collector.run()
    except BrokenPipeError:  # `fleet logs ... | head`: the reader is gone
        return 0
    finally:
        collector.close()
        print(f"fleet logs: {collector.lines} line(s) collected"
              + (f", {collector.refused} bad message(s) dropped" if collector.refused else ""),
              file=sys.stderr, flush=True)
