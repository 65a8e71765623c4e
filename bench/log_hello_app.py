"""hello_app that also logs one line per request, so `--logger` is exercised (bench/logger_bench.py)."""

import logging

from hello_app import BODY, HEADERS

log = logging.getLogger("log_hello_app")


def application(environ, start_response):
    log.info("GET %s", environ.get("PATH_INFO", ""))
    start_response("200 OK", HEADERS)
    return [BODY]
