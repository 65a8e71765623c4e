"""The WSGI app of the multi-host tests: says which process and which host answered.

Namespace hosts share the hostname and /etc/machine-id, so the host is told by
the network namespace the worker lives in: the inode of /proc/self/ns/net,
which the test maps to a host (`Host.ns_inode`). $FLEET_TEST_HOST (set on the
`fleet master`/`fleet node` command) is reported too, as a cross-check.
"""

from __future__ import annotations

import json
import os

NETNS = os.stat("/proc/self/ns/net").st_ino


def application(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "netns": NETNS,
                       "host": os.environ.get("FLEET_TEST_HOST")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
