"""Requests and responses through real Mongrel2 and `fleet master` (apps:router, -p 2 --threads 4)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import threading
from pathlib import Path
from urllib.parse import quote

import pytest

from fleet.dev.mongrel2 import Mongrel2
from tests.support.harness import (
    FleetMaster,
    Harness,
    master_args,
    raw_exchange,
    request,
    split_response,
    upload_files,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("master")


def test_get_with_query(m2: Mongrel2, prefix: str) -> None:
    resp = request(m2, "GET", f"{prefix}echo/sub?a=1&b=two", headers={"X-Custom": "yes"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json"
    data = resp.json()
    assert data["REQUEST_METHOD"] == "GET"
    assert data["SCRIPT_NAME"] + data["PATH_INFO"] == f"{prefix}echo/sub"
    assert data["QUERY_STRING"] == "a=1&b=two"
    assert data["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert data["REMOTE_ADDR"] == "127.0.0.1"
    assert data["wsgi.url_scheme"] == "http"
    assert isinstance(data["SERVER_NAME"], str) and data["SERVER_NAME"]
    assert isinstance(data["SERVER_PORT"], str) and data["SERVER_PORT"]
    assert data["HTTP_X_CUSTOM"] == "yes"
    assert data["HTTP_HOST"] == f"127.0.0.1:{m2.port}"
    assert data["body_length"] == 0


def test_post_form(m2: Mongrel2, prefix: str) -> None:
    body = b"name=value&x=1&text=hello+world"
    resp = request(m2, "POST", f"{prefix}echo", body=body,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 200
    data = resp.json()
    assert data["REQUEST_METHOD"] == "POST"
    assert data["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert data["CONTENT_LENGTH"] == str(len(body))
    assert data["body_length"] == len(body)
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "HTTP_CONTENT_TYPE" not in data and "HTTP_CONTENT_LENGTH" not in data


def test_hello(m2: Mongrel2, prefix: str) -> None:
    resp = request(m2, "GET", f"{prefix}hello")
    assert (resp.status, resp.body) == (200, b"Hello world!")


def test_fast_requests_never_wait_behind_a_slow_one(m2: Mongrel2, prefix: str) -> None:
    """The dispatcher may give a thread its next request while it serves one (rather than wake
    another thread); when that one turns out slow, the worker gives the next back and another
    thread serves it. So a burst of fast requests beside a slow one all finish before it."""
    finished: list[tuple[str, int]] = []
    lock = threading.Lock()

    def get(path: str) -> None:
        status = request(m2, "GET", path).status
        with lock:
            finished.append((path, status))

    for _ in range(2):
        finished.clear()
        slow = threading.Thread(target=get, args=(f"{prefix}slow?s=1.5",))
        slow.start()
        fast = [threading.Thread(target=get, args=(f"{prefix}hello",)) for _ in range(12)]
        for thread in fast:
            thread.start()
        for thread in [*fast, slow]:
            thread.join(30)
        assert len(finished) == 13 and all(status == 200 for _, status in finished), finished
        assert finished[-1][0].endswith("slow?s=1.5"), f"a fast request waited for the slow one: {finished}"


def test_unknown_path_is_the_apps_404(m2: Mongrel2, prefix: str) -> None:
    assert request(m2, "GET", f"{prefix}no-such-app").status == 404


def test_keep_alive_reuses_the_connection(m2: Mongrel2, prefix: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", m2.port, timeout=30)
    try:
        conn.request("GET", f"{prefix}hello")
        first = conn.getresponse()
        assert (first.status, first.read()) == (200, b"Hello world!")
        assert not first.will_close
        sock = conn.sock
        conn.request("GET", f"{prefix}echo?second=1")
        second = conn.getresponse()
        assert second.status == 200
        assert json.loads(second.read())["QUERY_STRING"] == "second=1"
        assert conn.sock is sock, "the second request needed a new connection"
    finally:
        conn.close()


def test_head_has_no_body_and_keeps_the_connection_usable(m2: Mongrel2, prefix: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", m2.port, timeout=30)
    try:
        conn.request("HEAD", f"{prefix}hello")
        head = conn.getresponse()
        assert head.status == 200
        assert head.read() == b""
        # Had the server sent a body, it would be parsed as the next response.
        conn.request("GET", f"{prefix}hello")
        get = conn.getresponse()
        assert (get.status, get.read()) == (200, b"Hello world!")
    finally:
        conn.close()


@pytest.mark.parametrize("request_head", [
    b"GET {path} HTTP/1.0\r\n\r\n",
    b"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
], ids=["http10", "http10-host", "http11-connection-close"])
def test_server_closes_when_asked(m2: Mongrel2, prefix: str, request_head: bytes) -> None:
    raw, closed = raw_exchange(m2, request_head.replace(b"{path}", f"{prefix}hello".encode()),
                               timeout=10)
    assert closed, f"the server did not close the connection; got {raw[:200]!r}"
    status, _, body = split_response(raw)
    assert (status, body) == (200, b"Hello world!")


def test_app_exception_gives_500_then_serves(m2: Mongrel2, prefix: str) -> None:
    resp = request(m2, "GET", f"{prefix}boom")
    assert resp.status == 500
    assert b"boom: this app always fails" not in resp.body  # no traceback leaked to the client
    assert request(m2, "GET", f"{prefix}hello").body == b"Hello world!"


def test_write_callable(m2: Mongrel2, prefix: str) -> None:
    resp = request(m2, "GET", f"{prefix}write")
    assert (resp.status, resp.body) == (200, b"written-1;written-2;returned")


def test_closing_iterable_is_closed(m2: Mongrel2, prefix: str, tmp_path: Path) -> None:
    record = tmp_path / "closed.txt"
    resp = request(m2, "GET", f"{prefix}closing?record={quote(str(record))}")
    assert (resp.status, resp.body) == (200, b"one;two;three")
    wait_for(lambda: record.exists() and "closed" in record.read_text(), 10,
             what="close() of the response iterable")
    assert record.read_text().count("closed") == 1


@pytest.mark.parametrize("name, raw_value, expected", [
    ("X-Tab", b"a\tb", "a\tb"),
    ("X-Quote", b'he said "hi" \\ back', 'he said "hi" \\ back'),
    ("X-Latin", b"caf\xe9", "caf\xe9"),  # PEP 3333: header bytes decoded as latin-1
])
def test_awkward_header_values_are_answered(m2: Mongrel2, prefix: str, name: str,
                                             raw_value: bytes, expected: str) -> None:
    """Mongrel2's json protocol emits invalid JSON for a raw tab or a non-UTF-8 byte."""
    raw, _ = raw_exchange(
        m2, b"GET %secho HTTP/1.1\r\nHost: 127.0.0.1\r\n%s: %s\r\nConnection: close\r\n\r\n"
        % (prefix.encode(), name.encode(), raw_value), timeout=10)
    status, _, body = split_response(raw)
    assert status == 200, raw[:300]
    key = "HTTP_" + name.upper().replace("-", "_")
    assert json.loads(body)[key] == expected


def test_requests_spread_over_workers(m2: Mongrel2, master: FleetMaster) -> None:
    pids = {request(m2, "GET", "/t/echo").json()["pid"] for _ in range(40)}
    workers = {p.pid for p in master.descendants()}
    assert pids <= workers, f"answered by {pids}, master's descendants are {workers}"


def test_werkzeug_testapp(harness: Harness) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    harness.master(master_args(server, module="werkzeug.testapp:test_app", processes=1, threads=2))
    resp = request(server, "GET", "/t/")
    assert resp.status == 200
    assert b"Werkzeug" in resp.body
    assert resp.headers["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("dispatch", ["broker", "direct"])
def test_dispatch_modes(harness: Harness, dispatch: str) -> None:
    server = harness.mongrel2()
    harness.master(master_args(server, processes=2, threads=2, extra=["--dispatch", dispatch]))
    for path in ("/t/hello", "/j/hello"):
        for _ in range(5):
            assert request(server, "GET", path).body == b"Hello world!"
    payload = bytes(range(256)) * 400  # over limits.content_length: the upload path
    data = request(server, "POST", "/t/upload", body=payload).json()
    assert (data["length"], data["sha256"]) == (len(payload), hashlib.sha256(payload).hexdigest())


def test_curl_upload_with_expect_100_continue(m2: Mongrel2, tmp_path: Path) -> None:
    """curl sends `Expect: 100-continue` for bodies over 1 MiB; Mongrel2 answers it itself."""
    payload = os.urandom(2 * 1024 * 1024)
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "60", "-H", "Content-Type: application/octet-stream",
         "--data-binary", f"@{source}", "-w", "\n%{http_code}", m2.url("/t/upload")],
        capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    body, _, code = out.stdout.rpartition("\n")
    assert code == "200"
    data = json.loads(body)
    assert (data["length"], data["sha256"]) == (len(payload), hashlib.sha256(payload).hexdigest())
    wait_for(lambda: upload_files(m2) == [], 10, what="the upload temp file to be removed")


def test_curl_http10_and_head(m2: Mongrel2) -> None:
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "--http1.0", "-i", m2.url("/j/hello")],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"HTTP/1.") and out.stdout.endswith(b"\r\n\r\nHello world!")
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "-I", m2.url("/t/hello")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1] == "200"
