"""The floor: the least a Python Mongrel2 handler can do per request.

    python bench/floor_handler.py SEND_SPEC RECV_SPEC [-p N]

Runs N processes; each connects a PULL socket to SEND_SPEC and a PUB socket to
RECV_SPEC, splits off the sender and connection id, skips `@*` control
messages (disconnects) and answers every request with a fixed 200 "Hello
world!" in Mongrel2's reply format `SENDER SP LEN:CONN, SP BODY`. It never
closes connections, so it is only meant for HTTP/1.1 keep-alive clients (wrk).
SIGTERM/SIGINT stop all processes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys

import zmq

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nHello world!"
CONTROL_PATH = b"@*"


def serve(send_spec: str, recv_spec: str) -> None:
    """One handler process: receive, reply, forever (until SIGTERM)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    ctx = zmq.Context()
    # The reply path first: a PUB drops what it cannot send yet, so a request taken before
    # Mongrel2's SUB has shaken hands would be answered into the void (the slow joiner).
    pub = ctx.socket(zmq.PUB)
    monitor = pub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    pub.connect(recv_spec)
    monitor.recv_multipart()
    pub.disable_monitor()
    monitor.close()
    pull = ctx.socket(zmq.PULL)
    pull.connect(send_spec)
    recv, send = pull.recv, pub.send
    while True:
        sender, conn, path, _ = recv().split(b" ", 3)
        if path == CONTROL_PATH:
            continue
        send(b"%s %d:%s, %s" % (sender, len(conn), conn, RESPONSE), copy=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("send_spec")
    parser.add_argument("recv_spec")
    parser.add_argument("-p", "--processes", type=int, default=1)
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("-p must be >= 1")
    children = [
        multiprocessing.Process(target=serve, args=(args.send_spec, args.recv_spec), daemon=True)
        for _ in range(args.processes)
    ]
    for child in children:
        child.start()
    print(f"floor_handler: {args.processes} processes ready "
          f"({', '.join(str(c.pid) for c in children)})", file=sys.stderr, flush=True)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for child in children:
            child.join()
    finally:
        for child in children:
            if child.is_alive():
                os.kill(child.pid, signal.SIGTERM)
        for child in children:
            child.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
