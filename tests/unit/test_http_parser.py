"""fleet.http.parser: client bytes in, Mongrel2-shaped requests and typed refusals out.

Every test runs three times: with the simple parser in front (fleet.http.simple,
then its compiled twin) and with h11 alone, so every path gives every answer below.
"""

from __future__ import annotations

import sys

import pytest

from fleet import native
from fleet.http import simple
from fleet.http.parser import (
    CONTINUE,
    NeedData,
    PeerClosed,
    Rejected,
    RequestReader,
    RequestReady,
    SendContinue,
)
from fleet.wsgi.environ import build_environ

TAKERS = {"simple (Python) first": simple.take_simple, "simple (C) first": native.compiled("fleet.http._simple"),
          "h11 alone": None}
SIMPLE = simple.take_simple  # what reader() gives its RequestReader; the fixture sets each in turn


@pytest.fixture(autouse=True, params=list(TAKERS))
def parser_path(request, monkeypatch):
    taker = TAKERS[request.param]
    if request.param == "simple (C) first":
        if taker is None:
            pytest.skip("fleet.http._simple is not built (or FLEET_PURE is set)")
        taker = taker.take_simple
    monkeypatch.setattr(sys.modules[__name__], "SIMPLE", taker)
    return request.param


def reader(max_body: int = 1000, header_limit: int = 16 * 1024) -> RequestReader:
    return RequestReader(b"http-1", "198.18.0.9", max_body=max_body, header_limit=header_limit, simple=SIMPLE)


def events(r: RequestReader, data: bytes) -> list:
    r.feed(data)
    out = []
    while True:
        event = r.next_event()
        out.append(event)
        if not isinstance(event, SendContinue):
            return out


def ready(r: RequestReader, data: bytes) -> RequestReady:
    (event,) = events(r, data)
    assert isinstance(event, RequestReady), event
    return event


def test_a_get_becomes_a_request_shaped_like_mongrel2s():
    got = ready(reader(), b"GET /a%20b/c?x=1&y=2 HTTP/1.1\r\nHost: example.org:8080\r\nX-Thing: 1\r\n"
                          b"x-thing: 2\r\nCookie: a=1\r\n\r\n")
    headers = got.request.headers
    assert headers["METHOD"] == "GET"
    assert headers["VERSION"] == "HTTP/1.1"
    assert headers["URI"] == "/a%20b/c?x=1&y=2"
    assert headers["PATH"] == "/a%20b/c"
    assert headers["QUERY"] == "x=1&y=2"
    assert headers["REMOTE_ADDR"] == "198.18.0.9"
    assert headers["URL_SCHEME"] == "http"
    assert headers["x-thing"] == ["1", "2"]
    assert headers["content-length"] == "0"
    assert got.request.conn_id == b"http-1"
    assert got.length == 0 and got.body.read() == b""


def test_the_environ_is_what_the_mongrel2_side_builds():
    got = ready(reader(), b"POST /p/q?z=9 HTTP/1.1\r\nHost: h:81\r\nContent-Type: text/plain\r\n"
                          b"Content-Length: 5\r\n\r\nhello")
    environ = build_environ(got.request, body=got.body, content_length=got.length, errors=None,
                            multithread=True, multiprocess=True)
    assert environ["REQUEST_METHOD"] == "POST"
    assert environ["PATH_INFO"] == "/p/q"
    assert environ["QUERY_STRING"] == "z=9"
    assert environ["SERVER_NAME"] == "h" and environ["SERVER_PORT"] == "81"
    assert environ["CONTENT_TYPE"] == "text/plain"
    assert environ["CONTENT_LENGTH"] == "5"
    assert environ["REMOTE_ADDR"] == "198.18.0.9"
    assert environ["wsgi.input"].read() == b"hello"


def test_a_client_header_cannot_pose_as_one_of_the_servers_keys():
    got = ready(reader(), b"GET / HTTP/1.1\r\nHost: h\r\nMETHOD: DELETE\r\nRemote_Addr: 1.2.3.4\r\n\r\n")
    assert got.request.headers["METHOD"] == "GET"
    assert got.request.headers["REMOTE_ADDR"] == "198.18.0.9"


def test_a_chunked_body_arrives_whole_with_its_real_length():
    got = ready(reader(), b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert got.body.read() == b"hello world"
    assert got.length == 11
    assert "transfer-encoding" not in got.request.headers
    assert got.request.headers["content-length"] == "11"


def test_bytes_may_come_one_at_a_time():
    r = reader()
    data = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
    seen = []
    for i in range(len(data)):
        r.feed(data[i:i + 1])
        seen.append(r.next_event())
    assert all(isinstance(e, NeedData) for e in seen[:-1])
    assert isinstance(seen[-1], RequestReady) and seen[-1].body.read() == b"abc"


def test_pipelined_requests_come_out_one_by_one_in_order():
    r = reader()
    first = ready(r, b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\nGET /3 HT")
    assert first.request.headers["PATH"] == "/1"
    assert isinstance(r.next_event(), NeedData)  # nothing more until the first is answered
    r.next_request()
    assert r.next_event().request.headers["PATH"] == "/2"
    r.next_request()
    assert r.mid_request
    assert isinstance(r.next_event(), NeedData)
    assert ready(r, b"TP/1.1\r\nHost: h\r\n\r\n").request.headers["PATH"] == "/3"


def test_a_head_over_the_limit_is_refused_431():
    r = reader(header_limit=1024)
    (event,) = events(r, b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 2000)
    assert event == Rejected(431, event.reason)


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read():
    (event,) = events(reader(max_body=10), b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n")
    assert isinstance(event, Rejected) and event.status == 413


def test_a_chunked_body_growing_over_the_limit_is_refused():
    (event,) = events(reader(max_body=10), b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                                           b"6\r\nabcdef\r\n6\r\nghijkl\r\n")
    assert isinstance(event, Rejected) and event.status == 413


@pytest.mark.parametrize("data, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: 1\r\n\r\n", 400),
])
def test_broken_http_is_refused_with_the_right_status(data, status):
    (event,) = events(reader(), data)
    assert isinstance(event, Rejected) and event.status == status, event
    assert event.reason


def test_expect_100_continue_is_asked_for_once_then_the_body_is_read():
    r = reader()
    got = events(r, b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert [type(e) for e in got] == [SendContinue, NeedData]
    assert CONTINUE.startswith(b"HTTP/1.1 100 ")
    assert isinstance(r.next_event(), NeedData)  # not asked twice
    assert ready(r, b"data").body.read() == b"data"


def test_expect_100_continue_over_the_limit_is_refused_without_continue():
    got = events(reader(max_body=3), b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n"
                                     b"Expect: 100-continue\r\n\r\n")
    assert [type(e) for e in got] == [Rejected]


def test_the_client_closing_is_reported_with_whether_a_request_was_cut():
    r = reader()
    assert isinstance(events(r, b"GET / HT")[0], NeedData)
    assert events(r, b"") == [PeerClosed(mid_request=True)]
    idle = reader()
    assert events(idle, b"") == [PeerClosed(mid_request=False)]


def test_a_close_after_a_complete_request_comes_after_it():
    r = reader()
    ready(r, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    r.feed(b"")
    r.next_request()
    assert r.next_event() == PeerClosed(mid_request=False)


def test_an_absolute_form_target_is_served_by_its_path():
    got = ready(reader(), b"GET http://example.org/a/b?c=d HTTP/1.1\r\nHost: example.org\r\n\r\n")
    assert got.request.headers["PATH"] == "/a/b"
    assert got.request.headers["QUERY"] == "c=d"


def test_http_10_is_served_as_10():
    got = ready(reader(), b"GET /old HTTP/1.0\r\n\r\n")
    assert got.request.headers["VERSION"] == "HTTP/1.0"


def test_a_big_body_is_spooled_and_intact():
    body = bytes(range(256)) * 5000  # 1.28 MB, over the in-memory spool limit
    got = ready(reader(max_body=len(body)), b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"
                % len(body) + body)
    assert got.length == len(body) and got.body.read() == body


def test_a_head_over_the_limit_is_refused_even_when_it_arrives_whole():
    r = reader(header_limit=1024)
    (event,) = events(r, b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
    assert isinstance(event, Rejected) and event.status == 431


def test_a_head_just_under_the_limit_is_served():
    r = reader(header_limit=1024)
    head = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: "
    data = head + b"a" * (1024 - len(head) - 4) + b"\r\n\r\n"
    assert len(data) == 1024
    assert ready(r, data).request.headers["x-big"].startswith("aaa")


# -- request smuggling (RFC 9112 6.1, 6.3, 7.1) -----------------------------------------------

POST = b"POST / HTTP/1.1\r\nHost: h\r\n"
SERVED = "served"


@pytest.mark.parametrize("data, expected", [
    # Two framings at once: refused, whichever comes first.
    (POST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400),
    (POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (POST + b"Content-Length: 3\r\nTransfer-Encoding: identity\r\n\r\nabc", 501),  # h11 refuses the coding first
    # Transfer-Encoding in HTTP/1.0: faulty framing.
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # Codings other than a single chunked: not implemented.
    (POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    (POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    (POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 501),
    (POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
    # Obfuscated header lines: refused, never read as some other header.
    (POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    (POST + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n", 400),
    (POST + b"X: a\rb\r\nContent-Length: 0\r\n\r\n", 400),
    (POST + b"X: a\x00b\r\nContent-Length: 0\r\n\r\n", 400),
    # Content-Length: one non-negative decimal; repeats must agree.
    (POST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (POST + b"Content-Length: +3\r\n\r\nabc", 400),
    (POST + b"Content-Length: -3\r\n\r\n", 400),
    (POST + b"Content-Length: 0x3\r\n\r\nabc", 400),
    (POST + b"Content-Length: 1 2\r\n\r\n", 400),
    # Chunk framing.
    (POST + b"Transfer-Encoding: chunked\r\n\r\n3x\r\nabc\r\n0\r\n\r\n", 400),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", 400),
    (POST + b"Transfer-Encoding: chunked\r\n\r\nfffffff\r\n", 413),  # refused at the chunk header
    (POST + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nab", 413),
    # What RFC 9112 lets a server accept, read one way only.
    (POST + b"Transfer-Encoding: CHUNKED\r\n\r\n3\r\nabc\r\n0\r\n\r\n", (SERVED, b"abc")),
    (POST + b"Transfer-Encoding:\tchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", (SERVED, b"abc")),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\n\r\n", (SERVED, b"abc")),
    (POST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", (SERVED, b"abc")),
    (b"POST / HTTP/1.1\nHost: h\nContent-Length: 3\n\nabc", (SERVED, b"abc")),  # bare LF ends lines
], ids=[
    "te-cl", "cl-te", "cl-te-identity", "te-http10", "te-twice", "gzip-chunked", "chunked-gzip", "xchunked",
    "space-before-colon", "vtab-value", "bare-cr", "nul", "cl-conflict", "cl-plus", "cl-negative", "cl-hex",
    "cl-two-numbers", "chunk-size-junk", "chunk-no-crlf", "chunk-header-over-limit", "chunk-size-overflow",
    "te-upper-case", "te-tab", "chunk-extension", "cl-repeated-equal", "bare-lf",
])
def test_request_smuggling_shapes_are_refused_or_read_one_way(data, expected):
    got = events(reader(max_body=1000), data)
    if isinstance(expected, int):
        assert [type(e) for e in got] == [Rejected] and got[0].status == expected, got
        assert got[0].reason
    else:
        (event,) = got
        assert isinstance(event, RequestReady), event
        assert event.body.read() == expected[1]


def test_after_a_websocket_handshake_the_rest_is_the_new_protocols() -> None:
    r = reader(max_body=10)
    r.feed(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
           b"\x81\x85MASKxxxxx")
    event = r.next_event()
    assert isinstance(event, RequestReady) and event.request.header("upgrade") == "websocket"
    assert r.take_rest() == b"\x81\x85MASKxxxxx"
