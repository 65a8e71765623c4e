"""Tests for the sans-I/O Mongrel2 codec (fleet.mongrel2.codec).

Captured bytes are what Mongrel2 1.12 sent to a handler. Where the capture elided
headers with "…" the messages were completed with the elided headers filled
in; the resulting HEADERS lengths (363 tnetstring, 355 json) equal the
captured ones, so the reconstruction is byte-exact up to header order.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import tnetstring
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fleet.mongrel2.codec as mongrel2
from fleet.mongrel2.codec import (
    MAX_HEADERS_BYTES,
    MAX_TARGETS,
    Control,
    Credits,
    Disconnect,
    ProtocolError,
    Request,
    encode_close,
    encode_ctl,
    encode_response,
    parse_message,
    peek_route,
)
from tests.support.encoders import ENCODERS, encode_json_request, encode_tnetstring_request, netstring

# --- captured messages ---------------------------------------------------------------

TNET_UUID = b"34f9ceee-cd52-4b7f-b197-88bf2f0ec378"
JSON_UUID = b"5a2b8d6e-0e8b-4c3e-9b1d-2f1f3c0a7e11"

TNET_GET = (
    b"34f9ceee-cd52-4b7f-b197-88bf2f0ec378 4 /t/hello 266:11:REMOTE_ADDR,9:127.0.0.1,"
    b"6:METHOD,3:GET,10:URL_SCHEME,4:http,7:PATTERN,3:/t/,5:QUERY,9:a=1&b=two,3:URI,"
    b"18:/t/hello?a=1&b=two,7:VERSION,8:HTTP/1.1,4:PATH,8:/t/hello,4:host,14:127.0.0.1:6780,"
    b"10:user-agent,11:curl/7.88.1,6:accept,3:*/*,15:x-forwarded-for,9:127.0.0.1,}0:,"
)
TNET_GET_HEADERS = {
    "REMOTE_ADDR": "127.0.0.1",
    "METHOD": "GET",
    "URL_SCHEME": "http",
    "PATTERN": "/t/",
    "QUERY": "a=1&b=two",
    "URI": "/t/hello?a=1&b=two",
    "VERSION": "HTTP/1.1",
    "PATH": "/t/hello",
    "host": "127.0.0.1:6780",
    "user-agent": "curl/7.88.1",
    "accept": "*/*",
    "x-forwarded-for": "127.0.0.1",
}

TNET_POST = (
    b"34f9ceee-cd52-4b7f-b197-88bf2f0ec378 5 /t/form 363:11:REMOTE_ADDR,9:127.0.0.1,"
    b"6:METHOD,4:POST,10:URL_SCHEME,4:http,7:PATTERN,3:/t/,3:URI,7:/t/form,7:VERSION,"
    b"8:HTTP/1.1,4:PATH,7:/t/form,4:host,14:127.0.0.1:6780,10:user-agent,11:curl/7.88.1,"
    b'6:accept,3:*/*,3:x-q,19:he said "hi" \\ back,14:content-length,2:14,'
    b"12:content-type,33:application/x-www-form-urlencoded,15:x-forwarded-for,9:127.0.0.1,"
    b"5:x-dup,12:3:one,3:two,]}14:name=value&x=1,"
)
JSON_POST = (
    b"5a2b8d6e-0e8b-4c3e-9b1d-2f1f3c0a7e11 9 /j/form 355:"
    b'{"PATH":"/j/form","x-dup":["one","two"],"x-forwarded-for":"127.0.0.1",'
    b'"content-type":"application/x-www-form-urlencoded","content-length":"14",'
    b'"x-q":"he said \\"hi\\" \\\\ back","accept":"*/*","user-agent":"curl/7.88.1",'
    b'"host":"127.0.0.1:6780","METHOD":"POST","VERSION":"HTTP/1.1","URI":"/j/form",'
    b'"PATTERN":"/j/","URL_SCHEME":"http","REMOTE_ADDR":"127.0.0.1"},14:name=value&x=1,'
)


def _post_headers(prefix: str) -> dict:
    return {
        "REMOTE_ADDR": "127.0.0.1",
        "METHOD": "POST",
        "URL_SCHEME": "http",
        "PATTERN": f"/{prefix}/",
        "URI": f"/{prefix}/form",
        "VERSION": "HTTP/1.1",
        "PATH": f"/{prefix}/form",
        "host": "127.0.0.1:6780",
        "user-agent": "curl/7.88.1",
        "accept": "*/*",
        "x-q": 'he said "hi" \\ back',
        "content-length": "14",
        "content-type": "application/x-www-form-urlencoded",
        "x-forwarded-for": "127.0.0.1",
        "x-dup": ["one", "two"],
    }


TNET_DISCONNECT = TNET_UUID + b' 4 @* 16:6:METHOD,4:JSON,}21:{"type":"disconnect"},'
JSON_DISCONNECT = JSON_UUID + b' 9 @* 17:{"METHOD":"JSON"},21:{"type":"disconnect"},'
TNET_CREDITS = (
    TNET_UUID + b' 2 @* 43:16:DOWNLOAD_CREDITS,4:1067,6:METHOD,4:JSON,}18:{"type":"credits"},'
)
# A client JSSocket message to a route starting with '@' pretending to be a disconnect.
CLIENT_AT_T = (
    TNET_UUID + b" 1 @t 70:4:PATH,2:@t,6:METHOD,4:JSON,7:PATTERN,2:@t,11:REMOTE_ADDR,"
    b'9:127.0.0.1,}21:{"type":"disconnect"},'
)
UPLOAD_HEADERS = {
    "REMOTE_ADDR": "127.0.0.1",
    "METHOD": "POST",
    "VERSION": "HTTP/1.1",
    "PATH": "/t/up",
    "x-mongrel2-upload-start": "tmp/mongrel2.upload.LJoc1e",
    "host": "localhost",
    "content-length": "1025",
}
UPLOAD_DONE_HEADERS = {**UPLOAD_HEADERS, "x-mongrel2-upload-done": "tmp/mongrel2.upload.LJoc1e"}

CAPTURED = [
    pytest.param(
        TNET_GET, Request(TNET_UUID, b"4", b"/t/hello", TNET_GET_HEADERS, b""), id="tnet-get"
    ),
    pytest.param(
        TNET_POST,
        Request(TNET_UUID, b"5", b"/t/form", _post_headers("t"), b"name=value&x=1"),
        id="tnet-post",
    ),
    pytest.param(
        JSON_POST,
        Request(JSON_UUID, b"9", b"/j/form", _post_headers("j"), b"name=value&x=1"),
        id="json-post",
    ),
    pytest.param(TNET_DISCONNECT, Disconnect(TNET_UUID, b"4"), id="tnet-disconnect"),
    pytest.param(JSON_DISCONNECT, Disconnect(JSON_UUID, b"9"), id="json-disconnect"),
    pytest.param(TNET_CREDITS, Credits(TNET_UUID, b"2", 1067), id="tnet-credits"),
    pytest.param(
        TNET_UUID + b' 2 @* 43:16:DOWNLOAD_CREDITS,4:1067#6:METHOD,4:JSON,}18:{"type":"credits"},',
        Credits(TNET_UUID, b"2", 1067),
        id="tnet-credits-as-int",
    ),
    pytest.param(
        JSON_UUID + b' 2 @* 43:{"DOWNLOAD_CREDITS":"1067","METHOD":"JSON"},18:{"type":"credits"},',
        Credits(JSON_UUID, b"2", 1067),
        id="json-credits",
    ),
    pytest.param(
        TNET_UUID + b' 3 @* 16:6:METHOD,4:JSON,}16:{"type":"other"},',
        Control(TNET_UUID, b"3", {"type": "other"}),
        id="other-control",
    ),
    pytest.param(
        CLIENT_AT_T,
        Request(
            TNET_UUID,
            b"1",
            b"@t",
            {"PATH": "@t", "METHOD": "JSON", "PATTERN": "@t", "REMOTE_ADDR": "127.0.0.1"},
            b'{"type":"disconnect"}',
        ),
        id="client-at-t-is-a-request",
    ),
    pytest.param(
        encode_tnetstring_request(TNET_UUID, b"43", b"/t/up", UPLOAD_HEADERS, b""),
        Request(TNET_UUID, b"43", b"/t/up", UPLOAD_HEADERS, b""),
        id="upload-start",
    ),
    pytest.param(
        encode_json_request(JSON_UUID, b"43", b"/t/up", UPLOAD_DONE_HEADERS, b""),
        Request(JSON_UUID, b"43", b"/t/up", UPLOAD_DONE_HEADERS, b""),
        id="upload-done",
    ),
    pytest.param(
        # Mongrel2's json is invalid JSON: raw tab and a non-UTF-8 byte.
        JSON_UUID + b' 7 /j/x 37:{"METHOD":"GET","x-t":"a\tb\xe9","\xff":"\x00"},0:,',
        Request(JSON_UUID, b"7", b"/j/x", {"METHOD": "GET", "x-t": "a\tb\xe9", "\xff": "\x00"}),
        id="json-raw-control-and-latin1",
    ),
    pytest.param(
        TNET_UUID + b" 8 /ws 49:6:METHOD,9:WEBSOCKET,5:FLAGS,4:0x81,4:PATH,3:/ws,}8:hello ws,",
        Request(TNET_UUID, b"8", b"/ws", {"METHOD": "WEBSOCKET", "FLAGS": "0x81", "PATH": "/ws"}, b"hello ws"),
        id="websocket-frame",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), CAPTURED)
def test_parse_captured(raw: bytes, expected: object) -> None:
    assert parse_message(raw) == expected


def test_reconstructed_posts_match_the_doc_fragments() -> None:
    assert b"3:x-q,19:he said \"hi\" \\ back," in TNET_POST
    assert TNET_POST.endswith(b"5:x-dup,12:3:one,3:two,]}14:name=value&x=1,")
    assert b'"x-q":"he said \\"hi\\" \\\\ back"' in JSON_POST
    assert encode_tnetstring_request(
        TNET_UUID, b"5", b"/t/form", _post_headers("t"), b"name=value&x=1"
    ) == TNET_POST
    assert encode_json_request(
        JSON_UUID, b"9", b"/j/form", _post_headers("j"), b"name=value&x=1"
    ).startswith(JSON_UUID + b" 9 /j/form 355:")


def test_parse_accepts_bytearray_and_memoryview() -> None:
    assert parse_message(bytearray(TNET_GET)) == parse_message(TNET_GET)
    assert parse_message(memoryview(TNET_GET)) == parse_message(TNET_GET)


# --- Request helpers ---------------------------------------------------------------


def test_request_helpers() -> None:
    request = parse_message(TNET_POST)
    assert isinstance(request, Request)
    assert request.method == "POST"
    assert request.version == "HTTP/1.1"
    assert request.header("x-dup") == "one, two"
    assert request.header("Content-Type") == "application/x-www-form-urlencoded"
    assert request.header("missing") is None
    assert request.header("METHOD") is None  # only client headers, never Mongrel2's keys
    assert request.upload_start is None and request.upload_done is None
    assert request.download_credits is None
    assert not request.is_jssocket and not request.is_websocket
    assert not request.should_close()


def test_request_upload_and_credit_helpers() -> None:
    done = parse_message(encode_json_request(b"s", b"1", b"/t/up", UPLOAD_DONE_HEADERS, b""))
    assert done.upload_start == done.upload_done == "tmp/mongrel2.upload.LJoc1e"
    with_credits = {**TNET_GET_HEADERS, "DOWNLOAD_CREDITS": "102400"}
    request = parse_message(encode_tnetstring_request(b"s", b"1", b"/t/", with_credits, b""))
    assert request.download_credits == 102400
    assert parse_message(CLIENT_AT_T).is_jssocket


@pytest.mark.parametrize(
    ("version", "connection", "close"),
    [
        ("HTTP/1.1", None, False),
        ("HTTP/1.1", "close", True),
        ("HTTP/1.1", "Upgrade, Close", True),
        ("HTTP/1.0", None, True),
        ("HTTP/1.0", "keep-alive", False),
        ("HTTP/1.0", "Keep-Alive", False),
    ],
)
def test_should_close(version: str, connection: str | None, close: bool) -> None:
    headers = {"METHOD": "GET", "VERSION": version}
    if connection is not None:
        headers["connection"] = connection
    assert Request(b"s", b"1", b"/", headers).should_close() is close


# --- malformed input ---------------------------------------------------------------

def tnet(inner: bytes, body: bytes = b"0:,", path: bytes = b"/p", route: bytes = b"s 1") -> bytes:
    """A message whose tnetstring HEADERS dict holds ``inner`` (length computed)."""
    return b"%s %s %d:%s}%s" % (route, path, len(inner), inner, body)


def jsn(payload: bytes, body: bytes = b"0:,", path: bytes = b"/p") -> bytes:
    """A message whose json HEADERS netstring holds ``payload`` (length computed)."""
    return b"s 1 %s %s%s" % (path, netstring(payload), body)


GET = b"6:METHOD,3:GET,"
H_GET = b"15:" + GET + b"}"  # minimal valid tnetstring headers
JSON_CTL = b"6:METHOD,4:JSON,"
CREDITS_BODY = b'18:{"type":"credits"},'

MALFORMED = [
    # framing of SENDER CONN_ID PATH
    (b"", "found 0 of 3 spaces"),
    (b"abc", "found 0 of 3 spaces"),
    (b"s 1 /p", "found 2 of 3 spaces"),
    (tnet(GET, route=b"s_x 1"), "sender b's_x' is not [A-Za-z0-9-]"),
    (tnet(GET, route=b"s.x 1"), "sender"),
    (tnet(GET, route=b" 1"), "sender b''"),
    (tnet(GET, route=b"s" * 257 + b" 1"), "sender"),
    (tnet(GET, route=b"s x1"), "conn id b'x1' is not a decimal"),
    (tnet(GET, route=b"s -1"), "conn id"),
    (tnet(GET, route=b"s 01"), "conn id"),
    (tnet(GET, route=b"s \xd9\xa1"), "conn id"),  # Arabic-Indic digit one
    (tnet(GET, route=b"s 12345678901"), "conn id"),
    (tnet(GET, route=b"s "), "conn id"),
    (tnet(GET, path=b""), "empty path"),
    # HEADERS netstring framing
    (b"s 1 /p abc", "headers: no 'LEN:'"),
    (b"s 1 /p 99999999999:x", "headers: no 'LEN:'"),
    (b"s 1 /p x5:" + GET + b"}0:,", "headers: bad netstring length b'x5'"),
    (b"s 1 /p 015:" + GET + b"}0:,", "headers: bad netstring length b'015'"),
    (b"s 1 /p -1:}0:,", "headers: bad netstring length b'-1'"),
    (b"s 1 /p 100:" + GET + b"}0:,", "headers: netstring needs 100 bytes and a terminator, only 19"),
    (b"s 1 /p 15:" + GET, "headers: netstring needs 15 bytes and a terminator, only 15"),
    (b"s 1 /p 15:" + GET + b"]0:,", "headers: netstring ends in b']', expected '}' (tnetstring) or ',' (json)"),
    # tnetstring HEADERS content
    (tnet(GET + b"x"), "headers: invalid tnetstring"),
    (tnet(b"6:METHOD,4:GET,"), "headers: invalid tnetstring"),
    (tnet(GET + b"1:a,"), "headers: invalid tnetstring"),  # key without value
    (tnet(GET + b"1:1#1:a,"), "headers: key 1 is not a string"),
    (tnet(GET + b"3:1.5^1:a,"), "headers: key 1.5 is not a string"),
    (tnet(GET + b"1:a,3:1.5^"), "headers: 'a' has a value of type float"),
    (tnet(GET + b"1:a,4:true!"), "headers: 'a' has a value of type bool"),
    (tnet(GET + b"1:a,0:~"), "headers: 'a' has a value of type NoneType"),
    (tnet(GET + b"1:a,8:1:b,1:c,}"), "headers: 'a' has a value of type dict"),
    (tnet(GET + b"1:a,0:]"), "headers: 'a' has a value of type list"),  # empty list
    (tnet(GET + b"1:a,7:4:true!]"), "headers: 'a' has an item of type bool"),
    (tnet(GET + b"1:a,7:1:b,0:]]"), "headers: 'a' has an item of type list"),
    # json HEADERS content
    (jsn(b'{"METHOD":GET}'), "headers: invalid JSON"),
    (jsn(b'{"METHOD":"GET"}x'), "headers: invalid JSON: Extra data"),
    (jsn(b""), "headers: invalid JSON"),
    (jsn(b'["GET"]'), "headers: JSON is not an object"),
    (jsn(b'{"METHOD":"GET","a":1.5}'), "headers: 'a' has a value of type float"),
    (jsn(b'{"METHOD":"GET","a":null}'), "headers: 'a' has a value of type NoneType"),
    (jsn(b'{"METHOD":"GET","a":true}'), "headers: 'a' has a value of type bool"),
    (jsn(b'{"METHOD":"GET","a":[]}'), "headers: 'a' has a value of type list"),
    (jsn(b'{"METHOD":"GET","a":{"b":"c"}}'), "headers: 'a' has a value of type dict"),
    (jsn(b'{"METHOD":"GET","a":[["x"]]}'), "headers: 'a' has an item of type list"),
    (jsn(b'{"METHOD":"GET","a":[1.5]}'), "headers: 'a' has an item of type float"),
    (jsn(b'{"METHOD":"GET","a":"\\u0100"}'), "headers: 'a' has characters outside latin-1"),
    (jsn(b'{"METHOD":"GET","\\u4e2d":"x"}'), "has characters outside latin-1"),
    (jsn(b'{"METHOD":"GET","a":["x","\\ud800"]}'), "has characters outside latin-1"),
    # not a request fleet can answer
    (tnet(b""), "no METHOD header"),
    (tnet(b"13:UPLOAD_STREAM,1:0,", body=b"8:abcdefgh,"), "no METHOD header (upload.stream chunk?)"),
    (tnet(b"6:METHOD,12:3:GET,3:PUT,]"), "no METHOD header"),
    (jsn(b'{"METHOD":["GET","PUT"]}'), "no METHOD header"),
    # BODY netstring
    (b"s 1 /p " + H_GET, "body: no 'LEN:'"),
    (tnet(GET, body=b"x"), "body: no 'LEN:'"),
    (tnet(GET, body=b"3:ab,"), "body: netstring needs 3 bytes and a terminator, only 3"),
    (tnet(GET, body=b"2:ab"), "body: netstring needs 2 bytes and a terminator, only 2"),
    (tnet(GET, body=b"2:ab;"), "body: netstring does not end in ','"),
    (tnet(GET, body=b"2:ab}"), "body: netstring does not end in ','"),
    (tnet(GET, body=b"02:ab,"), "body: bad netstring length b'02'"),
    (tnet(GET, body=b"0:,x"), "1 bytes of trailing garbage after the body"),
    (tnet(GET, body=b"0:,0:,"), "3 bytes of trailing garbage after the body"),
    (tnet(GET, body=b"0:, "), "1 bytes of trailing garbage after the body"),
    # control messages
    (tnet(JSON_CTL, path=b"@*", body=b"3:abc,"), "control body: invalid JSON"),
    (tnet(JSON_CTL, path=b"@*"), "control body: invalid JSON"),
    (tnet(JSON_CTL, path=b"@*", body=b"2:[],"), "control body: JSON is not an object"),
    (tnet(JSON_CTL, path=b"@*", body=b'2:"",'), "control body: JSON is not an object"),
    (tnet(b"16:DOWNLOAD_CREDITS,0:,", path=b"@*", body=CREDITS_BODY), "invalid DOWNLOAD_CREDITS ''"),
    (tnet(b"16:DOWNLOAD_CREDITS,2:-1,", path=b"@*", body=CREDITS_BODY), "invalid DOWNLOAD_CREDITS '-1'"),
    (tnet(b"16:DOWNLOAD_CREDITS,2:ab,", path=b"@*", body=CREDITS_BODY), "invalid DOWNLOAD_CREDITS 'ab'"),
    (tnet(b"16:DOWNLOAD_CREDITS,3:\xd9\xa1\xd9,", path=b"@*", body=CREDITS_BODY), "invalid DOWNLOAD_CREDITS"),
    (tnet(b"16:DOWNLOAD_CREDITS,11:99999999999,", path=b"@*", body=CREDITS_BODY), "invalid DOWNLOAD_CREDITS"),
    (tnet(b"16:DOWNLOAD_CREDITS,10:4294967296,", path=b"@*", body=CREDITS_BODY), "invalid DOWNLOAD_CREDITS"),
    (tnet(b"16:DOWNLOAD_CREDITS,2:-1#", path=b"@*", body=CREDITS_BODY), "invalid DOWNLOAD_CREDITS '-1'"),
    (tnet(b"16:DOWNLOAD_CREDITS,8:1:1,1:2,]", path=b"@*", body=CREDITS_BODY), "invalid DOWNLOAD_CREDITS ['1', '2']"),
    (tnet(GET + b"16:DOWNLOAD_CREDITS,1:x,"), "invalid DOWNLOAD_CREDITS 'x'"),
]


@pytest.mark.parametrize(("raw", "reason"), MALFORMED)
def test_malformed_raises_protocol_error(raw: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(raw)
    assert reason in str(info.value)


def test_malformed_table_builders_make_valid_messages() -> None:
    """Guard against table typos: the unbroken versions parse."""
    assert parse_message(tnet(JSON_CTL, path=b"@*", body=b"2:{},")) == Control(b"s", b"1", {})
    assert parse_message(b"s 1 /p " + H_GET + b"0:,") == Request(b"s", b"1", b"/p", {"METHOD": "GET"})
    assert parse_message(tnet(GET, body=b"2:ab,")).body == b"ab"
    assert parse_message(jsn(b'{"METHOD":"GET","a":"\\u00e9"}')).headers["a"] == "\xe9"
    credits = tnet(b"16:DOWNLOAD_CREDITS,3:100,", path=b"@*", body=CREDITS_BODY)
    assert parse_message(credits) == Credits(b"s", b"1", 100)
    assert parse_message(tnet(GET + b"1:a,8:1:b,1:c,]")).headers["a"] == ["b", "c"]


def test_headers_over_limit() -> None:
    value = b"x" * MAX_HEADERS_BYTES
    inner = b"6:METHOD,3:GET,1:a,%d:%s," % (len(value), value)
    raw = b"s 1 /p %d:%s}0:," % (len(inner), inner)
    with pytest.raises(ProtocolError, match="limit"):
        parse_message(raw)


@pytest.mark.parametrize("depth", [100, 5000])
def test_deep_nesting_is_a_protocol_error(depth: int) -> None:
    nested = b"0:]"
    for _ in range(depth):
        nested = b"%d:%s]" % (len(nested), nested)
    inner = b"6:METHOD,3:GET,1:a," + nested
    with pytest.raises(ProtocolError):
        parse_message(b"s 1 /p %d:%s}0:," % (len(inner), inner))
    payload = b'{"METHOD":"GET","a":' + b"[" * depth * 20 + b"]" * depth * 20 + b"}"
    with pytest.raises(ProtocolError):
        parse_message(b"s 1 /p " + netstring(payload) + b"0:,")
    control = b"[" * depth * 20 + b"]" * depth * 20
    with pytest.raises(ProtocolError):
        parse_message(tnet(JSON_CTL, path=b"@*", body=netstring(control)))


def test_huge_json_integer_is_a_protocol_error() -> None:
    payload = b'{"METHOD":"GET","a":' + b"1" * 5000 + b"}"
    with pytest.raises(ProtocolError):
        parse_message(b"s 1 /p " + netstring(payload) + b"0:,")


def test_numbers_become_str() -> None:
    event = parse_message(jsn(b'{"METHOD":"GET","a":[1,"b"],"c":-2}'))
    assert event.headers["a"] == ["1", "b"]
    assert event.headers["c"] == "-2"
    event = parse_message(tnet(GET + b"1:a,2:42#"))
    assert event.headers["a"] == "42"


# --- peek_route -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (TNET_GET, (TNET_UUID, b"4", False)),
        (TNET_DISCONNECT, (TNET_UUID, b"4", True)),
        (JSON_DISCONNECT, (JSON_UUID, b"9", True)),
        (CLIENT_AT_T, (TNET_UUID, b"1", False)),
        (b"s 1 @*x whatever", (b"s", b"1", False)),
    ],
)
def test_peek_route(raw: bytes, expected: tuple[bytes, bytes, bool]) -> None:
    assert peek_route(raw) == expected


@pytest.mark.parametrize("raw", [b"", b"s 1 /p", b"s_ 1 /p x", b"s 1x /p x"])
def test_peek_route_rejects(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        peek_route(raw)


# --- encoders ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((TNET_UUID, [b"18", b"19", b"20"], b"hello-all\n"), TNET_UUID + b" 8:18 19 20, hello-all\n"),
        ((b"34f9", [b"53"], b"hi"), b"34f9 2:53, hi"),
        ((b"34f9", (b"1",), b"\x00\xff bin"), b"34f9 1:1, \x00\xff bin"),
        ((b"34f9", [b"1234567"], b""), b"34f9 7:1234567, "),
    ],
)
def test_encode_response(args: tuple, expected: bytes) -> None:
    assert encode_response(*args) == expected


def test_encode_close() -> None:
    assert encode_close(TNET_UUID, [b"18", b"19", b"20"]) == TNET_UUID + b" 8:18 19 20, "


# Mongrel2's reply grammar (its Ragel parser drops anything else).
REPLY = re.compile(rb"([A-Za-z0-9-]+) (\d+):((?:X )?\d+(?: \d+)*), (.*)", re.S)


def test_encode_response_targets_limit() -> None:
    ids = [str(i).encode() for i in range(1, MAX_TARGETS + 1)]
    raw = encode_response(b"s", ids, b"x")
    match = REPLY.fullmatch(raw)
    assert match is not None
    assert int(match[2]) == len(match[3])
    assert match[3].split(b" ") == ids
    with pytest.raises(ValueError, match="128"):
        encode_response(b"s", ids + [b"999"], b"x")
    with pytest.raises(ValueError):
        encode_response(b"s", [], b"x")
    with pytest.raises(ValueError):
        encode_close(b"s", [])


@pytest.mark.parametrize(
    ("sender", "ids", "error"),
    [
        (b"s_x", [b"1"], ValueError),
        (b"s.x", [b"1"], ValueError),
        (b"", [b"1"], ValueError),
        ("s", [b"1"], ValueError),
        (b"s", [b"x"], ValueError),
        (b"s", [b""], ValueError),
        (b"s", [b"1 2"], ValueError),
        (b"s", [b"-1"], ValueError),
        (b"s", [1], ValueError),
        (b"s", b"12", TypeError),
    ],
)
def test_encode_response_rejects(sender: bytes, ids: object, error: type) -> None:
    with pytest.raises(error):
        encode_response(sender, ids, b"x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "args", "expected"),
    [
        ("ctl", {"cancel": 1}, b"34f9 4:X 53, 23:3:ctl,13:6:cancel,1:1#}]"),
        ("ctl", {"keep-alive": 1}, b"34f9 4:X 53, 28:3:ctl,18:10:keep-alive,1:1#}]"),
        ("ctl", {"credits": 10000}, b"34f9 4:X 53, 28:3:ctl,18:7:credits,5:10000#}]"),
        ("ctl", {"name": "val"}, b"34f9 4:X 53, 23:3:ctl,13:4:name,3:val,}]"),
    ],
)
def test_encode_ctl(key: str, args: dict, expected: bytes) -> None:
    raw = encode_ctl(b"34f9", b"53", key, args)
    assert raw == expected
    assert REPLY.fullmatch(raw) is not None
    payload = raw.split(b", ", 1)[1]
    expected = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in args.items()}
    assert tnetstring.loads(payload) == [b"ctl", expected]


def test_encode_ctl_rejects_bad_ids() -> None:
    with pytest.raises(ValueError):
        encode_ctl(b"34f9", b"5x", "ctl", {"cancel": 1})
    with pytest.raises(ValueError):
        encode_ctl(b"3_f9", b"5", "ctl", {"cancel": 1})


# --- fast paths: same results and errors as the step-by-step code ---------------------


def _reference_tnetstring_headers(data: bytes) -> dict:
    """fleet.mongrel2.codec's tnetstring HEADERS decoding before it had fast paths."""
    try:
        decoded = tnetstring.loads(data)
    except Exception as e:
        raise ProtocolError(f"headers: invalid tnetstring: {e}") from None
    if type(decoded) is not dict:
        raise ProtocolError("headers: not a dict")
    headers = {}
    for key, value in decoded.items():
        if type(key) is not bytes:
            raise ProtocolError(f"headers: key {key!r} is not a string")
        name = key.decode("latin-1")
        if type(value) is bytes:
            headers[name] = value.decode("latin-1")
        else:
            headers[name] = mongrel2._odd_value(name, value)
    return headers


def _reference_json_headers(payload: bytes) -> dict:
    """fleet.mongrel2.codec's json HEADERS decoding before it had fast paths."""
    try:
        decoded = mongrel2._JSON.decode(payload.decode("latin-1"))
    except Exception as e:
        raise ProtocolError(f"headers: invalid JSON: {e}") from None
    if type(decoded) is not dict:
        raise ProtocolError("headers: JSON is not an object")
    headers = {}
    for name, value in decoded.items():
        headers[name] = value if type(value) is str else mongrel2._odd_value(name, value)
    if b"\\u" in payload:
        mongrel2._check_latin1(headers)
    return headers


def _disable_fast_paths(mp: pytest.MonkeyPatch) -> None:
    """Make the codec take only its step-by-step paths (the reference)."""
    never = re.compile(rb"(?!)")
    mp.setattr(mongrel2, "_HEAD_RE", never)
    mp.setattr(mongrel2, "_PEEK_RE", never)
    mp.setattr(mongrel2, "_headers_from_tnetstring", _reference_tnetstring_headers)
    mp.setattr(mongrel2, "_headers_from_json", _reference_json_headers)
    mp.setattr(mongrel2, "_new_request", Request)
    mp.setattr(mongrel2, "_SENDERS_OK", set())
    mp.setattr(mongrel2, "_SENDERS_OK_MAX", 0)


def _outcome(func, *args) -> object:
    """What func returns, or the type and message of the exception it raises."""
    try:
        result = func(*args)
    except Exception as e:
        return (type(e), str(e))
    return (type(result), result, *(type(x) for x in (result if isinstance(result, tuple) else ())))


def _assert_fast_equals_reference(func, *args) -> None:
    fast = _outcome(func, *args)
    with pytest.MonkeyPatch.context() as mp:
        _disable_fast_paths(mp)
        reference = _outcome(func, *args)
    assert fast == reference


@pytest.mark.parametrize("raw", [p.values[0] for p in CAPTURED] + [raw for raw, _ in MALFORMED])
def test_fast_paths_match_reference(raw: bytes) -> None:
    _assert_fast_equals_reference(parse_message, raw)
    _assert_fast_equals_reference(peek_route, raw)


def test_reference_switch_really_disables_fast_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    _disable_fast_paths(monkeypatch)
    monkeypatch.setattr(mongrel2, "_split_checked",
                        lambda raw: calls.append(raw) or (b"s", b"1", b"/", {"METHOD": "GET"}, b""))
    parse_message(TNET_GET)
    assert calls == [TNET_GET]


# Each tnetstring content error, on each decoding path: the plain ASCII
# comprehension, the ASCII one for headers with lists (any ']' in HEADERS),
# and the checking loop (non-ASCII HEADERS). Each reason is the reference's.
TNET_CONTENT_ERRORS = [
    (b"1:1#1:a,", "headers: key 1 is not a string"),
    (b"3:1.5^1:a,", "headers: key 1.5 is not a string"),
    (b"1:a,3:1.5^", "headers: 'a' has a value of type float"),
    (b"1:a,4:true!", "headers: 'a' has a value of type bool"),
    (b"1:a,0:~", "headers: 'a' has a value of type NoneType"),
    (b"1:a,8:1:b,1:c,}", "headers: 'a' has a value of type dict"),
    (b"1:a,0:]", "headers: 'a' has a value of type list"),
    (b"1:a,7:4:true!]", "headers: 'a' has an item of type bool"),
    (b"1:a,7:1:b,0:]]", "headers: 'a' has an item of type list"),
    (b"1:a,8:1:b,1:c,]1:1#1:a,", "headers: key 1 is not a string"),  # after a good list
    (b"1:a,3:1.5^1:b,8:1:c,1:d,]", "headers: 'a' has a value of type float"),  # before one
]
TNET_PATHS = [
    pytest.param(b"", id="ascii"),
    pytest.param(b"1:],1:],", id="ascii-with-bracket"),
    pytest.param(b"1:\xe9,1:\xe9,", id="latin1"),
]


@pytest.mark.parametrize("extra", TNET_PATHS)
@pytest.mark.parametrize(("inner", "reason"), TNET_CONTENT_ERRORS)
def test_tnetstring_header_errors_on_every_path(extra: bytes, inner: bytes, reason: str) -> None:
    raw = tnet(GET + extra + inner)
    with pytest.raises(ProtocolError) as info:
        parse_message(raw)
    assert reason in str(info.value)
    _assert_fast_equals_reference(parse_message, raw)


@pytest.mark.parametrize("extra", TNET_PATHS)
def test_tnetstring_odd_values_on_every_path(extra: bytes) -> None:
    raw = tnet(GET + extra + b"1:a,8:1:b,1:c,]1:n,2:42#1:m,8:1:x,1:7#]")
    headers = parse_message(raw).headers
    assert headers["a"] == ["b", "c"]
    assert headers["n"] == "42"
    assert headers["m"] == ["x", "7"]
    assert list(headers)[-3:] == ["a", "n", "m"]
    _assert_fast_equals_reference(parse_message, raw)


def test_parse_fast_path_values_are_exact_str_and_bytes() -> None:
    request = parse_message(TNET_POST)
    assert all(type(k) is str for k in request.headers)
    assert all(type(v) is str for v in request.headers.values() if not isinstance(v, list))
    assert all(type(x) is str for x in request.headers["x-dup"])
    assert (type(request.sender), type(request.conn_id), type(request.path), type(request.body)) == (bytes,) * 4


def test_parse_accepts_bytes_subclass() -> None:
    class Frame(bytes):
        pass

    event = parse_message(Frame(TNET_GET))
    assert event == parse_message(TNET_GET)
    assert type(event.sender) is bytes and type(event.body) is bytes


def test_peek_route_keeps_bytearray_parts() -> None:
    sender, conn_id, is_control = peek_route(bytearray(TNET_DISCONNECT))
    assert (sender, conn_id, is_control) == (TNET_UUID, b"4", True)
    assert type(sender) is bytearray and type(conn_id) is bytearray


def test_peek_route_path_may_be_empty_but_spaces_are_required() -> None:
    assert peek_route(b"s 1  ") == (b"s", b"1", False)
    with pytest.raises(ProtocolError, match="found 2 of 3 spaces"):
        peek_route(b"s 1 @*")
    _assert_fast_equals_reference(peek_route, b"s 1  ")


@pytest.mark.parametrize(
    "payload",
    [b' {"METHOD":"GET"}', b'{"METHOD":"GET"}\n', b'\t{"METHOD":"GET"} ', b'  "GET" '],
)
def test_json_headers_whitespace_around_the_object(payload: bytes) -> None:
    raw = jsn(payload)
    _assert_fast_equals_reference(parse_message, raw)
    if payload.strip().startswith(b"{"):
        assert parse_message(raw).headers == {"METHOD": "GET"}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b' {"METHOD":"GET"} x', "headers: invalid JSON: Extra data"),
        (b'{"METHOD":"GET"}{}', "headers: invalid JSON: Extra data"),
        (b" ", "headers: invalid JSON: Expecting value"),
        (b'{"METHOD":"GET",}', "headers: invalid JSON"),
    ],
)
def test_json_headers_errors_match_reference(payload: bytes, reason: str) -> None:
    raw = jsn(payload)
    with pytest.raises(ProtocolError) as info:
        parse_message(raw)
    assert reason in str(info.value)
    _assert_fast_equals_reference(parse_message, raw)


def test_json_repeated_key_keeps_first_position_last_value() -> None:
    raw = jsn(b'{"a":"1","METHOD":"GET","a":["2","3"]}')
    assert list(parse_message(raw).headers.items()) == [("a", ["2", "3"]), ("METHOD", "GET")]
    _assert_fast_equals_reference(parse_message, raw)


def test_fast_request_constructor_is_the_dataclass() -> None:
    assert mongrel2._REQUEST_FIELDS == tuple(f.name for f in dataclasses.fields(Request))
    assert not hasattr(Request, "__post_init__")
    args = (TNET_UUID, b"4", b"/t/hello", dict(TNET_GET_HEADERS), b"x")
    fast = mongrel2._new_request(*args)
    assert type(fast) is Request
    assert fast == Request(*args)
    assert repr(fast) == repr(Request(*args))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.body = b""  # type: ignore[misc]


def test_encode_response_single_id_checks_after_sender_is_known() -> None:
    assert encode_response(b"34f9", [b"1"], b"") == b"34f9 1:1, "  # sender now remembered
    assert b"34f9" in mongrel2._SENDERS_OK
    for ids in ([b"x"], [b""], [b"1 2"], [b"-1"], [1], [b"\xd9\xa1"], [bytearray(b"1")], ["1"]):
        with pytest.raises(ValueError):
            encode_response(b"34f9", ids, b"x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_response(b"34f9", b"1", b"x")
    assert encode_response(b"34f9", (b"1",), bytearray(b"ab")) == b"34f9 1:1, ab"
    assert encode_response(b"34f9", [b"1"], memoryview(b"ab")) == b"34f9 1:1, ab"
    assert encode_response(b"34f9", [b"1" * 25], b"ab") == b"34f9 25:" + b"1" * 25 + b", ab"
    for sender in (b"s_x", bytearray(b"34f9"), "34f9"):
        with pytest.raises(ValueError):
            encode_response(sender, [b"1"], b"x")  # type: ignore[arg-type]
    assert b"s_x" not in mongrel2._SENDERS_OK
    assert all(type(sender) is bytes for sender in mongrel2._SENDERS_OK)


def test_encode_response_sender_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mongrel2, "_SENDERS_OK", set())
    for i in range(3 * mongrel2._SENDERS_OK_MAX):
        sender = b"s-%d" % i
        assert encode_response(sender, [b"7"], b"x") == sender + b" 1:7, x"
        assert encode_response(sender, [b"7"], b"x") == sender + b" 1:7, x"
    assert len(mongrel2._SENDERS_OK) == mongrel2._SENDERS_OK_MAX


@pytest.mark.parametrize(
    "args",
    [
        (TNET_UUID, [b"18", b"19", b"20"], b"hello-all\n"),
        (b"34f9", [b"53"], b"hi"),
        (b"34f9", (b"1",), b"\x00\xff bin"),
        (b"34f9", [b"0"], b""),
        (b"34f9", [b"01"], b""),
        (b"s_x", [b"1"], b"x"),
        (b"s", [b"1", b"x"], b"x"),
        (b"s", [], b"x"),
        (b"s", b"12", b"x"),
    ],
)
def test_encode_response_fast_path_matches_reference(args: tuple) -> None:
    _assert_fast_equals_reference(encode_response, *args)
    _assert_fast_equals_reference(encode_response, *args)  # once the sender is known


# --- property tests ----------------------------------------------------------------

latin1 = st.binary(max_size=24).map(lambda b: b.decode("latin-1"))
senders = st.from_regex(rb"[A-Za-z0-9-]{1,40}", fullmatch=True)
conn_ids = st.integers(0, 2**31 - 1).map(lambda i: str(i).encode())
paths = (
    st.binary(min_size=1, max_size=40)
    .map(lambda b: b.replace(b" ", b"/"))
    .filter(lambda p: p != b"@*")
)
header_names = latin1.filter(lambda k: k not in ("METHOD", "DOWNLOAD_CREDITS"))
header_values = st.one_of(latin1, st.lists(latin1, min_size=2, max_size=5))
headers_st = st.builds(
    lambda method, rest: {"METHOD": method, **rest},
    latin1,
    st.dictionaries(header_names, header_values, max_size=12),
)
bodies = st.binary(max_size=300)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(
    encoder=st.sampled_from(ENCODERS),
    sender=senders,
    conn_id=conn_ids,
    path=paths,
    headers=headers_st,
    body=bodies,
)
def test_roundtrip_requests(encoder, sender, conn_id, path, headers, body) -> None:
    raw = encoder(sender, conn_id, path, headers, body)
    assert parse_message(raw) == Request(sender, conn_id, path, headers, body)
    assert peek_route(raw) == (sender, conn_id, False)


@FAST
@given(
    encoder=st.sampled_from(ENCODERS),
    sender=senders,
    conn_id=conn_ids,
    credits=st.integers(0, 2**31 - 1),
)
def test_roundtrip_control(encoder, sender, conn_id, credits) -> None:
    disconnect = encoder(sender, conn_id, b"@*", {"METHOD": "JSON"}, b'{"type":"disconnect"}')
    assert parse_message(disconnect) == Disconnect(sender, conn_id)
    raw = encoder(
        sender, conn_id, b"@*", {"DOWNLOAD_CREDITS": str(credits), "METHOD": "JSON"},
        b'{"type":"credits"}',
    )
    assert parse_message(raw) == Credits(sender, conn_id, credits)


@FAST
@given(
    sender=senders,
    ids=st.lists(conn_ids, min_size=1, max_size=MAX_TARGETS),
    body=st.binary(max_size=200),
)
def test_encode_response_grammar(sender, ids, body) -> None:
    match = REPLY.fullmatch(encode_response(sender, ids, body))
    assert match is not None
    assert (match[1], match[3].split(b" "), match[4]) == (sender, ids, body)
    assert int(match[2]) == len(match[3])


def _parse_or_protocol_error(raw: bytes) -> None:
    try:
        event = parse_message(raw)
    except ProtocolError:
        return
    assert isinstance(event, (Request, Disconnect, Credits, Control))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    _parse_or_protocol_error(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_after_valid_prefix(tail: bytes) -> None:
    _parse_or_protocol_error(b"s 1 /p " + tail)
    _parse_or_protocol_error(b"s 1 @* " + tail)
    _parse_or_protocol_error(b"s 1 /p " + H_GET + tail)


SEEDS = [
    TNET_GET,
    TNET_POST,
    JSON_POST,
    TNET_DISCONNECT,
    JSON_DISCONNECT,
    TNET_CREDITS,
    CLIENT_AT_T,
]

mutation = st.tuples(
    st.sampled_from(["flip", "delete", "insert", "truncate", "duplicate"]),
    st.integers(0, 10_000),
    st.integers(0, 10_000),
    st.binary(min_size=1, max_size=8),
)


def _mutate(raw: bytes, op: str, i: int, j: int, data: bytes) -> bytes:
    if not raw:
        return data
    i %= len(raw)
    j = i + j % 16
    if op == "flip":
        return raw[:i] + bytes([raw[i] ^ (data[0] or 1)]) + raw[i + 1 :]
    if op == "delete":
        return raw[:i] + raw[j:]
    if op == "insert":
        return raw[:i] + data + raw[i:]
    if op == "truncate":
        return raw[:i]
    return raw[:j] + raw[i:j] + raw[j:]


@settings(max_examples=500, deadline=None)
@given(seed=st.sampled_from(SEEDS), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_mutated_valid_messages(seed: bytes, mutations: list) -> None:
    raw = seed
    for op, i, j, data in mutations:
        raw = _mutate(raw, op, i, j, data)
    _parse_or_protocol_error(raw)
    try:
        peek_route(raw)
    except ProtocolError:
        pass


@settings(max_examples=150, deadline=None)
@given(
    encoder=st.sampled_from(ENCODERS),
    headers=headers_st,
    body=bodies,
    op=mutation,
)
def test_fuzz_mutated_generated_messages(encoder, headers, body, op) -> None:
    _parse_or_protocol_error(_mutate(encoder(b"s", b"1", b"/p", headers, body), *op))


# --- fast paths against the reference, on generated and mutated input ----------------

ascii_text = st.text(st.characters(max_codepoint=127), max_size=24)
ascii_headers_st = st.builds(
    lambda method, rest: {"METHOD": method, **rest},
    ascii_text,
    st.dictionaries(
        ascii_text.filter(lambda k: k not in ("METHOD", "DOWNLOAD_CREDITS")),
        st.one_of(ascii_text, st.lists(ascii_text, min_size=2, max_size=5)),
        max_size=12,
    ),
)


@FAST
@given(
    encoder=st.sampled_from(ENCODERS),
    conn_id=conn_ids,
    path=paths,
    headers=st.one_of(ascii_headers_st, headers_st),
    body=bodies,
    op=st.one_of(st.none(), mutation),
)
def test_fuzz_fast_paths_match_reference(encoder, conn_id, path, headers, body, op) -> None:
    raw = encoder(TNET_UUID, conn_id, path, headers, body)
    if op is None:
        assert parse_message(raw) == Request(TNET_UUID, conn_id, path, headers, body)
    else:
        raw = _mutate(raw, *op)
    _assert_fast_equals_reference(parse_message, raw)
    _assert_fast_equals_reference(peek_route, raw)


@settings(max_examples=300, deadline=None)
@given(seed=st.sampled_from(SEEDS), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_mutated_seeds_match_reference(seed: bytes, mutations: list) -> None:
    raw = seed
    for op, i, j, data in mutations:
        raw = _mutate(raw, op, i, j, data)
    _assert_fast_equals_reference(parse_message, raw)
    _assert_fast_equals_reference(peek_route, raw)


@FAST
@given(
    sender=st.one_of(senders, st.binary(max_size=8)),
    ids=st.one_of(
        st.lists(conn_ids, min_size=1, max_size=1),
        st.lists(st.binary(max_size=4), min_size=1, max_size=1),
        st.lists(conn_ids, max_size=3).map(tuple),
    ),
    body=st.binary(max_size=50),
)
def test_fuzz_encode_response_matches_reference(sender, ids, body) -> None:
    _assert_fast_equals_reference(encode_response, sender, ids, body)
    _assert_fast_equals_reference(encode_response, sender, ids, body)
