"""Raw ZMTP against real libzmq sockets (pyzmq): the handshake, framing in both
directions, reconnects, and peers we must refuse."""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.mongrel2 import zmtp
from fleet.mongrel2.connection import ConnectFailed, Publisher, Puller, connect
from fleet.mongrel2.zmtp import FrameReader, Handshake, ZmtpError, frame


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def bound(context: zmq.Context, kind: int) -> tuple[zmq.Socket, str]:
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def rebind(sock: zmq.Socket, spec: str) -> None:
    """Bind where a closed socket was (libzmq's I/O thread closes the old one a moment later)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            sock.bind(spec)
            return
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def receive_all(puller: Puller, count: int, timeout: float = 5.0) -> list[bytes]:
    """Drive the puller as a poll loop would, until `count` messages or the timeout."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        if not puller.connect(time.monotonic()):
            time.sleep(0.01)
            continue
        want = select.POLLOUT if puller.writable_wanted else select.POLLIN
        poll = select.poll()
        poll.register(puller.fileno(), want)
        if poll.poll(50):
            puller.ready(got, time.monotonic())
    return got


def opened(puller: Puller) -> Puller:
    """The puller with its handshake done (a libzmq PUSH blocks until a peer is there)."""
    receive_all(puller, 0, timeout=0)
    deadline = time.monotonic() + 5
    while puller.state != Puller.OPEN and time.monotonic() < deadline:
        receive_all(puller, 1, timeout=0.05)
    assert puller.state == Puller.OPEN
    return puller


# -- the codec -------------------------------------------------------------------------------------


messages = st.lists(st.binary(max_size=700), max_size=10)


@settings(max_examples=200, deadline=None)
@given(messages, st.integers(min_value=1, max_value=300))
def test_any_split_of_the_stream_gives_the_same_messages(batch, step) -> None:
    stream = b"".join(frame(m) for m in batch)
    reader, out = FrameReader(), []
    for start in range(0, len(stream), step):
        reader.feed(stream[start:start + step], out)
    assert out == batch
    assert reader.tail == b""


def test_frames_are_short_below_256_bytes_and_long_from_there() -> None:
    assert frame(b"x" * 255)[:2] == b"\x00\xff"
    assert frame(b"x" * 256)[:9] == b"\x02" + (256).to_bytes(8, "big")


def test_commands_are_skipped_and_multipart_messages_dropped_whole() -> None:
    reader, out = FrameReader(), []
    stream = (zmtp.command(b"PING", b"\x00\x00") + b"\x01\x03one" + b"\x01\x03two" + b"\x00\x05three"
              + frame(b"kept"))
    reader.feed(stream, out)
    assert out == [b"kept"] and reader.multipart_dropped == 1


def test_an_absurd_frame_size_breaks_the_stream() -> None:
    with pytest.raises(ZmtpError, match="frame of"):
        FrameReader().feed(b"\x02" + (1 << 40).to_bytes(8, "big") + b"x", [])


def peer_opening(socket_type: bytes, version: int = 3, mechanism: bytes = b"NULL") -> bytes:
    greeting = zmtp.SIGNATURE + bytes((version, 0)) + mechanism.ljust(20, b"\x00") + b"\x00" * 32
    return greeting + zmtp.ready(socket_type)


@pytest.mark.parametrize("opening, reason", [
    (b"GET / HTTP/1.1\r\n", "bad signature"),
    (peer_opening(b"PUSH", version=2), "ZMTP 2"),
    (peer_opening(b"PUSH", mechanism=b"CURVE"), "CURVE mechanism"),
    (peer_opening(b"PUB"), "expected PUSH"),
    (zmtp.GREETING + zmtp.command(b"ERROR", b"\x06denied"), "refused us: denied"),
    (zmtp.GREETING + frame(b"data"), "message before READY"),
])
def test_a_peer_we_cannot_use_is_refused_with_the_reason(opening: bytes, reason: str) -> None:
    with pytest.raises(ZmtpError, match=reason):
        Handshake(b"PULL").feed(opening)


def test_the_handshake_hands_over_the_bytes_after_it() -> None:
    handshake = Handshake(b"PULL")
    stream = peer_opening(b"PUSH") + frame(b"first")
    assert not handshake.feed(stream[:30])
    assert handshake.feed(stream[30:])
    out: list[bytes] = []
    FrameReader().feed(handshake.rest, out)
    assert out == [b"first"]


# -- against libzmq --------------------------------------------------------------------------------


def test_a_puller_receives_what_a_libzmq_push_sends(context) -> None:
    push, spec = bound(context, zmq.PUSH)
    puller = opened(Puller(spec))
    sent = [b"short", b"x" * 300, b"y" * 70000, b""]
    for message in sent:
        push.send(message)
    assert receive_all(puller, len(sent)) == sent
    puller.close()


def test_a_multipart_message_from_libzmq_is_dropped_and_the_stream_goes_on(context) -> None:
    push, spec = bound(context, zmq.PUSH)
    puller = opened(Puller(spec))
    push.send_multipart([b"a", b"b"])
    push.send(b"after")
    assert receive_all(puller, 1) == [b"after"]
    assert puller.reader.multipart_dropped == 1


def test_a_publisher_reaches_a_libzmq_sub(context) -> None:
    sub, spec = bound(context, zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"ident")
    publisher = Publisher(spec)
    assert publisher.wait_connected(5)
    for message in (b"ident 1:5, hello", b"other 1:5, filtered", b"ident 1:6, " + b"z" * 100000):
        assert publisher.send(message)
    assert sub.poll(5000)
    assert sub.recv() == b"ident 1:5, hello"
    assert sub.poll(5000)
    assert sub.recv() == b"ident 1:6, " + b"z" * 100000
    publisher.close()


def test_a_publisher_reconnects_after_its_peer_restarts(context) -> None:
    sub, spec = bound(context, zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    publisher = Publisher(spec)
    assert publisher.wait_connected(5)
    sub.close()
    time.sleep(0.05)  # the FIN arrives
    again = context.socket(zmq.SUB)
    again.setsockopt(zmq.LINGER, 0)
    again.setsockopt(zmq.SUBSCRIBE, b"")
    rebind(again, spec)
    time.sleep(0.05)
    deadline = time.monotonic() + 5
    while not again.poll(10) and time.monotonic() < deadline:
        publisher.send(b"after the restart")
    assert again.recv() == b"after the restart"
    publisher.close()


def test_a_puller_reconnects_and_a_refusing_peer_is_waited_for(context) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = f"tcp://127.0.0.1:{port}"
    puller = Puller(spec)
    assert receive_all(puller, 1, timeout=0.3) == []  # nobody there: refused, retried, no exception
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.bind(spec)
    opened(puller)
    push.send(b"first")
    assert receive_all(puller, 1) == [b"first"]
    push.close()
    deadline = time.monotonic() + 5
    while puller.state == Puller.OPEN and time.monotonic() < deadline:  # until it reads the EOF
        receive_all(puller, 1, timeout=0.05)
    assert puller.state != Puller.OPEN
    again = context.socket(zmq.PUSH)
    again.setsockopt(zmq.LINGER, 0)
    rebind(again, spec)
    opened(puller)
    again.send(b"second")
    assert receive_all(puller, 1) == [b"second"]
    puller.close()


def test_no_peer_means_a_dropped_reply_not_a_hang() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    publisher = Publisher(f"tcp://127.0.0.1:{port}")
    started = time.monotonic()
    assert not publisher.send(b"nobody")
    assert not publisher.send(b"nobody again")  # no new attempt within the reconnect interval
    assert publisher.dropped == 2 and time.monotonic() - started < 1


def test_connecting_a_pull_to_a_pub_is_refused(context) -> None:
    _, spec = bound(context, zmq.PUB)
    with pytest.raises(ConnectFailed, match="PUB|closed|refused"):
        connect(spec, b"PULL", timeout=2)


def test_a_server_that_is_not_zeromq_is_refused() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            conn.recv(100)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(ConnectFailed, match="bad signature"):
            connect(f"tcp://127.0.0.1:{port}", b"PUB", timeout=2)


def test_a_half_closed_puller_gets_what_was_written_and_then_nothing_more(context) -> None:
    """detach(): after our SHUT_WR, libzmq drops us from its round-robin; what it
    wrote before still arrives, and every later message goes to the other peer."""
    push, spec = bound(context, zmq.PUSH)
    leaving, staying = opened(Puller(spec)), opened(Puller(spec))
    for number in range(10):
        push.send(b"before %d" % number)
    leaving.shut_down_sending()
    got_leaving: list[bytes] = []
    deadline = time.monotonic() + 5
    while leaving.state == Puller.OPEN and time.monotonic() < deadline:  # until libzmq closes its side
        got_leaving += receive_all(leaving, 100, timeout=0.05)
    assert leaving.state != Puller.OPEN, "libzmq never closed the half-closed connection"
    for number in range(10):
        push.send(b"after %d" % number)
    got_staying = receive_all(staying, 20 - len(got_leaving))
    assert sorted(got_leaving + got_staying) == sorted([b"before %d" % n for n in range(10)]
                                                       + [b"after %d" % n for n in range(10)])
    assert not any(m.startswith(b"after") for m in got_leaving)
    staying.close()
