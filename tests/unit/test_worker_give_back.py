"""A request thread stuck in a slow request gives back what it holds behind it.

The dispatcher may hand a thread its next request while it serves one
(fleet.dispatch.broker packs it there rather than wake another thread). Here
a real BrokerSource reads a real link whose other end is this test: a slow
request and a fast one arrive together, the thread blocks in the slow one,
and the worker's main thread must send GIVE_BACK for the fast one, which the
thread then never serves.
"""

from __future__ import annotations

import os
import socket
import threading

from fleet.config import Endpoint, HandlerConfig
from fleet.dispatch import frames
from fleet.dispatch.frames import Inbox, decode
from fleet.worker import worker as worker_module
from fleet.worker.sources import BrokerSource
from fleet.worker.spec import WorkerSpec
from tests.support.encoders import encode_tnetstring_request

SENDER = b"34f9ceee-cd52-4b7f-b197-88bf2f0ec378"
HEADERS = {"METHOD": "GET", "VERSION": "HTTP/1.1", "PATH": "/", "URI": "/", "PATTERN": "/",
           "URL_SCHEME": "http", "REMOTE_ADDR": "127.0.0.1", "host": "localhost"}


class Publisher:
    """Records the replies (the lane's framed wire, or the Python path's messages)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.lock = threading.Lock()

    def send(self, message: bytes) -> bool:
        with self.lock:
            self.sent.append(message)
        return True

    def send_framed(self, *parts: bytes) -> bool:
        return self.send(b"".join(parts))

    def close(self) -> None:
        pass


class Dispatcher:
    """The link's far end, read as the dispatcher would."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = Inbox(decode)
        self.messages: list[list[bytes]] = []

    def wait_for(self, kind: bytes, timeout: float = 10.0) -> list[bytes]:
        self.sock.settimeout(timeout)
        while True:
            for message in self.messages:
                if message[0][:1] == kind:
                    self.messages.remove(message)
                    return message
            data = self.sock.recv(65536)  # a timeout here fails the test
            assert data, "the worker closed its link"
            self.inbox.feed(data, self.messages)


def request(conn_id: bytes, path: str) -> bytes:
    return encode_tnetstring_request(SENDER, conn_id, path.encode(), {**HEADERS, "PATH": path, "URI": path}, b"")


def test_a_thread_stuck_in_a_slow_request_gives_back_the_one_behind_it(tmp_path, monkeypatch):
    release, stuck, served = threading.Event(), threading.Event(), []

    def app(environ, start_response):
        served.append(environ["PATH_INFO"])
        if environ["PATH_INFO"] == "/slow":
            stuck.set()
            release.wait(30)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    path = str(tmp_path / "link")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    config = HandlerConfig(endpoints=(Endpoint("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),), app="app", threads=2)
    worker = worker_module.Worker(WorkerSpec(config, path, os.getppid()), app)
    publisher = Publisher()
    worker.responders = [[publisher]]
    retiring = threading.Event()
    source = BrokerSource(path, b"1/0", 2, None, retiring)
    far, _ = listener.accept()
    dispatcher = Dispatcher(far)
    try:
        assert dispatcher.wait_for(frames.HELLO)[1] == b"1/0"
        assert dispatcher.wait_for(frames.CREDIT)[1] == b"2"
        monkeypatch.setattr(worker, "work_source", lambda number: source)
        thread = threading.Thread(target=worker.run_thread, args=(0,), daemon=True)
        worker.threads.append(thread)
        thread.start()
        far.sendall(frames.encode([frames.tagged(frames.REQUEST, 0), request(b"3", "/before")])
                    + frames.encode([frames.tagged(frames.REQUEST, 0), request(b"1", "/slow")])
                    + frames.encode([frames.tagged(frames.REQUEST, 0), request(b"2", "/fast")]))
        assert stuck.wait(10)
        main = threading.Thread(target=worker.wait, args=(lambda figures: None,), daemon=True)
        main.start()
        assert dispatcher.wait_for(frames.GIVE_BACK) == [frames.tagged(frames.GIVE_BACK, 0), b"2"]
        assert served == ["/before", "/slow"] and not release.is_set(), "given back while the slow one runs"
        # The reply finished before the slow one left too, with its DONE, without waiting for it.
        assert dispatcher.wait_for(frames.DONE)[:2] == [frames.tagged(frames.DONE, 0), b"3"]
        assert any(b" 1:3, HTTP/1.1 200 OK" in reply for reply in publisher.sent)

        release.set()
        done = dispatcher.wait_for(frames.DONE)
        assert done[:2] == [frames.tagged(frames.DONE, 0), b"1"]
        retiring.set()
        assert dispatcher.wait_for(frames.RETIRE) == [frames.RETIRE]
        far.sendall(frames.encode([frames.RETIRED]))
        thread.join(10)
        main.join(10)
        assert not thread.is_alive() and not main.is_alive()
        assert served == ["/before", "/slow"], "the thread never served what it gave back"
        assert sum(reply.count(b"200 OK") for reply in publisher.sent) == 2
    finally:
        release.set()
        far.close()
        listener.close()
