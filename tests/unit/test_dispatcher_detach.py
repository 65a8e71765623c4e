"""detach() shuts down our sending side of a connection libzmq owns, by fd;
it must do so only if the fd still is a connection to that Mongrel2."""

from __future__ import annotations

import socket

from fleet.dispatch.dispatcher import _shut_down_sending, _tcp_address


def _connected_pair() -> tuple[socket.socket, socket.socket, int]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    server, _ = listener.accept()
    listener.close()
    return client, server, port


def _peer_sees_eof(server: socket.socket) -> bool:
    server.settimeout(0.5)
    try:
        return server.recv(1) == b""
    except TimeoutError:
        return False


def test_shuts_down_sending_on_the_connection_to_that_endpoint() -> None:
    client, server, port = _connected_pair()
    with client, server:
        _shut_down_sending(client.fileno(), f"tcp://127.0.0.1:{port}")
        assert _peer_sees_eof(server)
        server.sendall(b"still readable")  # only our sending side is shut
        assert client.recv(100) == b"still readable"


def test_leaves_a_reused_fd_alone() -> None:
    client, server, port = _connected_pair()
    with client, server:
        _shut_down_sending(client.fileno(), f"tcp://127.0.0.1:{port + 1}")
        assert not _peer_sees_eof(server)


def test_tcp_address_only_for_numeric_ipv4() -> None:
    assert _tcp_address("tcp://127.0.0.1:9999") == ("127.0.0.1", 9999)
    assert _tcp_address("tcp://localhost:9999") is None
    assert _tcp_address("ipc:///run/m2") is None
