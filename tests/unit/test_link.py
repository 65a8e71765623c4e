"""The dispatcher <-> thread link: framing, partial reads, introductions, closes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.dispatch import frames as wire
from fleet.dispatch.frames import Inbox, decode, encode
from fleet.dispatch.link import LinkClosed, LinkServer, ThreadLink
from fleet.worker.sources import BrokerSource

messages = st.lists(st.lists(st.binary(max_size=300), min_size=1, max_size=5), max_size=8)


@settings(max_examples=200, deadline=None)
@given(messages, st.integers(min_value=1, max_value=64))
def test_any_split_of_the_byte_stream_gives_the_same_messages(batch, step) -> None:
    stream = b"".join(encode(frames) for frames in batch)
    inbox, out = Inbox(), []
    for start in range(0, len(stream), step):
        inbox.feed(stream[start:start + step], out)
    assert out == batch
    assert not inbox.tail


def test_decode_keeps_an_incomplete_message() -> None:
    data = encode([b"a", b"bc"]) + encode([b"tail"])[:-2]
    out: list = []
    used = decode(data, out)
    assert out == [[b"a", b"bc"]] and used == len(encode([b"a", b"bc"]))


def wait_receive(server: LinkServer, count: int, timeout: float = 5.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        server.receive(got)
        time.sleep(0.005)
    return got


@pytest.fixture
def server(tmp_path: Path):
    link_server = LinkServer(str(tmp_path / "dispatch"))
    yield link_server
    link_server.close()


def test_a_thread_introduces_itself_and_talks_both_ways(server: LinkServer) -> None:
    thread = ThreadLink(server.path, b"42/0", timeout=2.0)
    try:
        thread.send([wire.CREDIT, b"2"])
        assert wait_receive(server, 1) == [(b"42/0", [wire.CREDIT, b"2"])]
        assert server.send(b"42/0", [wire.tagged(wire.REQUEST, 0), b"raw"])
        assert not server.send(b"nobody/0", [wire.RETIRED])
        server.flush()
        assert thread.receive() == [wire.tagged(wire.REQUEST, 0), b"raw"]
    finally:
        thread.close()


def test_a_closed_thread_is_reported_and_forgotten(server: LinkServer) -> None:
    thread = ThreadLink(server.path, b"7/1", timeout=2.0)
    thread.send([wire.CREDIT, b"1"])
    assert wait_receive(server, 1)
    thread.close()
    assert wait_receive(server, 1) == [(b"7/1", None)]
    assert not server.send(b"7/1", [wire.RETIRED])


def test_a_link_that_does_not_introduce_itself_is_dropped(server: LinkServer, tmp_path: Path) -> None:
    import socket

    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stranger.connect(server.path)
    stranger.sendall(encode([wire.CREDIT, b"9"]))
    assert wait_receive(server, 1, timeout=0.5) == []
    stranger.settimeout(2)
    assert stranger.recv(10) == b""  # the dispatcher hung up
    stranger.close()


def test_the_thread_sees_the_dispatcher_leave(server: LinkServer) -> None:
    thread = ThreadLink(server.path, b"8/0", timeout=2.0)
    wait_receive(server, 0, timeout=0.2)  # accept and read the introduction
    server.close()
    with pytest.raises(LinkClosed):
        thread.receive()
    thread.close()


def test_a_retiring_thread_sends_the_dones_it_still_holds_before_it_closes_its_link(server: LinkServer) -> None:
    """Requests finished between RETIRE and RETIRED keep their replies and DONEs in the
    thread's outbox (fleet.worker.outbox); closing the link first lost them, and the write
    after the close killed the worker (found by bench/scale_bench.py under load)."""
    retiring = threading.Event()
    source = BrokerSource(server.path, b"42/0", 1, None, retiring)
    held: list[bytes] = []  # the thread's outbox: DONEs waiting to go

    def flush() -> None:
        while held:
            source.link.send_encoded(held.pop())

    source.before_retire = flush
    try:
        assert wait_receive(server, 1) == [(b"42/0", [wire.CREDIT, b"1"])]
        retiring.set()
        assert source.next() is None  # RETIRE goes; nothing came
        assert wait_receive(server, 1) == [(b"42/0", [wire.RETIRE])]
        held.append(source.done_message(0, b"c1"))  # a request finished meanwhile
        assert server.send(b"42/0", [wire.RETIRED])
        server.flush()
        assert source.next() is None and source.draining
        assert wait_receive(server, 2) == [(b"42/0", wire.done(0, b"c1", None, False, credit=False)),
                                           (b"42/0", None)]
    finally:
        source.close()
