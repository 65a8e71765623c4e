"""ASGI applications served by `fleet master --interface asgi` in the tests.

`starlette_app` is a real framework app (routes, streaming, request bodies,
lifespan state); `raw` speaks ASGI by hand, for what a framework would hide
(disconnects, cancellation, protocol mistakes). Apps that record something
write to the file named by the `record` query parameter (an absolute path).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from contextlib import asynccontextmanager
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

HELLO = b"Hello world!"
STREAM_CHUNKS = 100


def _record(scope: dict, line: str) -> None:
    path = parse_qs(scope.get("query_string", b"").decode()).get("record", [None])[0]
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


# -- a Starlette app ------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: Starlette):
    yield {"started_by": f"pid {os.getpid()}"}


async def hello(request: Request) -> Response:
    return PlainTextResponse(HELLO.decode())


async def scope_view(request: Request) -> Response:
    scope = request.scope
    return JSONResponse({
        "method": scope["method"], "path": scope["path"], "raw_path": scope["raw_path"].decode("latin-1"),
        "query_string": scope["query_string"].decode("latin-1"), "http_version": scope["http_version"],
        "scheme": scope["scheme"], "client": list(scope["client"]) if scope["client"] else None,
        "server": list(scope["server"]), "root_path": scope["root_path"],
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "state": dict(scope.get("state", {})),
    })


async def echo(request: Request) -> Response:
    body = await request.body()
    return Response(body, media_type="application/octet-stream",
                    headers={"x-sha256": hashlib.sha256(body).hexdigest(), "x-length": str(len(body))})


async def stream(request: Request) -> Response:
    count = int(request.query_params.get("n", STREAM_CHUNKS))

    async def chunks():
        for number in range(count):
            yield f"chunk {number}\n".encode()
            if number % 10 == 0:
                await asyncio.sleep(0)

    return StreamingResponse(chunks(), media_type="text/plain")


async def slow(request: Request) -> Response:
    await asyncio.sleep(float(request.query_params.get("s", "1")))
    return PlainTextResponse(f"slept in {os.getpid()}")


async def background(request: Request) -> Response:
    """The response first, then work the app goes on with (Starlette's background task)."""
    record = request.query_params["record"]

    async def later() -> None:
        await asyncio.sleep(0.3)
        with open(record, "a") as out:
            out.write("ran\n")

    return PlainTextResponse("queued", background=BackgroundTask(later))


async def boom(request: Request) -> Response:
    raise RuntimeError("boom from the application")


async def ws_echo(websocket: WebSocket) -> None:
    """Echoes text and bytes; "close:CODE" closes with that code; "scope" answers with the scope."""
    subprotocols = websocket.scope["subprotocols"]
    await websocket.accept(subprotocol=subprotocols[0] if subprotocols else None)
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            text = message["text"]
            if text.startswith("close:"):
                await websocket.close(code=int(text[6:]))
                return
            if text == "scope":
                scope = websocket.scope
                await websocket.send_json({"path": scope["path"], "query": scope["query_string"].decode(),
                                           "scheme": scope["scheme"], "subprotocols": scope["subprotocols"],
                                           "pid": os.getpid()})
                continue
            await websocket.send_text(text)
        else:
            await websocket.send_bytes(message["bytes"])


_room: set[WebSocket] = set()


async def ws_broadcast(websocket: WebSocket) -> None:
    """Every text message goes to every socket in the room (of this worker process)."""
    await websocket.accept()
    _room.add(websocket)
    try:
        while True:
            text = await websocket.receive_text()
            for member in list(_room):
                try:
                    await member.send_text(text)
                except Exception:
                    _room.discard(member)
    except WebSocketDisconnect:
        pass
    finally:
        _room.discard(websocket)


async def ws_refuse(websocket: WebSocket) -> None:
    await websocket.close(code=4403)


starlette_app = Starlette(
    routes=[
        Route("/hello", hello), Route("/scope", scope_view), Route("/echo", echo, methods=["POST", "PUT"]),
        Route("/stream", stream), Route("/slow", slow), Route("/boom", boom), Route("/background", background),
        WebSocketRoute("/ws/echo", ws_echo), WebSocketRoute("/ws/broadcast", ws_broadcast),
        WebSocketRoute("/ws/refuse", ws_refuse),
    ],
    lifespan=lifespan,
)


def mounted(app):
    """Serve `app` under any Mongrel2 route prefix (/t/, /j/): the first path segment is dropped."""

    async def strip(scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            rest = scope["path"].split("/", 2)[2] if scope["path"].count("/") >= 2 else ""
            scope = dict(scope, path="/" + rest)
        await app(scope, receive, send)

    return strip


starlette_routes = mounted(starlette_app)


# -- ASGI by hand -------------------------------------------------------------------------

# /x/barrier: requests that wait for each other, by key -> (arrived, all there).
_barriers: dict[str, tuple[list[int], asyncio.Event]] = {}
BARRIER_WAIT = 30.0


async def _barrier(scope) -> tuple[int, bytes]:
    """200 once `n` requests of the same `key` are in this process at the same time; 504 if
    they never are (a worker that served them one by one would never get there)."""
    query = parse_qs(scope["query_string"].decode())
    key, wanted = query["key"][0], int(query["n"][0])
    arrived, everyone = _barriers.setdefault(key, ([0], asyncio.Event()))
    arrived[0] += 1
    if arrived[0] >= wanted:
        everyone.set()
    try:
        await asyncio.wait_for(everyone.wait(), BARRIER_WAIT)
    except TimeoutError:
        return 504, b"only %d of %d arrived" % (arrived[0], wanted)
    return 200, b"%d together in %d" % (wanted, os.getpid())



async def raw(scope, receive, send):
    """/x/hello, /x/endless (streams until the client leaves; records the cancel),
    /x/wait-disconnect (waits in receive() for http.disconnect; records it),
    /x/no-start, /x/bad-status, /x/incomplete (protocol mistakes)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    action = scope["path"].rstrip("/").rsplit("/", 1)[-1]
    if action == "barrier":
        status, body = await _barrier(scope)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})
    elif action == "ws-record":
        # A WebSocket that echoes and records how it ended (the scope type is websocket).
        await receive()
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message.get("text") or "bytes"})
        _record(scope, f"disconnect {message['code']}")
    elif action == "pid":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps({"pid": os.getpid()}).encode()})
    elif action == "hello":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": HELLO})
    elif action == "endless":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            for number in range(100_000):
                await send({"type": "http.response.body", "body": b"tick %d\n" % number, "more_body": True})
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            _record(scope, "cancelled")
            raise
        except OSError:
            _record(scope, "send failed")
            return
        await send({"type": "http.response.body", "body": b""})
    elif action == "wait-disconnect":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"waiting\n", "more_body": True})
        message = await receive()
        while message["type"] == "http.request":
            message = await receive()
        _record(scope, message["type"])
    elif action == "fail-mid-stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first part\n", "more_body": True})
        raise RuntimeError("failed half way")
    elif action == "bad-status":
        await send({"type": "http.response.start", "status": "200 OK", "headers": []})
    elif action == "incomplete":
        await send({"type": "http.response.start", "status": 200, "headers": []})
    elif action == "body-before-start":
        await send({"type": "http.response.body", "body": b"x"})
    else:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"unknown": action}).encode()})


# -- lifespan variants ------------------------------------------------------------------------


async def startup_fails(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "the database is not there"})
        return
    await raw(scope, receive, send)


async def startup_raises(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        raise ConnectionRefusedError("cannot reach the cache")
    await raw(scope, receive, send)


async def no_lifespan(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError(f"only http, not {scope['type']}")  # what Django's handler does
    await raw(scope, receive, send)


def shutdown_recorder(path: str):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.shutdown":
                    with open(path, "a") as out:
                        out.write(f"shutdown {os.getpid()}\n")
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await raw(scope, receive, send)
    return app


shutdown_recorded = shutdown_recorder(os.environ.get("FLEET_TEST_RECORD", "/dev/null"))


async def stuck(scope, receive, send):
    """/x/sleep?s=N sleeps (cancellable); /x/block?s=N blocks the whole loop (not cancellable)."""
    if scope["type"] != "http":
        return await raw(scope, receive, send)
    query = parse_qs(scope["query_string"].decode())
    seconds = float(query.get("s", ["60"])[0])
    action = scope["path"].rstrip("/").rsplit("/", 1)[-1]
    if action == "sleep":
        await asyncio.sleep(seconds)
    elif action == "block":
        time.sleep(seconds)
    else:
        return await raw(scope, receive, send)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"woke"})
