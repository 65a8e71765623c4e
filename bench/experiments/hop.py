"""CPU per request for the dispatcher<->thread hop alone: REQUEST out, DONE back,
credit window W per thread, PROCS worker processes x 1 thread. Variants: zmq (ROUTER/DEALER ipc),
zmq2 (two I/O threads), stream (unix, length-prefixed), seqpacket.

    .venv/bin/python -m bench.experiments.hop zmq|zmq2|stream|seqpacket [N]

An experiment kept as it was run (the figures behind the link design), not a bench.
"""
import os
import resource
import socket
import struct
import sys
import time

import zmq

N = int(sys.argv[2]) if len(sys.argv) > 2 else 100000
VARIANT = sys.argv[1]
W = 2
PROCS = 2
RAW = b"54c6755b-9628-40a4-9a2d-cc82a816345e 12 /bench 80:" + b"x" * 380
path = f"/tmp/fleet-micro-hop-{os.getpid()}.sock"

def cpu():
    t = os.times(); return t.user + t.system

def worker_zmq(io):
    ctx = zmq.Context(io_threads=io)
    s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.IDENTITY, b"%d/0" % os.getpid()); s.connect("ipc://" + path)
    s.send_multipart([b"+", b"%d" % W])
    while True:
        f = s.recv_multipart()
        if f[0] == b"!": break
        s.send_multipart([b"=\x00", b"12"])
    os._exit(0)

def worker_stream(kind):
    s = socket.socket(socket.AF_UNIX, kind); s.connect(path)
    if kind == socket.SOCK_STREAM:
        def send(*frames):
            body = b"".join(struct.pack("!I", len(x)) + x for x in frames)
            s.sendall(struct.pack("!I", len(body)) + body)
        buf = bytearray()
        def recv():
            nonlocal buf
            while True:
                if len(buf) >= 4:
                    n = struct.unpack_from("!I", buf)[0]
                    if len(buf) >= 4 + n:
                        m = bytes(buf[4:4+n]); del buf[:4+n]; return m
                d = s.recv(65536)
                if not d: raise SystemExit
                buf += d
    else:
        def send(*frames):
            s.send(b"".join(struct.pack("!I", len(x)) + x for x in frames))
        def recv():
            return s.recv(65536)
    send(b"%d/0" % os.getpid())
    send(b"+", b"%d" % W)
    while True:
        m = recv()
        if m[4:5] == b"!": break
        send(b"=\x00", b"12")
    os._exit(0)

def split(m):
    out = []; i = 0
    while i < len(m):
        n = struct.unpack_from("!I", m, i)[0]; out.append(m[i+4:i+4+n]); i += 4 + n
    return out

def main():
    try: os.unlink(path)
    except FileNotFoundError: pass
    if VARIANT.startswith("zmq"):
        io = int(VARIANT[3:] or 1)
        ctx = zmq.Context(io_threads=io)
        r = ctx.socket(zmq.ROUTER); r.setsockopt(zmq.ROUTER_MANDATORY, 1); r.bind("ipc://" + path)
        kids = []
        for _ in range(PROCS):
            pid = os.fork()
            if pid == 0: worker_zmq(io)
            kids.append(pid)
        t0 = time.perf_counter(); c0 = cpu(); sent = 0; done = 0
        poller = zmq.Poller(); poller.register(r, zmq.POLLIN)
        while done < N:
            poller.poll()
            while True:
                try: f = r.recv_multipart(zmq.NOBLOCK)
                except zmq.Again: break
                if f[1] == b"+": k = int(f[2])
                else: done += 1; k = 1
                for _ in range(k):
                    if sent < N: r.send_multipart([f[0], b"Q\x00", RAW]); sent += 1
        c1 = cpu(); t1 = time.perf_counter()
        # stop workers
        for pid in kids: os.kill(pid, 9)
    else:
        kind = socket.SOCK_STREAM if VARIANT == "stream" else socket.SOCK_SEQPACKET
        ls = socket.socket(socket.AF_UNIX, kind); ls.bind(path); ls.listen(16)
        kids = []
        for _ in range(PROCS):
            pid = os.fork()
            if pid == 0: ls.close(); worker_stream(kind)
            kids.append(pid)
        conns = []
        for _ in range(PROCS):
            c, _ = ls.accept(); c.setblocking(False); conns.append(c)
        bufs = {c.fileno(): bytearray() for c in conns}
        poller = zmq.Poller()
        for c in conns: poller.register(c.fileno(), zmq.POLLIN)
        bymap = {c.fileno(): c for c in conns}
        t0 = time.perf_counter(); c0 = cpu(); sent = 0; done = 0
        def send(c, *frames):
            body = b"".join(struct.pack("!I", len(x)) + x for x in frames)
            if kind == socket.SOCK_STREAM: c.send(struct.pack("!I", len(body)) + body)
            else: c.send(body)
        while done < N:
            for fd, _ in poller.poll():
                c = bymap[fd]
                if kind == socket.SOCK_STREAM:
                    try: d = c.recv(65536)
                    except BlockingIOError: continue
                    b = bufs[fd]; b += d; msgs = []
                    while len(b) >= 4:
                        n = struct.unpack_from("!I", b)[0]
                        if len(b) < 4 + n: break
                        msgs.append(bytes(b[4:4+n])); del b[:4+n]
                else:
                    msgs = []
                    while True:
                        try: msgs.append(c.recv(65536))
                        except BlockingIOError: break
                for m in msgs:
                    f = split(m)
                    if len(f) == 1: continue  # hello
                    if f[0] == b"+": k = int(f[1])
                    else: done += 1; k = 1
                    for _ in range(k):
                        if sent < N: send(c, b"Q\x00", RAW); sent += 1
        c1 = cpu(); t1 = time.perf_counter()
        for pid in kids: os.kill(pid, 9)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    for pid in kids: os.waitpid(pid, 0)
    ch2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wcpu = ch2.ru_utime + ch2.ru_stime - ch.ru_utime - ch.ru_stime
    print(f"{VARIANT:8} {N/(t1-t0):9.0f} msg/s  dispatcher {1e6*(c1-c0)/N:6.1f} us/req  "
          f"workers {1e6*wcpu/N:6.1f} us/req")

if __name__ == "__main__":
    main()
