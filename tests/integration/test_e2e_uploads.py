"""Request bodies over Mongrel2's limits.content_length go through its temp-file upload path."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
from collections.abc import Iterator

import pytest

from fleet.dev.mongrel2 import Mongrel2
from tests.support.harness import CONTENT_LENGTH, log_text, master_args, request, upload_files, wait_for

pytestmark = pytest.mark.usefixtures("master")


def _check_upload(m2: Mongrel2, path: str, payload: bytes) -> None:
    resp = request(m2, "POST", path, body=payload,
                   headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert resp.status == 200, resp.body[:300]
    data = resp.json()
    assert data["length"] == len(payload)
    assert data["sha256"] == hashlib.sha256(payload).hexdigest()
    wait_for(lambda: upload_files(m2) == [], 10, what="the upload temp file to be removed")


@pytest.mark.parametrize("size", [CONTENT_LENGTH, CONTENT_LENGTH + 1, 1_000_000],
                         ids=["at-limit-inline", "limit+1", "1MB"])
def test_upload_byte_exact(m2: Mongrel2, prefix: str, size: int) -> None:
    _check_upload(m2, f"{prefix}upload", os.urandom(size))


@pytest.mark.slow
def test_upload_20mb(m2: Mongrel2) -> None:
    _check_upload(m2, "/t/upload", os.urandom(20 * 1024 * 1024))


def test_chunked_upload(m2: Mongrel2) -> None:
    """Mongrel2 sends any chunked body through the upload path, de-chunked."""
    payload = os.urandom(100_000)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 30_000):
            yield payload[i:i + 30_000]

    conn = http.client.HTTPConnection("127.0.0.1", m2.port, timeout=30)
    try:
        conn.request("POST", "/t/upload", body=chunks(), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        assert resp.status == 200
        data = json.loads(resp.read())
    finally:
        conn.close()
    assert (data["length"], data["sha256"]) == (len(payload), hashlib.sha256(payload).hexdigest())
    wait_for(lambda: upload_files(m2) == [], 10, what="the upload temp file to be removed")


@pytest.fixture
def planted(m2: Mongrel2) -> Iterator[str]:
    """A file that looks exactly like a Mongrel2 upload, holding a secret."""
    path = m2.chroot / "tmp" / "mongrel2.upload.F0rGed"
    path.write_bytes(b"secret-planted-upload")
    try:
        yield "/tmp/mongrel2.upload.F0rGed"
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("start, done, body", [
    ("/etc/passwd", "/etc/passwd", b"abc"),
    ("/etc/passwd", "/etc/passwd", b""),
    ("/tmp/../etc/passwd", "/tmp/../etc/passwd", b"abc"),
    ("tmp/../../../../etc/passwd", "tmp/../../../../etc/passwd", b"abc"),
    ("PLANTED", "PLANTED", b"abc"),
    ("PLANTED", "PLANTED", b""),
    ("PLANTED", None, b"abc"),
], ids=["passwd", "passwd-empty-body", "dotdot-abs", "dotdot-rel", "planted", "planted-empty-body",
        "start-only"])
def test_forged_upload_headers_are_rejected(m2: Mongrel2, prefix: str, planted: str,
                                            start: str, done: str | None, body: bytes) -> None:
    headers = {"X-Mongrel2-Upload-Start": start.replace("PLANTED", planted)}
    if done is not None:
        headers["X-Mongrel2-Upload-Done"] = done.replace("PLANTED", planted)
    resp = request(m2, "POST", f"{prefix}upload", body=body, headers=headers, timeout=15)
    assert resp.status == 400, resp.body[:300]
    assert b"root:" not in resp.body and b"secret" not in resp.body


@pytest.mark.parametrize("dispatch", ["broker", "direct"])
def test_a_refused_upload_is_refused_and_logged_once(harness, dispatch: str) -> None:
    """Mongrel2's temp_store is not the one fleet was told: the upload's start is refused
    (400, close). Mongrel2 still sends the done message: the dispatcher drops it (broker),
    or a worker answers it again and logs it only at debug (direct), never a second warning."""
    m2 = harness.mongrel2(upload_store="/tmp/other.upload.XXXXXX")
    master = harness.master(master_args(m2, extra=["--dispatch", dispatch]))
    for _ in range(3):
        assert request(m2, "POST", "/t/upload", body=os.urandom(300_000), timeout=30).status == 400
    wait_for(lambda: log_text(master).count("refused upload") >= 3, 10, what="three refusals in the log")
    time.sleep(1)  # time for a second refusal of each, if the done messages were served
    assert log_text(master).count("refused upload") == 3
