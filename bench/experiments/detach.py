"""How many requests are lost when a handler connected straight to Mongrel2 leaves?

    .venv/bin/python -m bench.experiments.detach [--runs 8] [--variants drain,shutwr0] [--work-ms 1.5]

Each run starts a real Mongrel2 (one route), three raw pyzmq handler
processes (PULL from send_spec, PUB to recv_spec, a fixed 200 answer after
--work-ms of busy CPU) and 16 keep-alive http.client clients (two processes x
8 threads) paced at about 1,000 requests/s in all for 12 s. Handler 0 leaves
about once a second (about 10 times a run), each time as the variant says,
and comes back with a fresh socket:

- none:   it does not leave (control: nothing should be lost);
- drain:  what fleet's Dispatcher.detach() does today: take what is on the
          socket, disconnect(send_spec), then keep answering what still
          arrives until 0.3 s of silence;
- shutwr: shutdown(SHUT_WR) the TCP connection to Mongrel2 (its fd learnt
          from a socket monitor's CONNECTED event), so Mongrel2's engine reads
          EOF and drops us from its round-robin while we still read what it
          had written; keep answering until the monitor reports DISCONNECTED
          (at most 1 s), then disconnect(send_spec), then the same 0.3 s of
          silence as drain. Here we read 20 ms more after DISCONNECTED
          before disconnecting;
- shutwr0: the same without those 20 ms (what fleet's Dispatcher.detach() does).

A request "lost" is one whose client got no answer within 5 s; the handlers
note every path they answered, so a lost one shows who received it (so far
always "nobody": it never left Mongrel2). Prints one line per run and a JSON
summary at the end. Needs the mongrel2 and m2sh binaries; run as root or not.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from fleet.dev.mongrel2 import HandlerRoute, Mongrel2, new_ident, tcp_pair

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HANDLERS = 3
CLIENT_PROCS = 2
THREADS_PER_CLIENT = 8
RATE = 1000.0  # requests/s, all clients together
DURATION = 12.0  # seconds of load
FIRST_LEAVE = 1.0  # seconds into the load
LEAVE_EVERY = 1.0  # handler 0 leaves, rejoins with a fresh socket, leaves again...
MIN_SERVE = 0.5  # ...serving at least this long on each connection
CLIENT_TIMEOUT = 5.0
SILENCE = 0.3  # after leaving, keep answering until this long without a message
GRACE = 0.02  # shutwr: reading after DISCONNECTED, before disconnect()
MONITOR_WAIT = 1.0  # shutwr: at most this long for Mongrel2 to drop the connection


def answer(pub: zmq.Socket, raw: bytes) -> bytes | None:
    """Reply 200 to a request; returns its path (None for a control message)."""
    sender, conn, path, _ = raw.split(b" ", 3)
    if path == b"@*":
        return None
    pub.send(b"%s %d:%s, %s" % (sender, len(conn), conn, RESPONSE))
    return path


def busy(seconds: float) -> None:
    """Stand-in for the work of a real handler, so requests queue up a little."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def handler(index: int, send_spec: str, recv_spec: str, leaves: list[float], end: float, variant: str,
            work: float, out) -> None:
    """Serve; at each time in `leaves` leave as `variant` says, then connect a
    fresh socket and serve again (the last leave is final)."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.connect(recv_spec)
    # disconnect_seen, per leave (shutwr): how many connections were shut down,
    # negative if the monitor did not report them all disconnected in time.
    # seen: path -> (handler, cycle, phase) for every request answered, to trace the lost ones.
    stats = {"index": index, "answered": 0, "after_leave": [], "leave_ms": [], "disconnect_seen": [],
             "reconnected": 0, "events": [], "seen": {}}
    where = [0, "serve"]  # cycle, phase

    def serve_until(pull: zmq.Socket, poller: zmq.Poller, until: float | None) -> None:
        while until is None or time.time() < until:
            if poller.poll(10):
                stats["answered"] += take(pull)
            if until is None and time.time() >= end:
                return

    def take(pull: zmq.Socket) -> int:
        count = 0
        while True:
            try:
                raw = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return count
            path = answer(pub, raw)
            if path is not None:
                stats["seen"][path.decode()] = (index, where[0], where[1])
                count += 1
                if work:
                    busy(work)

    for cycle, leave_at in enumerate(leaves + [None]):
        if leave_at is not None:
            # Each connection serves a while first, even if the last leave ran late.
            leave_at = max(leave_at, time.time() + MIN_SERVE)
            if leave_at > leaves[-1] + 0.5:
                leave_at = None
        where[:] = [cycle, "serve"]
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        monitor = pull.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        pull.connect(send_spec)
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        fds: set[int] = set()

        def monitor_events() -> None:
            while True:
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.Again:
                    return
                if event["event"] == zmq.EVENT_CONNECTED:
                    fds.add(event["value"])
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    fds.discard(event["value"])
                stats["events"].append((cycle, int(event["event"]), event["value"]))

        serve_until(pull, poller, leave_at)
        if leave_at is None:
            monitor.close()
            pull.close()
            break
        where[1] = "leaving"
        started = time.monotonic()
        after = 0
        monitor_events()
        if variant == "drain":
            after += take(pull)
            pull.disconnect(send_spec)
        elif variant in ("shutwr", "shutwr0"):
            targets = set(fds)
            for fd in targets:
                dup = socket.socket(fileno=os.dup(fd))
                try:
                    dup.shutdown(socket.SHUT_WR)
                finally:
                    dup.close()
            poller.register(monitor, zmq.POLLIN)
            deadline = time.monotonic() + MONITOR_WAIT
            while targets & fds and time.monotonic() < deadline:
                poller.poll(10)
                after += take(pull)
                monitor_events()
            stats["disconnect_seen"].append(len(targets) if not (targets & fds) else -len(targets))
            # shutwr: read a little longer in case messages reach our pipe
            # after DISCONNECTED (libzmq's source says they do not: the engine
            # flushes each read before the next; shutwr0 tests that).
            # libzmq reconnects only after >= 100 ms.
            grace_end = time.monotonic() + (GRACE if variant == "shutwr" else 0.0)
            while time.monotonic() < grace_end:
                poller.poll(5)
                after += take(pull)
                monitor_events()
            after += take(pull)
            if fds - targets:
                stats["reconnected"] += 1
            pull.disconnect(send_spec)
        stats["leave_ms"].append(round((time.monotonic() - started) * 1000, 1))
        where[1] = "after"
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < SILENCE:
            if poller.poll(10):
                got = take(pull)
                after += got
                if got:
                    quiet_since = time.monotonic()
            monitor_events()
        stats["after_leave"].append(after)
        monitor.close()
        pull.close()
    time.sleep(0.3)  # let the PUB send the last replies
    out.put(stats)
    pub.close()
    ctx.term()


def client_thread(port: int, start: float, stop: float, interval: float, offset: float, tag: str,
                  results: list) -> None:
    ok = errors = sent = 0
    lost: list[str] = []
    conn = None
    next_at = start + offset
    while True:
        now = time.time()
        if now >= stop:
            break
        if next_at > now:
            time.sleep(next_at - now)
        next_at += interval
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
        try:
            path = f"/x/{tag}-{sent}"
            sent += 1
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            if response.status == 200 and body == b"ok":
                ok += 1
            else:
                errors += 1
        except TimeoutError:
            lost.append(path)
            conn.close()
            conn = None
            next_at = time.time()
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = None
        if next_at < time.time() - 1.0:  # fell behind (a timeout): do not burst
            next_at = time.time()
    if conn is not None:
        conn.close()
    results.append((ok, lost, errors))


def client_process(port: int, start: float, stop: float, index: int, out) -> None:
    threads_total = CLIENT_PROCS * THREADS_PER_CLIENT
    interval = threads_total / RATE
    results: list = []
    threads = [
        threading.Thread(target=client_thread, args=(
            port, start, stop, interval, interval * (index * THREADS_PER_CLIENT + i) / threads_total,
            f"{index}.{i}", results))
        for i in range(THREADS_PER_CLIENT)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put([sum(r[0] for r in results), [p for r in results for p in r[1]], sum(r[2] for r in results)])


def one_run(variant: str, workdir: Path, work: float) -> dict:
    send, recv = tcp_pair()
    server = Mongrel2(workdir, [HandlerRoute("/", send, recv, new_ident())])
    server.start()
    mp = multiprocessing.get_context("fork")
    try:
        time.sleep(0.2)
        start = time.time() + 1.0
        end = start + DURATION + CLIENT_TIMEOUT + 1.0
        leaves = []
        if variant != "none":
            at = start + FIRST_LEAVE
            while at < start + DURATION - 1.0:
                leaves.append(at)
                at += LEAVE_EVERY
        handler_out = mp.Queue()
        handlers = [
            mp.Process(target=handler, args=(i, send, recv, leaves if i == 0 else [], end, variant, work, handler_out))
            for i in range(HANDLERS)
        ]
        for proc in handlers:
            proc.start()
        client_out = mp.Queue()
        clients = [mp.Process(target=client_process, args=(server.port, start, start + DURATION, i, client_out))
                   for i in range(CLIENT_PROCS)]
        for proc in clients:
            proc.start()
        ok = errors = 0
        lost: list[str] = []
        for _ in clients:
            got_ok, got_lost, got_errors = client_out.get(timeout=DURATION + CLIENT_TIMEOUT + 30)
            ok, errors = ok + got_ok, errors + got_errors
            lost += got_lost
        for proc in clients:
            proc.join()
        reports = sorted((handler_out.get(timeout=30) for _ in handlers), key=lambda r: r["index"])
        for proc in handlers:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        log = server.log_text()
    finally:
        server.stop()
    seen: dict = {}
    for report in reports:
        seen.update(report.pop("seen"))
    leaver = reports[0] if variant != "none" else None
    noise = ("Failed to open PID file", "No handler to notify")
    return {"variant": variant, "ok": ok, "lost": len(lost), "errors": errors, "leaver": leaver,
            "lost_seen_by": [seen.get(path, "nobody") for path in lost],
            "m2_log": [line for line in log.splitlines()
                       if ("ERROR" in line or "WARN" in line) and not any(n in line for n in noise)][-5:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--variants", default="drain,shutwr0")
    parser.add_argument("--work-ms", type=float, default=0.0, help="busy time per request in the handlers")
    parser.add_argument("--json", help="write all runs here")
    args = parser.parse_args()
    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="detach-exp-") as tmp:
        os.chmod(tmp, 0o755)
        for round_ in range(args.runs):
            for variant in variants:  # interleaved, so load noise hits both alike
                result = one_run(variant, Path(tmp) / f"{variant}-{round_}", args.work_ms / 1000)
                runs[variant].append(result)
                leaver = result["leaver"] or {}
                print(f"{variant:7s} run {round_}: lost {result['lost']} errors {result['errors']} "
                      f"ok {result['ok']}  leaver after_leave {leaver.get('after_leave')} "
                      f"leave_ms {leaver.get('leave_ms')} disconnect_seen {leaver.get('disconnect_seen')} "
                      f"reconnected {leaver.get('reconnected')} "
                      f"lost_seen_by {result['lost_seen_by']} m2 {result['m2_log']}", flush=True)
    summary = {v: {"lost": [r["lost"] for r in rs],
                   "leaves": [len((r["leaver"] or {}).get("leave_ms", [])) for r in rs],
                   "errors": [r["errors"] for r in rs], "ok": [r["ok"] for r in rs]} for v, rs in runs.items()}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
