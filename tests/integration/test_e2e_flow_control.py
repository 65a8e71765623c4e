"""Mongrel2 with download.flow_control=1, and HTTP pipelining.

With flow control Mongrel2 grants download credits only with a connection's
first request; a second large response on the same keep-alive connection
must still be sent within the credits left (else Mongrel2 kills it). Only
the broker can do this: Mongrel2 sends later grants to any handler, so
direct mode cannot honour flow control (it says so in its log).
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import time

import pytest

from tests.apps import apps
from tests.support.harness import Harness, master_args

STREAM_BODY = b"".join(apps.stream_chunk(i) for i in range(apps.STREAM_CHUNKS))
BIG_DIGEST = hashlib.sha256(apps.big_body()).digest()


def flow_server(harness: Harness, dispatch: str):
    server = harness.mongrel2([("/t/", "tnetstring")], flow_control=True)
    harness.master(master_args(server, processes=2, threads=2, extra=["--dispatch", dispatch]))
    return server


@pytest.mark.slow
def test_large_responses_on_one_keep_alive_connection(harness: Harness) -> None:
    server = flow_server(harness, "broker")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        for path in ("/t/big", "/t/stream", "/t/big", "/t/stream", "/t/hello"):
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, path
            if path == "/t/big":
                assert hashlib.sha256(body).digest() == BIG_DIGEST
            elif path == "/t/stream":
                assert body == STREAM_BODY
            else:
                assert body == b"Hello world!"
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(harness: Harness) -> None:
    """Mongrel2 forwards pipelined requests at once; two workers must not reorder them."""
    server = harness.mongrel2([("/t/", "tnetstring")])
    harness.master(master_args(server, processes=2, threads=2))
    paths = ["/t/slow?s=0.3", "/t/echo?n=2", "/t/hello", "/t/echo?n=4"]
    burst = b"".join(f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() for p in paths)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(burst)
        received = b""
        deadline = time.monotonic() + 30
        while received.count(b"HTTP/1.1 200") < len(paths) or b"n=4" not in received:
            if time.monotonic() > deadline:
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    # The order of the four answers is the order of the four requests.
    marks = [received.find(m) for m in (b'"slept"', b"n=2", b"Hello world!", b"n=4")]
    assert -1 not in marks, received[:2000]
    assert marks == sorted(marks), received[:2000]

