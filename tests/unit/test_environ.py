"""build_environ: PEP 3333 keys from a Mongrel2 request, checked by wsgiref.validate."""

from __future__ import annotations

import io
import sys
import warnings
from typing import Any
from wsgiref.validate import validator

import pytest
from werkzeug.test import EnvironBuilder

from fleet import native
from fleet.mongrel2.codec import HeaderValue, Request
from fleet.wsgi import environ as environ_module
from fleet.wsgi.environ import build_environ, decode_path, parse_host, split_script_name

COMPILED_BUILD = native.twin("fleet.wsgi._environ", "build_environ", None)


def make_request(path: str = "/t/hello", *, extra: dict[str, HeaderValue] | None = None,
                 drop: tuple[str, ...] = (), body: bytes = b"") -> Request:
    """A request as the codec hands it over (captured GET in the protocol notes)."""
    headers: dict[str, HeaderValue] = {
        "REMOTE_ADDR": "127.0.0.1", "METHOD": "GET", "URL_SCHEME": "http",
        "PATTERN": "/t/", "URI": path, "VERSION": "HTTP/1.1", "PATH": path,
        "host": "127.0.0.1:6780", "user-agent": "curl/7.88.1", "accept": "*/*",
        "x-forwarded-for": "127.0.0.1",
    }
    headers.update(extra or {})
    for key in drop:
        headers.pop(key)
    return Request(sender=b"34f9ceee", conn_id=b"17", path=path.encode("latin-1"),
                   headers=headers, body=body)


def environ_for(request: Request, content_length: int | None = None, **kw: Any) -> dict[str, Any]:
    """The reference's environ; the compiled twin, when it runs, must build the same one."""
    body = io.BytesIO(request.body)
    args = dict(body=body, content_length=content_length, errors=sys.stderr, multithread=False, multiprocess=True)
    environ = build_environ(request, **args, **kw)
    if COMPILED_BUILD is not None:
        assert list(COMPILED_BUILD(request, **args, **kw).items()) == list(environ.items())
    return environ


def assert_valid(environ: dict[str, Any]) -> bytes:
    """Run a tiny app under wsgiref.validate against ``environ``; any WSGIWarning fails.

    Returns the request body the app read. The environ is copied because the
    validator wraps wsgi.input in place.
    """
    read: list[bytes] = []

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        read.append(env["wsgi.input"].read(int(env.get("CONTENT_LENGTH") or 0)))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    def start_response(status: str, headers: list, exc_info: Any = None) -> Any:
        return lambda data: None

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = validator(app)(dict(environ), start_response)
        assert list(result) == [b"ok"]
        result.close()
    return read[0]


def test_captured_get_matches_pep3333() -> None:
    request = make_request("/t/hello?a=1&b=two".split("?")[0],
                           extra={"QUERY": "a=1&b=two", "URI": "/t/hello?a=1&b=two"})
    env = environ_for(request)
    assert_valid(env)
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/t/hello"
    assert env["QUERY_STRING"] == "a=1&b=two"
    assert env["REQUEST_URI"] == env["RAW_URI"] == env["mongrel2.uri"] == "/t/hello?a=1&b=two"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("127.0.0.1", "6780")
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["HTTP_HOST"] == "127.0.0.1:6780"
    assert env["HTTP_USER_AGENT"] == "curl/7.88.1"
    assert env["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert env["mongrel2.pattern"] == "/t/"
    assert env["mongrel2.conn_id"] == "17"
    assert env["wsgi.version"] == (1, 0)
    assert env["wsgi.url_scheme"] == "http"
    assert (env["wsgi.multithread"], env["wsgi.multiprocess"], env["wsgi.run_once"]) == (
        False, True, False)
    assert env["wsgi.input_terminated"] is True
    assert "CONTENT_LENGTH" not in env and "CONTENT_TYPE" not in env


def test_mongrel2_keys_never_become_http_headers() -> None:
    env = environ_for(make_request(extra={"DOWNLOAD_CREDITS": "102400", "FLAGS": "0x81",
                                          "method": "EVIL"}))
    mongrel2_keys = {"DOWNLOAD_CREDITS", "FLAGS", "PATH", "URI", "PATTERN", "VERSION",
                     "URL_SCHEME", "REMOTE_ADDR"}
    assert not {f"HTTP_{key}" for key in mongrel2_keys} & env.keys()
    # A client header named "Method" arrives lower-cased: it is an ordinary header.
    assert env["REQUEST_METHOD"] == "GET"
    assert env["HTTP_METHOD"] == "EVIL"


@pytest.mark.parametrize(("headers", "expected"), [
    ({"x-dup": ["one", "two"]}, {"HTTP_X_DUP": "one, two"}),
    ({"cookie": ["a=1", "b=2"]}, {"HTTP_COOKIE": "a=1; b=2"}),
    ({"x-q": 'he said "hi" \\ back'}, {"HTTP_X_Q": 'he said "hi" \\ back'}),
    ({"x_foo": "forged", "x-foo": "real"}, {"HTTP_X_FOO": "real"}),
    ({"x-mongrel2-upload-start": "/etc/passwd", "x-mongrel2-upload-done": "/etc/passwd"}, {}),
    ({"content-type": "text/plain", "content-length": "14"},
     {"CONTENT_TYPE": "text/plain", "CONTENT_LENGTH": "14"}),
    ({"content-length": ["5", "5"]}, {"CONTENT_LENGTH": "5"}),
    ({"content-length": ["5", "6"]}, {}),
    ({"content-length": "-1"}, {}),
    ({"x-latin": "caf\xe9"}, {"HTTP_X_LATIN": "caf\xe9"}),
])
def test_client_headers(headers: dict[str, HeaderValue], expected: dict[str, str]) -> None:
    env = environ_for(make_request(extra=headers))
    assert_valid(env)
    produced = {k: v for k, v in env.items()
                if k.startswith(("HTTP_X_", "HTTP_COOKIE", "CONTENT_"))
                and k != "HTTP_X_FORWARDED_FOR"}
    assert produced == expected
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env


@pytest.mark.parametrize(("header", "argument", "expected"), [
    (None, None, None),
    ("14", None, "14"),
    ("14", 1025, "1025"),  # upload: size of the temp file wins
    (None, 0, "0"),
])
def test_content_length_argument_overrides(header: str | None, argument: int | None,
                                           expected: str | None) -> None:
    extra = {"content-length": header} if header is not None else {}
    env = environ_for(make_request(extra=extra), content_length=argument)
    assert env.get("CONTENT_LENGTH") == expected


@pytest.mark.parametrize(("raw", "path_info"), [
    ("/t/a%20b/%22q%22", '/t/a b/"q"'),
    ("/t/%e9", "/t/\xe9"),  # not UTF-8: the byte survives as latin-1
    ("/t/%C3%A9", "/t/\xc3\xa9"),  # UTF-8 bytes as latin-1 str, PEP 3333
    ("/t/\xc3\xa9", "/t/\xc3\xa9"),  # raw 8-bit bytes in the path, decoded latin-1 by the codec
    ("/t/a%2Fb", "/t/a/b"),
    ("/t/../t/dots", "/t/../t/dots"),  # not normalised, like Mongrel2
    ("/t/100%", "/t/100%"),
])
def test_path_decoding(raw: str, path_info: str) -> None:
    env = environ_for(make_request(raw))
    assert_valid(env)
    assert env["PATH_INFO"] == path_info
    assert env["RAW_URI"] == raw


@pytest.mark.parametrize("raw", ["/t/a%20b/%22q%22", "/t/%C3%A9x", "/t/a%2Fb", "/t/plain"])
def test_path_info_matches_werkzeug(raw: str) -> None:
    """For UTF-8 and ASCII paths, werkzeug's EnvironBuilder gives the same PATH_INFO."""
    werkzeug_env = EnvironBuilder(path=raw).get_environ()
    assert environ_for(make_request(raw))["PATH_INFO"] == werkzeug_env["PATH_INFO"]


@pytest.mark.parametrize(("path", "script_name", "expected"), [
    ("/app/x", "/app", ("/app", "/x")),
    ("/app/x", "/app/", ("/app", "/x")),
    ("/app", "/app", ("/app", "")),
    ("/app/", "/app", ("/app", "/")),
    ("/apple", "/app", ("", "/apple")),  # not a segment boundary
    ("/other/x", "/app", ("", "/other/x")),  # outside the mount point
    ("/x", "/", ("", "/x")),
    ("/x", "", ("", "/x")),
    ("/a b/c", "/a b", ("/a b", "/c")),  # compared after decoding
])
def test_split_script_name(path: str, script_name: str, expected: tuple[str, str]) -> None:
    assert split_script_name(path, script_name) == expected


def test_script_name_stripped_from_encoded_path() -> None:
    env = environ_for(make_request("/my%20app/x"), script_name="/my app/")
    assert_valid(env)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/my app", "/x")
    env = environ_for(make_request("/my%20app"), script_name="/my app")
    assert_valid(env)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/my app", "")


def test_script_name_must_be_absolute() -> None:
    with pytest.raises(ValueError):
        split_script_name("/app/x", "app")


@pytest.mark.parametrize(("host", "scheme", "expected"), [
    ("example.com", "http", ("example.com", "80")),
    ("example.com", "https", ("example.com", "443")),
    ("example.com:8080", "http", ("example.com", "8080")),
    ("[::1]:6780", "http", ("[::1]", "6780")),
    ("[2001:db8::1]", "https", ("[2001:db8::1]", "443")),
    ("[::1", "http", ("[::1", "80")),
    ("example.com:", "http", ("example.com", "80")),
    ("example.com:abc", "http", ("example.com", "80")),
    ("example.com:99999", "http", ("example.com", "80")),
    (":8080", "http", ("localhost", "8080")),
    ("", "http", ("localhost", "80")),
    (None, "https", ("localhost", "443")),
])
def test_parse_host(host: str | None, scheme: str, expected: tuple[str, str]) -> None:
    assert parse_host(host, scheme) == expected


def test_https_and_no_host() -> None:
    env = environ_for(make_request(extra={"URL_SCHEME": "https"}, drop=("host",)))
    assert_valid(env)
    assert env["wsgi.url_scheme"] == "https"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("localhost", "443")
    assert "HTTP_HOST" not in env


def test_ipv6_host_header() -> None:
    env = environ_for(make_request(extra={"host": "[::1]:6780"}))
    assert_valid(env)
    assert (env["SERVER_NAME"], env["SERVER_PORT"], env["HTTP_HOST"]) == (
        "[::1]", "6780", "[::1]:6780")


def test_defaults_when_mongrel2_keys_missing() -> None:
    request = make_request(drop=("VERSION", "URL_SCHEME", "URI", "PATH"),
                           extra={"QUERY": "x=1"})
    env = environ_for(request)
    assert_valid(env)
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["wsgi.url_scheme"] == "http"
    assert env["PATH_INFO"] == "/t/hello"  # from the message's PATH field
    assert env["RAW_URI"] == "/t/hello?x=1"


def test_post_with_body() -> None:
    body = b"name=value&x=1"
    request = make_request("/t/form", body=body, extra={
        "METHOD": "POST", "content-length": "14",
        "content-type": "application/x-www-form-urlencoded"})
    env = environ_for(request, content_length=len(body))
    assert assert_valid(env) == body
    assert env["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert env["CONTENT_LENGTH"] == "14"


def test_no_method_is_not_an_http_request() -> None:
    with pytest.raises(ValueError, match="METHOD"):
        environ_for(make_request(drop=("METHOD",)))


def test_all_cgi_values_are_str() -> None:
    env = environ_for(make_request(extra={"x-dup": ["a", "b"], "QUERY": "q"}))
    assert all(type(v) is str for k, v in env.items() if "." not in k)


def test_decode_path_roundtrip_of_every_byte() -> None:
    raw = "".join(f"%{b:02x}" for b in range(256))
    assert decode_path(raw) == bytes(range(256)).decode("latin-1")


# --- the fast paths and caches give the same answers as the general code ------


def test_every_template_value_is_filled() -> None:
    for request in (make_request(), make_request(drop=("VERSION", "URL_SCHEME", "URI", "PATH"))):
        env = environ_for(request)
        assert None not in env.values()


def test_plain_and_encoded_paths_decode_alike() -> None:
    assert decode_path("/t/hello") == "/t/hello"  # no "%": returned as is
    assert decode_path("/t/caf\xe9") == "/t/caf\xe9"  # raw 8-bit byte, no escape
    assert decode_path("/t/%68ello") == "/t/hello"
    with pytest.raises(UnicodeEncodeError):
        decode_path("/t/\u20ac")  # not a latin-1 str: never came from the wire


@pytest.mark.parametrize("script_name", ["", "/"])
def test_root_mount_strips_nothing(script_name: str) -> None:
    env = environ_for(make_request("/t/a%20b"), script_name=script_name)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/t/a b")


def test_host_cache_follows_the_host_header() -> None:
    for host, expected in [("a.example:81", ("a.example", "81")),
                           ("b.example", ("b.example", "80")),
                           ("a.example:81", ("a.example", "81")),
                           ("[::1]:82", ("[::1]", "82"))]:
        env = environ_for(make_request(extra={"host": host}))
        assert (env["SERVER_NAME"], env["SERVER_PORT"], env["HTTP_HOST"]) == (*expected, host)
    env = environ_for(make_request(extra={"host": "b.example", "URL_SCHEME": "https"}))
    assert env["SERVER_PORT"] == "443"  # the scheme is part of what is cached


def test_client_headers_function() -> None:
    headers: dict[str, HeaderValue] = {
        "METHOD": "GET", "host": "h", "x-dup": ["1", "2"], "cookie": ["a=1", "b=2"],
        "content-type": "text/plain", "content-length": " 7 ", "x_foo": "no",
        "x-mongrel2-upload-done": "/tmp/x"}
    expected = {"HTTP_HOST": "h", "HTTP_X_DUP": "1, 2", "HTTP_COOKIE": "a=1; b=2",
                "CONTENT_TYPE": "text/plain", "CONTENT_LENGTH": "7"}
    assert environ_module.client_headers(headers) == expected
    assert environ_module.client_headers(headers) == expected  # names now cached


def test_header_name_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(environ_module, "MAX_CACHED_NAMES", 5)
    monkeypatch.setattr(environ_module, "_ENVIRON_KEYS", {})
    extra: dict[str, HeaderValue] = {f"x-h{i}": str(i) for i in range(20)}
    extra.update({"X-Upper": "skipped", "x_under": "skipped"})
    for _ in range(2):  # the second time, most names are past the full cache
        env = environ_for(make_request(extra=extra))
        assert all(env[f"HTTP_X_H{i}"] == str(i) for i in range(20))
        assert "HTTP_X_UPPER" not in env and "HTTP_X_UNDER" not in env
    assert len(environ_module._ENVIRON_KEYS) == 5
