"""The compiled ResponseFramer (fleet/wsgi/_response.c) against its reference
(fleet.wsgi.response.ResponseFramer): for generated requests, statuses,
headers and bodies, the same transcript of bytes, errors and keep-alive
decisions. tests/unit/test_http_response.py also runs all its cases on both."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet import native
from fleet.wsgi.response import ResponseFramer

pytestmark = pytest.mark.skipif(native.PURE, reason="FLEET_PURE is set: the compiled framer is not used")
COMPILED = native.twin("fleet.wsgi._response", "ResponseFramer", None)


def transcript(cls, request: dict, status, headers, body_length, chunks) -> list:
    seen: list = []

    def step(name, call):
        try:
            seen.append((name, call()))
        except Exception as error:
            seen.append((name, type(error).__name__, str(error)))

    framer = None
    try:
        framer = cls(**request)
    except Exception as error:
        return [("init", type(error).__name__, str(error))]
    seen.append(("keep_alive", framer.keep_alive))
    step("start", lambda: framer.start(status, list(headers), body_length))
    for chunk in chunks:
        step("body", lambda chunk=chunk: framer.body(chunk))
    step("end", framer.end)
    seen.append(("after", framer.keep_alive, framer.status_code))
    return seen


names = st.sampled_from(["Content-Type", "Content-Length", "content-length", "Date", "X-A", "Connection",
                         "Upgrade", "Transfer-Encoding", "Bad Name", "X-\xe9"])
values = st.sampled_from(["text/plain", "5", " 5 ", "007", "", "x\r\ny", "caf\xe9", "\u0100", "Upgrade",
                          "99999999999999999999", "keep-alive"])
statuses = st.sampled_from(["200 OK", "204 No Content", "304 Not Modified", "101 Switching Protocols",
                            "404 Not Found", "100 Continue", "200", "999 X", "2000 OK", "200 caf\xe9", 200])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.01", "HTTP/2.0", None]),
    connection=st.sampled_from([None, "close", "keep-alive", "Upgrade, close", ["keep-alive", "x"]]),
    now=st.sampled_from([None, 0.0, 1.7e9]),
    status=statuses,
    headers=st.lists(st.tuples(names, values), max_size=4),
    body_length=st.sampled_from([None, 0, 5, 12]),
    chunks=st.lists(st.sampled_from([b"hello", b"", b"x" * 9, bytearray(b"ab"), "str"]), max_size=3),
)
def test_both_framers_write_the_same_transcript(method, version, connection, now, status, headers, body_length,
                                                chunks) -> None:
    request = {"method": method, "version": version, "connection": connection, "now": now}
    assert transcript(COMPILED, request, status, headers, body_length, chunks) == \
        transcript(ResponseFramer, request, status, headers, body_length, chunks)


def test_the_compiled_framer_needs_the_same_keywords() -> None:
    for cls in (ResponseFramer, COMPILED):
        with pytest.raises(TypeError):
            cls(method="GET", version="HTTP/1.1")
        with pytest.raises(TypeError):
            cls("GET", "HTTP/1.1", None)
