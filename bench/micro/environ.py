"""Micro-benchmark of the per-request hot path: build_environ and ResponseFramer.

    .venv/bin/python -m bench.micro.environ [-n NUMBER] [-r REPEAT] [--profile]

Prints the best-of-REPEAT time per call in µs for a typical hello-world
request (12 headers, GET, "200 OK", one response header, one body chunk).
``--profile`` runs each case under cProfile instead and prints the top entries.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable

from bench.micro.cases import run_cases
from fleet.mongrel2.codec import Request
from fleet.wsgi.environ import build_environ
from fleet.wsgi.response import ResponseFramer, error_response

REQUEST = Request(
    sender=b"34f9ceee-cd52",
    conn_id=b"4",
    path=b"/t/hello",
    headers={
        "REMOTE_ADDR": "127.0.0.1", "METHOD": "GET", "URL_SCHEME": "http", "PATTERN": "/t/",
        "QUERY": "a=1&b=two", "URI": "/t/hello?a=1&b=two", "VERSION": "HTTP/1.1",
        "PATH": "/t/hello", "host": "127.0.0.1:6780", "user-agent": "curl/7.88.1",
        "accept": "*/*", "x-forwarded-for": "127.0.0.1",
    },
)
BODY = io.BytesIO(b"")
HEADERS = [("Content-Type", "text/plain")]


def environ() -> object:
    return build_environ(REQUEST, body=BODY, content_length=0, errors=sys.stderr,
                         multithread=False, multiprocess=True)


def framer() -> object:
    f = ResponseFramer(method="GET", version="HTTP/1.1", connection=None)
    f.start("200 OK", HEADERS, 12)
    f.body(b"Hello world!")
    f.end()
    return f.keep_alive


def framer_chunked() -> object:
    """Unknown length (a generator app): Transfer-Encoding: chunked."""
    f = ResponseFramer(method="GET", version="HTTP/1.1", connection=None)
    f.start("200 OK", HEADERS)
    f.body(b"Hello world!")
    f.end()
    return f.keep_alive


def error() -> object:
    return error_response(500)


CASES: dict[str, Callable[[], object]] = {
    "build_environ": environ,
    "ResponseFramer (length)": framer,
    "ResponseFramer (chunked)": framer_chunked,
    "error_response(500)": error,
}


def main(argv: list[str] | None = None) -> int:
    return run_cases(CASES, __doc__.splitlines()[0], argv, number=20_000, repeat=25)

if __name__ == "__main__":
    sys.exit(main())
