"""A blocking app for bench.blocking_mix: /slow waits SLOW seconds (as on a database or an
upstream call, the GIL released), anything else is the fixed "Hello world!"."""

import time

SLOW = 0.05
BODY = b"Hello world!"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def application(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        time.sleep(SLOW)
    start_response("200 OK", HEADERS)
    return [BODY]
