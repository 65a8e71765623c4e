"""ASGI applications (`--interface asgi`) through a real Mongrel2, both protocols, both dispatch modes.

A Starlette app shows what a framework user gets (routes, the scope, bodies,
uploads, streaming, HEAD, errors, lifespan state); ASGI spoken by hand shows
what a framework hides: disconnects reaching the app, cancellation, protocol
mistakes, requests served at once by one process.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from fleet.dev.mongrel2 import Mongrel2, free_port
from tests.apps.asgi_apps import HELLO, STREAM_CHUNKS
from tests.support.harness import (
    APPS,
    CONTENT_LENGTH,
    FleetMaster,
    Harness,
    fleet_cli,
    fleet_stats,
    log_text,
    master_args,
    request,
    scrape_metrics,
    upload_files,
    wait_for,
    wait_log,
    worker_pids,
)
from tests.support.load import Load

pytestmark = pytest.mark.slow


def asgi_args(server: Mongrel2, module: str, *, processes: int = 2, extra: list[str] | None = None) -> list[str]:
    args = master_args(server, module=module, processes=processes, threads=1)
    return args + ["--interface", "asgi", *(extra or [])]


class HttpFront:
    """Where `fleet master --http` listens, shaped like a Mongrel2 for the request helpers."""

    def __init__(self) -> None:
        self.port = free_port()

    def args(self, module: str, processes: int) -> list[str]:
        return ["--module", module, "--pythonpath", str(APPS), "-p", str(processes), "--interface", "asgi",
                "--http", f"127.0.0.1:{self.port}", "--graceful-timeout", "5"]


def serve(harness: Harness, front: str, module: str, *, processes: int = 2,
          extra: list[str] | None = None) -> tuple[Mongrel2 | HttpFront, FleetMaster]:
    """A master serving ``module`` through a real Mongrel2 (front: broker or direct) or on --http."""
    if front == "http":
        server = HttpFront()
        return server, harness.master(server.args(module, processes) + list(extra or []))
    server = harness.mongrel2()
    loop = "uvloop" if front == "broker" else "asyncio"  # both loops, both modes
    return server, harness.master(asgi_args(server, module, processes=processes,
                                            extra=["--dispatch", front, "--asgi-loop", loop, *(extra or [])]))


@pytest.fixture(scope="module", params=["broker", "direct", "http"])
def starlette(request: pytest.FixtureRequest, module_harness: Harness) -> tuple[Mongrel2 | HttpFront, FleetMaster]:
    return serve(module_harness, request.param, "asgi_apps:starlette_routes")


@pytest.fixture(scope="module", params=["broker", "http"])
def handmade(request: pytest.FixtureRequest, module_harness: Harness) -> tuple[Mongrel2 | HttpFront, FleetMaster]:
    return serve(module_harness, request.param, "asgi_apps:raw", processes=1)


def test_starlette_answers_on_both_protocols(starlette, prefix: str) -> None:
    server, master = starlette
    response = request(server, "GET", f"{prefix}hello")
    assert (response.status, response.body) == (200, HELLO)
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["content-length"] == str(len(HELLO))
    assert "ASGI on" in log_text(master)


def test_curl_gets_a_page_and_uploads_a_file(starlette, tmp_path: Path) -> None:
    server, _ = starlette
    page = subprocess.run(["curl", "-s", "-i", f"http://127.0.0.1:{server.port}/t/hello"],
                          capture_output=True, timeout=30)
    assert page.returncode == 0 and page.stdout.startswith(b"HTTP/1.1 200 OK") and page.stdout.endswith(HELLO)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(300_000))  # past Mongrel2's content length: a temp-file upload there
    sent = subprocess.run(["curl", "-s", "-D", "-", "-o", str(tmp_path / "echoed"), "-X", "POST",
                           "--data-binary", f"@{upload}", f"http://127.0.0.1:{server.port}/t/echo"],
                          capture_output=True, timeout=60)
    assert sent.returncode == 0 and b" 200 " in sent.stdout.splitlines()[0]
    assert (tmp_path / "echoed").read_bytes() == upload.read_bytes()


def test_the_scope_carries_the_request(starlette, prefix: str) -> None:
    server, _ = starlette
    response = request(server, "GET", f"{prefix}scope?a=1&b=%C3%A9", headers={"X-Trace": "t1", "Cookie": "k=v"})
    scope = response.json()
    assert scope["method"] == "GET"
    assert scope["path"] == "/scope"
    assert scope["raw_path"] == f"{prefix}scope"
    assert scope["query_string"] == "a=1&b=%C3%A9"
    assert scope["http_version"] == "1.1"
    assert scope["scheme"] == "http"
    assert scope["client"][0] == "127.0.0.1"
    assert scope["server"] == ["127.0.0.1", server.port]
    headers = dict(scope["headers"])
    assert headers["x-trace"] == "t1" and headers["cookie"] == "k=v"
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert not any(name.isupper() or name.startswith("x-mongrel2") for name, _ in scope["headers"])
    assert scope["state"]["started_by"].startswith("pid "), "the lifespan's state reaches every request"


def test_a_percent_encoded_utf8_path_is_decoded(starlette) -> None:
    server, _ = starlette
    response = request(server, "GET", "/t/scope/%C3%A9t%C3%A9")
    assert response.status == 404  # no such route; the 404 shows Starlette got the decoded path
    raw = request(server, "GET", "/t/scope")
    assert raw.status == 200


@pytest.mark.parametrize("size", [0, 1000, CONTENT_LENGTH - 1])
def test_a_request_body_arrives_whole(starlette, prefix: str, size: int) -> None:
    server, _ = starlette
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    response = request(server, "POST", f"{prefix}echo", body=body)
    assert response.status == 200
    assert response.body == body
    assert response.headers["x-sha256"] == hashlib.sha256(body).hexdigest()


def test_an_upload_reaches_the_app_in_pieces_and_its_file_is_deleted(starlette, prefix: str) -> None:
    server, _ = starlette
    body = hashlib.sha256(b"seed").digest() * 40_000  # 1.28 MB: Mongrel2 writes it to a temp file
    response = request(server, "PUT", f"{prefix}echo", body=body, timeout=60)
    assert response.status == 200
    assert response.headers["x-length"] == str(len(body))
    assert response.headers["x-sha256"] == hashlib.sha256(body).hexdigest()
    if isinstance(server, Mongrel2):
        wait_for(lambda: not upload_files(server), 10, what="the upload's temp file deleted")


def test_a_stream_is_chunked_and_complete(starlette, prefix: str) -> None:
    server, _ = starlette
    response = request(server, "GET", f"{prefix}stream")
    assert response.status == 200
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.body == b"".join(b"chunk %d\n" % n for n in range(STREAM_CHUNKS))


def test_head_gets_headers_only_and_the_connection_stays_open(starlette) -> None:
    server, _ = starlette
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("HEAD", "/t/hello")
        head = conn.getresponse()
        assert (head.status, head.read(), head.headers["content-length"]) == (200, b"", str(len(HELLO)))
        for _ in range(3):  # keep-alive: the same connection serves the next requests
            conn.request("GET", "/t/hello")
            assert conn.getresponse().read() == HELLO
    finally:
        conn.close()


def test_connection_close_is_honoured(starlette) -> None:
    server, _ = starlette
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /t/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(HELLO)


def test_an_app_exception_is_a_500_and_a_traceback_and_the_worker_lives(starlette, prefix: str) -> None:
    server, master = starlette
    before = worker_pids(master)
    response = request(server, "GET", f"{prefix}boom")
    assert response.status == 500
    wait_log(master, "RuntimeError: boom from the application")
    assert request(server, "GET", f"{prefix}hello").body == HELLO
    assert worker_pids(master) == before


def test_a_background_task_outlives_a_client_that_leaves_after_its_response(starlette, tmp_path: Path) -> None:
    server, _ = starlette
    record = tmp_path / "record"
    data, closed = _raw_exchange(server, f"GET /t/background?record={record} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.0 200") and data.endswith(b"queued") and closed
    wait_for(lambda: record.exists() and record.read_text() == "ran\n", 10, what="the background task to run")


def test_pipelined_requests_in_direct_mode_leak_no_slot(harness: Harness) -> None:
    """Mongrel2 hands a pipelined request over at once in direct mode: two requests of one connection
    in flight together must both be answered and both give their slot back."""
    server, master = serve(harness, "direct", "asgi_apps:raw", processes=1, extra=["--asgi-concurrency", "2"])
    for _ in range(4):
        data, _ = _raw_exchange(server, b"GET /t/hello HTTP/1.1\r\nHost: x\r\n\r\n"
                                        b"GET /t/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert data.count(HELLO) == 2, data
    for _ in range(10):
        assert request(server, "GET", "/t/hello").body == HELLO
    assert "internal error" not in log_text(master)


def test_a_hundred_slow_requests_are_served_by_one_process_at_once(handmade) -> None:
    server, master = handmade
    assert len(worker_pids(master)) == 1
    key = uuid.uuid4().hex

    def one(_: int) -> tuple[int, bytes]:
        response = request(server, "GET", f"/t/barrier?key={key}&n=100", timeout=60)
        return response.status, response.body

    with ThreadPoolExecutor(max_workers=100) as pool:
        answers = list(pool.map(one, range(100)))
    assert [status for status, _ in answers] == [200] * 100, answers[:3]
    assert {body for _, body in answers} == {b"100 together in %d" % next(iter(worker_pids(master)))}


@pytest.mark.parametrize("route", ["/t/", "/j/"])
def test_a_client_that_leaves_mid_stream_gets_its_task_cancelled(handmade, tmp_path: Path, route: str) -> None:
    server, _ = handmade
    record = tmp_path / "record"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET {route}endless?record={record} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"tick 3" not in data:
            data += sock.recv(65536)
    wait_for(lambda: record.exists() and record.read_text().strip(), 15, what="the app told of the disconnect")
    assert record.read_text().split() == ["cancelled"]


def test_an_app_waiting_in_receive_gets_http_disconnect(handmade, tmp_path: Path) -> None:
    server, _ = handmade
    record = tmp_path / "record"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET /t/wait-disconnect?record={record} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"waiting" not in data:
            data += sock.recv(65536)
    wait_for(lambda: record.exists() and record.read_text().strip(), 15, what="the app's receive() answered")
    assert record.read_text().split() == ["http.disconnect"]


@pytest.mark.parametrize("action, logged", [
    ("bad-status", "application broke ASGI in GET /t/bad-status: http.response.start: status must be an int"),
    ("body-before-start", "expected http.response.start, got 'http.response.body'"),
    ("incomplete", "application returned without completing its response in GET /t/incomplete"),
])
def test_a_protocol_mistake_is_logged_and_answered(handmade, action: str, logged: str) -> None:
    server, master = handmade
    data, closed = _raw_get(server, f"/t/{action}")
    assert closed, "the connection ends after a broken response"
    # Nothing had left yet (the head waits for the first body message): a 500 is still possible.
    assert data.startswith(b"HTTP/1.1 500 ")
    wait_log(master, logged)
    assert request(server, "GET", "/t/hello").body == HELLO


def test_an_error_after_the_head_cuts_the_response_short(handmade) -> None:
    server, master = handmade
    data, closed = _raw_get(server, "/t/fail-mid-stream")
    assert closed
    assert data.startswith(b"HTTP/1.1 200 OK") and b"first part" in data
    assert not data.endswith(b"0\r\n\r\n"), "a cut-short chunked body must not look complete"
    wait_log(master, "RuntimeError: failed half way")


def test_django_serves_a_page(harness: Harness, prefix: str) -> None:
    server = harness.mongrel2()
    harness.master(asgi_args(server, "django_site:application", processes=1))
    page = request(server, "GET", f"{prefix}page")
    assert page.status == 200
    assert page.body == f"<h1>Hello from Django at /{prefix.strip('/')}/page</h1>".encode()
    echo = request(server, "POST", "/t/echo?x=1", body=b"posted")
    assert echo.json() == {"method": "POST", "body": "posted", "query": {"x": "1"}, "script_name": "",
                           "remote": "127.0.0.1"}


def _raw_get(server: Mongrel2, path: str) -> tuple[bytes, bool]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    return data, False


# -- reloads and --http specifics ------------------------------------------------------------


@pytest.mark.parametrize("front", ["broker", "http"])
def test_reloads_under_load_lose_nothing(harness: Harness, front: str) -> None:
    """Slow and fast requests in flight across two HUP reloads: every one answered."""
    server, master = serve(harness, front, "asgi_apps:starlette_routes")
    slow = Load(server.port, "/t/slow?s=0.3", expect=lambda body: body.startswith(b"slept in "), clients=8,
                timeout=15.0, max_duration=120)
    fast = Load(server.port, "/t/hello", expect=HELLO, clients=4, pause=0.005, timeout=15.0, max_duration=120)
    slow.start()
    fast.start()
    try:
        fast.wait_succeeded(50)
        for _ in range(2):
            before = log_text(master).count("reload complete")
            old = worker_pids(master)
            master.proc.send_signal(signal.SIGHUP)
            wait_log(master, "reload complete", before + 1, timeout=60)
            wait_for(lambda o=old: not worker_pids(master) & o, 30, what="the old generation gone")
            fast.wait_succeeded(50)
    finally:
        reports = [slow.stop(), fast.stop()]
    for report in reports:
        assert report.clean, f"{report.summary()}\n{log_text(master)[-3000:]}"
    assert reports[0].succeeded > 0


def test_http_pipelined_requests_are_answered_in_order(harness: Harness) -> None:
    server, _ = serve(harness, "http", "asgi_apps:raw", processes=1)
    data, closed = _raw_exchange(server, b"GET /h/hello HTTP/1.1\r\nHost: x\r\n\r\n"
                                         b"GET /h/nothing HTTP/1.1\r\nHost: x\r\n\r\n"
                                         b"GET /h/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert closed
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", data) == [b"200", b"404", b"200"]
    assert b"Date: " in data


@pytest.mark.parametrize("head, status", [
    (b"POST /h/hello HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET /h/hello HTTP/1.1\r\n\r\n", 400),
    (b"POST /h/hello HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n", 413),
])
def test_http_refusals_are_kept(harness: Harness, head: bytes, status: int) -> None:
    server, master = serve(harness, "http", "asgi_apps:raw", processes=1)
    data, closed = _raw_exchange(server, head)
    assert data.startswith(b"HTTP/1.1 %d " % status) and closed
    wait_log(master, f"refused an HTTP request from 127.0.0.1 with {status}")


def _raw_exchange(server, data: bytes) -> tuple[bytes, bool]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return out, True
            out += chunk
    return out, False


# -- WebSockets -------------------------------------------------------------------------------


def ws_url(server, path: str) -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


@pytest.fixture(scope="module", params=["broker", "http"])
def sockets(request: pytest.FixtureRequest, module_harness: Harness) -> tuple[Mongrel2 | HttpFront, FleetMaster]:
    """One process, so that every socket of a test meets in the same room."""
    return serve(module_harness, request.param, "asgi_apps:starlette_routes", processes=1,
                 extra=["--websocket-max-size", "300000"])


@pytest.mark.parametrize("route", ["/t/", "/j/"])
def test_a_websocket_echoes_text_bytes_fragments_and_pings(sockets, route: str) -> None:
    server, _ = sockets
    with connect(ws_url(server, f"{route}ws/echo?x=1"), subprotocols=["chat", "v2"], open_timeout=10) as ws:
        assert ws.subprotocol == "chat"
        ws.send("héllo")
        assert ws.recv(timeout=10) == "héllo"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=10) == b"\x00\x01\xff"
        ws.send(["frag", "ments"])  # one message in two frames
        assert ws.recv(timeout=10) == "fragments"
        ws.send("x" * 250_000)
        assert ws.recv(timeout=10) == "x" * 250_000
        ws.ping(b"are you there").wait(10)
        ws.send("scope")
        scope = json.loads(ws.recv(timeout=10))
        assert scope["path"] == "/ws/echo" and scope["query"] == "x=1" and scope["scheme"] == "ws"
        assert scope["subprotocols"] == ["chat", "v2"]


def test_the_app_closes_with_its_code_and_the_client_with_its_own(sockets) -> None:
    server, _ = sockets
    with connect(ws_url(server, "/t/ws/echo"), open_timeout=10) as ws:
        ws.send("close:4001")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 4001 and closed.value.sent.code == 4001  # the handshake completed
    with connect(ws_url(server, "/t/ws/echo"), open_timeout=10) as ws:
        ws.send("ping")
        assert ws.recv(timeout=10) == "ping"
        ws.close(code=1000)
    # The server echoed the client's close (received code 1000, not 1006 for a connection cut short).
    assert ws.close_exc.rcvd is not None and ws.close_code == 1000


def test_broadcast_reaches_every_socket(sockets) -> None:
    server, _ = sockets
    with ExitStack() as stack:
        clients = [stack.enter_context(connect(ws_url(server, "/t/ws/broadcast"), open_timeout=10))
                   for _ in range(5)]
        time.sleep(0.5)  # every accept is through: the room is full
        clients[2].send("to everyone")
        assert [ws.recv(timeout=10) for ws in clients] == ["to everyone"] * 5


def test_a_refused_handshake_is_403(sockets) -> None:
    server, _ = sockets
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(server, "/t/ws/refuse"), open_timeout=10)
    assert refused.value.response.status_code == 403


def test_a_message_over_the_size_limit_closes_with_1009(sockets) -> None:
    server, _ = sockets
    with connect(ws_url(server, "/t/ws/echo"), open_timeout=10, max_size=None) as ws:
        ws.send("y" * 300_001)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1009


@pytest.mark.parametrize("front", ["broker", "http"])
def test_a_client_that_drops_its_connection_is_a_1006_disconnect(harness: Harness, front: str,
                                                                   tmp_path: Path) -> None:
    server, _ = serve(harness, front, "asgi_apps:raw", processes=1)
    record = tmp_path / "record"
    with connect(ws_url(server, f"/t/ws-record?record={record}"), open_timeout=10) as ws:
        ws.send("one")
        assert ws.recv(timeout=10) == "one"
        ws.socket.shutdown(socket.SHUT_RDWR)  # no close frame: the TCP connection just ends
    wait_for(lambda: record.exists() and record.read_text().strip(), 15, what="the app told of the drop")
    assert record.read_text().split("\n")[0] == "disconnect 1006"


@pytest.mark.parametrize("front", ["broker", "http"])
def test_open_websockets_take_no_request_slot_and_no_harakiri(harness: Harness, front: str) -> None:
    server, master = serve(harness, front, "asgi_apps:starlette_routes", processes=1,
                           extra=["--asgi-concurrency", "2", "--harakiri", "1"])
    pids = worker_pids(master)
    with ExitStack() as stack:
        sockets = [stack.enter_context(connect(ws_url(server, "/t/ws/echo"), open_timeout=10)) for _ in range(5)]
        for ws in sockets:
            ws.send("open")
            assert ws.recv(timeout=10) == "open"
        assert request(server, "GET", "/t/hello").body == HELLO  # 5 sockets, and still room for requests
        time.sleep(2.5)  # past --harakiri, and past the master's backstop at twice it
        for ws in sockets:
            ws.send("still here")
            assert ws.recv(timeout=10) == "still here"
    assert worker_pids(master) == pids and "harakiri" not in log_text(master)


def test_direct_mode_refuses_websockets_and_says_why(harness: Harness) -> None:
    server, master = serve(harness, "direct", "asgi_apps:starlette_routes", processes=1)
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(server, "/t/ws/echo"), open_timeout=10)
    assert refused.value.response.status_code == 503
    wait_log(master, "refused a WebSocket: through Mongrel2 they need --dispatch broker")


@pytest.mark.parametrize("front", ["broker", "http"])
def test_200_websockets_stay_open_across_a_reload_until_their_own_close(harness: Harness, front: str) -> None:
    server, master = serve(harness, front, "asgi_apps:starlette_routes", extra=["--graceful-timeout", "120"])
    old = worker_pids(master)

    async def scenario() -> list[int]:
        clients = await asyncio.gather(*(aconnect(ws_url(server, "/t/ws/echo"), open_timeout=30)
                                         for _ in range(200)))
        answers = await asyncio.gather(*(_echo(ws, f"before {n}") for n, ws in enumerate(clients)))
        assert answers == [f"before {n}" for n in range(200)]
        pids = [json.loads(await _echo(ws, "scope"))["pid"] for ws in clients]
        assert set(pids) <= old
        before = log_text(master).count("reload complete")
        master.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_log, master, "reload complete", before + 1, 60)
        assert worker_pids(master) & old, "the old workers stay while their sockets are open"
        answers = await asyncio.gather(*(_echo(ws, f"after {n}") for n, ws in enumerate(clients)))
        assert answers == [f"after {n}" for n in range(200)]
        await asyncio.gather(*(ws.close() for ws in clients))
        return [ws.close_code for ws in clients]

    assert asyncio.run(scenario()) == [1000] * 200
    wait_for(lambda: not worker_pids(master) & old, 30, what="the old workers gone once their sockets closed")
    with connect(ws_url(server, "/t/ws/echo"), open_timeout=10) as ws:  # the new generation serves them
        ws.send("new")
        assert ws.recv(timeout=10) == "new"


async def _echo(ws, text: str) -> str:
    await ws.send(text)
    return await asyncio.wait_for(ws.recv(), 30)


@pytest.mark.parametrize("front", ["broker", "http"])
def test_the_graceful_timeout_closes_a_retiring_workers_sockets_with_1001(harness: Harness, front: str) -> None:
    server, master = serve(harness, front, "asgi_apps:starlette_routes", processes=1,
                           extra=["--graceful-timeout", "3"])
    with connect(ws_url(server, "/t/ws/echo"), open_timeout=10) as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"
        master.proc.send_signal(signal.SIGHUP)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=15)
    assert closed.value.rcvd.code == 1001


def test_a_graceful_stop_closes_websockets_through_mongrel2_at_once_with_1001(harness: Harness) -> None:
    """Detached from Mongrel2, the host gets no more frames of its sockets: they close at once, not
    when the graceful timeout (60 s here, past the client's wait) runs out."""
    server, master = serve(harness, "broker", "asgi_apps:starlette_routes", processes=1,
                           extra=["--graceful-timeout", "60"])
    with connect(ws_url(server, "/t/ws/echo"), open_timeout=10) as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"
        master.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=15)
    assert closed.value.rcvd.code == 1001
    assert master.wait_exit(timeout=30) == 0


def test_a_websocket_through_a_cluster_node_with_its_own_mongrel2(harness: Harness, cluster_args: list[str]) -> None:
    mine = harness.mongrel2([("/t/", "tnetstring")])
    harness.master(asgi_args(mine, "asgi_apps:starlette_routes", processes=1) + cluster_args)
    theirs = harness.mongrel2()
    node = harness.node(cluster_args + ["--node-name", "n", "--mongrel2-config",
                                        str(theirs.workdir / "config.sqlite")])
    node_workers = {child.pid for child in node.descendants()}
    with connect(ws_url(theirs, "/j/ws/echo"), open_timeout=10) as ws:
        ws.send("through the node")
        assert ws.recv(timeout=10) == "through the node"
        ws.send("scope")
        assert json.loads(ws.recv(timeout=10))["pid"] in node_workers


def test_open_websockets_are_counted_in_stats_metrics_and_status(harness: Harness, cluster_args: list[str]) -> None:
    stats, metrics = f"tcp://127.0.0.1:{free_port()}", free_port()
    server, _ = serve(harness, "broker", "asgi_apps:starlette_routes",
                      extra=["--stats", stats, "--metrics", f"127.0.0.1:{metrics}", *cluster_args])

    def counted(expected: int) -> bool:
        hosts = json.loads(fleet_cli("status", *cluster_args, "--json").stdout)["hosts"]
        return (fleet_stats(stats)["websockets_open"] == expected
                and scrape_metrics(metrics)[("fleet_websockets_open", ())] == expected
                and [h["websockets_open"] for h in hosts] == [expected])

    with ExitStack() as stack:
        for _ in range(3):
            ws = stack.enter_context(connect(ws_url(server, "/t/ws/echo"), open_timeout=10))
            ws.send("hi")
            assert ws.recv(timeout=10) == "hi"
        wait_for(lambda: counted(3), 20, what="3 open WebSockets in stats, metrics and status")
    wait_for(lambda: counted(0), 20, what="none open once they closed")
    served = fleet_stats(stats)["served"]
    assert (served["websockets_opened"], served["websockets_closed"]) == (3, 3)
    assert "websockets open 0  (opened 3, closed 3)" in fleet_cli("stats", "--stats", stats).stdout


# -- supervision --------------------------------------------------------------------------


@pytest.mark.parametrize("front", ["broker", "direct", "http"])
def test_harakiri_cancels_the_stuck_request_and_answers_504(harness: Harness, front: str) -> None:
    server, master = serve(harness, front, "asgi_apps:stuck", processes=1, extra=["--harakiri", "1"])
    pids = worker_pids(master)
    with ThreadPoolExecutor(max_workers=2) as pool:
        stuck = pool.submit(request, server, "GET", "/t/sleep?s=60", timeout=30)
        wait_log(master, "harakiri: the request on connection", timeout=15)
        assert stuck.result().status == 504
    assert request(server, "GET", "/t/hello").body == HELLO
    assert worker_pids(master) == pids, "the worker itself cancels: nobody is killed"


def test_a_loop_blocked_past_harakiri_is_killed_by_the_master(harness: Harness) -> None:
    server, master = serve(harness, "broker", "asgi_apps:stuck", processes=1, extra=["--harakiri", "1"])
    pids = worker_pids(master)
    answer = request(server, "GET", "/t/block?s=30", timeout=30)
    assert answer.status == 504
    wait_log(master, "harakiri: worker", timeout=15)
    wait_for(lambda: worker_pids(master) and not worker_pids(master) & pids, 30, what="a new worker")
    wait_for(lambda: request(server, "GET", "/t/hello").body == HELLO, 30, what="served again")


@pytest.mark.parametrize("front", ["broker", "http"])
def test_max_requests_recycles_an_asgi_worker(harness: Harness, front: str) -> None:
    server, master = serve(harness, front, "asgi_apps:raw", processes=1, extra=["--max-requests", "20"])
    first = worker_pids(master)
    load = Load(server.port, "/t/hello", expect=HELLO, clients=2, pause=0.01, timeout=15.0, max_duration=60)
    load.start()
    try:
        wait_for(lambda: worker_pids(master) and not worker_pids(master) & first, 30,
                 what="the worker recycled after 20 requests")
        load.wait_succeeded(20)
    finally:
        report = load.stop()
    assert report.clean, report.summary()
    assert "(--max-requests)" in log_text(master)


def test_a_cluster_node_serves_the_asgi_app_too(harness: Harness, cluster_args: list[str]) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(asgi_args(server, "asgi_apps:raw", processes=1) + cluster_args)
    node = harness.node(cluster_args + ["--node-name", "n1"])
    owners = {child.pid: name for name, proc in (("master", master), ("node", node)) for child in proc.descendants()}
    # One keep-alive connection: Mongrel2 deals messages round-robin, and a new connection per
    # request would send each request one way and each connection's disconnect the other.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    served = set()
    for _ in range(20):
        conn.request("GET", "/t/pid")
        served.add(owners.get(json.loads(conn.getresponse().read())["pid"]))
    conn.close()
    assert served == {"master", "node"}
    assert "ASGI on" in node.stderr_text()


# -- lifespan ----------------------------------------------------------------------------


@pytest.mark.parametrize("module, reason", [
    ("asgi_apps:startup_fails", "the application's startup failed: the database is not there"),
    ("asgi_apps:startup_raises", "the application's lifespan raised ConnectionRefusedError: cannot reach the cache"),
])
def test_a_failed_startup_fails_the_boot(harness: Harness, module: str, reason: str) -> None:
    server = harness.mongrel2()
    master = harness.master(asgi_args(server, module, processes=1), ready=False)
    code = master.wait_exit(timeout=30)
    assert code != 0
    assert reason in master.stderr_text()


def test_an_app_without_lifespan_is_served(harness: Harness) -> None:
    server = harness.mongrel2()
    master = harness.master(asgi_args(server, "asgi_apps:no_lifespan", processes=1))
    assert request(server, "GET", "/t/hello").body == HELLO
    assert "does not speak the ASGI lifespan protocol" in log_text(master)


def test_shutdown_runs_on_a_graceful_stop(harness: Harness, tmp_path: Path, monkeypatch) -> None:
    record = tmp_path / "record"
    monkeypatch.setenv("FLEET_TEST_RECORD", str(record))
    server = harness.mongrel2()
    master = harness.master(asgi_args(server, "asgi_apps:shutdown_recorded", processes=2))
    pids = worker_pids(master)
    assert request(server, "GET", "/t/hello").body == HELLO
    master.stop(signal.SIGTERM)
    assert sorted(record.read_text().split("\n")[:-1]) == sorted(f"shutdown {pid}" for pid in pids)


def test_a_reload_whose_startup_fails_keeps_the_old_generation(harness: Harness, tmp_path: Path) -> None:
    appdir = tmp_path / "app"
    appdir.mkdir()
    module = appdir / "asgi_reload_app.py"
    source = (
        "FAIL = {fail!r}\n"
        "async def app(scope, receive, send):\n"
        "    if scope['type'] == 'lifespan':\n"
        "        await receive()\n"
        "        if FAIL:\n"
        "            await send({{'type': 'lifespan.startup.failed', 'message': 'broken on purpose'}})\n"
        "            return\n"
        "        await send({{'type': 'lifespan.startup.complete'}})\n"
        "        await receive()\n"
        "        await send({{'type': 'lifespan.shutdown.complete'}})\n"
        "        return\n"
        "    await send({{'type': 'http.response.start', 'status': 200, 'headers': []}})\n"
        "    await send({{'type': 'http.response.body', 'body': b'version ' + {body!r}}})\n"
    )
    module.write_text(source.format(fail=False, body=b"1"))
    server = harness.mongrel2()
    master = harness.master(asgi_args(server, "asgi_reload_app:app",
                                      extra=["--pythonpath", str(appdir)]))
    old = worker_pids(master)
    module.write_text(source.format(fail=True, body=b"2"))
    master.proc.send_signal(signal.SIGHUP)
    wait_log(master, "reload failed", timeout=60)
    wait_for(lambda: worker_pids(master) == old, 15, what="only the old workers left")
    assert request(server, "GET", "/t/").body == b"version 1"
    assert "broken on purpose" in log_text(master)


def test_interface_mix_ups_are_one_line(harness: Harness) -> None:
    server = harness.mongrel2()
    wsgi_as_asgi = harness.master(asgi_args(server, "apps:hello", processes=1), ready=False)
    assert wsgi_as_asgi.wait_exit(timeout=30) != 0
    assert "is not an async callable, so not an ASGI app" in wsgi_as_asgi.stderr_text()
    asgi_as_wsgi = harness.master(master_args(server, module="asgi_apps:raw", processes=1, threads=1),
                                  ready=False)
    assert asgi_as_wsgi.wait_exit(timeout=30) != 0
    assert "is an async callable (an ASGI app); add --interface asgi" in asgi_as_wsgi.stderr_text()


def test_asgi_requests_are_counted_in_stats(harness: Harness) -> None:
    server = harness.mongrel2()
    stats = f"tcp://127.0.0.1:{free_port()}"
    harness.master(asgi_args(server, "asgi_apps:raw", processes=1, extra=["--stats", stats]))
    for path, status in [("/t/hello", 200)] * 5 + [("/t/nothing", 404), ("/t/bad-status", 500)]:
        assert _raw_get(server, path)[0].startswith(b"HTTP/1.1 %d " % status) if status == 500 else \
            request(server, "GET", path).status == status
    expected = {"1xx": 0, "2xx": 5, "3xx": 0, "4xx": 1, "5xx": 1}
    figures = wait_for(lambda: (f := fleet_stats(stats))["served"]["requests"]["mongrel2"] == expected and f, 15,
                       what="7 ASGI requests in fleet stats")
    assert figures["totals"]["requests"] == 7
