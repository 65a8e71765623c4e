"""--http: plain HTTP/1.1 served by the same workers and threads as Mongrel2's requests.

Real clients (http.client, raw sockets, curl) against real `fleet master`
processes, with a real Mongrel2 beside them.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from fleet.dev.mongrel2 import Mongrel2, free_port
from tests.support.harness import (
    APPS,
    FleetMaster,
    Harness,
    dechunk,
    master_args,
    request,
    wait_for,
    wait_log,
    worker_pids,
)
from tests.support.load import Load, json_answers

pytestmark = pytest.mark.slow

MAX_BODY = 100_000
TIMEOUT = 10.0


def http_args(port: int, *extra: str) -> list[str]:
    return ["--http", f"127.0.0.1:{port}", "--http-max-body", str(MAX_BODY), *extra]


@pytest.fixture(scope="module")
def both(module_harness: Harness) -> tuple[Mongrel2, FleetMaster, int]:
    """One master serving a Mongrel2 (/t/, /j/) and --http, -p 2 --threads 4."""
    server = module_harness.mongrel2()
    port = free_port()
    master = module_harness.master(master_args(server, extra=http_args(port)))
    return server, master, port


def get(port: int, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
        method: str = "GET") -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def exchange(port: int, data: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send raw bytes, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split back-to-back responses that each carry a Content-Length."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"truncated head: {raw[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        raw = rest[length:]
    return out


def test_get_on_one_keep_alive_connection(both) -> None:
    _, master, port = both
    answers = json_answers("127.0.0.1", port, "/h/echo/a%20b?x=1", 20)
    assert len(answers) == 20
    first = answers[0]
    assert first["REQUEST_METHOD"] == "GET"
    assert first["PATH_INFO"] == "/h/echo/a b"
    assert first["QUERY_STRING"] == "x=1"
    assert first["REMOTE_ADDR"] == "127.0.0.1"
    assert first["SERVER_PORT"] == str(port)
    assert {a["pid"] for a in answers} <= worker_pids(master)
    assert len({a["pid"] for a in answers}) == 1, "one connection is one worker's"


def test_responses_carry_date_and_length(both) -> None:
    _, _, port = both
    status, headers, body = get(port, "/h/hello")
    assert (status, body) == (200, b"Hello world!")
    assert headers["Content-Length"] == "12"
    assert headers["Date"].endswith("GMT")


def test_pipelined_requests_are_answered_in_order(both) -> None:
    _, _, port = both
    data = b"".join(b"GET /h/echo?i=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(7))
    data += b"GET /h/echo?i=7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    got = responses(exchange(port, data))
    assert [status for status, _, _ in got] == [200] * 8
    assert [json.loads(body)["QUERY_STRING"] for _, _, body in got] == [f"i={i}" for i in range(8)]
    assert got[-1][1]["connection"] == "close"


def test_a_chunked_request_body_arrives_whole(both) -> None:
    _, _, port = both
    pieces = [os.urandom(7000) for _ in range(9)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/h/echo", body=iter(pieces), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
    finally:
        conn.close()
    whole = b"".join(pieces)
    assert resp.status == 200
    assert data["body_length"] == len(whole) and data["CONTENT_LENGTH"] == str(len(whole))
    assert data["body_sha256"] == hashlib.sha256(whole).hexdigest()
    assert "HTTP_TRANSFER_ENCODING" not in data


def test_curl_upload_with_expect_100_continue(both, tmp_path) -> None:
    _, _, port = both
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(60_000))
    out = subprocess.run(["curl", "-sS", "-H", "Expect: 100-continue", "--data-binary", f"@{payload}",
                          f"http://127.0.0.1:{port}/h/echo"], capture_output=True, timeout=30, check=True)
    data = json.loads(out.stdout)
    assert data["body_sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest()


def test_a_streamed_response_is_chunked(both) -> None:
    _, _, port = both
    raw = exchange(port, b"GET /h/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    text = dechunk(body)
    assert text.count(b"\n") == 1000


@pytest.mark.parametrize("data, status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
    (b"POST /h/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1), 413),
    (b"POST /h/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"ffff\r\n" + b"z" * 0xffff + b"\r\n" + b"ffff\r\n" + b"z" * 0xffff + b"\r\n", 413),
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    # Request smuggling (RFC 9112 6.1): the request that rides in the body must never be served.
    (b"POST /h/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /h/hello HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"POST /h/echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # A chunk announcing more than --http-max-body is refused at its header, without waiting for it.
    (b"POST /h/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffff\r\n", 413),
], ids=["head-too-big", "declared-body-too-big", "chunked-body-too-big", "garbage", "no-host",
        "unknown-coding", "te-and-cl", "te-in-http-1.0", "chunk-header-too-big"])
def test_bad_requests_get_a_4xx_and_the_server_goes_on(both, data: bytes, status: int) -> None:
    _, master, port = both
    got = responses(exchange(port, data))
    assert [s for s, _, _ in got] == [status]
    assert got[0][1]["connection"] == "close"
    assert get(port, "/h/hello")[0] == 200
    assert f"with {status}" in master.stderr_text()


def test_a_client_gone_mid_stream_frees_the_thread(both) -> None:
    _, master, port = both
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /h/endless HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    wait_log(master, "went away", timeout=30)
    assert json_answers("127.0.0.1", port, "/h/echo", 8)


def test_http_and_mongrel2_load_together_on_the_same_workers(both) -> None:
    """Both kinds of traffic at once, threads > 1: nothing fails, and the
    same worker processes (not a second pool) answer both."""
    server, master, port = both
    loads = [Load(server.port, "/t/hello", expect=b"Hello world!", clients=4, max_duration=60),
             Load(port, "/h/hello", expect=b"Hello world!", clients=4, max_duration=60)]
    for load in loads:
        load.start()
    seen_http, seen_m2 = [], []
    for _ in range(10):
        seen_http += json_answers("127.0.0.1", port, "/h/echo", 4)  # a new connection each time
        seen_m2 += json_answers("127.0.0.1", server.port, "/t/echo", 4)
    time.sleep(2)
    reports = [load.stop() for load in loads]
    for report in reports:
        assert report.clean and report.succeeded > 100, report.summary()
    workers = worker_pids(master)
    assert {a["pid"] for a in seen_http} <= workers
    assert {a["pid"] for a in seen_m2} <= workers
    http_threads = {(a["pid"], a["thread"]) for a in seen_http}
    m2_threads = {(a["pid"], a["thread"]) for a in seen_m2}
    assert http_threads & m2_threads, "no thread served both kinds of request"


def test_a_reload_under_http_load_loses_nothing(harness: Harness) -> None:
    port = free_port()
    master = harness.master(["--module", "apps:router", "--pythonpath", str(APPS),
                             "-p", "2", "--threads", "4", "--graceful-timeout", "10", *http_args(port)])
    before = worker_pids(master)
    load = Load(port, "/h/hello", expect=b"Hello world!", clients=8, max_duration=120).start()
    wait_for(lambda: load_sent(load) > 200, 30, what="load running")
    for reload in range(2):
        master.proc.send_signal(signal.SIGHUP)
        wait_log(master, "reload complete", count=reload + 1, timeout=60)
    time.sleep(1)
    report = load.stop()
    assert report.clean, report.summary()
    assert not worker_pids(master) & before


def load_sent(load: Load) -> int:
    return sum(client.sent for client in load._state)


def test_slow_clients_do_not_hold_the_only_thread(harness: Harness) -> None:
    """-p 1 --threads 1: five clients that never finish their request must not
    keep a sixth from being served (their 30 s limit is far off)."""
    port = free_port()
    harness.master(["--module", "apps:router", "--pythonpath", str(APPS), "-p", "1",
                    "--threads", "1", "--http-timeout", "30", *http_args(port)[:2]])
    stalled = []
    try:
        for i in range(5):
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            sock.sendall(b"POST /h/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial" if i % 2
                         else b"GET /h/echo HTTP/1.1\r\nHost: x\r\nX-Half: ")
            stalled.append(sock)
        status, _, body = get(port, "/h/hello")
        assert (status, body) == (200, b"Hello world!")
    finally:
        for sock in stalled:
            sock.close()


def test_a_client_too_slow_to_send_its_request_gets_408(harness: Harness) -> None:
    port = free_port()
    master = harness.master(["--module", "apps:router", "--pythonpath", str(APPS),
                             "--http-timeout", "1", *http_args(port)[:2]])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"GET /h/hello HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert "too slow" in master.stderr_text()


def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive(harness: Harness) -> None:
    port = free_port()
    harness.master(["--module", "apps:router", "--pythonpath", str(APPS),
                    "--http-keepalive", "1", *http_args(port)[:2]])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"GET /h/hello HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    status, headers, body = responses(answer)[0]
    assert (status, body) == (200, b"Hello world!")
    assert "connection" not in headers  # kept alive, then closed by the server when idle


def test_direct_dispatch_serves_http_beside_mongrel2(harness: Harness) -> None:
    server = harness.mongrel2()
    port = free_port()
    master = harness.master(master_args(server, extra=["--dispatch", "direct", *http_args(port)]))
    assert request(server, "GET", "/t/hello").body == b"Hello world!"
    answers = json_answers("127.0.0.1", port, "/h/echo", 10)
    assert {a["pid"] for a in answers} <= worker_pids(master)


def test_http_without_mongrel2_stops_cleanly_on_term(harness: Harness) -> None:
    port = free_port()
    master = harness.master(["--module", "apps:router", "--pythonpath", str(APPS),
                             *http_args(port)[:2]])
    assert get(port, "/h/hello")[0] == 200
    assert master.stop() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()


def test_a_client_that_stops_reading_frees_the_thread(harness: Harness) -> None:
    """-p 1 --threads 1: a 10 MB answer to a client that never reads fills the
    socket buffers; after --http-timeout the thread gives up and serves others."""
    port = free_port()
    master = harness.master(["--module", "apps:router", "--pythonpath", str(APPS), "-p", "1",
                             "--threads", "1", "--http-timeout", "2", *http_args(port)[:2]])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /h/big HTTP/1.1\r\nHost: x\r\n\r\n")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/h/hello")
        assert conn.getresponse().read() == b"Hello world!"
        conn.close()
    wait_log(master, "went away", timeout=30)
