"""fleet.http.simple: the common request without h11, and never a different answer than h11's.

What it takes is a table; what it must leave to h11 is a table (every shape
of the smuggling table in test_http_parser among them); and a property test
generates requests, valid and mutated, and holds the reader with the simple
parser to the reader with h11 alone: same requests, same refusals.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet import native
from fleet.http.parser import RequestReader, RequestReady
from fleet.http.simple import parse_simple, take_simple

LIMIT, MAX_BODY = 16 * 1024, 1000
compiled = native.compiled("fleet.http._simple")


@pytest.mark.parametrize("data, expected", [
    (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", (b"GET", b"/", b"1.1", [(b"host", b"h")], 27, 0)),
    (b"GET /a?b=c HTTP/1.0\r\n\r\n", (b"GET", b"/a?b=c", b"1.0", [], 23, 0)),
    (b"POST /p HTTP/1.1\r\nHOST:  h \r\nContent-Length: 3\r\nX-A: a \t b\r\n\r\nabcGET",
     (b"POST", b"/p", b"1.1", [(b"host", b"h"), (b"content-length", b"3"), (b"x-a", b"a \t b")], 62, 3)),
    (b"PURGE /x HTTP/1.1\r\nHost: h\r\nX-Empty:\r\nX-Obs: \xe9t\xe9\r\n\r\n",
     (b"PURGE", b"/x", b"1.1", [(b"host", b"h"), (b"x-empty", b""), (b"x-obs", b"\xe9t\xe9")], 52, 0)),
])
def test_simple_requests_are_taken(data, expected):
    assert parse_simple(bytearray(data), LIMIT, MAX_BODY) == expected


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: h\r\n",  # head not complete yet
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nabc",  # body not complete yet
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n" + b"x" * 1001,  # over the body limit
    b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1234567890123456789\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Fold: a\r\n b\r\n\r\n",  # obs-fold
    b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",  # blank before the colon
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Ctl: a\x01b\r\n\r\n",
    b"GET / HTTP/1.1\nHost: h\n\n",  # bare line feeds
    b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n",
    b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",  # absolute form
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: " + b"y" * LIMIT + b"\r\n\r\n",  # head over the limit
])
def test_everything_else_is_left_to_h11(data):
    assert parse_simple(bytearray(data), LIMIT, MAX_BODY) is None


# -- the simple parser against h11 -------------------------------------------------------------------

def read_all(data: bytes, taker, pieces: int) -> list:
    """What a reader makes of ``data`` fed in ``pieces``: requests (as comparable tuples) and refusals."""
    reader = RequestReader(b"c", "10.0.0.1", max_body=MAX_BODY, header_limit=LIMIT, simple=taker)
    out = []
    step = max(1, len(data) // pieces)
    chunks = [data[i:i + step] for i in range(0, len(data), step)] + [b""]
    for chunk in chunks:
        reader.feed(chunk)
        while True:
            event = reader.next_event()
            if isinstance(event, RequestReady):
                out.append(("request", event.request.headers, event.body.read(), event.length))
                reader.next_request()
                continue
            out.append(type(event).__name__ + ":" + str(getattr(event, "status", "")))
            if type(event).__name__ in ("Rejected", "PeerClosed"):
                return out
            break
    return out


TOKEN = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"PATCH", b"M-SEARCH", b"get"])
TARGET = st.sampled_from([b"/", b"/a/b", b"/q?x=1&y=%20", b"/%E9t%E9", b"/a b", b"*", b"http://h/x", b""])
VERSION = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0", b"http/1.1"])
NAME = st.sampled_from([b"Host", b"host", b"Content-Length", b"Transfer-Encoding", b"Expect", b"X-A", b"Cookie",
                        b"Connection", b"X A", b"", b"X-\xe9"])
VALUE = st.sampled_from([b"h", b"", b" h ", b"3", b"0", b"5, 5", b"-1", b"chunked", b"100-continue", b"close",
                         b"a\tb", b"\xe9", b"a\x01b", b"a\r\n b", b"99999999999999999999"])
EOL = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])


@st.composite
def requests(draw) -> bytes:
    line = draw(TOKEN) + b" " + draw(TARGET) + b" " + draw(VERSION) + draw(EOL)
    fields = b"".join(draw(NAME) + b":" + draw(VALUE) + draw(EOL)
                      for _ in range(draw(st.integers(0, 5))))
    body = draw(st.sampled_from([b"", b"abc", b"0\r\n\r\n", b"3\r\nabc\r\n0\r\n\r\n"]))
    return line + fields + draw(EOL) + body


@settings(max_examples=400, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=3), st.integers(1, 4))
def test_the_simple_parser_never_answers_differently_from_h11(pipeline, pieces):
    data = b"".join(pipeline)
    alone = read_all(data, None, pieces)
    assert read_all(data, take_simple, pieces) == alone
    if compiled is not None:
        assert read_all(data, compiled.take_simple, pieces) == alone


# -- the compiled twin against the reference -----------------------------------------------------------

@settings(max_examples=600, deadline=None)
@given(requests(), st.integers(0, 64), st.integers(0, 8))
def test_the_compiled_twin_takes_what_the_reference_takes(data, cut, limit_cut):
    if compiled is None:
        pytest.skip("fleet.http._simple is not built (or FLEET_PURE is set)")
    data = bytearray(data[:len(data) - cut] if cut < len(data) else data)
    limit = max(1, len(data) - limit_cut)
    for head_limit, max_body in ((LIMIT, MAX_BODY), (limit, 2), (limit, 0)):
        args = (data, head_limit, max_body, b"http-7", "10.1.2.3", "https")
        expected, got = take_simple(*args), compiled.take_simple(*args)
        assert got == expected
        if got is not None:
            assert list(got[0].headers) == list(expected[0].headers)  # the same order too


@pytest.mark.skipif(compiled is None, reason="fleet.http._simple is not built (or FLEET_PURE is set)")
def test_the_compiled_twin_on_the_tables():
    for data in [b"GET /a?b HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\nX-A: 3\r\n\r\n",
                 b"GET /? HTTP/1.0\r\nCookie:\r\n\r\n",
                 b"POST /%E9 HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody-and-more",
                 b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-" + b"n" * 300 + b": v\r\n\r\n"]:
        args = (bytearray(data), LIMIT, MAX_BODY, b"c", "r", "http")
        assert compiled.take_simple(*args) == take_simple(*args) is not None
