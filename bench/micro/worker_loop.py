"""Micro-benchmark of a broker-mode request thread's whole loop, in one process.

    .venv/bin/python -m bench.micro.worker_loop [-n NUMBER] [-r REPEAT] [--profile]

A real BrokerSource reads requests from a real link (a Unix socket whose
other end this script holds, preloaded with the captured GET of
bench.micro.mongrel2), Worker.handle serves them with the benchmark's
hello-world app, and the DONEs go back over the link (with the outbox, as
the worker's threads run, they leave together). Only the reply to
Mongrel2 is not sent (a publisher that counts). Prints µs per request with
the compiled lane and with the worker's Python path (the lane off); the
compiled codec, environ and framer run in both unless FLEET_PURE=1.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading

from bench.hello_app import application
from bench.micro.cases import run_cases
from bench.micro.mongrel2 import TNET_GET
from fleet.config import Endpoint, HandlerConfig
from fleet.dispatch import frames
from fleet.worker import worker as worker_module
from fleet.worker.outbox import Outbox
from fleet.worker.sources import BrokerSource
from fleet.worker.spec import WorkerSpec
from fleet.worker.tally import Tally

BATCH = 200  # requests queued on the link before each timed call


class CountingPublisher:
    spec = "count://"

    def __init__(self) -> None:
        self.sent = 0

    def send(self, message: bytes) -> bool:
        self.sent += 1
        return True

    def send_framed(self, data: bytes) -> bool:
        self.sent += 1
        return True


def make_loop(lane: object, held: bool = False) -> tuple:
    directory = tempfile.mkdtemp(prefix="fleet-loop-")
    path = os.path.join(directory, "link")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    source = BrokerSource(path, b"1/0", 1, None, threading.Event())
    dispatcher, _ = listener.accept()
    dispatcher.setblocking(False)
    config = HandlerConfig(endpoints=(Endpoint("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),), app="app", processes=2)
    worker = worker_module.Worker(WorkerSpec(config, path, os.getpid()), application)
    publishers = [CountingPublisher()]
    tally = Tally()
    batch = frames.encode([frames.tagged(frames.REQUEST, 0), TNET_GET]) * BATCH

    def drain() -> None:
        try:
            while dispatcher.recv(1 << 16):
                pass
        except BlockingIOError:
            pass

    outbox = Outbox(publishers, source.link.send_encoded) if held else None

    def run() -> None:
        worker_module.lane = lane
        dispatcher.sendall(batch)
        for _ in range(BATCH):
            worker.handle(source.next(), source, publishers, tally, outbox)
            if outbox is not None and (not source.has_more() or outbox.due()):
                outbox.flush()  # as Worker.run_thread does
        drain()

    return run


def main(argv: list[str] | None = None) -> int:
    lane = worker_module.lane
    cases = {"loop, Python path": make_loop(None)}
    if lane is not None:
        cases["loop, compiled lane"] = make_loop(lane)
        cases["loop, compiled lane, outbox"] = make_loop(lane, held=True)
    return run_cases(cases, __doc__.splitlines()[0], argv, number=10, repeat=5, per=BATCH)


if __name__ == "__main__":
    sys.exit(main())
