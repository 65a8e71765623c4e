"""The worker's compiled lane (fleet/worker/_lane.c) against the worker's Python path.

Each app of the table is served from the same Mongrel2 message twice through
Worker.handle: once with the lane, once without it (the reference path:
parse, _serve, serve). Everything observable must be the same: every message
sent to Mongrel2, in order, what the dispatcher is told (done), and the
log lines. The table covers what the lane finishes itself (a list or tuple of
bytes) and everything it must hand over after calling the app once:
iterators, write(), errors before and after start_response, exc_info,
statuses and headers the framer refuses, wrong body lengths, a client gone.
"""

from __future__ import annotations

import logging
import os
import sys

import pytest

from fleet import native
from fleet.config import Endpoint, HandlerConfig
from fleet.mongrel2.codec import Disconnect
from fleet.mongrel2.zmtp import frame_head
from fleet.worker import worker as worker_module
from fleet.worker.sources import Message
from fleet.worker.spec import WorkerSpec
from fleet.worker.tally import Tally
from tests.support.encoders import encode_json_request, encode_tnetstring_request

pytestmark = pytest.mark.skipif(native.PURE, reason="FLEET_PURE is set: the compiled lane is not used")

SENDER = b"34f9ceee-cd52-4b7f-b197-88bf2f0ec378"
HEADERS = {"METHOD": "GET", "VERSION": "HTTP/1.1", "PATH": "/t/x", "URI": "/t/x?a=1", "QUERY": "a=1",
           "PATTERN": "/t/", "URL_SCHEME": "http", "REMOTE_ADDR": "127.0.0.1", "host": "localhost:6767"}


class Publisher:
    """Records what would go to Mongrel2."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, message: bytes) -> bool:
        self.sent.append(message)
        return True

    def send_framed(self, wire: bytes) -> bool:
        """What the lane returns: messages framed for the wire, recorded one by one as send() does."""
        self.sent.extend(unframe(wire))
        return True


def unframe(wire: bytes) -> list[bytes]:
    """The messages in ZMTP single-frame messages, back to back (fleet.mongrel2.zmtp.frame_head)."""
    messages, pos = [], 0
    while pos < len(wire):
        if wire[pos] & 2:  # a long frame: 8 bytes of size
            size, pos = int.from_bytes(wire[pos + 1:pos + 9], "big"), pos + 9
        else:
            size, pos = wire[pos + 1], pos + 2
        messages.append(wire[pos:pos + size])
        pos += size
    assert pos == len(wire), "the wire ends on a message boundary"
    return messages


class Source:
    """A work source that records done() and can say the client has gone."""

    honours_credits = True

    def __init__(self, gone_after_first: bool = False) -> None:
        self.done_calls: list[tuple] = []
        self.gone_after_first = gone_after_first
        self.polls = 0

    def poll_control(self, timeout: float) -> list:
        self.polls += 1
        return [Disconnect(SENDER, b"42")] if self.gone_after_first else []

    def done(self, index, conn_id, sent=None, closed=False) -> None:
        self.done_calls.append((index, conn_id, sent, closed))


def make_worker(app) -> worker_module.Worker:
    config = HandlerConfig(endpoints=(Endpoint("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),), app="app", processes=2)
    return worker_module.Worker(WorkerSpec(config, "/nonexistent", os.getpid()), app)


def serve_both_ways(app, raw: bytes, monkeypatch, caplog, **source_kw) -> list:
    outcomes = []
    for lane in (native.compiled("fleet.worker._lane"), None):
        monkeypatch.setattr(worker_module, "lane", lane)
        worker, source, publisher = make_worker(app), Source(**source_kw), Publisher()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fleet.worker"):
            tally = Tally()
            worker.handle(Message(0, raw, None), source, [publisher], tally)
        logs = [(r.levelname, r.getMessage(), r.exc_info[0] if r.exc_info else None) for r in caplog.records]
        outcomes.append((publisher.sent, source.done_calls, logs, tally.statuses))
    return outcomes


def request(headers=None, body=b"", encode=encode_tnetstring_request, conn_id=b"42") -> bytes:
    return encode(SENDER, conn_id, b"/t/x", {**HEADERS, **(headers or {})}, body)


# -- the apps --------------------------------------------------------------------------------------

def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12")])
    return [b"Hello world!"]


def echo_environ(environ, start_response):
    keys = sorted(k for k in environ if k.isupper() or k.startswith("mongrel2."))
    body = "\n".join(f"{k}={environ[k]}" for k in keys).encode("latin-1") + environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return (b"env:", body)


def no_length_parts(environ, start_response):
    start_response("201 Created", [("X-A", "1")])
    return [b"a", b"", b"bc"]


def generator(environ, start_response):
    start_response("200 OK", [])
    yield b"one"
    yield b"two"


def lazy_start(environ, start_response):
    def body():
        start_response("200 OK", [("Content-Length", "3")])
        yield b"abc"
    return body()


class ClosingIterable:
    closed: list = []

    def __init__(self, start_response) -> None:
        start_response("200 OK", [])

    def __iter__(self):
        return iter([b"x"])

    def close(self) -> None:
        ClosingIterable.closed.append(True)


def closing(environ, start_response):
    return ClosingIterable(start_response)


def writes_then_list(environ, start_response):
    write = start_response("200 OK", [])
    write(b"early ")
    return [b"late"]


def raises_before_start(environ, start_response):
    raise RuntimeError("boom")


def raises_after_write(environ, start_response):
    start_response("200 OK", [])("partial")  # not bytes: the framer refuses it
    return []


def error_with_exc_info(environ, start_response):
    start_response("200 OK", [])
    try:
        raise ValueError("late")
    except ValueError:
        start_response("500 Internal Server Error", [("X-E", "1")], sys.exc_info())
    return [b"error page"]


def exc_info_after_head(environ, start_response):
    write = start_response("200 OK", [])
    write(b"x")
    try:
        raise ValueError("too late")
    except ValueError:
        start_response("500 Oops", [], sys.exc_info())
    return [b"never"]


def bad_status(environ, start_response):
    start_response("2000 Nope", [])
    return [b"x"]


def hop_by_hop(environ, start_response):
    start_response("200 OK", [("Connection", "keep-alive")])
    return [b"x"]


def too_long(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    return [b"abc"]


def too_short(environ, start_response):
    start_response("200 OK", [("Content-Length", "5")])
    return [b"abc"]


def no_start(environ, start_response):
    return [b"x"]


def not_bytes(environ, start_response):
    start_response("200 OK", [])
    return ["text"]


def bytearray_body(environ, start_response):
    start_response("200 OK", [])
    return [bytearray(b"ab"), b"c"]


def no_content(environ, start_response):
    start_response("204 No Content", [("Content-Length", "0")])
    return [b"ignored"]


def twice(environ, start_response):
    start_response("200 OK", [])
    start_response("200 OK", [])
    return [b"x"]


def streaming_to_gone_client(environ, start_response):
    start_response("200 OK", [])
    for _ in range(3):
        yield b"chunk"


APPS = [hello, echo_environ, no_length_parts, generator, lazy_start, closing, writes_then_list,
        raises_before_start, raises_after_write, error_with_exc_info, exc_info_after_head, bad_status, hop_by_hop,
        too_long, too_short, no_start, not_bytes, bytearray_body, no_content, twice]

REQUESTS = {
    "get": request(),
    "head": request({"METHOD": "HEAD"}),
    "http10": request({"VERSION": "HTTP/1.0"}),
    "http10-keep-alive": request({"VERSION": "HTTP/1.0", "connection": "keep-alive"}),
    "close": request({"connection": "close"}),
    "connection-list": request({"connection": ["keep-alive", "close"]}),
    "post": request({"METHOD": "POST", "content-length": "4"}, b"data"),
    "json": request(encode=encode_json_request),
}


@pytest.mark.parametrize("name", list(REQUESTS))
@pytest.mark.parametrize("app", APPS, ids=lambda app: app.__name__)
def test_the_lane_and_the_python_path_send_the_same(app, name, monkeypatch, caplog) -> None:
    with_lane, without = serve_both_ways(app, REQUESTS[name], monkeypatch, caplog)
    assert with_lane == without
    assert with_lane[1], "the dispatcher was told the request is done"


def test_a_client_gone_mid_stream_is_seen_both_ways(monkeypatch, caplog) -> None:
    with_lane, without = serve_both_ways(streaming_to_gone_client, request(), monkeypatch, caplog,
                                         gone_after_first=True)
    assert with_lane == without
    assert any("went away" in line for _, line, _ in with_lane[2])


def test_what_the_lane_does_not_take_is_served_by_python(monkeypatch, caplog) -> None:
    lane = native.compiled("fleet.worker._lane")
    for raw in (request({"x-mongrel2-upload-start": "/tmp/x"}), request({"DOWNLOAD_CREDITS": "100"}),
                SENDER + b" 42 @* 21:6:METHOD,4:JSON,}21:{\"type\":\"disconnect\"},", b"garbage"):
        assert lane.serve(hello, raw, Publisher(), Source().poll_control, False, True) is None
        with_lane, without = serve_both_ways(hello, raw, monkeypatch, caplog)
        assert with_lane == without


def test_the_common_request_is_finished_in_c(monkeypatch) -> None:
    lane = native.compiled("fleet.worker._lane")
    publisher = Publisher()
    conn_id, closed, status, wire = lane.serve(hello, request(), publisher, Source().poll_control, False, True)
    assert (conn_id, closed, status) == (b"42", False, "200 OK")
    assert publisher.sent == [], "the lane sends nothing itself: the worker's outbox does"
    message = (SENDER + b" 2:42, HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
               b"Content-Length: 12\r\n\r\nHello world!")
    assert wire == frame_head(len(message)) + message
    ClosingIterable.closed.clear()
    assert len(lane.serve(closing, request(), Publisher(), Source().poll_control, False, True)) == 5


@pytest.mark.parametrize("size", [0, 200, 255, 256, 70_000])
def test_the_wire_is_framed_as_zmtp_at_every_size(size) -> None:
    """Short frames up to 255 bytes, long ones (8-byte size) past: the close message too."""
    lane = native.compiled("fleet.worker._lane")

    def sized(environ, start_response):
        start_response("200 OK", [("Content-Length", str(size))])
        return [b"x" * size]

    _, closed, _, wire = lane.serve(sized, request({"connection": "close"}), Publisher(), Source().poll_control,
                                    False, True)
    assert closed
    reply, close = unframe(wire)
    assert reply.startswith(SENDER + b" 2:42, HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\n" + b"x" * size)
    assert close == SENDER + b" 2:42, "
    assert wire.startswith(frame_head(len(reply)))
