"""The ASGI bench app: the same fixed "Hello world!" as bench/hello_app.py, in ASGI 3."""

BODY = b"Hello world!"
START = {"type": "http.response.start", "status": 200,
         "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(BODY))]}
RESPONSE = {"type": "http.response.body", "body": BODY}


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send(START)
    await send(RESPONSE)
