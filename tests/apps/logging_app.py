"""A WSGI app that logs: GET ...?tag=T&lines=N logs N lines "request T line I"
(default 1) through the standard logging module and answers {"pid": ...}.

Served with `--pythonpath tests/integration --module logging_app`; also the
app of bench/logger_bench.py, so the logger is exercised once per request.
"""

from __future__ import annotations

import json
import logging
import os
from urllib.parse import parse_qs

log = logging.getLogger("logging_app")
MAX_LINES = 10_000  # per request: a typo in a test must not flood the log


def application(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    tag = query.get("tag", ["-"])[0]
    lines = min(int(query.get("lines", ["1"])[0]), MAX_LINES)
    for number in range(lines):
        log.info("request %s line %d", tag, number)
    body = json.dumps({"pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
