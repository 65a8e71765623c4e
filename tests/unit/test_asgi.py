"""The ASGI side's pure parts: the scope, the response cycle, lifespan, the interface checks."""

from __future__ import annotations

import asyncio

import pytest

from fleet.appload import AppLoadError, check_interface, is_async_callable
from fleet.asgi.cycle import AsgiProtocolError, ResponseCycle
from fleet.asgi.lifespan import Lifespan, LifespanFailed
from fleet.asgi.scope import NotHttp, asgi_headers, decode_path, http_scope
from fleet.asgi.sockets import WebSocketExchange
from fleet.asgi.websocket import (
    BINARY,
    CLOSE,
    CLOSED,
    CLOSING,
    CONNECTING,
    END,
    OPEN,
    PING,
    PONG,
    TEXT,
    WebSocketSession,
    accept_token,
    close_frame,
    encode_frame,
    parse_close,
    websocket_scope,
)
from fleet.config import ConfigError, Endpoint, HandlerConfig
from fleet.mongrel2.codec import Request
from fleet.wsgi.response import ResponseFramer

ENDPOINT = (Endpoint("tcp://127.0.0.1:9999", "tcp://127.0.0.1:9998"),)


def mongrel2_request(**headers) -> Request:
    base = {"METHOD": "GET", "VERSION": "HTTP/1.1", "PATH": "/app/x", "URI": "/app/x?q=1", "QUERY": "q=1",
            "PATTERN": "/app/", "REMOTE_ADDR": "10.1.2.3", "URL_SCHEME": "http", "host": "example.org:8080"}
    base.update(headers)
    return Request(b"uuid", b"42", b"/app/x", base)


# -- scope ------------------------------------------------------------------------------


def test_the_scope_has_what_asgi_asks_for() -> None:
    scope = http_scope(mongrel2_request(accept="*/*"), root_path="", state={"db": 1})
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert (scope["method"], scope["http_version"], scope["scheme"]) == ("GET", "1.1", "http")
    assert (scope["path"], scope["raw_path"], scope["query_string"]) == ("/app/x", b"/app/x", b"q=1")
    assert scope["client"] == ("10.1.2.3", 0)
    assert scope["server"] == ("example.org", 8080)
    assert (b"accept", b"*/*") in scope["headers"] and (b"host", b"example.org:8080") in scope["headers"]
    assert scope["state"] == {"db": 1}


def test_each_request_gets_its_own_copy_of_the_state() -> None:
    state = {"n": 1}
    scope = http_scope(mongrel2_request(), state=state)
    scope["state"]["n"] = 2
    assert state == {"n": 1}


def test_mongrel2_keys_and_upload_headers_never_reach_the_app() -> None:
    headers = asgi_headers({"METHOD": "GET", "x-mongrel2-upload-done": "/tmp/x", "x-real": "1",
                            "cookie": ["a=1", "b=2"]})
    assert headers == [(b"x-real", b"1"), (b"cookie", b"a=1"), (b"cookie", b"b=2")]


@pytest.mark.parametrize("raw, decoded", [
    ("/plain", "/plain"), ("/%C3%A9t%C3%A9", "/été"), ("/a%2Fb", "/a/b"), ("/bad%FF", "/bad\ufffd"),
])
def test_the_path_is_percent_and_utf8_decoded(raw: str, decoded: str) -> None:
    assert decode_path(raw) == decoded


def test_an_ipv6_host_and_a_missing_host() -> None:
    assert http_scope(mongrel2_request(host="[::1]:81"))["server"] == ("::1", 81)
    request = mongrel2_request()
    del request.headers["host"]
    assert http_scope(request)["server"] == ("localhost", 80)


@pytest.mark.parametrize("method", ["JSON", "WEBSOCKET", "WEBSOCKET_HANDSHAKE"])
def test_messages_that_are_not_http_are_refused(method: str) -> None:
    with pytest.raises(NotHttp):
        http_scope(mongrel2_request(METHOD=method))


def test_http_10_and_https() -> None:
    scope = http_scope(mongrel2_request(VERSION="HTTP/1.0", URL_SCHEME="https", host="secure.example"))
    assert (scope["http_version"], scope["scheme"], scope["server"]) == ("1.0", "https", ("secure.example", 443))


# -- the response cycle -------------------------------------------------------------------


def cycle(method: str = "GET", version: str = "HTTP/1.1", connection: str | None = None) -> ResponseCycle:
    return ResponseCycle(ResponseFramer(method=method, version=version, connection=connection))


def start(status: int = 200, headers=((b"content-type", b"text/plain"),)) -> dict:
    return {"type": "http.response.start", "status": status, "headers": list(headers)}


def test_a_one_message_body_gets_a_content_length_and_leaves_in_one_piece() -> None:
    c = cycle()
    assert c.send(start()) == b""
    out = c.send({"type": "http.response.body", "body": b"hello"})
    assert out == b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    assert c.complete and c.keep_alive and c.status == "200 OK"


def test_a_streamed_body_is_chunked() -> None:
    c = cycle()
    c.send(start())
    first = c.send({"type": "http.response.body", "body": b"ab", "more_body": True})
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked" in first
    assert first.endswith(b"\r\n\r\n2\r\nab\r\n")
    assert c.send({"type": "http.response.body", "body": b"c", "more_body": True}) == b"1\r\nc\r\n"
    assert c.send({"type": "http.response.body"}) == b"0\r\n\r\n"
    assert c.complete


def test_head_sends_no_body_but_the_length() -> None:
    c = cycle("HEAD")
    c.send(start())
    out = c.send({"type": "http.response.body", "body": b"hello"})
    assert out.endswith(b"Content-Length: 5\r\n\r\n")


def test_http_10_without_keep_alive_closes() -> None:
    c = cycle(version="HTTP/1.0")
    c.send(start())
    c.send({"type": "http.response.body", "body": b"x"})
    assert not c.keep_alive


def test_an_unknown_status_gets_a_reason() -> None:
    c = cycle()
    c.send(start(299))
    assert c.send({"type": "http.response.body"}).startswith(b"HTTP/1.1 299 Unknown\r\n")


@pytest.mark.parametrize("messages, error", [
    ([{"type": "http.response.body", "body": b"x"}], "expected http.response.start"),
    ([start(status="200")], "status must be an int"),
    ([start(status=True)], "status must be an int"),
    ([start(status=600)], "status must be an int"),
    ([start(headers=[("a", "b")])], "header names and values must be bytes"),
    ([start(headers=[b"abc"])], "headers must be (name, value) pairs"),
    ([start(), {"type": "http.response.body", "body": "text"}], "body must be bytes"),
    ([start(), start()], "expected http.response.body"),
    ([start(), {"type": "http.response.body"}, {"type": "http.response.body"}], "after the response was complete"),
    (["not a dict"], "expected http.response.start, got None"),
])
def test_protocol_mistakes_are_refused_with_a_reason(messages: list, error: str) -> None:
    c = cycle()
    with pytest.raises(AsgiProtocolError, match=error.replace("(", r"\(").replace(")", r"\)")):
        for message in messages:
            c.send(message)


# -- lifespan -----------------------------------------------------------------------------


def run(coroutine):
    return asyncio.run(coroutine)


def lifespan_app(on_startup=None, on_shutdown=None, calls=None):
    async def app(scope, receive, send):
        assert scope["type"] == "lifespan"
        message = await receive()
        if on_startup is not None:
            await on_startup(scope, send)
        else:
            scope["state"]["ready"] = True
            await send({"type": "lifespan.startup.complete"})
        message = await receive()
        assert message["type"] == "lifespan.shutdown"
        if calls is not None:
            calls.append("shutdown")
        await (on_shutdown or (lambda s: s({"type": "lifespan.shutdown.complete"})))(send)
    return app


def test_startup_fills_the_state_and_shutdown_runs() -> None:
    calls: list[str] = []

    async def scenario() -> dict:
        lifespan = Lifespan(lifespan_app(calls=calls))
        await lifespan.startup()
        await lifespan.shutdown(5)
        return lifespan.state

    assert run(scenario()) == {"ready": True}
    assert calls == ["shutdown"]


def test_startup_failed_is_a_boot_failure() -> None:
    async def fail(scope, send):
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    with pytest.raises(LifespanFailed, match="startup failed: no database"):
        run(Lifespan(lifespan_app(on_startup=fail)).startup())


def test_raising_after_the_startup_event_is_a_boot_failure() -> None:
    async def boom(scope, send):
        raise OSError("disk gone")

    with pytest.raises(LifespanFailed, match="lifespan raised OSError: disk gone"):
        run(Lifespan(lifespan_app(on_startup=boom)).startup())


def test_an_app_that_refuses_the_lifespan_scope_is_served_without_it() -> None:
    async def http_only(scope, receive, send):
        raise ValueError("Django can only handle ASGI/HTTP connections, not lifespan.")

    async def scenario() -> Lifespan:
        lifespan = Lifespan(http_only)
        await lifespan.startup()
        await lifespan.shutdown(5)  # nothing to do: no error
        return lifespan

    assert run(scenario()).supported is False


def test_a_shutdown_that_hangs_is_given_up() -> None:
    async def hang(send):
        await asyncio.sleep(3600)

    async def scenario() -> None:
        lifespan = Lifespan(lifespan_app(on_shutdown=hang))
        await lifespan.startup()
        await lifespan.shutdown(0.05)

    run(scenario())


# -- the interface checks -------------------------------------------------------------------


async def asgi_function(scope, receive, send):
    pass


class AsgiClass:
    async def __call__(self, scope, receive, send):
        pass


def wsgi_function(environ, start_response):
    return []


@pytest.mark.parametrize("app, is_async", [
    (asgi_function, True), (AsgiClass(), True), (wsgi_function, False), (AsgiClass, False),
])
def test_async_callables_are_recognised(app, is_async: bool) -> None:
    assert is_async_callable(app) is is_async


def test_the_two_conventions_are_not_mixed_up() -> None:
    with pytest.raises(AppLoadError, match="not an ASGI app"):
        check_interface(wsgi_function, "m:app", "asgi")
    with pytest.raises(AppLoadError, match="add --interface asgi"):
        check_interface(asgi_function, "m:app", "wsgi")
    check_interface(asgi_function, "m:app", "asgi")
    check_interface(wsgi_function, "m:app", "wsgi")


@pytest.mark.parametrize("changes, error", [
    ({"interface": "rsgi"}, "--interface must be one of wsgi, asgi"),
    ({"interface": "asgi", "threads": 4}, "--threads is for WSGI apps"),
    ({"interface": "asgi", "asgi_concurrency": 0}, "--asgi-concurrency must be a whole number"),
    ({"interface": "asgi", "asgi_loop": "trio"}, "--asgi-loop must be one of"),
])
def test_asgi_settings_are_checked(changes: dict, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        HandlerConfig(ENDPOINT, "app:app", **changes)


def test_asgi_settings_travel_with_the_configuration() -> None:
    config = HandlerConfig(ENDPOINT, "app:app", interface="asgi", asgi_concurrency=7, asgi_loop="asyncio")
    assert HandlerConfig.from_dict(config.to_dict()) == config


# -- WebSockets ----------------------------------------------------------------------------


def test_the_accept_token_is_rfc_6455s_example() -> None:
    assert accept_token("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size, head", [(5, b"\x81\x05"), (300, b"\x81\x7e\x01\x2c"),
                                        (70_000, b"\x81\x7f" + (70_000).to_bytes(8, "big"))])
def test_frames_use_the_shortest_length(size: int, head: bytes) -> None:
    assert encode_frame(TEXT, b"x" * size) == head + b"x" * size


def test_the_websocket_scope() -> None:
    request = mongrel2_request(METHOD="WEBSOCKET_HANDSHAKE", URL_SCHEME="https",
                               **{"sec-websocket-protocol": "chat, v2"})
    scope = websocket_scope(request, state={"a": 1})
    assert (scope["type"], scope["scheme"], scope["path"]) == ("websocket", "wss", "/app/x")
    assert scope["subprotocols"] == ["chat", "v2"] and scope["state"] == {"a": 1}


def opened(max_size: int = 100) -> WebSocketSession:
    session = WebSocketSession("ACCEPT", max_size)
    session.app_sends({"type": "websocket.accept"})
    return session


def test_accept_writes_the_101_with_the_subprotocol_and_headers() -> None:
    session = WebSocketSession("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    [out] = session.app_sends({"type": "websocket.accept", "subprotocol": "chat", "headers": [(b"x-a", b"1")]})
    assert out == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n"
                   b"x-a: 1\r\n\r\n")
    assert session.state == OPEN and session.status.startswith("101")


@pytest.mark.parametrize("ending, expected", [("app_sends", b"HTTP/1.1 403 "), ("app_returned", b"HTTP/1.1 403 "),
                                              ("app_failed", b"HTTP/1.1 500 "), ("going_away", b"HTTP/1.1 503 ")])
def test_a_handshake_never_accepted_gets_an_http_answer(ending: str, expected: bytes) -> None:
    session = WebSocketSession("ACCEPT")
    args = ({"type": "websocket.close"},) if ending == "app_sends" else ()
    out = getattr(session, ending)(*args)
    assert out[0].startswith(expected) and out[-1] is END and session.state == CLOSED


def test_text_bytes_ping_and_pong_from_the_client() -> None:
    session = opened()
    assert session.client_sends(TEXT, "héllo".encode()) == ([{"type": "websocket.receive", "text": "héllo"}], [])
    assert session.client_sends(BINARY, b"\x00") == ([{"type": "websocket.receive", "bytes": b"\x00"}], [])
    assert session.client_sends(PING, b"pp") == ([], [b"\x8a\x02pp"])
    assert session.client_sends(PONG, b"pp") == ([], [])


@pytest.mark.parametrize("opcode, payload, code", [(TEXT, b"\xff\xfe", 1007), (BINARY, b"z" * 101, 1009),
                                                   (0x3, b"", 1002)])
def test_bad_client_messages_close_with_their_code(opcode: int, payload: bytes, code: int) -> None:
    session = opened()
    events, out = session.client_sends(opcode, payload)
    assert events[0]["type"] == "websocket.disconnect" and events[0]["code"] == code
    assert out[0][:4] == b"\x88" + bytes([len(out[0]) - 2]) + code.to_bytes(2, "big") and out[-1] is END


def test_the_client_closes_and_the_close_is_echoed() -> None:
    session = opened()
    events, out = session.client_sends(CLOSE, b"\x0f\xa1bye")
    assert events == [{"type": "websocket.disconnect", "code": 4001, "reason": "bye"}]
    assert out == [close_frame(4001), END] and session.state == CLOSED


def test_the_app_closes_and_the_clients_echo_ends_it() -> None:
    session = opened()
    assert session.app_sends({"type": "websocket.close", "code": 4000, "reason": "done"}) == [close_frame(4000, "done")]
    assert session.state == CLOSING
    assert session.client_sends(TEXT, b"late") == ([], [])  # data after our close is dropped
    events, out = session.client_sends(CLOSE, b"\x0f\xa0")
    assert out == [END] and events[0]["code"] == 4000 and session.state == CLOSED


def test_sends_are_framed_and_checked() -> None:
    session = opened()
    assert session.app_sends({"type": "websocket.send", "text": "é"}) == [encode_frame(TEXT, "é".encode())]
    assert session.app_sends({"type": "websocket.send", "bytes": b"\x01"}) == [b"\x82\x01\x01"]
    with pytest.raises(AsgiProtocolError, match="exactly one of"):
        session.app_sends({"type": "websocket.send", "text": "a", "bytes": b"b"})
    with pytest.raises(AsgiProtocolError, match="expected websocket.send or websocket.close"):
        session.app_sends({"type": "websocket.accept"})


def test_a_lost_connection_is_1006_once() -> None:
    session = opened()
    assert session.client_gone() == [{"type": "websocket.disconnect", "code": 1006, "reason": ""}]
    assert session.client_gone() == []
    assert parse_close(b"") == (1005, "")


def test_accept_with_bad_headers_changes_nothing() -> None:
    session = WebSocketSession("ACCEPT")
    with pytest.raises(AsgiProtocolError, match="no CR or LF"):
        session.app_sends({"type": "websocket.accept", "headers": [(b"x", b"a\r\nb")]})
    assert session.state == CONNECTING and session.status is None


@pytest.mark.parametrize("code, echoed", [(1000, 1000), (4999, 4999), (1005, None), (1006, 1002), (999, 1002),
                                          (2999, 1002), (5000, 1002)])
def test_a_close_code_that_may_not_travel_is_answered_1002(code: int, echoed: int | None) -> None:
    session = opened()
    payload = b"" if code == 1005 else code.to_bytes(2, "big")
    _, out = session.client_sends(CLOSE, payload)
    assert out[0] == (close_frame(1000) if echoed is None else close_frame(echoed))


class FakeReply:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(data)

    def disconnect(self) -> None:
        pass


def test_sending_after_the_socket_closed_raises_an_oserror() -> None:
    async def scenario() -> None:
        ended = []

        async def end() -> None:
            ended.append(True)

        exchange = WebSocketExchange("http", mongrel2_request(), WebSocketSession("A"), FakeReply(), end)
        assert await exchange.receive() == {"type": "websocket.connect"}
        await exchange.send({"type": "websocket.accept"})
        await exchange.send({"type": "websocket.close", "code": 4000})
        with pytest.raises(OSError):
            await exchange.send({"type": "websocket.send", "text": "late"})
        await exchange.send({"type": "websocket.close"})  # closing again is no mistake
        exchange.incoming(CLOSE, b"\x0f\xa0")  # the client's echo ends it
        assert await exchange.receive() == {"type": "websocket.disconnect", "code": 4000, "reason": ""}
        await asyncio.sleep(0)
        assert ended == [True] and exchange.reply.sent[-1] == close_frame(4000)

    run(scenario())


def test_a_client_far_ahead_of_the_app_is_closed_with_1009() -> None:
    async def scenario() -> list[bytes]:
        async def end() -> None:
            pass

        exchange = WebSocketExchange("http", mongrel2_request(), WebSocketSession("A", max_size=100), FakeReply(), end)
        await exchange.send({"type": "websocket.accept"})
        for _ in range(11):
            exchange.incoming(TEXT, b"x" * 10)  # 110 bytes nobody read
        await asyncio.sleep(0)
        return exchange.reply.sent

    assert run(scenario())[-1] == close_frame(1009, "too much unread")


def test_trailers_after_the_body_are_dropped_quietly() -> None:
    c = cycle()
    c.send({**start(), "trailers": True})
    c.send({"type": "http.response.body", "body": b"x"})
    assert c.send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"1")]}) == b""


def test_a_close_the_client_never_answers_ends_the_connection_and_the_apps_wait(monkeypatch) -> None:
    monkeypatch.setattr("fleet.asgi.sockets.CLOSE_TIMEOUT", 0.05)

    async def scenario() -> tuple[dict, list]:
        ended: list[bool] = []

        async def end() -> None:
            ended.append(True)

        exchange = WebSocketExchange("http", mongrel2_request(), WebSocketSession("A"), FakeReply(), end)
        await exchange.receive()
        await exchange.send({"type": "websocket.accept"})
        exchange.going_away()  # the worker's time is up; the client stays silent
        event = await asyncio.wait_for(exchange.receive(), 5)  # the app waiting in receive() is told
        await asyncio.sleep(0.01)
        return event, ended

    event, ended = run(scenario())
    assert event == {"type": "websocket.disconnect", "code": 1001, "reason": ""} and ended == [True]
