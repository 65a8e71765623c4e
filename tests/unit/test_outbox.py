"""The outbox: finished replies wait for the next ones, never behind a slow request for long.

The Outbox alone first (order, what leaves at once, when it is due), then a
real request thread of a Worker (its lane, its loop) with two requests in
hand, the second stuck in the app: the first one's reply and DONE must wait
while the thread is busy, and the worker's main thread must send them for it
once they are stale.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from fleet import native
from fleet.config import Endpoint, HandlerConfig
from fleet.mongrel2.zmtp import frame_head
from fleet.worker import outbox as outbox_module
from fleet.worker import worker as worker_module
from fleet.worker.outbox import HOLD_BYTES, Outbox
from fleet.worker.sources import FINISHED, Message
from fleet.worker.spec import WorkerSpec
from tests.support.encoders import encode_tnetstring_request

SENDER = b"34f9ceee-cd52-4b7f-b197-88bf2f0ec378"


class Wire:
    """Everything that left, from every publisher and the link, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, bytes]] = []
        self.changed = threading.Condition()

    def record(self, where: str, data: bytes) -> None:
        with self.changed:
            self.log.append((where, bytes(data)))
            self.changed.notify_all()

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.log), timeout)


class Publisher:
    def __init__(self, wire: Wire, name: str) -> None:
        self.wire, self.name = wire, name

    def send(self, message: bytes) -> bool:
        self.wire.record(self.name, frame_head(len(message)) + message)
        return True

    def send_framed(self, *parts: bytes) -> bool:
        self.wire.record(self.name, b"".join(parts))
        return True


def make_outbox(endpoints: int = 2) -> tuple[Outbox, Wire]:
    wire = Wire()
    outbox = Outbox([Publisher(wire, f"m2-{i}") for i in range(endpoints)], lambda data: wire.record("link", data))
    return outbox, wire


def framed(message: bytes) -> bytes:
    """A reply as the lane returns it: framed for the wire."""
    return frame_head(len(message)) + message


def test_replies_leave_before_the_dones_written_after_them():
    outbox, wire = make_outbox()
    outbox.hold(0, framed(b"reply-a"), b"done-a")
    outbox.hold(1, framed(b"reply-b"), None)
    outbox.hold(0, framed(b"reply-c"), b"done-bc")
    assert wire.log == []
    outbox.flush()
    assert wire.log == [
        ("m2-0", framed(b"reply-a") + framed(b"reply-c")),
        ("m2-1", framed(b"reply-b")),
        ("link", b"done-adone-bc"),
    ]
    outbox.flush()
    assert len(wire.log) == 3, "an empty outbox sends nothing"


def test_direct_mode_holds_replies_without_dones():
    outbox, wire = make_outbox(1)
    outbox.hold(0, framed(b"reply"), None)  # direct mode: no DONE to keep
    assert outbox.since
    outbox.flush()
    assert wire.log == [("m2-0", framed(b"reply"))]


def test_a_large_reply_goes_after_what_waits_without_a_copy():
    outbox, wire = make_outbox(1)
    outbox.hold(0, framed(b"small"), b"done-small")
    big = framed(b"x" * HOLD_BYTES)
    outbox.hold(0, big, b"done-big")
    assert wire.log == [("m2-0", framed(b"small")), ("link", b"done-small"), ("m2-0", big)]
    outbox.flush()
    assert wire.log[-1] == ("link", b"done-big"), "the large reply's DONE still leaves after it"


def test_due_after_hold_max_or_hold_bytes(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(outbox_module.time, "monotonic", lambda: clock[0])
    outbox, _ = make_outbox(1)
    assert not outbox.due()
    outbox.hold(0, framed(b"a"), None)
    assert not outbox.due()
    clock[0] += outbox_module.HOLD_MAX * 1.5
    assert outbox.due()
    outbox.flush()
    outbox.hold(0, framed(b"b" * (HOLD_BYTES // 2 - 16)), None)
    assert not outbox.due()
    outbox.hold(0, framed(b"c" * (HOLD_BYTES // 2)), None)
    assert outbox.due()


def test_flush_if_stale_only_after_stall():
    outbox, wire = make_outbox(1)
    outbox.hold(0, framed(b"a"), None)
    outbox.flush_if_stale(outbox.since + outbox_module.STALL / 2)
    assert wire.log == []
    outbox.flush_if_stale(outbox.since + outbox_module.STALL * 1.5)
    assert wire.log == [("m2-0", framed(b"a"))]


# -- a request thread with a slow request behind a fast one ------------------------------------------

HEADERS = {"METHOD": "GET", "VERSION": "HTTP/1.1", "PATH": "/", "URI": "/", "PATTERN": "/",
           "URL_SCHEME": "http", "REMOTE_ADDR": "127.0.0.1", "host": "localhost"}


class HandSource:
    """Two requests in hand at once, as the dispatcher's one write brings them."""

    honours_credits = True

    def __init__(self, wire: Wire, messages: list[Message]) -> None:
        self.wire = wire
        self.messages = list(messages)
        self.link = self  # the outbox sends DONEs through source.link.send_encoded

    def next(self):
        return self.messages.pop(0) if self.messages else FINISHED

    def has_more(self) -> bool:
        return bool(self.messages)

    def done_message(self, index, conn_id, sent=None, closed=False) -> bytes:
        return b"DONE:" + conn_id + b";"

    def send_encoded(self, data: bytes) -> None:
        self.wire.record("link", data)

    def poll_control(self, timeout: float) -> list:
        return []

    def close(self) -> None:
        pass


@pytest.mark.skipif(native.PURE, reason="FLEET_PURE is set: no lane, so nothing is held")
def test_a_stuck_request_does_not_hold_back_the_reply_before_it(monkeypatch):
    release, stuck = threading.Event(), threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            stuck.set()
            release.wait(30)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    config = HandlerConfig(endpoints=(Endpoint("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),), app="app")
    worker = worker_module.Worker(WorkerSpec(config, "/nonexistent", os.getppid()), app)
    wire = Wire()
    worker.responders = [[Publisher(wire, "m2-0")]]
    fast = encode_tnetstring_request(SENDER, b"1", b"/", HEADERS, b"")
    slow = encode_tnetstring_request(SENDER, b"2", b"/", {**HEADERS, "PATH": "/slow", "URI": "/slow"}, b"")
    source = HandSource(wire, [Message(0, fast, None), Message(0, slow, None)])
    monkeypatch.setattr(worker, "work_source", lambda number: source)
    thread = threading.Thread(target=worker.run_thread, args=(0,), daemon=True)
    worker.threads.append(thread)
    thread.start()
    assert stuck.wait(5)
    time.sleep(0.05)
    assert wire.log == [], "the first reply waits while the next request is in hand"

    waiter = threading.Thread(target=worker.wait, args=(lambda figures: None,), daemon=True)  # the worker's main thread
    waiter.start()
    assert wire.wait_for(lambda log: [where for where, _ in log] == ["m2-0", "link"])
    assert b"200 OK" in wire.log[0][1] and b" 1:1, " in wire.log[0][1]
    assert wire.log[1][1] == b"DONE:1;"

    release.set()
    thread.join(5)
    waiter.join(5)
    assert [where for where, _ in wire.log] == ["m2-0", "link", "m2-0", "link"]
    assert b" 1:2, " in wire.log[2][1] and wire.log[3][1] == b"DONE:2;"
