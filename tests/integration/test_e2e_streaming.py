"""Large and streamed responses, and clients that leave in the middle of one."""

from __future__ import annotations

import hashlib
import http.client
import socket
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from fleet.dev.mongrel2 import Mongrel2
from tests.apps import apps
from tests.support.harness import raw_exchange, split_response, wait_for

pytestmark = pytest.mark.usefixtures("master")

STREAM_BODY = b"".join(apps.stream_chunk(i) for i in range(apps.STREAM_CHUNKS))


def test_10mb_response(m2: Mongrel2, prefix: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", m2.port, timeout=60)
    try:
        conn.request("GET", f"{prefix}big")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert resp.getheader("Content-Length") == str(apps.BIG_SIZE)
    assert len(body) == apps.BIG_SIZE
    assert hashlib.sha256(body).digest() == hashlib.sha256(apps.big_body()).digest()


def test_streamed_response_is_chunked_and_intact(m2: Mongrel2, prefix: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", m2.port, timeout=60)
    try:
        conn.request("GET", f"{prefix}stream")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.getheader("Content-Length") is None
        body = resp.read()
        assert body == STREAM_BODY
        # The chunked framing ended exactly: the connection serves another request.
        conn.request("GET", f"{prefix}hello")
        again = conn.getresponse()
        assert (again.status, again.read()) == (200, b"Hello world!")
    finally:
        conn.close()


def test_streamed_response_to_http10_ends_with_close(m2: Mongrel2, prefix: str) -> None:
    raw, closed = raw_exchange(m2, f"GET {prefix}stream HTTP/1.0\r\n\r\n".encode(), timeout=30)
    assert closed, "an HTTP/1.0 body without a length must end with the connection"
    status, headers, body = split_response(raw)
    assert status == 200
    assert "chunked" not in headers.get("transfer-encoding", "")
    assert body == STREAM_BODY


@pytest.mark.slow
def test_client_disconnect_closes_the_iterable(m2: Mongrel2, prefix: str, tmp_path: Path) -> None:
    record = tmp_path / "endless.txt"
    with socket.create_connection(("127.0.0.1", m2.port), timeout=30) as sock:
        sock.sendall(f"GET {prefix}endless?record={quote(str(record))} HTTP/1.1\r\n"
                     f"Host: 127.0.0.1\r\n\r\n".encode())
        received = b""
        deadline = time.monotonic() + 30
        while received.count(b"tick") < 5 and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
        assert received.count(b"tick") >= 5
    # The app would stream for minutes; only noticing the disconnect closes it early.
    wait_for(lambda: record.exists() and "closed" in record.read_text(), 20,
             what="close() of the abandoned stream's iterable")
