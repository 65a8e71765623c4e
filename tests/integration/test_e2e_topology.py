"""Threads in parallel within one worker, and one master serving two Mongrel2 servers."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.harness import Harness, master_args, request

THREADS = 4


@pytest.mark.slow
def test_threads_serve_slow_requests_in_parallel(harness: Harness) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    harness.master(master_args(server, processes=1, threads=THREADS))
    assert request(server, "GET", "/t/hello").status == 200  # warm
    started = time.monotonic()
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(lambda _: request(server, "GET", "/t/slow?s=1").json(),
                                range(THREADS)))
    elapsed = time.monotonic() - started
    assert len({r["pid"] for r in results}) == 1
    assert len({r["thread"] for r in results}) == THREADS
    # Serially this takes 4 s; the bound is loose on purpose (a functional check).
    assert elapsed < 3.0, f"{THREADS} x 1 s requests took {elapsed:.2f}s"


def test_one_master_serves_two_mongrel2_servers(harness: Harness) -> None:
    first = harness.mongrel2([("/t/", "tnetstring")])
    second = harness.mongrel2([("/t/", "tnetstring"), ("/j/", "json")])
    assert first.port != second.port
    harness.master(master_args(first, second, processes=2, threads=2))
    for server in (first, second, first, second):
        for path in ("/t/hello",) + (("/j/hello",) if server is second else ()):
            resp = request(server, "GET", path)
            assert (resp.status, resp.body) == (200, b"Hello world!"), (server.port, path)
    # Each reply goes back to the server that asked (distinct send_ident/recv_ident).
    data = request(second, "GET", "/t/echo?from=second").json()
    assert data["HTTP_HOST"] == f"127.0.0.1:{second.port}"
    assert data["QUERY_STRING"] == "from=second"
