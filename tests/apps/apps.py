"""WSGI applications served by `fleet master` in the integration tests.

Served with `--pythonpath tests/integration --module apps:NAME`. `router`
serves all of them from one master: the path segment after the Mongrel2
route picks the app, e.g. `/t/echo/x` -> `echo`, so the tests do not depend
on how fleet splits SCRIPT_NAME and PATH_INFO.

Apps that record something (close() calls) write to the file named by the
`record` query parameter (an absolute path), or by $FLEET_TEST_RECORD.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], None]]

HELLO = b"Hello world!"
BIG_SIZE = 10 * 1024 * 1024
STREAM_CHUNKS = 1000
READ_CHUNK = 64 * 1024
ENDLESS_LIMIT_SECONDS = 120.0  # the "endless" stream still ends, so a bug cannot run forever
ECHO_KEYS = (
    "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE",
    "CONTENT_LENGTH", "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR",
    "wsgi.url_scheme",
)


@functools.lru_cache(maxsize=1)
def big_body() -> bytes:
    """10 MiB of deterministic, non-repeating-looking bytes."""
    block = hashlib.sha256(b"fleet big body").digest() * 2048  # 64 KiB
    return b"".join(
        bytes((b + i) & 0xFF for b in block[:16]) + block[16:] for i in range(BIG_SIZE // len(block))
    )


def stream_chunk(i: int) -> bytes:
    return b"chunk %04d %s\n" % (i, b"x" * (i % 37))


def _query(environ: Environ) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _record_path(environ: Environ) -> str | None:
    return _query(environ).get("record") or os.environ.get("FLEET_TEST_RECORD")


def _record(environ: Environ, text: str) -> None:
    path = _record_path(environ)
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


def _read_body(environ: Environ) -> tuple[str, int]:
    """sha256 hex and length of wsgi.input, read in chunks (as a real app would)."""
    stream = environ["wsgi.input"]
    digest = hashlib.sha256()
    length = 0
    while True:
        chunk = stream.read(READ_CHUNK)
        if not chunk:
            break
        digest.update(chunk)
        length += len(chunk)
    return digest.hexdigest(), length


def _json(start_response: StartResponse, data: object, status: str = "200 OK") -> list[bytes]:
    body = json.dumps(data, sort_keys=True).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def hello(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(HELLO)))])
    return [HELLO]


def echo(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """The interesting environ keys, the body's sha256 and length, and who served it."""
    data = {key: environ.get(key) for key in ECHO_KEYS}
    data.update({k: v for k, v in environ.items() if k.startswith("HTTP_")})
    data["body_sha256"], data["body_length"] = _read_body(environ)
    data["pid"] = os.getpid()
    data["thread"] = threading.get_ident()
    return _json(start_response, data)


def upload(environ: Environ, start_response: StartResponse) -> list[bytes]:
    sha, length = _read_body(environ)
    return _json(start_response, {"sha256": sha, "length": length, "pid": os.getpid()})


def big(environ: Environ, start_response: StartResponse) -> list[bytes]:
    body = big_body()
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(len(body)))])
    return [body]


def stream(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    """1,000 chunks from a generator and no Content-Length."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    for i in range(STREAM_CHUNKS):
        yield stream_chunk(i)


def boom(environ: Environ, start_response: StartResponse) -> list[bytes]:
    raise RuntimeError("boom: this app always fails")


def slow(environ: Environ, start_response: StartResponse) -> list[bytes]:
    seconds = min(float(_query(environ).get("s", "1")), 30.0)
    _record(environ, f"started {os.getpid()}")
    started = time.monotonic()
    time.sleep(seconds)
    return _json(start_response, {"pid": os.getpid(), "thread": threading.get_ident(),
                                  "slept": time.monotonic() - started})


def write_callable(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """The legacy write() API, then one more chunk from the iterable."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written-1;")
    write(b"written-2;")
    return [b"returned"]


class ClosingBody:
    """An iterable whose close() is recorded, as PEP 3333 requires servers to call it."""

    def __init__(self, environ: Environ, chunks: Iterable[bytes], delay: float = 0.0,
                 limit: float | None = None) -> None:
        self.environ = environ
        self.chunks = chunks
        self.delay = delay
        self.limit = limit

    def __iter__(self) -> Iterator[bytes]:
        started = time.monotonic()
        for chunk in self.chunks:
            if self.limit is not None and time.monotonic() - started > self.limit:
                return
            yield chunk
            if self.delay:
                time.sleep(self.delay)

    def close(self) -> None:
        _record(self.environ, f"closed {os.getpid()}")


def closing(environ: Environ, start_response: StartResponse) -> ClosingBody:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return ClosingBody(environ, [b"one;", b"two;", b"three"])


def endless(environ: Environ, start_response: StartResponse) -> ClosingBody:
    """A slow stream that never ends by itself (for the client-disconnect test)."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    _record(environ, f"started {os.getpid()}")

    def forever() -> Iterator[bytes]:
        i = 0
        while True:
            yield b"tick %d\n" % i
            i += 1

    return ClosingBody(environ, forever(), delay=0.05, limit=ENDLESS_LIMIT_SECONDS)


APPS: dict[str, Callable[..., Iterable[bytes]]] = {
    "hello": hello, "echo": echo, "upload": upload, "big": big, "stream": stream,
    "boom": boom, "slow": slow, "write": write_callable, "closing": closing, "endless": endless,
}


def router(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Pick the app by the path segment after the route: /t/echo/... -> echo."""
    full = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    parts = [p for p in full.split("/") if p]
    app = APPS.get(parts[1]) if len(parts) > 1 else None
    if app is None:
        body = f"no test app at {full!r}\n".encode()
        start_response("404 Not Found", [("Content-Type", "text/plain"),
                                         ("Content-Length", str(len(body)))])
        return [body]
    return app(environ, start_response)


application = router


# -- apps for the supervisor tests (test_e2e_supervisor.py) -------------------------

HOG_CHUNK = 25 * 1024 * 1024
_hogged: list[bytes] = []


def hog(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """Keep 25 MB more (touched, so it counts in the RSS) for the life of the worker."""
    _hogged.append(b"h" * HOG_CHUNK)
    try:
        import psutil

        rss = psutil.Process().memory_info().rss
    except Exception:  # the test falls back on its own measurement
        rss = None
    return _json(start_response, {"pid": os.getpid(), "hogged": len(_hogged) * HOG_CHUNK, "rss": rss})


APPS["hog"] = hog
