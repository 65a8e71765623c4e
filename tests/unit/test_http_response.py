"""ResponseFramer and error_response: HTTP/1.x framing and persistence, bytes only."""

from __future__ import annotations

import http.client
import io
from array import array
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet import native
from fleet.wsgi import response as http_response
from fleet.wsgi.response import ResponseError, ResponseFramer, error_response, http_date

GET, HEAD = "GET", "HEAD"
V11, V10 = "HTTP/1.1", "HTTP/1.0"
CL5 = [("Content-Length", "5")]


# Every test runs against the reference and, when built, its C twin (fleet/wsgi/_response.c).
FRAMERS = {"reference": ResponseFramer, "compiled": native.twin("fleet.wsgi._response", "ResponseFramer", None)}
Framer = ResponseFramer  # the class under test, set by the fixture below


@pytest.fixture(autouse=True, scope="module", params=list(FRAMERS))
def framer_class(request):
    """Module scope, so the hypothesis tests get it too; sets the global Framer."""
    global Framer
    if FRAMERS[request.param] is None:
        pytest.skip("FLEET_PURE is set: the compiled framer is not used")
    Framer = FRAMERS[request.param]
    yield Framer
    Framer = ResponseFramer


def framer(method: str = GET, version: str = V11, connection: str | list[str] | None = None,
           now: float | None = None) -> ResponseFramer:
    return Framer(method=method, version=version, connection=connection, now=now)


def respond(f: ResponseFramer, status: str, headers: list[tuple[str, str]],
            chunks: list[bytes], body_length: int | None = None) -> tuple[bytes, bytes]:
    """Push one response through ``f``; return (head, framed body + end)."""
    head = f.start(status, headers, body_length)
    return head, b"".join(f.body(c) for c in chunks) + f.end()


def header_lines(head: bytes) -> list[str]:
    """The header lines of a head, without the status line and final blank line."""
    assert head.endswith(b"\r\n\r\n")
    return head.decode("latin-1").split("\r\n")[1:-2]


@dataclass
class Case:
    """One row of the framing rules."""

    id: str
    status: str = "200 OK"
    headers: list[tuple[str, str]] = field(default_factory=list)
    method: str = GET
    version: str = V11
    connection: str | None = None
    body_length: int | None = None
    chunks: list[bytes] = field(default_factory=lambda: [b"hello"])
    added: list[str] = field(default_factory=list)  # header lines the framer appends
    body: bytes = b"hello"
    keep_alive: bool = True
    status_line: str = "HTTP/1.1 200 OK"


CASES = [
    Case("1.1 unknown length -> chunked", added=["Transfer-Encoding: chunked"],
         body=b"5\r\nhello\r\n0\r\n\r\n"),
    Case("1.1 app length", headers=CL5, added=["Content-Length: 5"]),
    Case("1.1 worker length", body_length=5, added=["Content-Length: 5"]),
    Case("1.1 app length wins over worker's", headers=CL5, body_length=99,
         added=["Content-Length: 5"]),
    Case("1.1 zero length", body_length=0, chunks=[], body=b"", added=["Content-Length: 0"]),
    Case("1.1 close", connection="close", headers=CL5,
         added=["Content-Length: 5", "Connection: close"], keep_alive=False),
    Case("1.1 close among tokens", connection="keep-alive, Close", headers=CL5,
         added=["Content-Length: 5", "Connection: close"], keep_alive=False),
    Case("1.1 close, unknown length still chunked", connection="close",
         added=["Transfer-Encoding: chunked", "Connection: close"],
         body=b"5\r\nhello\r\n0\r\n\r\n", keep_alive=False),
    Case("1.2 is read as 1.1", version="HTTP/1.2", added=["Transfer-Encoding: chunked"],
         body=b"5\r\nhello\r\n0\r\n\r\n"),
    Case("1.0 closes by default", version=V10, headers=CL5,
         added=["Content-Length: 5", "Connection: close"], keep_alive=False,
         status_line="HTTP/1.0 200 OK"),
    Case("1.0 keep-alive with length", version=V10, connection="Keep-Alive", headers=CL5,
         added=["Content-Length: 5", "Connection: keep-alive"], status_line="HTTP/1.0 200 OK"),
    Case("1.0 keep-alive with worker length", version=V10, connection="keep-alive",
         body_length=5, added=["Content-Length: 5", "Connection: keep-alive"],
         status_line="HTTP/1.0 200 OK"),
    Case("1.0 keep-alive, unknown length -> close", version=V10, connection="keep-alive",
         added=["Connection: close"], keep_alive=False, status_line="HTTP/1.0 200 OK"),
    Case("1.0 unknown length -> no framing, close", version=V10, chunks=[b"he", b"llo"],
         added=["Connection: close"], keep_alive=False, status_line="HTTP/1.0 200 OK"),
    Case("0.9 closes, never chunked", version="HTTP/0.9", connection="keep-alive",
         added=["Connection: close"], keep_alive=False),
    Case("unknown version closes", version="", headers=CL5,
         added=["Content-Length: 5", "Connection: close"], keep_alive=False),
    Case("HEAD keeps app length, no body", method=HEAD, headers=[("Content-Length", "100")],
         added=["Content-Length: 100"], body=b""),
    Case("HEAD unknown length: neither header", method=HEAD, body=b""),
    Case("HEAD worker length of the GET body", method=HEAD, body_length=5,
         added=["Content-Length: 5"], body=b""),
    Case("HEAD empty app body says nothing", method=HEAD, body_length=0, chunks=[], body=b""),
    Case("HEAD 1.0 keep-alive needs no length", method=HEAD, version=V10,
         connection="keep-alive", added=["Connection: keep-alive"], body=b"",
         status_line="HTTP/1.0 200 OK"),
    Case("204 no body, app length dropped", status="204 No Content",
         headers=[("Content-Length", "0")], chunks=[b"x"], body=b"",
         status_line="HTTP/1.1 204 No Content"),
    Case("204 unknown length not chunked", status="204 No Content", chunks=[], body=b"",
         status_line="HTTP/1.1 204 No Content"),
    Case("204 1.0 keep-alive", status="204 No Content", version=V10, connection="keep-alive",
         chunks=[], body=b"", added=["Connection: keep-alive"],
         status_line="HTTP/1.0 204 No Content"),
    Case("304 keeps app length, no body", status="304 Not Modified",
         headers=[("Content-Length", "10")], added=["Content-Length: 10"], body=b"",
         status_line="HTTP/1.1 304 Not Modified"),
    Case("304 no worker length", status="304 Not Modified", body_length=5, body=b"",
         status_line="HTTP/1.1 304 Not Modified"),
    Case("101 upgrade allowed", status="101 Switching Protocols", connection="Upgrade",
         headers=[("Upgrade", "websocket"), ("Connection", "Upgrade"),
                  ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")],
         chunks=[], body=b"", status_line="HTTP/1.1 101 Switching Protocols"),
    Case("status without reason", status="200", headers=CL5, added=["Content-Length: 5"],
         status_line="HTTP/1.1 200 "),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_framing_rules(case: Case) -> None:
    f = framer(case.method, case.version, case.connection)
    head, body = respond(f, case.status, case.headers, case.chunks, case.body_length)
    assert head.decode("latin-1").split("\r\n")[0] == case.status_line
    app_lines = [f"{n}: {v}" for n, v in case.headers if n.lower() != "content-length"]
    assert header_lines(head) == app_lines + case.added
    assert body == case.body
    assert f.keep_alive is case.keep_alive


@pytest.mark.parametrize("case", [c for c in CASES if not c.status.startswith("101")],
                         ids=[c.id for c in CASES if not c.status.startswith("101")])
def test_stdlib_client_reads_what_we_frame(case: Case) -> None:
    """http.client parses the bytes back into the app's body and agrees on persistence."""
    f = framer(case.method, case.version, case.connection)
    head, body = respond(f, case.status, case.headers, case.chunks, case.body_length)
    response = parse_with_http_client(head + body, case.method)
    expected = b"" if case.method == HEAD or case.body == b"" else b"".join(case.chunks)
    assert response.read() == expected
    assert response.will_close is not f.keep_alive


@settings(max_examples=50, deadline=None)
@given(chunks=st.lists(st.binary(max_size=40), max_size=6), known=st.booleans(),
       version=st.sampled_from([V10, V11]))
def test_any_body_round_trips(chunks: list[bytes], known: bool, version: str) -> None:
    f = framer(version=version, connection="keep-alive")
    total = sum(map(len, chunks))
    head, body = respond(f, "200 OK", [], chunks, total if known else None)
    response = parse_with_http_client(head + body, GET)
    assert response.read() == b"".join(chunks)
    assert response.will_close is not f.keep_alive


class _FakeSocket:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


def parse_with_http_client(data: bytes, method: str) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(_FakeSocket(data), method=method)  # type: ignore[arg-type]
    response.begin()
    return response


def test_chunked_bytes_exact() -> None:
    f = framer()
    head = f.start("200 OK", [("Content-Type", "text/plain")])
    assert head == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
    assert f.body(b"hello") == b"5\r\nhello\r\n"
    assert f.body(b"") == b""  # never a 0-size chunk mid-stream
    assert f.body(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert f.body(memoryview(b"ab")) == b"2\r\nab\r\n"
    assert f.end() == b"0\r\n\r\n"
    assert f.keep_alive


def test_more_body_than_content_length() -> None:
    f = framer()
    f.start("200 OK", CL5)
    assert f.body(b"hel") == b"hel"
    with pytest.raises(ResponseError, match="Content-Length"):
        f.body(b"lo!")
    assert not f.keep_alive


def test_less_body_than_content_length_closes() -> None:
    f = framer()
    f.start("200 OK", CL5)
    assert f.body(b"hel") == b"hel"
    assert f.end() == b""
    assert not f.keep_alive


def test_head_ignores_body_beyond_length() -> None:
    f = framer(HEAD)
    f.start("200 OK", CL5)
    assert f.body(b"far more than five bytes") == b""
    assert f.end() == b""
    assert f.keep_alive


@pytest.mark.parametrize("status", [
    "200OK", "20 OK", "2000 OK", "abc OK", " 200 OK", "200 OK\r\nX-Evil: 1", "200 OK\n",
    "200 OK\0", "099 Low", "600 High", "100 Continue", "103 Early Hints", "200 caf\u20ac", 200,
])
def test_invalid_status(status: str) -> None:
    with pytest.raises(ResponseError):
        framer().start(status, [])


@pytest.mark.parametrize("headers", [
    [("X-Evil", "a\r\nSet-Cookie: x=1")],
    [("X-Evil", "a\nb")],
    [("X-Evil", "a\rb")],
    [("X-Evil", "a\0b")],
    [("X-Evil\r\nSet-Cookie", "x=1")],
    [("X Evil", "1")],
    [("X-Evil:", "1")],
    [("", "1")],
    [("X-Euro", "\u20ac")],
    [("X-Bytes", b"1")],
    [("X-Short",)],
    [("Content-Length", "5"), ("Content-Length", "6")],
    [("Content-Length", "-1")],
    [("Content-Length", "five")],
])
def test_bad_headers_rejected(headers: list) -> None:
    with pytest.raises(ResponseError):
        framer().start("200 OK", headers)


@pytest.mark.parametrize("name", [
    "Connection", "Keep-Alive", "Transfer-Encoding", "TE", "Trailer", "Upgrade",
    "Proxy-Authenticate", "proxy-authorization",
])
def test_hop_by_hop_rejected(name: str) -> None:
    with pytest.raises(ResponseError, match="hop-by-hop"):
        framer().start("200 OK", [(name, "x")])


@pytest.mark.parametrize("headers", [
    [("Transfer-Encoding", "chunked")],
    [("Connection", "keep-alive")],
    [("Keep-Alive", "timeout=5")],
])
def test_101_allows_only_upgrade_headers(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(ResponseError):
        framer().start("101 Switching Protocols", [("Upgrade", "websocket")] + headers)


def test_identical_repeated_content_length_collapses() -> None:
    head = framer().start("200 OK", [("Content-Length", "5"), ("content-length", "5")])
    assert header_lines(head) == ["Content-Length: 5"]


def test_body_must_be_bytes() -> None:
    f = framer()
    f.start("200 OK", [])
    with pytest.raises(ResponseError, match="str"):
        f.body("text")  # type: ignore[arg-type]
    assert not f.keep_alive


def test_call_order_is_enforced() -> None:
    f = framer()
    with pytest.raises(RuntimeError):
        f.body(b"x")
    with pytest.raises(RuntimeError):
        f.end()
    f.start("200 OK", [])
    with pytest.raises(RuntimeError):
        f.start("200 OK", [])
    f.end()
    with pytest.raises(RuntimeError):
        f.body(b"x")


def test_failed_start_can_be_retried_with_an_error_response() -> None:
    """start() commits nothing when it raises, so the worker may call it again."""
    f = framer()
    with pytest.raises(ResponseError):
        f.start("200 OK", [("Bad Name", "x")])
    assert f.status_code is None
    head = f.start("500 Internal Server Error", [], body_length=0)
    assert f.status_code == 500
    assert header_lines(head) == ["Content-Length: 0"]


def test_date_header() -> None:
    head = framer(now=784111777.9).start("200 OK", [], body_length=0)
    assert "Date: Sun, 06 Nov 1994 08:49:37 GMT" in header_lines(head)
    assert http_date(784111777.2) == "Sun, 06 Nov 1994 08:49:37 GMT"  # cached per second
    head = framer(now=0).start("200 OK", [("Date", "app's")], body_length=0)
    assert [line for line in header_lines(head) if line.startswith("Date")] == ["Date: app's"]
    assert "Date" not in framer().start("200 OK", [], body_length=0).decode()


def test_connection_header_as_list() -> None:
    f = framer(connection=["keep-alive", "close"])
    f.start("200 OK", CL5)
    assert not f.keep_alive


def test_keep_alive_before_start_reflects_the_request() -> None:
    assert framer().keep_alive
    assert not framer(version=V10).keep_alive
    assert framer(version=V10, connection="keep-alive").keep_alive


def test_error_response_bytes() -> None:
    assert error_response(503) == (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 24\r\n"
        b"Connection: close\r\n\r\n"
        b"503 Service Unavailable\n")


@pytest.mark.parametrize(("status", "version", "line"), [
    (400, V11, "HTTP/1.1 400 Bad Request"),
    (500, V10, "HTTP/1.0 500 Internal Server Error"),
    (502, "HTTP/0.9", "HTTP/1.1 502 Bad Gateway"),
    (504, V11, "HTTP/1.1 504 Gateway Timeout"),
    (599, V11, "HTTP/1.1 599 Error"),
])
def test_error_response_parses(status: int, version: str, line: str) -> None:
    data = error_response(status, version, now=0)
    assert data.decode().split("\r\n")[0] == line
    response = parse_with_http_client(data, GET)
    assert response.status == status
    assert response.will_close
    assert response.getheader("Date") == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert response.read() == f"{status} {line.split(' ', 2)[2]}\n".encode()


@pytest.mark.parametrize("status", [200, 304, 99, 600])
def test_error_response_only_for_errors(status: int) -> None:
    with pytest.raises(ValueError):
        error_response(status)


# --- the fast paths and caches give the same answers as the general code ------


def test_call_order_errors_name_the_state() -> None:
    f = framer()
    with pytest.raises(RuntimeError, match="body\\(\\) called in state IDLE"):
        f.body(b"x")
    f.start("200 OK", [], body_length=0)
    f.end()
    with pytest.raises(RuntimeError, match="end\\(\\) called in state DONE"):
        f.end()


def test_valid_status_cached_invalid_never() -> None:
    for _ in range(2):
        head = framer().start("200 OK", [], body_length=0)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        with pytest.raises(ResponseError):
            framer().start("200 OK\r\n", [])
        with pytest.raises(ResponseError):
            framer().start("100 Continue", [])


def test_status_and_name_caches_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_response, "MAX_CACHED", 3)
    monkeypatch.setattr(http_response, "_STATUSES", {})
    monkeypatch.setattr(http_response, "_HEADER_NAMES", {})
    for _ in range(2):  # the second time, most are past the full caches
        for i in range(10):
            head = framer().start(f"{200 + i} R{i}", [(f"X-H{i}", "v")], body_length=0)
            status_line, first_header = head.decode().split("\r\n")[:2]
            assert (status_line, first_header) == (f"HTTP/1.1 {200 + i} R{i}", f"X-H{i}: v")
        with pytest.raises(ResponseError, match="invalid header name"):
            framer().start("200 OK", [("Bad Name", "v")])
    assert len(http_response._STATUSES) == len(http_response._HEADER_NAMES) == 3


def test_header_values_beyond_ascii() -> None:
    head = framer().start("200 OK", [("X-Latin", "caf\xe9"), ("X-Tab", "a\tb\x7f")], body_length=0)
    assert header_lines(head)[:2] == ["X-Latin: caf\xe9", "X-Tab: a\tb\x7f"]
    assert b"caf\xe9" in head  # one latin-1 byte, not UTF-8


def test_date_header_found_in_any_case() -> None:
    head = framer(now=0).start("200 OK", [("date", "app's")], body_length=0)
    dates = [line for line in header_lines(head) if line.lower().startswith("date")]
    assert dates == ["date: app's"]


@pytest.mark.parametrize(("value", "expected"), [(" 5 ", 5), ("007", 7), ("0", 0)])
def test_content_length_accepted(value: str, expected: int) -> None:
    head = framer().start("200 OK", [("Content-Length", value)])
    assert header_lines(head) == [f"Content-Length: {expected}"]


@pytest.mark.parametrize("value", ["+5", "", " ", "5.0", "\u0665", "\xb2", "1_000"])
def test_content_length_rejected(value: str) -> None:
    """Only ASCII digits: int() and str.isdigit() alone accept more."""
    with pytest.raises(ResponseError, match="Content-Length"):
        framer().start("200 OK", [("Content-Length", value)])


def test_body_accepts_bytes_like_and_subclasses() -> None:
    class Chunk(bytes):
        pass

    f = framer()
    f.start("200 OK", [])
    assert f.body(bytearray(b"ab")) == b"2\r\nab\r\n"
    assert f.body(Chunk(b"cd")) == b"2\r\ncd\r\n"
    assert type(f.body(Chunk(b"cd"))) is bytes
    shorts = array("H", [1, 2])  # 2 items, 4 bytes
    assert f.body(memoryview(shorts)) == b"4\r\n" + shorts.tobytes() + b"\r\n"
    f = framer(HEAD)
    f.start("200 OK", [])
    assert f.body(bytearray(b"ab")) == b""
    with pytest.raises(ResponseError, match="int"):
        f.body(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(("version", "keep_alive", "status_line"), [
    (None, False, "HTTP/1.1 200 OK"),
    ("HTTP/1.01", True, "HTTP/1.1 200 OK"),  # minor 1 written with a leading zero
    ("HTTP/01.0", False, "HTTP/1.1 200 OK"),  # major "01" is not "1": unknown, closes
    ("HTTP/2.0", False, "HTTP/1.1 200 OK"),
])
def test_unusual_versions(version: str, keep_alive: bool, status_line: str) -> None:
    f = framer(version=version, connection="keep-alive")
    head = f.start("200 OK", [], body_length=0)
    assert head.decode().split("\r\n")[0] == status_line
    assert f.keep_alive is keep_alive


def test_error_response_repeats_with_and_without_date() -> None:
    assert error_response(500) == error_response(500)
    dated = error_response(500, now=0)
    assert dated == error_response(500).replace(
        b"Connection: close\r\n", b"Connection: close\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n")
    assert error_response(500, "HTTP/1.0").startswith(b"HTTP/1.0 500 Internal Server Error\r\n")
