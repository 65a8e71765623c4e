"""The harness itself: fleet.dev.mongrel2 runs a real Mongrel2 that raw pyzmq handlers can serve.

These tests do not involve `fleet master`, so they pass whatever state the
master is in, and they show that failures elsewhere are not the harness's.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
from pathlib import Path

import pytest
import tnetstring
import zmq

from fleet.dev.mongrel2 import (
    HandlerRoute,
    Mongrel2,
    Mongrel2Error,
    free_port,
    new_ident,
    tcp_pair,
)
from tests.support.harness import (
    FLOOR_HANDLER,
    Harness,
    raw_exchange,
    request,
    split_response,
    upload_files,
    wait_for,
)


def test_floor_handler_serves_both_protocols(harness: Harness) -> None:
    server = harness.mongrel2()
    for route in server.routes:
        harness.popen([sys.executable, str(FLOOR_HANDLER), route.send_spec, route.recv_spec, "-p", "2"])
    for path in ("/t/", "/j/"):  # answering: until Mongrel2's SUB has subscribed, a PUB drops replies
        wait_for(lambda path=path: _answered(server, path), 15, what=f"the floor handler on {path}")
    for path in ("/t/hello?a=1", "/j/hello", "/t/x", "/j/y"):
        resp = request(server, "GET", path)
        assert (resp.status, resp.body) == (200, b"Hello world!"), path
    assert "Mongrel2/1.12" in server.log_text()


def _answered(server: Mongrel2, path: str) -> bool:
    try:
        return request(server, "GET", path, timeout=1).status == 200
    except OSError:
        return False


def test_keep_alive_through_floor_handler(harness: Harness) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    route = server.routes[0]
    harness.popen([sys.executable, str(FLOOR_HANDLER), route.send_spec, route.recv_spec])
    # Two pipelined requests on one connection; the floor handler never closes.
    data, closed = raw_exchange(server, b"GET /t/a HTTP/1.1\r\nHost: x\r\n\r\n" * 2, timeout=2)
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert not closed


def test_stop_is_idempotent_and_frees_the_port(tmp_path: Path) -> None:
    send, recv = tcp_pair()
    server = Mongrel2(tmp_path / "m2", [HandlerRoute("/t/", send, recv, new_ident())])
    with server:
        assert server.running()
        pid = server.pid
        assert pid is not None
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    assert not server.running()
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    # It can be started again in the same directory (stale pid file, sqlite db).
    server.start()
    try:
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    finally:
        server.stop()


def test_start_fails_cleanly_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        send, recv = tcp_pair()
        server = Mongrel2(tmp_path / "m2", [HandlerRoute("/t/", send, recv, new_ident())],
                          port=busy.getsockname()[1])
        with pytest.raises(Mongrel2Error):
            server.start(timeout=5)
        assert not server.running()


def test_rejects_unsafe_settings(tmp_path: Path) -> None:
    send, recv = tcp_pair()
    with pytest.raises(ValueError):
        Mongrel2(tmp_path, [HandlerRoute("/t/", send, recv, new_ident())], content_length=1024)
    with pytest.raises(ValueError):
        HandlerRoute("/t/", send, recv, "bad_ident.with.dots")
    with pytest.raises(ValueError):
        HandlerRoute("/t/", send, recv, new_ident(), protocol="xml")


def test_free_ports_are_distinct() -> None:
    ports = {free_port() for _ in range(50)}
    assert len(ports) == 50


def _upload_handler(server: Mongrel2, route: HandlerRoute, seen: dict, ready: threading.Event) -> None:
    """A raw handler for one upload: checks the temp file in the chroot, answers, unlinks it."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(route.send_spec)
    pub = ctx.socket(zmq.PUB)
    pub.connect(route.recv_spec)
    pull.setsockopt(zmq.RCVTIMEO, 30000)
    ready.set()
    try:
        while True:
            msg = pull.recv()
            sender, conn, path, rest = msg.split(b" ", 3)
            if path == b"@*":
                continue
            headers, _ = tnetstring.pop(rest)
            headers = {k.decode(): v for k, v in headers.items()}
            if "x-mongrel2-upload-done" not in headers:
                seen["start"] = headers["x-mongrel2-upload-start"].decode()
                continue
            rel = headers["x-mongrel2-upload-done"].decode()
            file = server.chroot / rel.lstrip("/")  # the path is inside the chroot
            data = file.read_bytes()
            file.unlink()
            seen["done"] = rel
            body = hashlib.sha256(data).hexdigest().encode()
            reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            pub.send(b"%s %d:%s, %s" % (sender, len(conn), conn, reply))
            return
    finally:
        pub.close(linger=1000)
        pull.close(linger=0)
        ctx.term()


def test_upload_lands_in_the_chroot_tmp(harness: Harness) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    seen: dict = {}
    ready = threading.Event()
    thread = threading.Thread(target=_upload_handler, args=(server, server.routes[0], seen, ready))
    thread.start()
    ready.wait(5)
    payload = os.urandom(1_000_000)
    try:
        resp = request(server, "POST", "/t/up", body=payload,
                       headers={"Content-Type": "application/octet-stream"})
    finally:
        thread.join(35)
    assert resp.status == 200
    assert resp.body.decode() == hashlib.sha256(payload).hexdigest()
    assert seen["start"] == seen["done"]
    # The header holds upload.temp_store's mkstemp result, as seen inside the chroot.
    assert seen["start"].startswith("/tmp/mongrel2.upload.")
    assert upload_files(server) == []


def test_http_10_request_reaches_handler(harness: Harness) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    route = server.routes[0]
    harness.popen([sys.executable, str(FLOOR_HANDLER), route.send_spec, route.recv_spec])
    # The floor handler never closes: read until its body has arrived.
    raw, closed = raw_exchange(server, b"GET /t/ HTTP/1.0\r\n\r\n", timeout=15, until=b"Hello world!")
    status, headers, body = split_response(raw)
    assert (status, body) == (200, b"Hello world!")


def test_flow_control_setting_reaches_mongrel2(harness: Harness) -> None:
    """flow_control=True turns on download credits: requests carry DOWNLOAD_CREDITS."""
    server = harness.mongrel2([("/t/", "tnetstring")], flow_control=True)
    route = server.routes[0]
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(route.send_spec)
    pull.setsockopt(zmq.RCVTIMEO, 10000)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /t/credits HTTP/1.1\r\nHost: x\r\n\r\n")
            _, _, path, rest = pull.recv().split(b" ", 3)
    finally:
        pull.close(linger=0)
        ctx.term()
    headers, _ = tnetstring.pop(rest)
    assert path == b"/t/credits"
    assert b"DOWNLOAD_CREDITS" in headers
    assert "download.flow_control" in (server.workdir / "m2.conf").read_text()
