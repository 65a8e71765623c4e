"""The WSGI app of the soak and hostile-network runs: hostapp's answer, plus uploads.

GET answers like hostapp (pid, network namespace inode, $FLEET_TEST_HOST).
POST reads the whole body (Mongrel2 hands bodies over its limits.content_length
to fleet as a temp file) and answers its length and SHA-256 too, so the client
can check every byte arrived.
"""

from __future__ import annotations

import hashlib
import json
import os

NETNS = os.stat("/proc/self/ns/net").st_ino


def application(environ, start_response):
    answer = {"pid": os.getpid(), "netns": NETNS, "host": os.environ.get("FLEET_TEST_HOST")}
    if environ["REQUEST_METHOD"] == "POST":
        digest, length = hashlib.sha256(), 0
        stream = environ["wsgi.input"]
        while chunk := stream.read(65536):
            digest.update(chunk)
            length += len(chunk)
        answer.update(length=length, sha256=digest.hexdigest())
    body = json.dumps(answer).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
