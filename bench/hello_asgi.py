"""The ASGI bench app: the same fixed "Hello world!" as bench/hello_app.py, in ASGI 3,
and a WebSocket that echoes every message (bench.ws_echo)."""

BODY = b"Hello world!"
START = {"type": "http.response.start", "status": 200,
         "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(BODY))]}
RESPONSE = {"type": "http.response.body", "body": BODY}
ACCEPT = {"type": "websocket.accept"}


async def application(scope, receive, send):
    kind = scope["type"]
    if kind == "http":
        await send(START)
        await send(RESPONSE)
    elif kind == "websocket":
        await receive()  # websocket.connect
        await send(ACCEPT)
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")})
    elif kind == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
