"""WebSocket echo round trips per second: N connections, each sending a small text
message and waiting for its echo, back to back, for a fixed time.

    .venv/bin/python -m bench.ws_echo --port 8000 [--path /] [--connections 32] [--duration 10]

The client is kept as cheap as it can be so that it measures the server: raw
asyncio protocols (uvloop when installed), one pre-built masked frame, and
only the echo's length checked byte for byte. It is the same client for
every server it is pointed at; it shares the machine's cores with them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import importlib.util
import json
import os
import statistics
import time

MESSAGE = b"Hello world!"
# The client's frame: FIN + text, masked (as RFC 6455 requires of clients), the key all zeros
# so that the payload stays readable; the server's echo is the same message unmasked.
FRAME = bytes([0x81, 0x80 | len(MESSAGE)]) + b"\x00\x00\x00\x00" + MESSAGE
ECHO = bytes([0x81, len(MESSAGE)]) + MESSAGE


class EchoClient(asyncio.Protocol):
    def __init__(self, path: str, host: str, until: float, done: asyncio.Future) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.handshake = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        self.until = until
        self.done = done
        self.buffer = b""
        self.open = False
        self.sent_at = 0.0
        self.latencies: list[float] = []
        self.bad = 0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(self.handshake)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.open:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self._finish(f"handshake refused: {head[:60]!r}")
                return
            self.open, self.buffer = True, rest
            self._send()
            return
        while len(self.buffer) >= len(ECHO):
            echo, self.buffer = self.buffer[:len(ECHO)], self.buffer[len(ECHO):]
            now = time.monotonic()
            self.latencies.append(now - self.sent_at)
            self.bad += echo != ECHO
            if now >= self.until:
                self._finish(None)
                return
            self._send()

    def connection_lost(self, error: Exception | None) -> None:
        self._finish("connection lost" if self.open else "no handshake")

    def _send(self) -> None:
        self.sent_at = time.monotonic()
        self.transport.write(FRAME)

    def _finish(self, error: str | None) -> None:
        if not self.done.done():
            self.done.set_result(error)
        self.transport.close()


async def run(port: int, path: str, connections: int, duration: float, host: str = "127.0.0.1") -> dict:
    loop = asyncio.get_running_loop()
    until = time.monotonic() + duration
    clients, waits = [], []
    for _ in range(connections):
        done = loop.create_future()
        _, client = await loop.create_connection(lambda d=done: EchoClient(path, f"{host}:{port}", until, d),
                                                 host, port)
        clients.append(client)
        waits.append(done)
    started = time.monotonic()
    errors = [e for e in await asyncio.gather(*waits) if e]
    elapsed = time.monotonic() - started
    latencies = sorted(x for c in clients for x in c.latencies)
    count = len(latencies)
    return {
        "round_trips": count, "round_trips_per_s": count / elapsed if elapsed else 0.0,
        "p50_ms": 1000 * latencies[count // 2] if count else None,
        "p99_ms": 1000 * latencies[min(count - 1, int(count * 0.99))] if count else None,
        "mean_ms": 1000 * statistics.fmean(latencies) if count else None,
        "bad": sum(c.bad for c in clients), "errors": errors,
    }


def measure(port: int, path: str, connections: int, duration: float) -> dict:
    loop = (importlib.import_module("uvloop").new_event_loop() if importlib.util.find_spec("uvloop")
            else asyncio.new_event_loop())
    try:
        return loop.run_until_complete(run(port, path, connections, duration))
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.port, args.path, args.connections, args.duration)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
